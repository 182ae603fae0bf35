"""Progress in a log: a line with count and ETA when stderr is not a terminal, tqdm when it is."""
from __future__ import annotations

import io
import re

import torch

from d3codec.distill.classifier import train_classifier
from d3codec.progress import Progress, format_duration


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_lines_with_count_percent_and_eta() -> None:
    out = io.StringIO()
    with Progress(4, "fit", unit="it", interval=0, stream=out) as bar:
        for _ in range(3):
            bar.update()
        bar.set_postfix(loss="0.25")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("fit: 0/4 it (0.0%)")
    assert lines[1].startswith("fit: 1/4 it (25.0%)") and "ETA " in lines[1]
    assert lines[-1].startswith("fit: 3/4 it (75.0%)") and lines[-1].endswith("loss 0.25")
    assert all(re.search(r"elapsed \d+s", line) for line in lines)


def test_lines_come_at_most_once_per_interval_plus_start_and_end() -> None:
    out = io.StringIO()
    with Progress(1000, "cache", unit="img", interval=3600, stream=out) as bar:
        for _ in range(1000):
            bar.update()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("cache: 1,000/1,000 img (100.0%)") and "ETA" not in lines[-1]


def test_quiet_writes_nothing_and_a_terminal_gets_a_bar_not_lines() -> None:
    quiet = io.StringIO()
    with Progress(5, "fit", enabled=False, interval=0, stream=quiet) as bar:
        bar.update(5)
    assert quiet.getvalue() == ""
    tty = _Terminal()
    with Progress(5, "fit", interval=0, stream=tty) as bar:
        bar.update(5)
    drawn = tty.getvalue()
    assert "\rfit:" in drawn and "it/s]" in drawn and "(100.0%)" not in drawn  # tqdm's bar, no log line


def test_a_resumed_count_starts_at_initial_and_rates_count_only_new_work() -> None:
    bar = Progress(10, "distil", initial=6, interval=0, stream=io.StringIO())
    assert bar.line().startswith("distil: 6/10 it (60.0%)") and "it/s" not in bar.line()


def test_durations_read_as_seconds_minutes_hours() -> None:
    assert [format_duration(s) for s in (4.4, 185, 7450)] == ["4s", "3m05s", "2h04m"]


def test_training_writes_progress_lines_to_a_non_terminal_stderr(monkeypatch, capsys) -> None:
    monkeypatch.setenv("D3CODEC_PROGRESS_INTERVAL", "0")
    model = torch.nn.Linear(4, 2)
    batches = [(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(8, dtype=torch.int64))]
    train_classifier(model, batches, epochs=3, generator=torch.Generator().manual_seed(0), desc="expert 0")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("expert 0: 0/3 ep") and err[-1].startswith("expert 0: 3/3 ep (100.0%)")
    assert "loss " in err[-1]
    train_classifier(model, batches, epochs=2, generator=torch.Generator().manual_seed(0), progress=False)
    assert capsys.readouterr().err == ""


def test_long_epochs_count_steps_so_a_log_hears_from_inside_an_epoch(monkeypatch, capsys) -> None:
    monkeypatch.setenv("D3CODEC_PROGRESS_INTERVAL", "0")
    model = torch.nn.Linear(4, 2)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 4, generator=g), torch.zeros(8, dtype=torch.int64)) for _ in range(5)]
    train_classifier(model, batches, epochs=2, generator=torch.Generator().manual_seed(0), desc="expert 0")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("expert 0 (2 ep): 0/10 step")
    assert any(line.startswith("expert 0 (2 ep): 3/10 step (30.0%)") for line in err)  # mid-epoch
    assert err[-1].startswith("expert 0 (2 ep): 10/10 step (100.0%)")
