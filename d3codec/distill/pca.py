"""Principal axes of a set of images, for the fit's starting codes.

An eigendecomposition of the smaller of the two Gram matrices (pixels x pixels or images x images)
gives the same top axes as an SVD of the images, at a fraction of the time and memory when the
images have more pixels than there are images (64 px: 12,288 pixels, 4,096 images).
"""
from __future__ import annotations

import torch

#: The basis comes from at most this many images (evenly spaced over the targets).
BASIS_IMAGES = 4096

#: Axes whose variance is below this fraction of the largest carry rounding noise, not data.
_RELATIVE_FLOOR = 1e-12


def basis_rows(count: int) -> torch.Tensor:
    """Indices of the rows the basis comes from: at most `BASIS_IMAGES` of `count`, evenly spaced
    (so every class of the targets, which come class by class, is represented)."""
    return torch.linspace(0, count - 1, min(count, BASIS_IMAGES)).round().long()


def principal_axes(x: torch.Tensor, d: int) -> torch.Tensor:
    """The top-`d` principal axes of the rows of `x` ([images, pixels], float64, already centred),
    as orthonormal columns [pixels, <= d], largest variance first. Axes beyond the rank of `x` come
    back as zero columns."""
    if x.dtype != torch.float64 or x.dim() != 2:
        raise ValueError("principal_axes wants a 2-D float64 tensor of centred rows")
    rows, pixels = x.shape
    d = min(d, rows, pixels)
    if pixels <= rows:
        var, vec = torch.linalg.eigh(x.T @ x)  # ascending
        var, axes = var.flip(0)[:d], vec.flip(1)[:, :d]
    else:
        var, vec = torch.linalg.eigh(x @ x.T)
        var = var.flip(0)[:d]
        axes = x.T @ vec.flip(1)[:, :d] / var.clamp_min(1e-300).sqrt()  # unit columns
    live = var > _RELATIVE_FLOOR * var[:1].clamp_min(1e-300)
    return torch.where(live, axes, torch.zeros_like(axes))


def working_bytes(rows: int, pixels: int) -> int:
    """Peak memory of `principal_axes` on `rows` images of `pixels` values, with the float32 batch
    they are read as: that batch beside its float64 copy, or the copy beside the eigendecomposition
    of the smaller Gram matrix (the matrix, its vectors and LAPACK's workspace)."""
    n = min(rows, pixels)
    return max(12 * pixels * rows, 8 * pixels * rows + 32 * n * n)
