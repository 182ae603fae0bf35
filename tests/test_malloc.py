"""Allocator settings (`d3codec._malloc`: huge pages by default in the CLI, the glibc tuning opt-in):
they change speed, never bytes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from d3codec._malloc import ENV, THP_ENV, keep_freed_memory, use_huge_pages


def test_the_tuning_is_off_unless_asked_for(monkeypatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert keep_freed_memory() is False
    monkeypatch.setenv(ENV, "0")
    assert keep_freed_memory() is False


def test_huge_pages_are_asked_for_before_torch_loads_unless_the_user_chose(monkeypatch) -> None:
    code = ("import os, sys; from d3codec._malloc import use_huge_pages; r = use_huge_pages(); "
            "print(r, os.environ.get('THP_MEM_ALLOC_ENABLE'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != THP_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    expected = "True 1 False" if sys.platform.startswith("linux") else "False None False"
    assert out.split("\n")[0] == expected
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, **{THP_ENV: "0"}), capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith("False 0")                      # the user's setting stands
    import torch  # noqa: F401

    monkeypatch.delenv(THP_ENV, raising=False)
    assert use_huge_pages() is False and THP_ENV not in os.environ   # torch is loaded: too late to ask


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_an_encode_writes_the_same_bytes_whatever_the_allocator_settings(tmp_path) -> None:
    files = []
    for tuned, thp in (("0", "0"), ("0", None), ("1", "0")):   # None: the CLI's default (huge pages)
        out = tmp_path / f"digits-{tuned}-{thp}.d3"
        env = {k: v for k, v in os.environ.items() if k != THP_ENV}
        env.update({ENV: tuned, **({THP_ENV: thp} if thp else {})})
        subprocess.run([sys.executable, "-m", "d3codec", "encode", "digits", "--budget", "1ipc", "-o", str(out),
                        "--cache-dir", str(tmp_path / f"cache-{tuned}-{thp}"), "--device", "cpu", "--threads", "1", "-q",
                        "--fit-steps", "30", "--iterations", "4", "--expert-epochs", "1"],
                       env=env, check=True, capture_output=True, timeout=600)
        files.append(out.read_bytes())
    assert files[0] == files[1] == files[2]
