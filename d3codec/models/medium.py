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

from d3codec.models._upsample import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, NORMS, UpsamplingDecoder, num_blocks
from d3codec.models.registry import Hparams, register_decoder

HPARAMS = ("channels", "image_size", "latent_dim", "width", "norm", "slope", "min_width")


def vae_widths(width: int, floor: int, blocks: int) -> list[int]:
    """Feature-map widths: `blocks` maps halving from `width` (not below `floor`), the last repeated."""
    main = [max(floor, width >> i) for i in range(blocks)]
    return main + [main[-1]]


@register_decoder("medium", 1)
def medium_v1(hparams: dict[str, Any]) -> nn.Module:
    """Linear input, ConvTranspose(3, 2, 1, 1) blocks halving from h, a final block, Conv 3x3, tanh (D3 2 IPC)."""
    h = Hparams("medium", 1, hparams, HPARAMS)
    channels = h.int("channels", hi=64)
    size = h.int("image_size", lo=MIN_IMAGE_SIZE, hi=MAX_IMAGE_SIZE)
    latent = h.int("latent_dim")
    width = h.int("width", 512, hi=8192)
    norm = h.choice("norm", "batch", NORMS)
    slope = h.float("slope", 0.01, 0.0, 1.0)
    floor = h.int("min_width", max(1, width // 16), hi=width)
    return UpsamplingDecoder(family="medium", version=1, hparams=h.resolved, channels=channels, image_size=size,
                             latent_dim=latent, widths=vae_widths(width, floor, num_blocks(size)), kernel=3,
                             use_fc=True, norm=norm, slope=slope)
