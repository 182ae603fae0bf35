"""Baseline table: random real images at equal bytes (uint8, PNG, JPEG q90, WebP q90), trained
with the evaluation recipe, final test accuracy. Ratios are against the uint8 baseline measured
in the same run.

    python benchmarks/baselines.py --dataset mnist --data-dir ../shared/data/mnist \
        --ipc 1 2 10 --steps 100 --batch 128 --runs 1 --out runs/baselines_mnist.jsonl

The number of epochs of each row is ceil(steps / batches per epoch), so every row trains for
about the same number of optimiser steps (a fixed compute budget; stated in the output).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from d3codec.data import open_dataset  # noqa: E402
from d3codec.evaluate import Recipe, evaluate_baseline, select_baseline  # noqa: E402
from d3codec.format.budget import parse_budget  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir")
    p.add_argument("--cache-dir")
    p.add_argument("--ipc", type=float, nargs="+", default=[1, 2, 10])
    p.add_argument("--codecs", nargs="+", default=["random", "png", "jpeg", "webp"])
    p.add_argument("--steps", type=int, default=100, help="optimiser steps per run (about)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--model", default="convnet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="append one JSON line per row here")
    args = p.parse_args()

    train = open_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
    test = open_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir, split="test")
    print(f"# {train.name}: {len(train)} train / {len(test)} test images"
          + (" (test held out of the training split)" if test.test_held_out else " (official test split)"),
          flush=True)
    print(f"# recipe: {args.model}, SGD lr 0.01 momentum 0.9 wd 5e-4, /10 halfway, DSA, batch {args.batch}, "
          f"~{args.steps} steps, {args.runs} run(s), final accuracy", flush=True)
    print("| budget | codec | bytes used | images/class | epochs | accuracy (%) | vs uint8 |", flush=True)
    print("|---|---|---|---|---|---|---|", flush=True)
    for ipc in args.ipc:
        budget = parse_budget(f"{ipc:g}ipc", train.num_classes, train.image_shape).bytes
        reference = None
        for codec in args.codecs:
            n = len(select_baseline(train, budget, codec, seed=args.seed).labels)
            batch = min(args.batch, n)
            epochs = max(1, math.ceil(args.steps / math.ceil(n / batch)))
            recipe = Recipe(model=args.model, epochs=epochs, runs=args.runs, batch_size=batch, seed=args.seed)
            report = evaluate_baseline(codec, train, test, budget, recipe, device=args.device)
            report["storage"]["budget_spec"] = f"{ipc:g}ipc"
            acc = report["accuracy"]
            if codec == "random":
                reference = acc["mean"]
            ratio = f"{acc['mean'] / reference:.2f}x" if reference else "-"
            sto = report["storage"]
            print(f"| {ipc:g} ipc ({budget:,} B) | {codec}{' q' + str(report['quality']) if report['quality'] else ''} "
                  f"| {sto['bytes']:,} | {sto['images_per_class_mean']:.1f} | {epochs} "
                  f"| {100 * acc['mean']:.2f} +- {100 * acc['std']:.2f} | {ratio} |", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(report, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
