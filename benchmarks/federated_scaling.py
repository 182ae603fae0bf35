"""Federated scaling: wall time of `--subtasks K` (K = 1, 2, 4) on a fixed small dataset, run
serially (one process) and with 2 local processes (`--nproc 2`), and the speed-up of the latter.

Each configuration runs from a fresh cache (experts and teacher trained inside the timing), at
fixed tiny settings, and the serial and 2-process files are checked to be byte-identical. Figures
are ratios against the serial run of the same K, measured in the same run.

    python benchmarks/federated_scaling.py [--classes 16 --per-class 40 --size 16 --iterations 20]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np


def _dataset(path: str, classes: int, per_class: int, size: int) -> str:
    """A learnable npz dataset: per-class base colour plus noise (deterministic)."""
    rng = np.random.default_rng(0)
    base = rng.integers(30, 220, (classes, 1, 1, 3))
    x = np.clip(base.repeat(per_class, 0) + rng.integers(-30, 30, (classes * per_class, size, size, 3)), 0, 255)
    y = np.arange(classes).repeat(per_class)
    np.savez(path, x=x.astype(np.uint8), y=y)
    return path


def _run(npz: str, root: str, subtasks: int, nproc: int, iterations: int) -> tuple[float, bytes]:
    from d3codec.encode.api import EncodeOptions
    from d3codec.encode.federated import encode_federated
    from d3codec.encode.merge import DataSpec

    cache = os.path.join(root, f"cache-k{subtasks}-p{nproc}")
    data = DataSpec.of(npz, cache_dir=cache)
    data.open("train")  # build the data cache outside the timing
    out = os.path.join(root, f"k{subtasks}-p{nproc}.d3")
    options = EncodeOptions(iterations=iterations, num_experts=1, expert_epochs=2, quiet=True)
    start = time.perf_counter()
    encode_federated(data, "10ipc", out, options, subtasks=subtasks, nproc=nproc)
    wall = time.perf_counter() - start
    with open(out, "rb") as f:
        return wall, f.read()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=16)
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--subtasks", default="1,2,4")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        npz = _dataset(os.path.join(root, "data.npz"), args.classes, args.per_class, args.size)
        print(f"dataset: {args.classes} classes x {args.per_class} images, {args.size}x{args.size} RGB; budget 10ipc; "
              f"{args.iterations} iterations, 1 expert x 2 epochs per subtask; {os.cpu_count()} CPUs")
        print(f"{'K':>3} {'serial s':>9} {'2 proc s':>9} {'speed-up':>9}  identical")
        for k in (int(v) for v in args.subtasks.split(",")):
            serial, a = _run(npz, root, k, 1, args.iterations)
            parallel, b = _run(npz, root, k, 2, args.iterations)
            print(f"{k:>3} {serial:>9.1f} {parallel:>9.1f} {serial / parallel:>8.2f}x  {a == b}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
