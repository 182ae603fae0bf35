"""Maximum mean discrepancy between feature sets: a mixture of RBF kernels, unbiased estimator.

D3 matches, per class, the expert features of decoded samples with those of real images of the
same class. Both sets must come from the same normalised pixel space (see ARCHITECTURE.md).
"""
from __future__ import annotations

from typing import Sequence

import torch

#: The paper's kernel bandwidths.
DEFAULT_SIGMAS: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances [n, m], clamped at 0 (float rounding)."""
    aa = (a * a).sum(1, keepdim=True)
    bb = (b * b).sum(1, keepdim=True)
    return (aa + bb.T - 2.0 * a @ b.T).clamp_min(0.0)


def _kernel(d2: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    return sum(torch.exp(-d2 / (2.0 * s * s)) for s in sigmas)  # type: ignore[return-value]


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, sigmas: Sequence[float] = DEFAULT_SIGMAS) -> torch.Tensor:
    """Unbiased estimate of MMD^2 between samples `x` [n, d] and `y` [m, d] (n, m >= 2).

    Kernel: sum over `sigmas` of exp(-||a - b||^2 / (2 sigma^2)). The diagonal terms of the
    within-set kernels are excluded, so the estimate is unbiased (and may be slightly negative).
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd needs [n, d] and [m, d] features, got {tuple(x.shape)} and {tuple(y.shape)}")
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"unbiased mmd needs at least 2 samples per set, got {n} and {m}")
    kxx = _kernel(_sq_dists(x, x), sigmas)
    kyy = _kernel(_sq_dists(y, y), sigmas)
    kxy = _kernel(_sq_dists(x, y), sigmas)
    # exp(0) = 1 per bandwidth on the diagonal: subtract it exactly instead of masking.
    diag = float(len(sigmas))
    sxx = (kxx.sum() - diag * n) / (n * (n - 1))
    syy = (kyy.sum() - diag * m) / (m * (m - 1))
    return sxx + syy - 2.0 * kxy.mean()


def classwise_mmd(syn_feats: torch.Tensor, syn_labels: torch.Tensor, real_feats: torch.Tensor,
                  real_labels: torch.Tensor, sigmas: Sequence[float] = DEFAULT_SIGMAS) -> torch.Tensor:
    """Sum over classes present in both sets of `mmd2_unbiased` between same-class features."""
    total = syn_feats.new_zeros(())
    for c in torch.unique(syn_labels).tolist():
        xs = syn_feats[syn_labels == c]
        ys = real_feats[real_labels == c]
        if xs.shape[0] >= 2 and ys.shape[0] >= 2:
            total = total + mmd2_unbiased(xs, ys, sigmas)
    return total


def grouped_mmd(syn_feats: torch.Tensor, real_feats: torch.Tensor, per_class: int, real_counts: Sequence[int],
                sigmas: Sequence[float] = DEFAULT_SIGMAS) -> torch.Tensor:
    """Sum over a batch's classes of `mmd2_unbiased` between class i's synthetic features (rows
    `i * per_class` to `(i + 1) * per_class` of `syn_feats`) and its real ones (the next
    `real_counts[i]` rows of `real_feats`, classes in order). A class with under 2 real rows adds
    nothing; with none left the sum is a constant zero (no gradient)."""
    total = syn_feats.new_zeros(())
    start = 0
    for i, k in enumerate(real_counts):
        if k >= 2:
            total = total + mmd2_unbiased(syn_feats[i * per_class:(i + 1) * per_class], real_feats[start:start + k],
                                          sigmas)
        start += k
    return total
