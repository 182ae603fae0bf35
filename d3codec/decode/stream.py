"""The sample order of a `.d3` stream: what every position of every epoch draws, and which
positions each rank's batches hold (in the manner of FFCV's `TraversalOrder`).

`Stream(priors, device, seed=..., mode=..., batch_size=...)` is the deterministic part of `D3Dataset`
(the rules are in `d3codec.decode.dataset`'s docstring); it knows nothing of DataLoaders, epoch
counters or decoders:

    stream.batches(rank, world)        # [(start, stop), ...] global positions of the rank's batches
    stream.draw(start, stop, epoch)    # Draw: classes, components, mean-or-random, latents
    stream.augment_seed(epoch, start)  # the seed of the augmentation of the batch at `start`

A position's draw depends on (seed, epoch, position) only: slots come from a permutation seeded
by (seed, epoch) (or by (seed, round) when the epoch is not whole rounds), and the random numbers
from blocks of `DRAW_BLOCK` positions, each its own generator seeded by (seed, epoch, block): per
position a noise row `eps` and three uniforms `u` (u[:, 0]: the class under `class_weights`,
u[:, 1]: mean or random draw under `class_weights` in mixed mode, u[:, 2]: the component).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from d3codec._seed import derive_seed
from d3codec.decode.sampling import PriorTensors
from d3codec.errors import ConfigError

MODES = ("mixed", "random", "mean")
#: Positions per random-draw block (one generator seed each).
DRAW_BLOCK = 4096
#: Permutations and noise blocks kept per stream (the ones in use, and the previous few).
_CACHED = 4


@dataclass
class Draw:
    """What positions [start, stop) of an epoch draw: class, component, random-or-mean, latent."""

    classes: torch.Tensor  # [B] int64
    comps: torch.Tensor  # [B] int64
    random: torch.Tensor  # [B] bool (False: the component's mean)
    z: torch.Tensor  # [B, D] float32


def _index_dtype(n: int) -> torch.dtype:
    """int32 for permutations of up to 2^31 slots (half the memory; `randperm` draws the same
    permutation in either dtype), else int64."""
    return torch.int32 if n < 2 ** 31 else torch.int64


def class_cdf(weights: Optional[Sequence[float]], n: int) -> Optional[torch.Tensor]:
    """The cumulative class distribution of `class_weights` (None: balanced rounds instead)."""
    if weights is None:
        return None
    w = torch.as_tensor(list(weights) if not isinstance(weights, torch.Tensor) else weights, dtype=torch.float64)
    if w.shape != (n,) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"class_weights must be {n} finite non-negative numbers with a positive sum; fix them")
    return torch.cumsum(w / w.sum(), 0).float()


class Stream:
    """The deterministic order of a stream over `priors` (a file's classes and components).

    Args:
        priors, device: the file's priors, on `device`, where the draws are made.
        seed, mode, batch_size, drop_last: as `D3Dataset`'s.
        epoch_size: positions per epoch over all ranks; None: the fewest whole rounds that fill one
            batch on every rank (so it follows the world size).
        class_weights: N weights to draw classes with instead of balanced rounds.
    """

    def __init__(self, priors: PriorTensors, device: torch.device, *, seed: int, mode: str, batch_size: int,
                 epoch_size: Optional[int] = None, class_weights: Optional[Sequence[float]] = None,
                 drop_last: bool = False) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.priors, self.device = priors, device
        self.seed, self.mode, self.batch_size, self.drop_last = seed, mode, batch_size, drop_last
        self.epoch_size = epoch_size
        n, k = priors.num_classes, priors.latents_per_class
        #: Slots per round: every component once (twice in mixed mode: its mean and one draw).
        self.round = n * k * (2 if mode == "mixed" else 1)
        self.class_cdf = class_cdf(class_weights, n)
        self._perm: Optional[tuple[int, int, torch.Tensor]] = None
        self._round_perms: dict[int, torch.Tensor] = {}
        self._blocks: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- sizes and batches ----

    def sizes(self, world: int) -> tuple[int, int]:
        """(epoch size, shard size) with `world` ranks: `epoch_size` if given, else the fewest whole
        rounds that fill one batch on each rank; each rank draws ceil(epoch size / world)."""
        size = self.epoch_size if self.epoch_size is not None else \
            self.round * math.ceil(self.batch_size * world / self.round)
        return size, math.ceil(size / world)

    def _bounds(self, shard: int) -> list[tuple[int, int]]:
        """The batches [s, e) of a shard of `shard` positions (the last one short unless `drop_last`)."""
        ends = [(s, min(s + self.batch_size, shard)) for s in range(0, shard, self.batch_size)]
        return [(s, e) for s, e in ends if not (self.drop_last and e - s < self.batch_size)]

    def num_batches(self, world: int) -> int:
        """Batches each of `world` ranks yields per epoch (the length of `batches(rank, world)`)."""
        return len(self._bounds(self.sizes(world)[1]))

    def batches(self, rank: int, world: int) -> list[tuple[int, int]]:
        """The global positions [start, stop) of rank `rank`'s batches of an epoch, in order: rank r
        holds positions [r S, (r + 1) S), S the shard size (past the epoch they wrap: padding)."""
        shard = self.sizes(world)[1]
        return [(rank * shard + s, rank * shard + e) for s, e in self._bounds(shard)]

    # ---- what positions draw ----

    def _permutation(self, epoch: int, size: int) -> torch.Tensor:
        if self._perm is None or self._perm[:2] != (epoch, size):
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, "perm"))
            self._perm = (epoch, size, torch.randperm(size, generator=g, dtype=_index_dtype(size)).to(self.device))
        return self._perm[2]

    def _round_slots(self, epoch: int, size: int, pos: torch.Tensor) -> torch.Tensor:
        """Slots of epoch positions when `epoch_size` is not a whole number of rounds: epochs walk
        one endless sequence of rounds (position q = epoch * epoch_size + i; round q // round, each
        round its own permutation), so every slot comes once per round whatever the epoch size."""
        q = epoch * size + pos % size
        r, idx = q // self.round, q % self.round
        slot = torch.empty_like(idx)
        for rr in torch.unique(r).tolist():
            if rr not in self._round_perms:
                if len(self._round_perms) >= _CACHED:
                    self._round_perms.pop(next(iter(self._round_perms)))
                g = torch.Generator().manual_seed(derive_seed(self.seed, rr, "round"))
                self._round_perms[rr] = torch.randperm(self.round, generator=g,
                                                       dtype=_index_dtype(self.round)).to(self.device)
            mask = r == rr
            slot[mask] = self._round_perms[rr][idx[mask]].long()
        return slot

    def _block(self, epoch: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (epoch, b)
        if key not in self._blocks:
            if len(self._blocks) >= _CACHED:
                self._blocks.pop(next(iter(self._blocks)))
            g = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, epoch, "draws", b))
            eps = torch.randn(DRAW_BLOCK, self.priors.noise_dim, generator=g, device=self.device)
            u = torch.rand(DRAW_BLOCK, 3, generator=g, device=self.device)
            self._blocks[key] = (eps, u)
        return self._blocks[key]

    def _noise(self, epoch: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise rows and uniforms of positions [start, stop) of `epoch`."""
        first, last = start // DRAW_BLOCK, (stop - 1) // DRAW_BLOCK
        parts = [self._block(epoch, b) for b in range(first, last + 1)]
        eps = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        u = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        off = start - first * DRAW_BLOCK
        return eps[off:off + stop - start], u[off:off + stop - start]

    def draw(self, start: int, stop: int, epoch: int, world: int = 1) -> Draw:
        """Classes, components and latents of global positions [start, stop) of `epoch` with
        `world` ranks (it fixes the default epoch size); positions past the epoch wrap around."""
        if not 0 <= start < stop:
            raise ConfigError(f"positions must satisfy 0 <= start < stop, got [{start}, {stop})")
        pos = torch.arange(start, stop, device=self.device)
        eps, u = self._noise(epoch, start, stop)
        pt = self.priors
        n, k = pt.num_classes, pt.latents_per_class
        if self.class_cdf is None:
            size = self.sizes(world)[0]
            if size % self.round == 0:
                slot = self._permutation(epoch, size)[pos % size].long() % self.round
            else:
                slot = self._round_slots(epoch, size, pos)
            if self.mode == "mixed":
                random = slot >= n * k
                slot = torch.where(random, slot - n * k, slot)
            else:
                random = torch.full_like(slot, self.mode == "random", dtype=torch.bool)
            classes, comps = slot // k, slot % k
            if pt.cdf is not None:
                comps = torch.where(random, pt.pick_components(classes, u[:, 2]), comps)
        else:
            cdf = self.class_cdf.to(self.device)
            classes = torch.clamp(torch.searchsorted(cdf, u[:, 0].contiguous(), right=True), max=n - 1)
            if self.mode == "mixed":
                random = u[:, 1] >= 0.5
            else:
                random = torch.full_like(classes, self.mode == "random", dtype=torch.bool)
            uniform = torch.clamp((u[:, 2] * k).long(), max=k - 1)
            comps = torch.where(random, pt.pick_components(classes, u[:, 2]), uniform)
        z = pt.sample(classes, comps, eps if self.mode != "mean" else None, random)
        return Draw(classes, comps, random, z)

    def augment_seed(self, epoch: int, start: int) -> int:
        """The seed of the augmentation of the batch that starts at global position `start`."""
        return derive_seed(self.seed, epoch, "augment", start)
