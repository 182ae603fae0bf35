"""Where a federated file loses accuracy: train a student on FILE exactly as `d3codec eval --steps 300
--runs 1 --seed S` does, then split its test errors into those within a subtask's classes and those
across subtasks (contiguous groups), with per-class accuracy and the prediction histogram (JSON).

    python benchmarks/federated_gap.py FILE --seed S [--groups 2] [--dataset cifar10 --data-dir DIR]
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch

import d3codec.evaluate.recipe as recipe_module
from d3codec.data import open_dataset
from d3codec.evaluate.recipe import Recipe
from d3codec.evaluate.run import evaluate_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--groups", type=int, default=2, help="subtasks of the contiguous split")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--data-dir")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)

    seen: dict[str, np.ndarray] = {}

    def predictions(model: torch.nn.Module, test: Any, device: Any) -> float:
        """The eval's test pass (as `evaluate_accuracy`), keeping its predictions."""
        was_training = model.training
        model.eval()
        preds, labels = [], []
        with torch.no_grad():
            for s in range(0, len(test), 1024):
                idx = list(range(s, min(len(test), s + 1024)))
                preds.append(model(test.batch(idx, device)).argmax(1))
                labels.append(test.label_tensor(idx, device))
        model.train(was_training)
        seen["p"], seen["y"] = torch.cat(preds).cpu().numpy(), torch.cat(labels).cpu().numpy()
        return float((seen["p"] == seen["y"]).mean())

    recipe_module.evaluate_accuracy = predictions  # in place of the eval's own test pass, not beside it
    test = open_dataset(args.dataset, data_dir=args.data_dir, split="test", progress=False)
    evaluate_file(args.file, test, Recipe(steps=args.steps, runs=1, seed=args.seed), device="cpu", progress=False)
    p, y, n = seen["p"], seen["y"], test.num_classes
    group = lambda c: c * args.groups // n  # noqa: E731
    wrong = p != y
    across = wrong & (group(p) != group(y))
    confusion = np.zeros((n, n), int)
    np.add.at(confusion, (y, p), 1)
    print(json.dumps({"file": args.file, "seed": args.seed, "acc": float((~wrong).mean()),
                      "within_err": float((wrong & ~across).mean()), "cross_err": float(across.mean()),
                      "per_class": (confusion.diagonal() / confusion.sum(1)).round(3).tolist(),
                      "pred_hist": confusion.sum(0).tolist()}))


if __name__ == "__main__":
    main()
