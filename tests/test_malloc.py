"""glibc malloc tuning (`d3codec._malloc`, opt-in in the CLI): it changes speed, never bytes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from d3codec._malloc import ENV, keep_freed_memory


def test_the_tuning_is_off_unless_asked_for(monkeypatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert keep_freed_memory() is False
    monkeypatch.setenv(ENV, "0")
    assert keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_an_encode_writes_the_same_bytes_with_and_without_the_tuning(tmp_path) -> None:
    files = []
    for tuned in ("0", "1"):
        out = tmp_path / f"digits-{tuned}.d3"
        env = dict(os.environ, **{ENV: tuned})
        subprocess.run([sys.executable, "-m", "d3codec", "encode", "digits", "--budget", "1ipc", "-o", str(out),
                        "--cache-dir", str(tmp_path / f"cache-{tuned}"), "--device", "cpu", "--threads", "1", "-q",
                        "--fit-steps", "30", "--iterations", "4", "--expert-epochs", "1"],
                       env=env, check=True, capture_output=True, timeout=600)
        files.append(out.read_bytes())
    assert files[0] == files[1]
