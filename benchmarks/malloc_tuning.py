"""What the allocator settings buy: training steps of the 64 px small decoder and of the ConvNet-D4
evaluator, each in a fresh process with glibc's and torch's defaults, with transparent huge pages
for torch's large tensors (`THP_MEM_ALLOC_ENABLE=1`, `d3codec._malloc.use_huge_pages`) and with
freed memory kept in the process (`D3CODEC_MALLOC_TUNING=1`, `keep_freed_memory`), in the same run.
Prints wall, user and system seconds, minor page faults and peak RSS, and each ratio to the default.

    python benchmarks/malloc_tuning.py [--steps 10] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _train_step import STEP

CHILD = r"""
import json, resource, sys, time
from d3codec._malloc import keep_freed_memory
keep_freed_memory()
import torch
torch.set_num_threads(int(sys.argv[2]))
TASK, CONVNET_BATCH = sys.argv[1], 128
""" + STEP + r"""
step()
r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(int(sys.argv[3])):
    step()
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall": time.perf_counter() - t, "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime,
                  "minflt": r1.ru_minflt - r0.ru_minflt, "maxrss_mb": r1.ru_maxrss / 1024}))
"""


MODES = {"default": {"D3CODEC_MALLOC_TUNING": "0", "THP_MEM_ALLOC_ENABLE": "0"},
         "huge pages": {"D3CODEC_MALLOC_TUNING": "0", "THP_MEM_ALLOC_ENABLE": "1"},
         "kept": {"D3CODEC_MALLOC_TUNING": "1", "THP_MEM_ALLOC_ENABLE": "0"}}


def run(task: str, mode: str, threads: int, steps: int) -> dict:
    env = dict(os.environ, **MODES[mode])
    out = subprocess.run([sys.executable, "-c", CHILD, task, str(threads), str(steps)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    print("| step (64 px) | allocator | wall s | user s | sys s | minor faults | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for task, name in [("decoder", "small decoder w128 fit, batch 256"), ("convnet", "ConvNet-D4 train, batch 128")]:
        runs = {mode: run(task, mode, args.threads, args.steps) for mode in MODES}
        base = runs["default"]
        for mode, r in runs.items():
            ratio = "" if mode == "default" else (f" (default / this: wall {base['wall'] / r['wall']:.2f}x, "
                                                  f"RSS {base['maxrss_mb'] / r['maxrss_mb']:.2f}x)")
            print(f"| {name} x{args.steps} | {mode}{ratio} | {r['wall']:.1f} | {r['user']:.1f} | {r['sys']:.1f} | "
                  f"{r['minflt']:,} | {r['maxrss_mb']:.0f} |")

if __name__ == "__main__":
    main()
