"""Fixtures for decode tests: decodable `.d3` files of every family, covariance kind, dtype and label kind."""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from d3codec.format.testing import random_d3
from d3codec.format.types import D3File, DecoderEntry, Stored
from d3codec.models import build_decoder, export_state


def _store(value: torch.Tensor, dtype: str) -> Stored:
    if not value.is_floating_point():
        return Stored.encode(value, "I64")
    if dtype in ("I8", "U8"):
        axis = 0 if value.dim() >= 2 else None
        return Stored.encode(value, dtype, axis=axis)
    return Stored.encode(value, dtype)


def build_file(family: str = "small", *, kind: str = "diag", dtype: str = "F32", labels: str = "hard",
               decoders: int = 1, num_classes: int = 4, k: int = 2, image_shape: tuple[int, int, int] = (3, 16, 16),
               dim: int = 8, width: int = 8, mixture: bool = False, norm: str = "batch", seed: int = 0) -> D3File:
    """A valid, decodable file: random priors/labels (`random_d3`) and real decoders with random weights
    and non-trivial BatchNorm statistics, every tensor stored in `dtype`."""
    if family == "large":
        width = dim // 4
    d3 = random_d3(seed, num_classes=num_classes, image_shape=image_shape, latents_per_class=k, dim=dim, kind=kind,
                   mixture=mixture, decoders=decoders, labels=labels, dtype=dtype, per_channel=True)
    g = torch.Generator().manual_seed(seed + 100)
    hp = {"channels": image_shape[0], "image_size": image_shape[1], "latent_dim": dim, "width": width, "norm": norm}
    entries = []
    for i, old in enumerate(d3.decoders):
        torch.manual_seed(seed * 1000 + i)
        module = build_decoder(family, 1, hp)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.05)
        weights = {name: _store(v, dtype) for name, v in export_state(module).items()}
        entries.append(DecoderEntry(family, 1, dict(hp), old.classes, weights))
    return d3.replace(decoders=entries)


@pytest.fixture
def make_d3() -> Callable[..., D3File]:
    """`make_d3(family, kind=..., dtype=..., labels=..., decoders=..., ...)` -> a decodable D3File."""
    return build_file
