"""Write a finished file within its budget: drop every class's last components if it comes out over.

The planner sizes most files with a compressed-size estimate (tensor values counted raw, headers as
they compress), which fills the budget far better than the strict shape-only bound but is not a
proof. So the writer checks: a file over its budget loses the last latent components of every class
(with their labels), the fewest that make it fit, instead of failing after hours of training.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

from d3codec.format.errors import OverBudgetError
from d3codec.format.io import dumps, encoded_size, save
from d3codec.format.types import LABEL_TENSORS, PRIOR_TENSORS, Budget, D3File, Stored


def _trim_stored(s: Optional[Stored], k: int) -> Optional[Stored]:
    """The first `k` entries along axis 1 (components) of an [N, K, ...] tensor."""
    if s is None:
        return None
    if s.axis is not None and s.axis % s.raw.dim() == 1:  # one scale per component: keep the first k
        return Stored(s.raw[:, :k].contiguous(), scale=s.scale[:k] if s.scale else None,
                      zero_point=s.zero_point[:k] if s.zero_point else None, axis=s.axis)
    return replace(s, raw=s.raw[:, :k].contiguous())


def trim_components(d3: D3File, k: int) -> D3File:
    """`d3` with only the first `k` latent components of every class (priors and labels)."""
    p, lab = d3.priors, d3.labels
    if not 1 <= k <= p.latents_per_class:
        raise ValueError(f"k must be in 1..{p.latents_per_class}, got {k}")
    priors = replace(p, **{f: _trim_stored(getattr(p, f), k) for f in PRIOR_TENSORS})
    labels = replace(lab, **{f: _trim_stored(getattr(lab, f), k) for f in LABEL_TENSORS})
    return d3.replace(priors=priors, labels=labels)


def fit_components(d3: D3File, budget: Budget) -> D3File:
    """`d3` itself when it fits `budget`, else with the most components per class that fit.

    Raises the `OverBudgetError` of the whole file when even one component per class is over.
    """
    if encoded_size(d3, budget) <= budget.bytes:
        return d3
    lo, hi = 0, d3.priors.latents_per_class - 1  # largest k in lo..hi that fits; 0: none does
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if encoded_size(trim_components(d3, mid), budget) <= budget.bytes:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        dumps(d3, budget)  # raises the OverBudgetError that names the largest part
    return trim_components(d3, lo)


def save_within_budget(d3: D3File, path: str, budget: Budget,
                       say: Callable[[str], None] = lambda _: None) -> tuple[int, D3File]:
    """Save atomically within `budget` (trimming components if need be); returns (size, file saved)."""
    try:
        return save(d3, path, budget), d3
    except OverBudgetError:
        fitted = fit_components(d3, budget)
        say(f"the file came out over its size estimate: kept {fitted.priors.latents_per_class} of "
            f"{d3.priors.latents_per_class} latent components per class to fit the budget")
        return save(fitted, path, budget), fitted
