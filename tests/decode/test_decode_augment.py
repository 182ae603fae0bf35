"""DSA: shapes, differentiability, determinism for a generator, Siamese replay, each transform's effect."""
from __future__ import annotations

import pytest
import torch

from d3codec.augment import DSA, TRANSFORMS
from d3codec.errors import ConfigError


def _batch(n: int = 8, c: int = 3, s: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["single", "all"])
@pytest.mark.parametrize("shape", [(8, 3, 16, 16), (5, 1, 28, 28), (2, 3, 32, 32)])
def test_shape_dtype_and_finite(mode: str, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    for seed in range(6):
        y = DSA(mode=mode)(x, torch.Generator().manual_seed(seed))
        assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()


@pytest.mark.parametrize("word", list(TRANSFORMS))
def test_every_transform_is_differentiable(word: str) -> None:
    x = _batch().requires_grad_(True)
    y = DSA(word)(x, torch.Generator().manual_seed(1))
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_same_generator_seed_same_output_and_different_seeds_differ() -> None:
    x = _batch()
    aug = DSA(mode="all")
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_single_mode_picks_every_transform_family() -> None:
    aug = DSA()
    x = _batch()
    picked = {aug.sample(x, torch.Generator().manual_seed(s)).transforms for s in range(200)}
    assert picked == {TRANSFORMS[w] for w in TRANSFORMS}


def test_siamese_replay_gives_same_transform_on_two_batches() -> None:
    aug = DSA(mode="all")
    real, syn = _batch(seed=1), _batch(seed=2)
    params = aug.sample(real, torch.Generator().manual_seed(7))
    # the same parameters applied to one batch twice give the same result ...
    assert torch.equal(aug.apply(real, params), aug.apply(real, params))
    # ... and a transform is the same map on both batches: it is linear for these words, so
    # applying it to the sum equals the sum of the applied (same spatial and flip parameters)
    lin = DSA("crop_cutout_flip_scale_rotate", mode="all")
    p = lin.sample(real, torch.Generator().manual_seed(7))
    both = lin.apply(real + syn, p)
    assert torch.allclose(both, lin.apply(real, p) + lin.apply(syn, p), atol=1e-5)


def test_per_batch_params_replay_on_a_batch_of_other_size() -> None:
    aug = DSA(mode="all", per_batch=True)
    x = _batch(n=6)
    p = aug.sample(x, torch.Generator().manual_seed(0))
    assert p.batch_size == 1
    small = aug.apply(x[:2], p)
    assert torch.allclose(small, aug.apply(x, p)[:2], atol=1e-6)


def test_per_sample_params_are_independent_of_batch_mates() -> None:
    aug = DSA(mode="all")
    x = _batch(n=6)
    p = aug.sample(x, torch.Generator().manual_seed(0))
    # brightness/contrast etc. are per sample: sample 0 alone gets the same augmentation
    assert torch.allclose(aug.apply(x[:1], p), aug.apply(x, p)[:1], atol=1e-6)


def test_params_drawn_for_fewer_images_are_rejected() -> None:
    aug = DSA(mode="all")
    p = aug.sample(_batch(n=2), torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="drawn for 2 images"):
        aug.apply(_batch(n=4), p)


def test_flip_with_probability_one_mirrors() -> None:
    x = _batch()
    y = DSA("flip", prob_flip=1.0)(x, torch.Generator().manual_seed(0))
    assert torch.equal(y, x.flip(3))


def test_crop_translates_by_whole_pixels_with_zero_fill() -> None:
    x = torch.ones(4, 1, 16, 16)
    aug = DSA("crop")
    p = aug.sample(x, torch.Generator().manual_seed(0))
    y = aug.apply(x, p)
    shift = p.values["crop"].abs()
    # a shift of s rows and t columns leaves (16-s)(16-t) ones: only whole-pixel moves, zero fill
    assert torch.equal(y.sum(dim=(1, 2, 3)), ((16 - shift[:, 0]) * (16 - shift[:, 1])).float())
    assert shift.max() <= 2  # 0.125 * 16


def test_cutout_zeroes_a_bounded_square() -> None:
    x = torch.ones(16, 3, 16, 16)
    y = DSA("cutout")(x, torch.Generator().manual_seed(0))
    zeros = (y[:, 0] == 0).sum(dim=(1, 2))
    assert (zeros > 0).all() and (zeros <= 64).all()  # at most 8x8 = half the side
    assert torch.equal(y[:, 0], y[:, 2])  # the same mask on every channel


def test_colour_keeps_constant_images_constant_in_space() -> None:
    x = torch.full((4, 3, 8, 8), 0.25)
    y = DSA("color")(x, torch.Generator().manual_seed(0))
    assert torch.allclose(y, y[:, :, :1, :1].expand_as(y))


def test_rotation_and_scale_preserve_the_centre_pixel() -> None:
    x = _batch(n=4, s=17)
    for word in ("rotate", "scale"):
        y = DSA(word)(x, torch.Generator().manual_seed(0))
        assert torch.allclose(y[:, :, 8, 8], x[:, :, 8, 8], atol=1e-5)


def test_cpu_generator_with_other_dtype() -> None:
    x = _batch().double()
    y = DSA(mode="all")(x, torch.Generator().manual_seed(0))
    assert y.dtype == torch.float64


def test_bad_strategy_and_mode_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown augmentation 'blur'"):
        DSA("color_blur")
    with pytest.raises(ConfigError, match="mode"):
        DSA(mode="sometimes")
    with pytest.raises(ConfigError, match=r"\[B, C, H, W\]"):
        DSA()(torch.zeros(3, 8, 8), torch.Generator())


def test_none_strategy_is_identity() -> None:
    x = _batch()
    assert torch.equal(DSA("none")(x, torch.Generator()), x)
