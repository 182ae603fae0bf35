"""Decoder family `large` (D3's 10-IPC decoder): `medium` without the Linear input.

z (dimension 4h) is reshaped directly to h x 2 x 2 (h = 1024), then ConvTranspose(3, 2, 1, 1)
blocks halving the width, a final block at the last width, Conv 3x3 and tanh: at 64 px 1024 ->
512 -> 256 -> 128 -> 64 -> 64, the paper's 6,308,547 parameters.

hparams: `channels`, `image_size` (required); `width` h (1024); `latent_dim` (must be 4h; default
4h); `norm` (`batch`), `slope` (0.01), `min_width` (max(1, h // 16)).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from d3codec.models._builder import upsampling_hparams, vae_widths
from d3codec.models.registry import register_decoder


@register_decoder("large", 1)
def large_v1(hparams: dict[str, Any]) -> nn.Module:
    """z reshaped to h x 2 x 2 (no Linear), ConvTranspose(3, 2, 1, 1) blocks, final block, Conv 3x3, tanh (D3 10 IPC)."""
    h = upsampling_hparams("large", 1, hparams, width=1024, slope=0.01, min_width_divisor=16, use_fc=False)
    return h.build(vae_widths(h.width, h.min_width, h.blocks), kernel=3)
