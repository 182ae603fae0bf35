"""Decoder family `medium` (D3's 2-IPC decoder): Linear(z -> 4h), h x 2 x 2, ConvTranspose(3, 2, 1, 1) blocks.

The VAE decoder of the reference: widths halve from h (512) per block, then one final block at
the last width: at 64 px 512 -> 256 -> 128 -> 64 -> 32 -> 32; at 32 px 512 -> 256 -> 128 -> 64
-> 64. Then Conv 3x3 to C channels and tanh. At 64 px with z=2048 that is the paper's 5,774,691
parameters.

hparams: `channels`, `image_size`, `latent_dim` (required); `width` h (512), `norm` (`batch`),
`slope` LeakyReLU slope (0.01, torch's default, as the reference), `min_width` (max(1, h // 16)).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from d3codec.models._builder import upsampling_hparams, vae_widths
from d3codec.models.registry import register_decoder


@register_decoder("medium", 1)
def medium_v1(hparams: dict[str, Any]) -> nn.Module:
    """Linear input, ConvTranspose(3, 2, 1, 1) blocks halving from h, a final block, Conv 3x3, tanh (D3 2 IPC)."""
    h = upsampling_hparams("medium", 1, hparams, width=512, slope=0.01, min_width_divisor=16, use_fc=True)
    return h.build(vae_widths(h.width, h.min_width, h.blocks), kernel=3)
