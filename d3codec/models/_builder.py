"""The one builder the upsampling families share: read and check their common hparams, then build.

`small`, `medium` and `large` take the same hyper-parameters (`channels`, `image_size`,
`latent_dim`, `width`, `norm`, `slope`, `min_width`) and differ only in their defaults, their
block widths, kernel, and whether a Linear maps z to the first map. A family file reads
`upsampling_hparams(...)` with its defaults, chooses the widths (`vae_widths` for `medium` and
`large`), and calls `UpsamplingHparams.build`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from d3codec.models._upsample import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, NORMS, UpsamplingDecoder, num_blocks
from d3codec.models.registry import Hparams

#: The hyper-parameters every upsampling family accepts.
HPARAMS = ("channels", "image_size", "latent_dim", "width", "norm", "slope", "min_width")
#: Largest `width` (channels of the first map) a family accepts.
MAX_WIDTH = 8192


@dataclass(frozen=True)
class UpsamplingHparams:
    """A family's checked hyper-parameters (`use_fc`: a Linear maps z to the first map);
    `blocks` is the number of upsampling blocks `image_size` needs."""

    family: str
    version: int
    resolved: dict[str, Any]
    channels: int
    image_size: int
    latent_dim: int
    width: int
    norm: str
    slope: float
    min_width: int
    use_fc: bool

    @property
    def blocks(self) -> int:
        return num_blocks(self.image_size)

    def build(self, widths: Sequence[int], *, kernel: int) -> UpsamplingDecoder:
        """The decoder with these hparams and the family's block `widths` and `kernel`."""
        return UpsamplingDecoder(family=self.family, version=self.version, hparams=self.resolved,
                                 channels=self.channels, image_size=self.image_size, latent_dim=self.latent_dim,
                                 widths=widths, kernel=kernel, use_fc=self.use_fc, norm=self.norm, slope=self.slope)


def vae_widths(width: int, floor: int, blocks: int) -> list[int]:
    """The `medium` and `large` widths: `blocks` maps halving from `width` (not below `floor`), the last repeated."""
    main = [max(floor, width >> i) for i in range(blocks)]
    return main + [main[-1]]


def upsampling_hparams(family: str, version: int, hparams: Mapping[str, Any], *, width: int, slope: float,
                       min_width_divisor: int, use_fc: bool) -> UpsamplingHparams:
    """Check `hparams` for an upsampling family with default `width`, `slope` and `min_width`
    (max(1, width // min_width_divisor)); every problem is a `DecoderHparamsError`.

    With `use_fc` a Linear maps z to the first map and `latent_dim` is required; without it z is
    reshaped to width x 2 x 2, so `latent_dim` defaults to, and must equal, 4 * width.
    """
    h = Hparams(family, version, hparams, HPARAMS)
    channels = h.int("channels", hi=64)
    size = h.int("image_size", lo=MIN_IMAGE_SIZE, hi=MAX_IMAGE_SIZE)
    if use_fc:
        latent = h.int("latent_dim")
        width = h.int("width", width, hi=MAX_WIDTH)
    else:
        width = h.int("width", width, hi=MAX_WIDTH)
        latent = h.int("latent_dim", 4 * width, hi=4 * MAX_WIDTH)
        if latent != 4 * width:
            raise h.fail(f"latent_dim must be 4 * width = {4 * width} (z is reshaped to width x 2 x 2), got {latent}; "
                         "fix hparams")
    norm = h.choice("norm", "batch", NORMS)
    slope = h.float("slope", slope, 0.0, 1.0)
    floor = h.int("min_width", max(1, width // min_width_divisor), hi=width)
    return UpsamplingHparams(family, version, h.resolved, channels, size, latent, width, norm, slope, floor, use_fc)
