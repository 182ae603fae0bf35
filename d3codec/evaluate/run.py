"""Evaluate a `.d3` file, or an equal-bytes baseline, with the one recipe; returns a report dict."""
from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch

from d3codec.data.dataset import normalize_uint8
from d3codec.decode.dataset import D3Dataset
from d3codec.decode.decoders import check_device
from d3codec.errors import ConfigError
from d3codec.evaluate.baselines import TensorBatches, select_baseline
from d3codec.evaluate.recipe import NormalizedTest, Recipe, check_model_fits, summarize_runs, train_and_test
from d3codec.evaluate.report import storage_figures
from d3codec.format.io import load


def _test_info(test: Any) -> dict[str, Any]:
    return {"name": test.name, "images": len(test), "held_out": test.test_held_out,
            "fingerprint": test.fingerprint}


def evaluate_file(path: str, test: Any, recipe: Recipe = Recipe(), *, device: Union[str, torch.device] = "auto",
                  progress: bool = True, epoch_size: Optional[int] = None) -> dict[str, Any]:
    """Train `recipe.runs` fresh networks only on `D3Dataset(path)` batches; test on `test`.

    The file's soft labels are used where it has them. Test images are normalised with the
    file's mean and std, so both sides share one pixel space. `device` "auto" is CUDA when there
    is one, else the CPU; the report names the device that ran.
    """
    recipe.validate()
    device = check_device(device)
    d3 = load(path)
    meta = d3.metadata
    if meta.num_classes != test.num_classes or tuple(meta.image_shape) != tuple(test.image_shape):
        raise ConfigError(
            f"{path} holds {meta.num_classes} classes of {tuple(meta.image_shape)} images but the test set "
            f"{test.name} has {test.num_classes} of {tuple(test.image_shape)}; pass the dataset the file was made from"
        )
    check_model_fits(recipe.model, meta.image_shape)
    normalized = NormalizedTest(test, meta.mean, meta.std)
    results, flops = [], 0
    if recipe.steps is not None:
        epoch_size = recipe.batch_size  # one batch per "epoch"
    for run in range(recipe.runs):
        data = D3Dataset(d3, batch_size=recipe.batch_size, device=device, seed=recipe.seed + 1000 * run,
                         epoch_size=epoch_size)
        result, flops = train_and_test(recipe, run, data, meta.image_shape, meta.num_classes, normalized,
                                       device, progress)
        results.append(result)
    file_bytes = d3.file_bytes if d3.file_bytes is not None else os.path.getsize(path)
    report = {
        "kind": "d3",
        "file": path,
        "dataset": meta.name,
        "same_source": meta.fingerprint == test.fingerprint if meta.fingerprint else None,
        "labels": d3.labels.kind,
        "test": _test_info(test),
        "recipe": recipe.as_dict(),
        "device": str(device),
        "storage": storage_figures(file_bytes, meta.num_classes, tuple(meta.image_shape)),
    }
    if d3.budget is not None:
        report["storage"]["budget_bytes"] = d3.budget.bytes
    report.update(summarize_runs(results, flops))
    return report


def evaluate_baseline(codec: str, train: Any, test: Any, budget_bytes: int, recipe: Recipe = Recipe(), *,
                      quality: Optional[int] = None, device: Union[str, torch.device] = "auto",
                      progress: bool = True) -> dict[str, Any]:
    """Random real images of `train` fitting `budget_bytes` under `codec`, hard labels, same recipe."""
    recipe.validate()
    device = check_device(device)
    if train.fingerprint != test.fingerprint or train.num_classes != test.num_classes:
        raise ConfigError(f"--train {train.name} and --test {test.name} are different datasets; "
                          "give the same dataset to both (its train and test splits are used)")
    check_model_fits(recipe.model, train.image_shape)
    chosen = select_baseline(train, budget_bytes, codec, quality=quality, seed=recipe.seed)
    images = normalize_uint8(chosen.images, train.mean, train.std, device)
    labels = torch.from_numpy(chosen.labels).to(device)
    normalized = NormalizedTest(test, train.mean, train.std)
    results, flops = [], 0
    for run in range(recipe.runs):
        batches = TensorBatches(images, labels, recipe.batch_size, seed=recipe.seed + 1000 * run,
                                one_batch=recipe.steps is not None)
        result, flops = train_and_test(recipe, run, batches, train.image_shape, train.num_classes, normalized,
                                       device, progress)
        results.append(result)
    counts = chosen.per_class(train.num_classes)
    storage = storage_figures(chosen.bytes_used, train.num_classes, train.image_shape)
    storage.update(budget_bytes=budget_bytes, images=len(chosen.labels),
                   images_per_class_min=min(counts), images_per_class_max=max(counts),
                   images_per_class_mean=len(chosen.labels) / train.num_classes)
    report = {
        "kind": "baseline",
        "baseline": codec,
        "quality": chosen.quality,
        "dataset": train.name,
        "labels": "hard",
        "test": _test_info(test),
        "recipe": recipe.as_dict(),
        "device": str(device),
        "storage": storage,
    }
    report.update(summarize_runs(results, flops))
    return report
