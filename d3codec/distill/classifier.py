"""The classifier training loop shared by experts and evaluation: SGD, step decay, DSA, soft targets.

`train_classifier(model, batches, epochs=..., generator=...)` runs plain supervised training on
any source of `(images, labels)` batches already on the device: labels are int64 class ids
(cross-entropy) or [B, classes] probabilities (soft cross-entropy). Everything random (the
augmentation) is drawn from the given generator, so a seed fixes the result on CPU.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from d3codec.augment import DSA
from d3codec.progress import Progress

Batch = tuple[torch.Tensor, torch.Tensor]
#: Batches of one epoch: an iterable re-iterated every epoch, or a function epoch -> iterable.
BatchSource = Union[Iterable[Batch], Callable[[int], Iterable[Batch]]]
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class TrainResult:
    """What a training run did: optimiser steps, images seen, time, last epoch's mean loss."""

    epochs: int
    steps: int
    images_seen: int
    wall_time_s: float
    final_loss: float


def default_augment() -> Augment:
    """The DSA of the literature (`d3codec.augment.DSA`, color_crop_cutout_flip_scale_rotate)."""
    return DSA()


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against probability targets [B, classes] (or int64 ids [B])."""
    if targets.dtype == torch.int64 or targets.dim() == 1:
        return F.cross_entropy(logits, targets)
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def lr_at(epoch: int, epochs: int, lr: float, decay: bool = True) -> float:
    """Learning rate of `epoch` (0-based): divided by 10 from the halfway epoch on."""
    return lr * 0.1 if decay and epochs >= 2 and epoch >= epochs // 2 else lr


def make_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.SGD:
    """The SGD optimiser of the recipe."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def _epoch_batches(batches: BatchSource, epoch: int) -> Iterable[Batch]:
    if callable(batches) and not hasattr(batches, "__iter__"):
        return batches(epoch)
    if hasattr(batches, "set_epoch"):
        batches.set_epoch(epoch)  # type: ignore[union-attr]
    return batches  # type: ignore[return-value]


def train_classifier(model: nn.Module, batches: BatchSource, *, epochs: int,
                     generator: Union[torch.Generator, Callable[[int], torch.Generator]],
                     lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
                     lr_decay: bool = True, augment: Optional[Augment] = None,
                     optimizer: Optional[torch.optim.SGD] = None, start_epoch: int = 0,
                     on_epoch_end: Optional[Callable[[int, nn.Module, torch.optim.SGD, float], Any]] = None,
                     progress: bool = True, desc: str = "training",
                     steps_per_epoch: Optional[int] = None) -> TrainResult:
    """Train `model` for epochs `start_epoch..epochs-1`; returns counts, time and the final loss.

    `augment(x, generator)` (e.g. DSA) is applied to every batch; `generator` may be a function
    epoch -> generator, so an epoch's draws do not depend on earlier epochs (resumable runs).
    `optimizer` and `start_epoch` resume an interrupted run; `on_epoch_end(epoch, model,
    optimizer, loss)` runs after each epoch (experts save their trajectory there). Progress counts
    steps where an epoch has several (`steps_per_epoch`, else `len(batches)`), else epochs. The
    model is left in eval mode.
    """
    if epochs < 0 or start_epoch < 0:
        raise ValueError("epochs and start_epoch must be non-negative")
    opt = optimizer or make_optimizer(model, lr, momentum, weight_decay)
    steps = seen = 0
    loss_mean = float("nan")
    started = time.perf_counter()
    if steps_per_epoch is None and hasattr(batches, "__len__") and not callable(batches):
        steps_per_epoch = len(batches)  # type: ignore[arg-type]
    # Long epochs (an expert's pass over a large set) count steps, so a log line comes every 30 s.
    per_step = steps_per_epoch is not None and steps_per_epoch > 1
    unit, scale = ("step", steps_per_epoch) if per_step else ("ep", 1)
    label = f"{desc} ({epochs} ep)" if per_step else desc
    with Progress(epochs * scale, label, unit=unit, enabled=progress, initial=start_epoch * scale) as bar:
        for epoch in range(start_epoch, epochs):
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch, epochs, lr, lr_decay)
            gen = generator(epoch) if callable(generator) else generator
            model.train()
            total, count = torch.zeros(()), 0
            for x, y in _epoch_batches(batches, epoch):
                if augment is not None:
                    x = augment(x, gen)
                loss = soft_cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach().cpu() * len(x)
                count += len(x)
                steps += 1
                if per_step:
                    bar.update()
            seen += count
            if count == 0:
                raise ValueError("the batch source yielded no batches for an epoch")
            loss_mean = float(total) / count
            bar.set_postfix(loss=f"{loss_mean:.3f}")
            if not per_step:
                bar.update()
            if on_epoch_end is not None:
                on_epoch_end(epoch, model, opt, loss_mean)
    model.eval()
    return TrainResult(epochs=epochs - start_epoch, steps=steps, images_seen=seen,
                       wall_time_s=time.perf_counter() - started, final_loss=loss_mean)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, dataset: Any, device: Union[str, torch.device] = "cpu",
                      batch_size: int = 1024) -> float:
    """Top-1 accuracy of `model` on every image of an `ImageDataset` (labels in its label space)."""
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    was_training = model.training
    model.eval()
    correct = 0
    for s in range(0, n, batch_size):
        idx = list(range(s, min(n, s + batch_size)))
        pred = model(dataset.batch(idx, device)).argmax(dim=1)
        correct += int((pred == dataset.label_tensor(idx, device)).sum())
    model.train(was_training)
    return correct / n
