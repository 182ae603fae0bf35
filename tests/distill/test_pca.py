"""The fit's principal axes: the same top axes as an SVD, whichever Gram matrix is smaller."""
import pytest
import torch

from d3codec.distill.pca import BASIS_IMAGES, basis_rows, principal_axes, working_bytes


def _images(rows: int, pixels: int, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred rows with `rank` axes of distinct variance (and a trace of noise), and those axes."""
    g = torch.Generator().manual_seed(seed)
    axes, _ = torch.linalg.qr(torch.randn(pixels, rank, generator=g, dtype=torch.float64))
    scale = 2.0 ** -torch.arange(rank, dtype=torch.float64) * 10
    x = (torch.randn(rows, rank, generator=g, dtype=torch.float64) * scale) @ axes.T
    x += 1e-6 * torch.randn(rows, pixels, generator=g, dtype=torch.float64)
    return x - x.mean(0), axes


@pytest.mark.parametrize("rows,pixels", [(300, 40), (40, 300)])  # pixels x pixels, then images x images
def test_principal_axes_match_the_svd(rows: int, pixels: int) -> None:
    x, _ = _images(rows, pixels, rank=12)
    got = principal_axes(x, 8)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    assert got.shape == (pixels, 8)
    assert torch.allclose(got.T @ got, torch.eye(8, dtype=torch.float64), atol=1e-9)
    assert torch.allclose((got * vh[:8].T).sum(0).abs(), torch.ones(8, dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("rows,pixels", [(300, 40), (40, 300)])
def test_axes_beyond_the_rank_are_zero(rows: int, pixels: int) -> None:
    x, axes = _images(rows, pixels, rank=3)
    x = x @ axes @ axes.T  # exactly rank 3, noise removed
    got = principal_axes(x, 10)
    assert got.shape == (pixels, 10)
    assert torch.isfinite(got).all()
    assert (got[:, 3:] == 0).all()
    assert torch.allclose(got[:, :3].T @ got[:, :3], torch.eye(3, dtype=torch.float64), atol=1e-9)


def test_more_axes_than_the_data_holds() -> None:
    x, _ = _images(5, 40, rank=3)
    assert principal_axes(x, 16).shape == (40, 5)
    with pytest.raises(ValueError):
        principal_axes(x.float(), 4)


def test_working_memory_grows_with_rows_and_pixels() -> None:
    small, rows64, pixels64 = working_bytes(1024, 3072), working_bytes(4096, 3072), working_bytes(4096, 12288)
    assert 0 < small < rows64 < pixels64
    assert pixels64 >= 8 * 4096 * 12288  # at least the float64 copy of the images


def test_the_basis_rows_are_evenly_spaced_over_every_target() -> None:
    assert basis_rows(10).tolist() == list(range(10))
    many = basis_rows(45_000)
    assert len(many) == BASIS_IMAGES and many[0] == 0 and many[-1] == 44_999
    assert (many.diff() > 0).all()
