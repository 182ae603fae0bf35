"""Latents from a file's priors: z = mean, or z = mean + L·eps with the component's covariance factor.

`PriorTensors.from_priors(priors, device)` dequantises a file's priors once (float32 on the
device); `sample(classes, comps, eps, random)` then draws a whole batch with no Python loop:

- diag:    z = mean + exp(logvar / 2) * eps[:, :D]
- lowrank: z = mean + F @ eps[:, D:D+R] + exp(logvar / 2) * eps[:, :D]   (cov = F F^T + diag)
- full:    z = mean + L @ eps[:, :D]                                     (cov = L L^T)

`sample_latents(priors, classes, comps, generator)` is the one-call form (it draws `eps`).
Mixture weights only choose components (`PriorTensors.pick_components`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from d3codec.errors import ConfigError
from d3codec.format.types import Priors

#: Samples per gathered [B, D, D] block of full covariance factors (bounds memory at ~32M floats).
_FULL_BLOCK_FLOATS = 1 << 25


@dataclass
class PriorTensors:
    """A file's priors as float32 tensors on one device, ready for batched sampling.

    `mean` [N, K, D]; `std` [N, K, D] (diag/lowrank: exp(logvar / 2)); `factor` [N, K, D, R]
    (lowrank); `cholesky` [N, K, D, D] (full, lower-triangular); `cdf` [N, K] cumulative mixture
    weights normalised per class (None: uniform).
    """

    kind: str
    mean: torch.Tensor
    std: Optional[torch.Tensor] = None
    factor: Optional[torch.Tensor] = None
    cholesky: Optional[torch.Tensor] = None
    cdf: Optional[torch.Tensor] = None

    @staticmethod
    def from_priors(priors: Priors, device: Union[str, torch.device] = "cpu") -> "PriorTensors":
        """Dequantise `priors` to float32 on `device`."""
        dev = torch.device(device)
        mean = priors.mean.dequantize().to(dev, torch.float32)
        out = PriorTensors(priors.kind, mean)
        if priors.kind in ("diag", "lowrank"):
            if priors.logvar is None:
                raise ConfigError(f"{priors.kind} priors need a logvar tensor; the file is incomplete")
            out.std = torch.exp(0.5 * priors.logvar.dequantize().to(dev, torch.float32))
        if priors.kind == "lowrank":
            if priors.factor is None:
                raise ConfigError("lowrank priors need a factor tensor; the file is incomplete")
            out.factor = priors.factor.dequantize().to(dev, torch.float32)
        elif priors.kind == "full":
            if priors.cholesky is None:
                raise ConfigError("full priors need a cholesky tensor; the file is incomplete")
            out.cholesky = torch.tril(priors.cholesky.dequantize().to(dev, torch.float32))
        elif priors.kind != "diag":
            raise ConfigError(f"unknown covariance kind {priors.kind!r}; use diag, lowrank or full")
        if priors.weights is not None:
            w = priors.weights.dequantize().to(dev, torch.float32).clamp_min(0)
            total = w.sum(dim=1, keepdim=True)
            # a class whose weights are all zero falls back to uniform
            w = torch.where(total > 0, w / total.clamp_min(1e-30), torch.full_like(w, 1.0 / w.shape[1]))
            out.cdf = torch.cumsum(w, dim=1)
        return out

    @property
    def num_classes(self) -> int:
        return self.mean.shape[0]

    @property
    def latents_per_class(self) -> int:
        return self.mean.shape[1]

    @property
    def dim(self) -> int:
        return self.mean.shape[2]

    @property
    def rank(self) -> int:
        return self.factor.shape[3] if self.factor is not None else 0

    @property
    def noise_dim(self) -> int:
        """Standard normals one random draw needs: D (+ R for lowrank)."""
        return self.dim + self.rank

    def pick_components(self, classes: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Components of `classes` drawn from the mixture weights by inverse CDF of uniforms `u` [B]."""
        k = self.latents_per_class
        if self.cdf is None:
            return torch.clamp((u * k).long(), max=k - 1)
        cdf = self.cdf[classes]  # [B, K]
        return torch.clamp((cdf < u.unsqueeze(1)).sum(dim=1), max=k - 1)

    def sample(self, classes: torch.Tensor, comps: torch.Tensor, eps: Optional[torch.Tensor] = None,
               random: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Latents [B, D] of components (classes[b], comps[b]).

        `eps` [B, noise_dim] standard normals (None: the means); `random` [B] bool selects which
        samples are random draws (None: all when `eps` is given); the others are the means.
        """
        mean = self.mean[classes, comps]
        if eps is None:
            return mean
        d = self.dim
        eps = eps.to(mean.dtype)
        if self.kind == "full":
            noise = self._full_noise(classes, comps, eps[:, :d])
        else:
            noise = self.std[classes, comps] * eps[:, :d]
            if self.kind == "lowrank":
                f = self.factor[classes, comps]  # [B, D, R]
                noise = noise + torch.bmm(f, eps[:, d:d + self.rank].unsqueeze(2)).squeeze(2)
        if random is not None:
            noise = noise * random.to(noise.dtype).unsqueeze(1)
        return mean + noise

    def _full_noise(self, classes: torch.Tensor, comps: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        d = self.dim
        block = max(1, _FULL_BLOCK_FLOATS // (d * d))
        parts = []
        for s in range(0, classes.shape[0], block):  # blocks bound the gathered [b, D, D] factors
            chol = self.cholesky[classes[s:s + block], comps[s:s + block]]
            parts.append(torch.bmm(chol, eps[s:s + block].unsqueeze(2)).squeeze(2))
        return torch.cat(parts) if parts else eps.new_zeros(0, d)

    def covariance(self) -> torch.Tensor:
        """Covariance matrices [N, K, D, D] of every component (for checks and tests)."""
        if self.kind == "full":
            return self.cholesky @ self.cholesky.transpose(-1, -2)
        cov = torch.diag_embed(self.std ** 2)
        if self.kind == "lowrank":
            cov = cov + self.factor @ self.factor.transpose(-1, -2)
        return cov


def sample_latents(priors: Union[Priors, PriorTensors], classes: torch.Tensor, comps: torch.Tensor,
                   generator: Optional[torch.Generator] = None, *, random: bool = True) -> torch.Tensor:
    """Latents [B, D] of components (classes[b], comps[b]): random draws from `generator` (on its
    device, then moved), or the means with `random=False`."""
    pt = priors if isinstance(priors, PriorTensors) else PriorTensors.from_priors(priors, classes.device)
    classes, comps = classes.to(pt.mean.device), comps.to(pt.mean.device)
    if not random:
        return pt.sample(classes, comps)
    gdev = generator.device if generator is not None else torch.device("cpu")
    eps = torch.randn(classes.shape[0], pt.noise_dim, generator=generator, device=gdev)
    return pt.sample(classes, comps, eps.to(pt.mean.device))
