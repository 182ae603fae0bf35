"""Does a second core pay more as a second thread or as a second process? Training steps of the
64 px small decoder (the fit) and of ConvNet-D4 (experts, evaluation) as one process at 1 thread,
one process at 2 threads, and 2 one-thread processes side by side (what `encode --subtasks 2
--nproc 2` runs), each in fresh processes with the CLI's allocator setting (huge pages). Prints
images per second and each setting's throughput against one process at 1 thread, in the same run.

    python benchmarks/process_scaling.py [--steps 6]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _train_step import STEP

CHILD = r"""
import json, sys, time
import torch
TASK, threads, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
CONVNET_BATCH = 256
""" + STEP + r"""
step()
t = time.perf_counter()
for _ in range(steps):
    step()
print(json.dumps({"images_per_s": 256 * steps / (time.perf_counter() - t)}))
"""


def _launch(task: str, threads: int, steps: int) -> subprocess.Popen:
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE=os.environ.get("THP_MEM_ALLOC_ENABLE", "1"), OMP_NUM_THREADS=str(threads))
    return subprocess.Popen([sys.executable, "-c", CHILD, task, str(threads), str(steps)], env=env,
                            stdout=subprocess.PIPE, text=True)


def throughput(task: str, processes: int, threads: int, steps: int) -> float:
    """Images per second of `processes` side-by-side processes of `threads` threads each, summed."""
    procs = [_launch(task, threads, steps) for _ in range(processes)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a {task} child failed")
    return sum(json.loads(o.strip().splitlines()[-1])["images_per_s"] for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, torch {__import__('torch').__version__}, {args.steps} steps after one warm-up\n")
    print("| step (64 px, batch 256) | setting | images/s | against 1 process x 1 thread |")
    print("|---|---|---|---|")
    for task, name in [("decoder", "small decoder w128 fit"), ("convnet", "ConvNet-D4 train")]:
        base = throughput(task, 1, 1, args.steps)
        for processes, threads in ((1, 1), (1, 2), (2, 1)):
            r = base if (processes, threads) == (1, 1) else throughput(task, processes, threads, args.steps)
            print(f"| {name} | {processes} process(es) x {threads} thread(s) | {r:.1f} | {r / base:.2f}x |")


if __name__ == "__main__":
    main()
