"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021) in plain, batched torch.

The augmentation set of the dataset-distillation literature: colour (brightness, saturation,
contrast), crop (translation with zero padding), cutout, flip, scale and rotate. Every transform
is differentiable with respect to the images, runs on any device with no per-sample Python loop,
and draws its randomness only from an explicit `torch.Generator`.

Siamese use (the same augmentation applied to real and synthetic batches)::

    aug = DSA()
    params = aug.sample(x_real, generator)       # draw once
    x_real, x_syn = aug.apply(x_real, params), aug.apply(x_syn, params)

`aug(x, generator)` is `aug.apply(x, aug.sample(x, generator))`. With `mode="single"` (the
literature's default, `aug_mode='S'`) one transform of the strategy is picked per batch; with
`mode="all"` (`'M'`) every transform is applied in turn. Parameters are drawn per sample;
`per_batch=True` draws one set shared by the whole batch (so it can be replayed on a batch of any
size). Batches of different sizes can also share per-sample parameters when one is a prefix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from d3codec.errors import ConfigError

#: The standard strategy: every transform family of DSA.
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
#: Strategy words and the elementary transforms they stand for, in application order.
TRANSFORMS: dict[str, tuple[str, ...]] = {
    "color": ("brightness", "saturation", "contrast"),
    "crop": ("crop",),
    "cutout": ("cutout",),
    "flip": ("flip",),
    "scale": ("scale",),
    "rotate": ("rotate",),
}


@dataclass
class DSAParams:
    """Drawn augmentation parameters: the chosen transforms and one tensor per transform.

    Tensors have a leading batch dimension of N (per sample) or 1 (shared by the batch).
    """

    transforms: tuple[str, ...]
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        sizes = {v.shape[0] for v in self.values.values()}
        return max(sizes) if sizes else 1

    def to(self, device: torch.device | str) -> "DSAParams":
        """The same parameters on another device."""
        return DSAParams(self.transforms, {k: v.to(device) for k, v in self.values.items()})


class DSA:
    """Differentiable Siamese Augmentation; defaults are the literature's `ParamDiffAug`.

    `aug(x, generator) -> x` augments a float batch [B, C, H, W]; `sample`/`apply` split the draw
    from its application so the same parameters can be replayed on a second batch.
    """

    def __init__(self, strategy: str = DEFAULT_STRATEGY, *, mode: str = "single", per_batch: bool = False,
                 prob_flip: float = 0.5, ratio_scale: float = 1.2, ratio_rotate: float = 15.0,
                 ratio_crop_pad: float = 0.125, ratio_cutout: float = 0.5, brightness: float = 1.0,
                 saturation: float = 2.0, contrast: float = 0.5) -> None:
        words = [w for w in strategy.split("_") if w] if strategy not in ("", "none") else []
        unknown = [w for w in words if w not in TRANSFORMS]
        if unknown:
            raise ConfigError(f"unknown augmentation {unknown[0]!r} in strategy {strategy!r}; "
                              f"use words from {', '.join(TRANSFORMS)} joined by '_'")
        if mode not in ("single", "all"):
            raise ConfigError(f"DSA mode must be 'single' (one transform per batch) or 'all', not {mode!r}")
        if ratio_scale < 1.0 or not 0.0 <= prob_flip <= 1.0 or not 0.0 <= ratio_cutout <= 1.0:
            raise ConfigError("DSA needs ratio_scale >= 1 and prob_flip, ratio_cutout in [0, 1]; fix the arguments")
        self.strategy, self.words, self.mode, self.per_batch = strategy, words, mode, per_batch
        self.prob_flip, self.ratio_scale, self.ratio_rotate = prob_flip, ratio_scale, ratio_rotate
        self.ratio_crop_pad, self.ratio_cutout = ratio_crop_pad, ratio_cutout
        self.brightness, self.saturation, self.contrast = brightness, saturation, contrast

    def __repr__(self) -> str:
        return f"DSA(strategy={self.strategy!r}, mode={self.mode!r}, per_batch={self.per_batch})"

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.apply(x, self.sample(x, generator))

    # ---- drawing parameters ----

    def sample(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> DSAParams:
        """Draw parameters for batch `x` (only its shape and device are used) from `generator`.

        The draws happen on the generator's device (CPU when None) and are moved to `x.device`,
        so a CPU generator gives the same parameters whatever device the images are on.
        """
        if x.dim() != 4:
            raise ConfigError(f"DSA augments image batches [B, C, H, W], got shape {tuple(x.shape)}")
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        gdev = gen.device
        n = 1 if self.per_batch else x.shape[0]
        _, _, h, w = x.shape
        if not self.words:
            return DSAParams(())
        if self.mode == "single":
            pick = int(torch.randint(len(self.words), (1,), generator=gen, device=gdev).item())
            transforms = TRANSFORMS[self.words[pick]]
        else:
            transforms = tuple(t for word in self.words for t in TRANSFORMS[word])

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=gen, device=gdev)

        values: dict[str, torch.Tensor] = {}
        for t in transforms:
            if t in ("brightness", "saturation", "contrast", "flip"):
                values[t] = rand(n, 1, 1, 1)
            elif t == "scale":
                values[t] = rand(n, 2) * (self.ratio_scale - 1.0 / self.ratio_scale) + 1.0 / self.ratio_scale
            elif t == "rotate":
                values[t] = (rand(n) - 0.5) * 2 * self.ratio_rotate / 180 * math.pi
            elif t == "crop":
                sx, sy = int(h * self.ratio_crop_pad + 0.5), int(w * self.ratio_crop_pad + 0.5)
                tx = torch.randint(-sx, sx + 1, (n, 1), generator=gen, device=gdev)
                ty = torch.randint(-sy, sy + 1, (n, 1), generator=gen, device=gdev)
                values[t] = torch.cat([tx, ty], dim=1)
            elif t == "cutout":
                ch, cw = int(h * self.ratio_cutout + 0.5), int(w * self.ratio_cutout + 0.5)
                ox = torch.randint(0, h + (1 - ch % 2), (n, 1), generator=gen, device=gdev)
                oy = torch.randint(0, w + (1 - cw % 2), (n, 1), generator=gen, device=gdev)
                values[t] = torch.cat([ox, oy], dim=1)
        return DSAParams(transforms, values).to(x.device)

    # ---- applying them ----

    def apply(self, x: torch.Tensor, params: DSAParams) -> torch.Tensor:
        """Apply drawn parameters to `x`; differentiable with respect to `x`.

        `params` must have been drawn for a batch of the same size, or per batch (size 1); a larger
        per-sample draw is cut to the first `len(x)` samples.
        """
        if x.dim() != 4:
            raise ConfigError(f"DSA augments image batches [B, C, H, W], got shape {tuple(x.shape)}")
        n = x.shape[0]
        if params.batch_size not in (1, n) and params.batch_size < n:
            raise ConfigError(f"DSA parameters were drawn for {params.batch_size} images but the batch has {n}; "
                              "draw them for the larger batch or with per_batch=True")
        for t in params.transforms:
            v = params.values[t].to(x.device)
            if v.shape[0] not in (1, n):
                v = v[:n]
            x = getattr(self, f"_{t}")(x, v)
        return x

    def _brightness(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return x + (r.to(x.dtype) - 0.5) * self.brightness

    def _saturation(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        return (x - mean) * (r.to(x.dtype) * self.saturation) + mean

    def _contrast(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (r.to(x.dtype) + self.contrast) + mean

    def _flip(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return torch.where(r < self.prob_flip, x.flip(3), x)

    def _affine(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        theta = theta.to(x.dtype).expand(x.shape[0], 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, align_corners=True)

    def _scale(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros_like(s[:, 0])
        theta = torch.stack([torch.stack([s[:, 0], zero, zero], 1), torch.stack([zero, s[:, 1], zero], 1)], 1)
        return self._affine(x, theta)

    def _rotate(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        c, s, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
        theta = torch.stack([torch.stack([c, -s, zero], 1), torch.stack([s, c, zero], 1)], 1)
        return self._affine(x, theta)

    def _crop(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Translate by whole pixels, filling with zeros (a gather from the 1-px zero-padded batch)."""
        n, _, h, w = x.shape
        t = t.expand(n, 2)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        gx = torch.clamp(rows + t[:, 0].view(n, 1, 1) + 1, 0, h + 1).expand(n, h, w)
        gy = torch.clamp(cols + t[:, 1].view(n, 1, 1) + 1, 0, w + 1).expand(n, h, w)
        padded = F.pad(x, [1, 1, 1, 1])
        flat = padded.flatten(2)  # [N, C, (H+2)(W+2)]
        idx = (gx * (w + 2) + gy).reshape(n, 1, h * w).expand(n, x.shape[1], h * w)
        return torch.gather(flat, 2, idx).view_as(x)

    def _cutout(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Zero a square of `ratio_cutout` of the side at the drawn centre (clipped at the border)."""
        n, _, h, w = x.shape
        o = o.expand(n, 2)
        ch, cw = int(h * self.ratio_cutout + 0.5), int(w * self.ratio_cutout + 0.5)
        top = (o[:, 0] - ch // 2).view(n, 1, 1)
        left = (o[:, 1] - cw // 2).view(n, 1, 1)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        inside = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)
        return x * (~inside).unsqueeze(1).to(x.dtype)
