"""What fresh random draws each epoch are worth, against one epoch's draws repeated.

Trains `d3codec eval`'s recipe (ConvNet, SGD momentum 0.9, lr / 10 halfway, DSA, batch 256,
final test accuracy) on a `.d3` file twice per seed, with the same network initialisation and
augmentation draws: once with `D3Dataset`'s epochs as a plain `for epoch ...: for x, y in ds:`
loop now gets them (a fresh epoch of draws every pass), once with every pass pinned to epoch 0
(what that loop got before each iteration advanced the epoch). An epoch is the file's default
round: every component's mean image once and one random draw of it.

    python benchmarks/fresh_draws.py FILE --test DATASET --data-dir DIR --epochs 30 --seeds 0 1
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any, Iterable

import torch

from d3codec.data import open_dataset
from d3codec.decode import D3Dataset
from d3codec.evaluate.recipe import NormalizedTest, Recipe, train_and_test
from d3codec.format.io import load


def _epochs(ds: D3Dataset, repeated: bool) -> Any:
    """A batch source for `train_classifier`: epoch e of the stream, or epoch 0 every time."""

    def source(epoch: int) -> Iterable[Any]:
        ds.set_epoch(0 if repeated else epoch)
        return ds

    return source


def run(path: str, test_spec: str, data_dir: str, epochs: int, seeds: list[int]) -> list[dict[str, Any]]:
    d3 = load(path)
    meta = d3.metadata
    test = NormalizedTest(open_dataset(test_spec, data_dir=data_dir, split="test", progress=False),
                          meta.mean, meta.std)
    rows = []
    for seed in seeds:
        recipe = Recipe(epochs=epochs, runs=1, seed=seed)
        row: dict[str, Any] = {"file": path, "seed": seed, "epochs": epochs}
        for mode in ("fresh", "repeated"):
            ds = D3Dataset(d3, batch_size=recipe.batch_size, device="cpu", seed=recipe.seed)
            started = time.perf_counter()
            result, _ = train_and_test(recipe, 0, _epochs(ds, mode == "repeated"), meta.image_shape,
                                       meta.num_classes, test, "cpu", progress=False)
            row[mode] = round(100 * result.accuracy, 2)
            row[f"{mode}_steps"] = result.train.steps
            row[f"{mode}_s"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--test", required=True, help="dataset whose test split is scored (as for d3codec eval)")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.file, args.test, args.data_dir, args.epochs, args.seeds)
    fresh = sum(r["fresh"] for r in rows) / len(rows)
    repeated = sum(r["repeated"] for r in rows) / len(rows)
    print(f"{args.file}: {args.epochs} epochs of {rows[0]['fresh_steps'] // args.epochs} steps, seeds {args.seeds}: "
          f"fresh draws {fresh:.2f}%, repeated draws {repeated:.2f}% ({fresh - repeated:+.2f} points)")


if __name__ == "__main__":
    main()
