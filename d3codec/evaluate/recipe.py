"""The evaluation recipe: which network, how long, and how to train and test it.

Every evaluation in d3codec (a `.d3` file, or a baseline at equal bytes) trains fresh networks with
this one recipe: SGD (momentum 0.9, weight decay 5e-4), lr divided by 10 halfway, DSA, batch 256,
and reports the FINAL test accuracy of each run (never the best one seen), mean and std over runs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from d3codec._seed import derive_seed
from d3codec.data.dataset import normalize_uint8
from d3codec.distill.classifier import (TrainResult, default_augment, evaluate_accuracy,
                                      train_classifier)
from d3codec.errors import ConfigError
from d3codec.models.convnet import ConvNet, init_params
from d3codec.models.resnet import ResNet18

MODELS = ("convnet", "resnet18")


@dataclass(frozen=True)
class Recipe:
    """How every evaluated network is trained."""

    model: str = "convnet"
    epochs: int = 300
    runs: int = 3
    steps: Optional[int] = None  # train for exactly this many SGD steps (an "epoch" is then one batch)
    lr: float = 0.01
    batch_size: int = 256
    augment: bool = True
    seed: int = 0

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(f"unknown --model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.epochs < 1 or self.runs < 1 or self.batch_size < 1 or (self.steps is not None and self.steps < 1):
            raise ConfigError("--epochs, --steps, --runs and --batch must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")

    @property
    def schedule_epochs(self) -> int:
        """Epochs the optimiser runs: `steps` one-batch epochs, or `epochs`."""
        return self.steps if self.steps is not None else self.epochs

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.steps is not None:
            d["epochs"] = self.steps
            d["epoch"] = "one batch"
        d.update(optimizer="SGD momentum 0.9, weight decay 5e-4", lr_schedule="/10 at epoch epochs//2",
                 augmentation="DSA color_crop_cutout_flip_scale_rotate" if self.augment else "none",
                 reported="final accuracy after the last epoch (no selection on test data)")
        return d


def check_model_fits(name: str, image_shape: Sequence[int]) -> None:
    """Refuse a network whose last stage would see 1 x 1 feature maps: ResNet-18 halves the image 3
    times, and its instance norm over a single pixel per channel outputs only its bias (torch refuses it)."""
    if name != "resnet18":
        return
    h, w = image_shape[-2:]
    side = min(h, w)
    for _ in range(3):  # stride-2 stages
        side = (side + 1) // 2
    if side < 2:
        raise ConfigError(f"--model resnet18 needs images of at least 9 x 9 pixels, these are {h} x {w} "
                          "(its last stage would normalise one pixel per channel); use --model convnet")


def build_model(name: str, image_shape: Sequence[int], num_classes: int, generator: torch.Generator) -> nn.Module:
    """A freshly initialised evaluation network (ConvNet with depth from resolution, or ResNet-18)."""
    c, h, w = image_shape
    check_model_fits(name, image_shape)
    if name == "convnet":
        model: nn.Module = ConvNet(c, num_classes, (h, w))
    elif name == "resnet18":
        model = ResNet18(c, num_classes)
    else:
        raise ConfigError(f"unknown --model {name!r}; choose one of {', '.join(MODELS)}")
    return init_params(model, generator)


def forward_flops(model: nn.Module, image_shape: Sequence[int]) -> int:
    """Approximate FLOPs of one forward pass of one image (2 x MACs of convolutions and linears)."""
    macs = [0]

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * (module.in_channels // module.groups)
            macs[0] += output.numel() * k
        elif isinstance(module, nn.Linear):
            macs[0] += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            param = next(model.parameters())
            model(torch.zeros(1, *image_shape, device=param.device, dtype=param.dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return 2 * macs[0]


class NormalizedTest:
    """A test split normalised with given mean/std (the file's), for `evaluate_accuracy`."""

    def __init__(self, dataset: Any, mean: Sequence[float], std: Sequence[float]) -> None:
        self.dataset, self.mean, self.std = dataset, tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices: Any, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        return normalize_uint8(self.dataset.uint8(indices), self.mean, self.std, device)

    def label_tensor(self, indices: Any, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        return self.dataset.label_tensor(indices, device)


@dataclass
class RunResult:
    """One trained network: its final test accuracy and what training cost."""

    accuracy: float
    train: TrainResult


def train_and_test(recipe: Recipe, run: int, batches: Union[Iterable[Any], Callable[[int], Iterable[Any]]],
                   image_shape: Sequence[int], num_classes: int, test: Any,
                   device: Union[str, torch.device], progress: bool = True) -> tuple[RunResult, int]:
    """Train run `run` of `recipe` on `batches`; returns its result and forward FLOPs per image."""
    model = build_model(recipe.model, image_shape, num_classes,
                        torch.Generator().manual_seed(derive_seed(recipe.seed, run, "init"))).to(device)
    flops = forward_flops(model, image_shape)
    result = train_classifier(
        model, batches, epochs=recipe.schedule_epochs, lr=recipe.lr, momentum=0.9, weight_decay=5e-4, lr_decay=True,
        augment=default_augment() if recipe.augment else None,
        generator=lambda e: torch.Generator().manual_seed(derive_seed(recipe.seed, run, e, "augment")),
        progress=progress, desc=f"eval run {run + 1}/{recipe.runs}")
    return RunResult(evaluate_accuracy(model, test, device), result), flops


def summarize_runs(results: list[RunResult], flops_per_image: int) -> dict[str, Any]:
    """Accuracy (mean, std over runs, each run) and compute (images seen, steps, time, FLOPs)."""
    accs = np.array([r.accuracy for r in results], dtype=np.float64)
    seen = [r.train.images_seen for r in results]
    return {
        "accuracy": {"mean": float(accs.mean()), "std": float(accs.std()), "runs": accs.tolist()},
        "compute": {
            "images_seen_per_run": int(np.mean(seen)),
            "optimizer_steps_per_run": int(np.mean([r.train.steps for r in results])),
            "train_seconds_per_run": float(np.mean([r.train.wall_time_s for r in results])),
            "forward_flops_per_image": int(flops_per_image),
            "train_flops_per_run_estimate": int(3 * flops_per_image * np.mean(seen)),
        },
    }
