"""Federated scaling: wall time of `--subtasks K` (K = 1, 2, 4) on a fixed small dataset, serial
against 2 local processes (`--nproc 2`), and the speed-up of the latter.

Three runs per K, each from a fresh cache (experts and teacher trained inside the timing):
- serial, 1 thread: the federated serial run as users get it (every federated process computes
  with one intra-op thread); the 2-process file must equal it byte for byte;
- serial, N threads (`--serial-threads`, default 2): the same run in one process with N intra-op
  threads, i.e. the same total thread count as 2 processes x 1 thread (its bytes differ: thread
  count changes float sums, which is why federated runs pin one thread);
- 2 processes x 1 thread. With more processes than subtasks (K = 1) the second process trains
  half of the subtask's experts (and the teacher), so `--experts 2` lets K = 1 gain too.
Figures are ratios against the serial runs of the same K, measured in the same invocation.
The spawned processes import d3codec afresh: in a working tree others edit, run from a frozen copy
(`git archive HEAD | tar -x -C SNAP; PYTHONPATH=SNAP python SNAP/benchmarks/...`) or the 2-process
runs may use newer code than the serial ones (different bytes, different times).

    python benchmarks/federated_scaling.py [--classes 16 --per-class 250 --size 16 --iterations 60
                                            --experts 2 --expert-epochs 3 --subtasks 1,2,4]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from typing import Iterator

import numpy as np


def _dataset(path: str, classes: int, per_class: int, size: int) -> str:
    """A learnable npz dataset: per-class base colour plus noise (deterministic)."""
    rng = np.random.default_rng(0)
    base = rng.integers(30, 220, (classes, 1, 1, 3))
    x = np.clip(base.repeat(per_class, 0) + rng.integers(-30, 30, (classes * per_class, size, size, 3)), 0, 255)
    y = np.arange(classes).repeat(per_class)
    np.savez(path, x=x.astype(np.uint8), y=y)
    return path


@contextlib.contextmanager
def _pinned_threads(n: int) -> Iterator[None]:
    """Make the federated code's one-thread pin (`single_thread`) pin `n` threads instead, in this
    process only (spawned processes are unaffected): the serial baseline at n threads."""
    import torch

    from d3codec.distill import merge
    from d3codec.distill.federated import run, sharing

    @contextlib.contextmanager
    def threads() -> Iterator[None]:
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(old)

    modules = (run, sharing, merge)  # every module that pins the thread count
    saved = [m.single_thread for m in modules]
    for m in modules:
        m.single_thread = threads
    try:
        yield
    finally:
        for m, pin in zip(modules, saved):
            m.single_thread = pin


def _run(npz: str, root: str, name: str, subtasks: int, nproc: int, args: argparse.Namespace) -> tuple[float, bytes]:
    from d3codec.distill.api import EncodeOptions
    from d3codec.distill.federated import encode_federated
    from d3codec.distill.merge import DataSpec

    cache = os.path.join(root, f"cache-k{subtasks}-{name}")
    data = DataSpec.of(npz, cache_dir=cache)
    data.open("train")  # build the data cache outside the timing
    out = os.path.join(root, f"k{subtasks}-{name}.d3")
    options = EncodeOptions(iterations=args.iterations, num_experts=args.experts, expert_epochs=args.expert_epochs,
                            cache_dir=cache, quiet=True)
    start = time.perf_counter()
    encode_federated(data, args.budget, out, options, subtasks=subtasks, nproc=nproc)
    wall = time.perf_counter() - start
    with open(out, "rb") as f:
        return wall, f.read()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=16)
    ap.add_argument("--per-class", type=int, default=250)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--budget", default="10ipc")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--experts", type=int, default=2, help="experts per subtask")
    ap.add_argument("--expert-epochs", type=int, default=3)
    ap.add_argument("--serial-threads", type=int, default=2, help="threads of the second serial baseline (0: skip it)")
    ap.add_argument("--subtasks", default="1,2,4")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        npz = _dataset(os.path.join(root, "data.npz"), args.classes, args.per_class, args.size)
        t = args.serial_threads
        print(f"dataset: {args.classes} classes x {args.per_class} images, {args.size}x{args.size} RGB; budget "
              f"{args.budget}; {args.iterations} iterations, {args.experts} experts x {args.expert_epochs} epochs "
              f"per subtask; {os.cpu_count()} CPUs; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        extra = (f" {f'serial {t}t':>10}", f" {f'vs {t}t':>7}") if t > 0 else ("", "")
        print(f"{'K':>3} {'serial 1t':>10}{extra[0]} {'2 proc':>8} {'vs 1t':>7}{extra[1]}  identical")
        for k in (int(v) for v in args.subtasks.split(",")):
            serial, a = _run(npz, root, "serial", k, 1, args)
            serial_t = float("nan")
            if t > 0:
                with _pinned_threads(t):
                    serial_t, _ = _run(npz, root, f"serial{t}t", k, 1, args)
            parallel, b = _run(npz, root, "nproc2", k, 2, args)
            cols = (f" {serial_t:>9.1f}s", f" {serial_t / parallel:>6.2f}x") if t > 0 else ("", "")
            print(f"{k:>3} {serial:>9.1f}s{cols[0]} {parallel:>7.1f}s {serial / parallel:>6.2f}x{cols[1]}  {a == b}",
                  flush=True)
        print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    sys.exit(main())
