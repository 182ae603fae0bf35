"""The two distillation objectives as functions of explicit networks and tensors.

The `Distiller` draws what an update uses from its one generator (the expert and its epochs, the
decoded samples, the real images, the augmentation parameters, batches and seeds) and calls:

- `feature_mmd`: MMD between a feature network's features of each class's synthetic and real images;
- `trajectory_loss`: trajectory matching (MTT): SGD of a student on the synthetic images from one
  expert epoch, its normalised distance to a later epoch of the same expert.

Expert networks are given as a module (the architecture) and a flat parameter vector (an epoch).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call

from d3codec.distill.mmd import DEFAULT_SIGMAS, grouped_mmd
from d3codec.distill.unroll import UnrollResult, trajectory_match
from d3codec.models.convnet import param_shapes, unflatten_params

#: `augment(images, seed) -> images`: a seeded, differentiable augmentation.
Augment = Callable[[torch.Tensor, int], torch.Tensor]


def named_params(net: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """`net`'s parameters by name, as views of the flat vector `flat` (for `functional_call`)."""
    return unflatten_params(flat, param_shapes(net))


class FeatureView(nn.Module):
    """Wraps a network so that `forward` is its `features` (for `functional_call`)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


def feature_params(net: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """The parameters of `FeatureView(net)` from `net`'s flat vector `flat`."""
    return {f"net.{k}": v for k, v in named_params(net, flat).items()}


def feature_mmd(features: FeatureView, params: dict[str, torch.Tensor], syn: torch.Tensor, real: torch.Tensor,
                per_class: int, real_counts: Sequence[int], sigmas: Sequence[float] = DEFAULT_SIGMAS) -> torch.Tensor:
    """The MMD objective of one batch of classes: the sum over its classes of MMD^2 between the
    features (`functional_call(features, params, ...)`) of the class's `per_class` synthetic images
    (`syn`, class-major) and of its `real_counts[i]` real images (`real`, class-major, no gradient).
    Classes with under 2 real images add nothing (see `mmd.grouped_mmd`)."""
    fs = functional_call(features, params, (syn,))
    with torch.no_grad():
        fr = functional_call(features, params, (real,))
    return grouped_mmd(fs, fr, per_class, real_counts, sigmas)


def trajectory_loss(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, start: torch.Tensor,
                    target: torch.Tensor, lr: torch.Tensor, batches: Sequence[torch.Tensor], *,
                    augment: Optional[Augment] = None, seeds: Sequence[int] = (), method: str = "exact",
                    ) -> UnrollResult:
    """The MTT objective: `len(batches)` SGD steps of `net` (parameters: flat vectors) from `start`
    with step size `lr`, step i on cross-entropy of `images[batches[i]]` (augmented by
    `augment(x, seeds[i])` when given) against their `labels`; the loss is
    ||w_N - target||^2 / ||start - target||^2 (`unroll.trajectory_match`).

    `images` must be a leaf that requires grad: its `.grad` receives d loss / d images; the result
    holds the loss and d loss / d lr.
    """
    if augment is not None and len(seeds) != len(batches):
        raise ValueError(f"trajectory_loss needs one augmentation seed per step: {len(batches)} steps, {len(seeds)} seeds")

    def step_loss(w: torch.Tensor, i: int) -> torch.Tensor:
        idx = batches[i]
        x = images[idx] if augment is None else augment(images[idx], seeds[i])
        logits = functional_call(net, named_params(net, w), (x,))
        return nn.functional.cross_entropy(logits, labels[idx])

    return trajectory_match(step_loss, [images], start, target, lr, len(batches), method)
