"""Latents from a file's priors: z = mean, or z = mean + L·eps with the component's covariance factor.

`PriorTensors.from_priors(priors, device)` moves a file's priors to the device in their stored
dtype; `sample(classes, comps, eps, random)` then dequantises only the rows a batch draws and
draws the whole batch with no Python loop, so decode-time memory is the stored tables plus one
batch, not float32 copies of every table (a file's int8 priors would otherwise grow 4x):

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
from d3codec.format.types import Priors, Stored

#: Samples per gathered [B, D, D] block of full covariance factors (bounds memory at ~32M floats).
_FULL_BLOCK_FLOATS = 1 << 25


class StoredRows:
    """A stored [N, K, ...] prior table on a device in its stored dtype; float32 rows on demand,
    dequantised exactly as `Stored.dequantize` does (value = (raw - zero_point) * scale)."""

    def __init__(self, stored: Stored, device: torch.device) -> None:
        self.raw = stored.raw.to(device)
        self.axis = stored.axis
        self.scale = self.zero_point = None
        if stored.scale is not None:
            self.scale = torch.tensor(stored.scale, dtype=torch.float32, device=device)
            zp = stored.zero_point or (0,) * len(stored.scale)
            self.zero_point = torch.tensor(zp, dtype=torch.float32, device=device)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.raw.shape)

    def rows(self, classes: torch.Tensor, comps: torch.Tensor) -> torch.Tensor:
        """Float32 entries [B, ...] of components (classes[b], comps[b])."""
        return self._dequantize(self.raw[classes, comps], (classes, comps))

    def full(self) -> torch.Tensor:
        """The whole table as float32 (N K times the memory of one row: for checks and tests)."""
        n, k = self.raw.shape[:2]
        dev = self.raw.device
        classes = torch.arange(n, device=dev).repeat_interleave(k)
        comps = torch.arange(k, device=dev).repeat(n)
        return self.rows(classes, comps).view(self.raw.shape)

    def _dequantize(self, x: torch.Tensor, index: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.scale is None:
            return x.to(torch.float32)
        x = x.to(torch.float32)
        scale, zp = self.scale, self.zero_point
        if self.axis is not None:
            view = [1] * x.dim()
            if self.axis < len(index):  # per class or per component: the gathered rows' own scales
                scale, zp = scale[index[self.axis]], zp[index[self.axis]]
                view[0] = -1
            else:
                view[self.axis - len(index) + 1] = -1
            scale, zp = scale.view(view), zp.view(view)
        return (x - zp) * scale


@dataclass
class PriorTensors:
    """A file's priors on one device, ready for batched sampling, kept in their stored dtype.

    `means`, `stds`, `factors`, `choleskys` give float32 rows of the components a batch draws:
    mean [B, D]; std [B, D] (diag/lowrank: exp(logvar / 2)); factor [B, D, R] (lowrank);
    cholesky [B, D, D] (full, lower-triangular). `cdf` [N, K] cumulative mixture weights
    normalised per class (None: uniform). The properties `mean`, `std`, `factor` and `cholesky`
    are whole [N, K, ...] float32 tables, built on each access (for checks and tests).
    """

    kind: str
    mean_rows: StoredRows
    logvar_rows: Optional[StoredRows] = None
    factor_rows: Optional[StoredRows] = None
    cholesky_rows: Optional[StoredRows] = None
    cdf: Optional[torch.Tensor] = None

    @staticmethod
    def from_priors(priors: Priors, device: Union[str, torch.device] = "cpu") -> "PriorTensors":
        """`priors` on `device` in their stored dtype (mixture weights as a float32 CDF)."""
        dev = torch.device(device)
        out = PriorTensors(priors.kind, StoredRows(priors.mean, dev))
        if priors.kind in ("diag", "lowrank"):
            if priors.logvar is None:
                raise ConfigError(f"{priors.kind} priors need a logvar tensor; the file is incomplete")
            out.logvar_rows = StoredRows(priors.logvar, dev)
        if priors.kind == "lowrank":
            if priors.factor is None:
                raise ConfigError("lowrank priors need a factor tensor; the file is incomplete")
            out.factor_rows = StoredRows(priors.factor, dev)
        elif priors.kind == "full":
            if priors.cholesky is None:
                raise ConfigError("full priors need a cholesky tensor; the file is incomplete")
            out.cholesky_rows = StoredRows(priors.cholesky, dev)
        elif priors.kind != "diag":
            raise ConfigError(f"unknown covariance kind {priors.kind!r}; use diag, lowrank or full")
        if priors.weights is not None:
            w = priors.weights.dequantize().to(dev, torch.float32).clamp_min(0)
            total = w.sum(dim=1, keepdim=True)
            # a class whose weights are all zero falls back to uniform
            w = torch.where(total > 0, w / total.clamp_min(1e-30), torch.full_like(w, 1.0 / w.shape[1]))
            out.cdf = torch.cumsum(w, dim=1)
        return out

    def means(self, classes: torch.Tensor, comps: torch.Tensor) -> torch.Tensor:
        return self.mean_rows.rows(classes, comps)

    def stds(self, classes: torch.Tensor, comps: torch.Tensor) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar_rows.rows(classes, comps))

    def factors(self, classes: torch.Tensor, comps: torch.Tensor) -> torch.Tensor:
        return self.factor_rows.rows(classes, comps)

    def choleskys(self, classes: torch.Tensor, comps: torch.Tensor) -> torch.Tensor:
        return torch.tril(self.cholesky_rows.rows(classes, comps))

    @property
    def mean(self) -> torch.Tensor:
        return self.mean_rows.full()

    @property
    def std(self) -> Optional[torch.Tensor]:
        return None if self.logvar_rows is None else torch.exp(0.5 * self.logvar_rows.full())

    @property
    def factor(self) -> Optional[torch.Tensor]:
        return None if self.factor_rows is None else self.factor_rows.full()

    @property
    def cholesky(self) -> Optional[torch.Tensor]:
        return None if self.cholesky_rows is None else torch.tril(self.cholesky_rows.full())

    @property
    def num_classes(self) -> int:
        return self.mean_rows.shape[0]

    @property
    def latents_per_class(self) -> int:
        return self.mean_rows.shape[1]

    @property
    def dim(self) -> int:
        return self.mean_rows.shape[2]

    @property
    def rank(self) -> int:
        return self.factor_rows.shape[3] if self.factor_rows is not None else 0

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
        mean = self.means(classes, comps)
        if eps is None:
            return mean
        d = self.dim
        eps = eps.to(mean.dtype)
        if self.kind == "full":
            noise = self._full_noise(classes, comps, eps[:, :d])
        else:
            noise = self.stds(classes, comps) * eps[:, :d]
            if self.kind == "lowrank":
                f = self.factors(classes, comps)  # [B, D, R]
                noise = noise + torch.bmm(f, eps[:, d:d + self.rank].unsqueeze(2)).squeeze(2)
        if random is not None:
            noise = noise * random.to(noise.dtype).unsqueeze(1)
        return mean + noise

    def _full_noise(self, classes: torch.Tensor, comps: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        d = self.dim
        block = max(1, _FULL_BLOCK_FLOATS // (d * d))
        parts = []
        for s in range(0, classes.shape[0], block):  # blocks bound the gathered [b, D, D] factors
            chol = self.choleskys(classes[s:s + block], comps[s:s + block])
            parts.append(torch.bmm(chol, eps[s:s + block].unsqueeze(2)).squeeze(2))
        return torch.cat(parts) if parts else eps.new_zeros(0, d)

    def covariance(self) -> torch.Tensor:
        """Covariance matrices [N, K, D, D] of every component (for checks and tests)."""
        if self.kind == "full":
            chol = self.cholesky
            return chol @ chol.transpose(-1, -2)
        cov = torch.diag_embed(self.std ** 2)
        if self.kind == "lowrank":
            f = self.factor
            cov = cov + f @ f.transpose(-1, -2)
        return cov


def sample_latents(priors: Union[Priors, PriorTensors], classes: torch.Tensor, comps: torch.Tensor,
                   generator: Optional[torch.Generator] = None, *, random: bool = True) -> torch.Tensor:
    """Latents [B, D] of components (classes[b], comps[b]): random draws from `generator` (on its
    device, then moved), or the means with `random=False`."""
    pt = priors if isinstance(priors, PriorTensors) else PriorTensors.from_priors(priors, classes.device)
    device = pt.mean_rows.raw.device
    classes, comps = classes.to(device), comps.to(device)
    if not random:
        return pt.sample(classes, comps)
    gdev = generator.device if generator is not None else torch.device("cpu")
    eps = torch.randn(classes.shape[0], pt.noise_dim, generator=generator, device=gdev)
    return pt.sample(classes, comps, eps.to(device))
