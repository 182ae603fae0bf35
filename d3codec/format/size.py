"""The compressed-size model: how many bytes a planned file will take once trained and written.

The planner sizes a file before any training, on a placeholder of exactly the planned names,
dtypes, shapes, metadata and provenance whose values are all zero (so its headers and structure
compress as they will). Decoder weights and latent codes count as Gaussian values put through the
real quantisers and the writer's zstd at the writer's levels; JSON widths of quantisation
parameters are `format.io`'s. `format.io.size_upper_bound` is the strict shape-only bound beside it.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch

from d3codec.format import _zstd
from d3codec.format.io import (LEVEL_LARGE, LEVEL_SMALL, SCALE_JSON_CHARS, SMALL_SECTION, ZERO_POINT_JSON_CHARS,
                               encoded_size)
from d3codec.format.types import D3File, Stored


def constant_prior_std(zeros: D3File, constant_logvar: bool) -> dict[str, list[Optional[Stored]]]:
    """`estimate_trained_size`'s `skip` and `grid` for a file whose log-variances stay at one value
    (`constant_logvar`): those compress away, and I8 means lie on `store_priors`' grid."""
    if not constant_logvar:
        return {}
    p = zeros.priors
    return {"skip": [p.logvar], "grid": [p.mean] if p.mean.dtype == "I8" else []}


#: Float tensors with fewer values count raw in the estimate (zstd's tables would cost more than they save).
_MODEL_MIN_NUMEL = 4096
#: Most values drawn to measure how one tensor compresses (larger tensors are sampled: conservative,
#: as a per-tensor quantisation range only widens with more values).
MODEL_SAMPLE = 1 << 20


@functools.lru_cache(maxsize=1024)
def _gaussian_ratio(dtype: str, axis: Optional[int], shape: tuple[int, ...], level: int) -> float:
    """Compressed / raw bytes of Gaussian values stored as `dtype` (quantised along `axis` as the real
    tensor is) in `shape`, measured with the writer's zstd on at most `MODEL_SAMPLE` values."""
    numel = math.prod(shape)
    if axis == 0 and len(shape) > 1:  # whole channels, so each keeps its own quantisation range
        sample: tuple[int, ...] = (max(1, min(shape[0], MODEL_SAMPLE // max(1, numel // shape[0]))), *shape[1:])
    else:
        sample, axis = (min(numel, MODEL_SAMPLE),), None
    values = torch.randn(sample, generator=torch.Generator().manual_seed(0))
    raw = Stored.encode(values, dtype, axis=axis).raw.contiguous().view(torch.uint8).numpy().tobytes()
    return min(1.0, len(_zstd.compress(raw, level)) / len(raw))


@functools.lru_cache(maxsize=256)
def grid_ratio(shape: tuple[int, ...], level: int, step: float, spread: float) -> float:
    """Compressed / raw bytes of latent means on a grid of `step` prior stds (`Stored.on_grid`, as the
    encoder's `store_priors` stores them), modelled as Gaussian values of std `spread` prior stds,
    measured with the writer's zstd (on all of them, up to `MODEL_SAMPLE`)."""
    values = torch.randn(min(math.prod(shape), MODEL_SAMPLE), generator=torch.Generator().manual_seed(0))
    raw = Stored.on_grid(values * spread, step).raw.numpy().tobytes()
    return min(1.0, len(_zstd.compress(raw, level)) / len(raw))


def estimate_trained_size(zeros: D3File, skip: Sequence[Optional[Stored]] = (),
                          grid: Sequence[Optional[Stored]] = (), *, step: float, spread: float) -> int:
    """Estimated size of the finished file laid out like `zeros` (a placeholder whose values are all
    zero, so it measures headers and structure as they compress): the sum of `estimate_parts`."""
    return sum(estimate_parts(zeros, skip, grid, step=step, spread=spread).values())


def estimate_parts(zeros: D3File, skip: Sequence[Optional[Stored]] = (),
                   grid: Sequence[Optional[Stored]] = (), *, step: float, spread: float) -> dict[str, int]:
    """Estimated compressed bytes of the priors, decoder(s) and labels of the finished file laid out
    like `zeros`, and of the rest ("header etc": headers, scales, zstd overhead, margin).

    Decoder weights and latent codes count as Gaussian values put through the real quantisers and
    the writer's zstd: trained ones compress at least as well (on 11 trained CIFAR-10, MNIST and
    digits files the estimate came out 3.6-13.6% above the real size; RESULTS.md, "Quality,
    session 6"), and `encode` trims components in a file that comes out over (`distill.trim`).
    Soft labels and integer tensors count raw; tensors in `skip` (one repeated value) as the zeros
    placeholder has them; tensors in `grid` (latent means `store_priors` puts on its grid of `step`
    prior stds, spread over `spread` prior stds) as `grid_ratio` models them.
    The rest holds the headers as `zeros` compresses, the widest JSON form of every quantisation
    scale and zero point, per-section zstd overhead and a 1% + 64 byte margin.
    """
    skipped = {id(s) for s in skip if s is not None}
    gridded = {id(s) for s in grid if s is not None}
    p, lab = zeros.priors, zeros.labels
    decoder = _decoder_part(zeros)
    sections = [("priors", list(p.tensors().values()), True),
                *((decoder, list(dec.weights.values()), True) for dec in zeros.decoders),
                ("labels", list(lab.tensors().values()), False)]
    parts = {"priors": 0, decoder: 0, "labels": 0}
    slack = 0
    for part, present, modelled in sections:
        raw = sum(s.nbytes for s in present)  # the writer picks the level from the whole section
        level = LEVEL_SMALL if raw <= SMALL_SECTION else LEVEL_LARGE
        for s in present:
            if id(s) in skipped:
                continue
            slack += SCALE_JSON_CHARS * len(s.scale or ()) + ZERO_POINT_JSON_CHARS * len(s.zero_point or ())
            floating = s.quantized or s.raw.is_floating_point()
            if id(s) in gridded:  # measured at its own size: small ones pay zstd's tables
                parts[part] += math.ceil(s.nbytes * grid_ratio(s.shape, level, step, spread))
            elif modelled and floating and s.raw.numel() >= _MODEL_MIN_NUMEL:
                parts[part] += math.ceil(s.nbytes * _gaussian_ratio(s.dtype, s.axis, s.shape, level))
            else:
                parts[part] += s.nbytes
    payload, count = sum(parts.values()), len(sections)
    overhead = count * 32 + 3 * (payload // (128 * 1024) + count)
    size = encoded_size(zeros) + payload + slack + overhead
    parts["header etc"] = size + size // 100 + 64 - payload
    return parts


def _decoder_part(d3: D3File) -> str:
    """The breakdown's name for the decoder weights: "decoder", or "decoders" for several."""
    return "decoder" if len(d3.decoders) == 1 else "decoders"


def raw_parts(d3: D3File, bound: int) -> dict[str, int]:
    """Raw bytes of the priors, decoder(s) and labels of `d3`, and the rest of `bound` ("header
    etc"): the breakdown of a strict shape-only bound, which counts every value raw."""
    decoder = _decoder_part(d3)
    parts = {"priors": sum(s.nbytes for s in d3.priors.tensors().values()),
             decoder: sum(s.nbytes for dec in d3.decoders for s in dec.weights.values()),
             "labels": sum(s.nbytes for s in d3.labels.tensors().values())}
    parts["header etc"] = bound - sum(parts.values())
    return parts
