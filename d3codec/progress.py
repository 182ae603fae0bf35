"""Progress of long work: a tqdm bar on a terminal, a plain line every 30 s or so in a log.

    with Progress(total=steps, desc="fit", unit="it", enabled=not quiet) as bar:
        for ...:
            bar.update()

When stderr is not a terminal (a batch job's log), the bar writes `desc: 120/4000 it (3.0%),
1.2 it/s, elapsed 1m40s, ETA 53m53s` at the start, every `interval` seconds (default 30, or the
`D3CODEC_PROGRESS_INTERVAL` environment variable) and when the work ends. `enabled=False` (the
CLI's `-q`) silences both forms.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional, TextIO

from tqdm import tqdm

#: Seconds between log lines when stderr is not a terminal.
DEFAULT_INTERVAL = 30.0


def _interval() -> float:
    text = os.environ.get("D3CODEC_PROGRESS_INTERVAL")
    try:
        return max(0.0, float(text)) if text else DEFAULT_INTERVAL
    except ValueError:
        return DEFAULT_INTERVAL


def format_duration(seconds: float) -> str:
    """`45s`, `3m05s`, `2h04m`: short and sortable by eye."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"


class Progress:
    """Counts work done out of `total` (None when unknown) and reports it as the stream allows."""

    def __init__(self, total: Optional[int], desc: str, unit: str = "it", *, enabled: bool = True,
                 initial: int = 0, interval: Optional[float] = None, stream: Optional[TextIO] = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.count = self._start_count = initial
        self.stream = stream if stream is not None else sys.stderr
        self.interval = _interval() if interval is None else interval
        self.postfix = ""
        self._started = self._last = time.monotonic()
        self._closed = False
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar: Optional[tqdm] = None
        self._lines = enabled and not tty
        if enabled and tty:
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, leave=False,
                             dynamic_ncols=True)
        if self._lines:
            self._write()

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._lines and time.monotonic() - self._last >= self.interval:
            self._write()

    def set_postfix(self, **values: Any) -> None:
        """Figures shown after the count (a loss, say): on the bar now, in the next log line."""
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def line(self) -> str:
        """The log line for the current count."""
        elapsed = time.monotonic() - self._started
        done = self.count - self._start_count
        parts = [f"{self.desc}: {self.count:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.count / self.total:.1f}%)"
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            if rate >= 100:
                parts.append(f"{rate:,.0f} {self.unit}/s")
            else:
                parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}")
        parts.append(f"elapsed {format_duration(elapsed)}")
        if self.total and done > 0 and self.count < self.total:
            parts.append(f"ETA {format_duration(elapsed / done * (self.total - self.count))}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _write(self) -> None:
        self._last = time.monotonic()
        print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._lines:
            self._write()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
