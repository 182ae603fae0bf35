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

from d3codec.models._upsample import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, NORMS, UpsamplingDecoder, num_blocks
from d3codec.models.medium import vae_widths
from d3codec.models.registry import Hparams, register_decoder

HPARAMS = ("channels", "image_size", "latent_dim", "width", "norm", "slope", "min_width")


@register_decoder("large", 1)
def large_v1(hparams: dict[str, Any]) -> nn.Module:
    """z reshaped to h x 2 x 2 (no Linear), ConvTranspose(3, 2, 1, 1) blocks, final block, Conv 3x3, tanh (D3 10 IPC)."""
    h = Hparams("large", 1, hparams, HPARAMS)
    channels = h.int("channels", hi=64)
    size = h.int("image_size", lo=MIN_IMAGE_SIZE, hi=MAX_IMAGE_SIZE)
    width = h.int("width", 1024, hi=8192)
    latent = h.int("latent_dim", 4 * width, hi=4 * 8192)
    if latent != 4 * width:
        raise h.fail(f"latent_dim must be 4 * width = {4 * width} (z is reshaped to width x 2 x 2), got {latent}; "
                     "fix hparams")
    norm = h.choice("norm", "batch", NORMS)
    slope = h.float("slope", 0.01, 0.0, 1.0)
    floor = h.int("min_width", max(1, width // 16), hi=width)
    return UpsamplingDecoder(family="large", version=1, hparams=h.resolved, channels=channels, image_size=size,
                             latent_dim=latent, widths=vae_widths(width, floor, num_blocks(size)), kernel=3,
                             use_fc=False, norm=norm, slope=slope)
