"""How close is the planner's size estimate to real trained files? Real size, estimate, ratio.

The planner sizes a file before training (`estimate_trained_size`: decoder weights and latent
codes compressed as Gaussian values compress). This script rebuilds, for each finished `.d3` file
given, the all-zero placeholder of its exact layout and compares the estimate with the real size.
A ratio below 1.0 means the planner under-estimated that file (encode then trims components).

    python benchmarks/size_estimate.py cifar10_10ipc.d3 mnist_1ipc.d3 digits.d3
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import replace
from typing import Optional

import torch

from d3codec.distill.planner import constant_prior_std, estimate_trained_size, store_means
from d3codec.format.io import load
from d3codec.format.types import PRIOR_TENSORS, D3File, Stored


def _zero(s: Optional[Stored]) -> Optional[Stored]:
    if s is None:
        return None
    if s.quantized:
        return Stored.encode(torch.zeros(s.shape), s.dtype, axis=s.axis)
    return Stored(torch.zeros_like(s.raw))


def estimate_of(d3: D3File) -> int:
    """The planner's estimate for a file of `d3`'s layout: a constant log-variance compresses away,
    and latent means on `store_priors`' grid count as the planner models them."""
    p = d3.priors
    priors = replace(p, **{f: _zero(getattr(p, f)) for f in PRIOR_TENSORS})
    decoders = [replace(dec, weights={n: _zero(s) for n, s in dec.weights.items()}) for dec in d3.decoders]
    zeros = d3.replace(priors=priors, decoders=decoders)
    constant = p.logvar is not None and bool((p.logvar.raw == p.logvar.raw.flatten()[0]).all())
    kwargs = constant_prior_std(zeros, constant)
    if constant and not _on_grid(d3):  # written before means were stored on a grid (min-max I8)
        kwargs["grid"] = []
    return estimate_trained_size(zeros, **kwargs)


def _on_grid(d3: D3File) -> bool:
    """Whether the means are stored as `store_means` stores them now (on its grid, where every
    component shares one prior std), not as an older writer did (min-max I8)."""
    p = d3.priors
    if p.logvar is None:
        return False
    again = store_means(p.mean.dequantize(), p.logvar.dequantize(), p.mean.dtype)
    if again.scale is None or p.mean.scale is None or again.zero_point != p.mean.zero_point:
        return False
    return math.isclose(again.scale[0], p.mean.scale[0], rel_tol=1e-3)  # float32 rounding of the std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="finished .d3 files")
    args = parser.parse_args()
    print(f"{'file':28s} {'budget':>10s} {'real':>10s} {'estimate':>10s} {'est/real':>8s} {'real/budget':>11s}")
    for path in args.files:
        d3 = load(path, memory_map=False)
        real = os.path.getsize(path)
        est = estimate_of(d3)
        budget = d3.budget.bytes if d3.budget is not None else real
        print(f"{os.path.basename(path)[:28]:28s} {budget:10,d} {real:10,d} {est:10,d} {est / real:8.3f} "
              f"{real / budget:11.3f}")


if __name__ == "__main__":
    main()
