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

from d3codec.models._upsample import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, NORMS, UpsamplingDecoder, num_blocks
from d3codec.models.registry import Hparams, register_decoder

HPARAMS = ("channels", "image_size", "latent_dim", "width", "norm", "slope", "min_width")


@register_decoder("small", 1)
def small_v1(hparams: dict[str, Any]) -> nn.Module:
    """Linear input, ConvTranspose(4, 2, 1) blocks halving k to k/8, Conv 3x3, tanh (D3 1 IPC)."""
    h = Hparams("small", 1, hparams, HPARAMS)
    channels = h.int("channels", hi=64)
    size = h.int("image_size", lo=MIN_IMAGE_SIZE, hi=MAX_IMAGE_SIZE)
    latent = h.int("latent_dim")
    width = h.int("width", 256, hi=8192)
    norm = h.choice("norm", "batch", NORMS)
    slope = h.float("slope", 0.2, 0.0, 1.0)
    floor = h.int("min_width", max(1, width // 8), hi=width)
    widths = [width] + [max(floor, width >> i) for i in range(1, num_blocks(size) + 1)]
    return UpsamplingDecoder(family="small", version=1, hparams=h.resolved, channels=channels, image_size=size,
                             latent_dim=latent, widths=widths, kernel=4, use_fc=True, norm=norm, slope=slope)
