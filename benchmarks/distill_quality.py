"""Distillation quality: test accuracy of encoded files beside equal-bytes baselines, same run.

Variants (ablations) encode the same dataset at the same budget with one change each:
`default` (planner: int8 weights and latents, `--labels auto`, fit to real images first), `f16` / `f32`
(decoder weights and latents stored in fp16 / fp32: fewer parameters and components fit), `soft` /
`hard` (the teacher's soft labels / each component's class), `random-init` (no reconstruction fit: the objective starts from random latents). Every file and every
baseline is evaluated with the same recipe (`d3codec.evaluate`), and accuracies are also given as
ratios to the uint8 random-real baseline measured in the same run.

    python benchmarks/distill_quality.py --dataset mnist --data-dir ../shared/data/mnist --budget 1ipc \
        --variants default f16 f32 soft hard random-init --baselines random png jpeg webp --steps 300 --runs 1
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

VARIANTS = {
    "default": {},
    "f16": {"weight_dtype": "F16", "latent_dtype": "F16"},
    "f32": {"weight_dtype": "F32", "latent_dtype": "F32"},
    "soft": {"labels": "soft"},
    "hard": {"labels": "hard"},
    "random-init": {"fit_steps": 0},
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-dir")
    ap.add_argument("--budget", default="1ipc")
    ap.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS))
    ap.add_argument("--baselines", nargs="*", default=["random"], choices=["random", "png", "jpeg", "webp"])
    ap.add_argument("--iterations", type=int, help="distillation iterations (default: the CPU default)")
    ap.add_argument("--objective", default="auto")
    ap.add_argument("--fit-steps", type=int, help="reconstruction iterations (default: the CPU default)")
    ap.add_argument("--epochs", type=int, default=300, help="evaluation epochs")
    ap.add_argument("--steps", type=int, help="evaluation SGD steps (instead of --epochs; equal for files and baselines)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir")
    ap.add_argument("--out-dir", help="keep the encoded files here (default: a temporary folder)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from d3codec.data import open_dataset
    from d3codec.distill.api import EncodeOptions, encode
    from d3codec.evaluate import Recipe, evaluate_baseline, evaluate_file
    from d3codec.format.budget import parse_budget

    torch.set_num_threads(args.threads)
    train = open_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir, progress=False)
    test = open_dataset(args.dataset, data_dir=args.data_dir, split="test", cache_dir=args.cache_dir, progress=False)
    recipe = Recipe(epochs=args.epochs, steps=args.steps, runs=args.runs, seed=args.seed)
    nbytes = parse_budget(args.budget, train.num_classes, train.image_shape).bytes
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="d3quality")
    rows = []
    for name in args.baselines:
        t0 = time.perf_counter()
        rep = evaluate_baseline(name, train, test, nbytes, recipe, progress=False)
        rows.append({"what": f"baseline {name}", "accuracy": rep["accuracy"]["mean"], "bytes": nbytes,
                     "encode_s": 0.0, "eval_s": time.perf_counter() - t0})
    for name in args.variants:
        path = os.path.join(out_dir, f"{args.dataset}-{args.budget}-{name}.d3")
        variant = dict(VARIANTS[name])
        variant.setdefault("fit_steps", args.fit_steps)
        opts = EncodeOptions(objective=args.objective, iterations=args.iterations, seed=args.seed,
                             cache_dir=args.cache_dir, quiet=True, **variant)
        t0 = time.perf_counter()
        d3 = encode(train, args.budget, path, opts)
        t1 = time.perf_counter()
        rep = evaluate_file(path, test, recipe, progress=False)
        rows.append({"what": f"d3 {name}", "accuracy": rep["accuracy"]["mean"], "bytes": d3.file_bytes,
                     "encode_s": t1 - t0, "eval_s": time.perf_counter() - t1,
                     "params": sum(s.raw.numel() for s in d3.decoders[0].weights.values())})
    base = next((r["accuracy"] for r in rows if r["what"] == "baseline random"), None)
    for r in rows:
        r["vs_uint8"] = r["accuracy"] / base if base else None
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    length = f"{args.steps} steps" if args.steps else f"{args.epochs} epochs"
    print(f"{args.dataset} at {args.budget} = {nbytes:,} bytes; eval: {length} x {args.runs} run(s)")
    print(f"{'what':18} {'accuracy':>9} {'x uint8':>8} {'bytes':>8} {'encode s':>9}")
    for r in rows:
        ratio = f"{r['vs_uint8']:.3f}" if r["vs_uint8"] else "-"
        print(f"{r['what']:18} {100 * r['accuracy']:8.2f}% {ratio:>8} {r['bytes']:8,} {r['encode_s']:9.0f}")


if __name__ == "__main__":
    main()
