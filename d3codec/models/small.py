"""Decoder family `small` (D3's 1-IPC decoder): Linear(z -> 4k), k x 2 x 2, ConvTranspose(4, 2, 1) blocks.

Block widths halve from k down to a floor of k/8: at 64 px, k=256: 256 -> 128 -> 64 -> 32 -> 32
-> 32 (five blocks, 2 -> 64 px), then Conv 3x3 to C channels and tanh; with z=64 that is the
paper's 789,187 parameters (BatchNorm on each block's output).

hparams: `channels`, `image_size`, `latent_dim` (required); `width` k (256), `norm` (`batch`),
`slope` LeakyReLU slope (0.2), `min_width` floor of the halving (max(1, k // 8)).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from d3codec.models._builder import upsampling_hparams
from d3codec.models.registry import register_decoder


@register_decoder("small", 1)
def small_v1(hparams: dict[str, Any]) -> nn.Module:
    """Linear input, ConvTranspose(4, 2, 1) blocks halving k to k/8, Conv 3x3, tanh (D3 1 IPC)."""
    h = upsampling_hparams("small", 1, hparams, width=256, slope=0.2, min_width_divisor=8, use_fc=True)
    widths = [h.width] + [max(h.min_width, h.width >> i) for i in range(1, h.blocks + 1)]
    return h.build(widths, kernel=4)
