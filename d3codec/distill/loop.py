"""Run a `Distiller` to the end: progress per phase, periodic and Ctrl-C checkpoints, exact resume.

The checkpoint (`<output>.ckpt`) records the plan and settings; `--resume` refuses one made with
other settings, so a resumed run continues to the very file an uninterrupted run writes.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any, Optional

from d3codec.distill.checkpoint import load_checkpoint, save_checkpoint
from d3codec.distill.distiller import Distiller
from d3codec.distill.planner import Plan
from d3codec.errors import ConfigError
from d3codec.progress import Progress


def _identity(distiller: Distiller, plan: Plan) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed: plan, settings, data."""
    return json.loads(json.dumps({"plan": plan.to_json(), "config": distiller.config.to_json(),
                                  "fingerprint": distiller.metadata.fingerprint,
                                  "classes": list(distiller.real.classes)}))


def save_state(distiller: Distiller, path: str, plan: Plan) -> None:
    """Checkpoint `distiller` to `path` atomically."""
    tensors, meta = distiller.state_tensors()
    meta["identity"] = _identity(distiller, plan)
    save_checkpoint(path, tensors, meta)


def restore_state(distiller: Distiller, path: str, plan: Plan) -> None:
    """Load a checkpoint into `distiller`, refusing one made with other settings."""
    tensors, meta = load_checkpoint(path)
    if meta.get("identity") != _identity(distiller, plan):
        raise ConfigError(f"checkpoint {path} was made with other settings, data or budget; "
                          "rerun with the same options, or without --resume to start over")
    distiller.load_state(tensors, meta)


def run_loop(distiller: Distiller, checkpoint: str, plan: Plan, *, resume: bool = False,
             checkpoint_every: int = 100, quiet: bool = False,
             seconds: Optional[dict[str, float]] = None) -> None:
    """Iterate to `config.total_iterations` (the fit, then the objective), checkpointing every
    `checkpoint_every` and on Ctrl-C. `seconds`, when given, gets each phase's wall time (`fit`,
    `objective`) added to it."""
    total = distiller.config.total_iterations
    if resume:
        if os.path.isfile(checkpoint):
            restore_state(distiller, checkpoint, plan)
            if not quiet:
                print(f"resuming from iteration {distiller.iteration} of {total} ({checkpoint})", file=sys.stderr)
        elif not quiet:
            print(f"no checkpoint at {checkpoint}: starting from the beginning", file=sys.stderr)
    fit = distiller.config.fit_iterations
    phases = [("fit", 0, fit), (f"objective {distiller.config.objective}", fit, total)]
    with _DeferredInterrupt() as stop:
        for desc, first, last in phases:
            if distiller.iteration >= last:
                continue
            started = time.perf_counter()
            if desc == "fit":
                distiller.prepare_fit()  # the PCA start (half a minute at 64 px) stays out of the fit's rate
            with Progress(last - first, desc, unit="it", enabled=not quiet,
                          initial=distiller.iteration - first) as bar:
                while distiller.iteration < last:
                    losses = distiller.step()
                    bar.set_postfix(**{k: f"{v:.4g}" for k, v in losses.items()})
                    bar.update()
                    if stop.requested:
                        save_state(distiller, checkpoint, plan)
                        bar.close()
                        print(f"interrupted at iteration {distiller.iteration}: checkpoint saved to {checkpoint}; "
                              "rerun with --resume to continue", file=sys.stderr)
                        raise KeyboardInterrupt
                    if (checkpoint_every > 0 and distiller.iteration % checkpoint_every == 0
                            and distiller.iteration < total):
                        save_state(distiller, checkpoint, plan)
            if seconds is not None:
                key = desc.split()[0]
                seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - started


class _DeferredInterrupt:
    """While active, the first Ctrl-C only sets `requested` (the current iteration finishes, so the
    checkpoint is a consistent state); a second one interrupts at once. Main thread only."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "_DeferredInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
