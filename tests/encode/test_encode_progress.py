"""A batch job's log shows where an encode is: every long step writes progress lines off a terminal."""
from __future__ import annotations

import re

import numpy as np
from click.testing import CliRunner

from d3codec.cli import cli


def _many_classes(path, classes: int = 50, per_class: int = 6, size: int = 16) -> str:
    """A generated many-class set: class c's images share a colour and a stripe, plus noise."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(classes), per_class)
    base = rng.integers(0, 256, size=(classes, 1, 1, 3))
    x = np.clip(base[y] + rng.normal(0, 20, size=(len(y), size, size, 3)), 0, 255).astype(np.uint8)
    for c in range(classes):
        x[y == c, c % size, :, :] = 255
    np.savez(path, x=x, y=y)
    return str(path)


def _encode(tmp_path, data: str, *extra: str):
    args = ["encode", data, "--budget", "1ipc", "-o", str(tmp_path / "out.d3"), "--cache-dir", str(tmp_path / "cache"),
            "--device", "cpu", "--iterations", "2", "--fit-steps", "3", "--experts", "1", "--expert-epochs", "1",
            "--threads", "1", *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_an_encode_off_a_terminal_writes_start_and_end_lines_for_every_long_step(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("D3CODEC_PROGRESS_INTERVAL", "3600")  # only the start and end lines
    res = _encode(tmp_path, _many_classes(tmp_path / "many.npz"))
    assert res.exit_code == 0, res.output
    err = res.stderr
    for step, unit, total in [("decoding many.npz", "img", 300), ("expert 0", "ep", 1), ("fit", "it", 3),
                              ("objective mmd", "it", 2)]:
        start = re.search(rf"^{re.escape(step)}: 0/{total:,} {unit} \(0\.0%\), elapsed", err, re.M)
        end = re.search(rf"^{re.escape(step)}: {total:,}/{total:,} {unit} \(100\.0%\), [^\n]*elapsed \d+s", err, re.M)
        assert start and end, f"no start/end progress line for {step!r} in:\n{err}"
    assert "\r" not in err  # no tqdm bar redraws in a log


def test_quiet_encode_writes_no_progress(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("D3CODEC_PROGRESS_INTERVAL", "0")
    res = _encode(tmp_path, _many_classes(tmp_path / "many.npz", classes=10), "-q")
    assert res.exit_code == 0, res.output
    assert not re.search(r"^(fit|objective|expert|decoding)\b.*elapsed", res.stderr, re.M), res.stderr
