"""The budget planner: every plan's finished file fits, impossible budgets name the smallest that works."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from d3codec.distill.labels import store_labels
from d3codec.distill.planner import decoder_shapes, plan_budget, store_decoder_state, store_priors
from d3codec.errors import BudgetError, ConfigError
from d3codec.format.budget import parse_budget
from d3codec.format.io import encoded_size
from d3codec.format.types import D3File, DecoderEntry, Metadata


def _metadata(num_classes: int, shape: tuple[int, int, int]) -> Metadata:
    c = shape[0]
    return Metadata(name="synthetic", num_classes=num_classes, class_names=[f"class {i}" for i in range(num_classes)],
                    image_shape=shape, mean=(0.4812,) * c, std=(0.2467,) * c, fingerprint="0123456789abcdef" * 2)


def _finished_file(plan, metadata: Metadata, provenance: dict, seed: int, constant_logvar: bool = False) -> D3File:
    """What `encode` would write for `plan`: trained-like (Gaussian) values in the planned layout."""
    g = torch.Generator().manual_seed(seed)
    shapes = decoder_shapes(plan.family, plan.version, plan.hparams)
    state = {k: (torch.randn(s, generator=g) * 0.3 if dt.is_floating_point else torch.zeros(s, dtype=dt))
             for k, (s, dt) in shapes.items()}
    n, k, d = metadata.num_classes, plan.latents_per_class, plan.latent_dim
    probs = torch.softmax(4 * torch.randn(n, k, n, generator=g), dim=-1)
    # Trained codes spread 4-8 prior stds (0.1) per dimension on CIFAR-10, MNIST and digits: take 7.
    return D3File(metadata=metadata,
                  priors=store_priors(0.7 * torch.randn(n, k, d, generator=g),
                                      torch.full((n, k, d), 2 * math.log(0.1)) if constant_logvar
                                      else torch.randn(n, k, d, generator=g) - 2, plan.latent_dtype),
                  decoders=[DecoderEntry(plan.family, plan.version, plan.hparams, list(range(n)),
                                         store_decoder_state(state, plan.weight_dtype))],
                  labels=store_labels(probs, plan.labels), budget=plan.budget, provenance=provenance)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_classes=st.integers(2, 20), channels=st.sampled_from([1, 3]), size=st.sampled_from([8, 16, 28, 32]),
       ipc=st.sampled_from(["0.5ipc", "1ipc", "2ipc", "10ipc", "1ipc-u8", "50KB", "200000"]),
       weight_dtype=st.sampled_from(["I8", "F16"]), constant_logvar=st.booleans(), seed=st.integers(0, 10**6))
def test_planned_files_never_exceed_the_budget(num_classes: int, channels: int, size: int, ipc: str,
                                               weight_dtype: str, constant_logvar: bool, seed: int) -> None:
    metadata = _metadata(num_classes, (channels, size, size))
    budget = parse_budget(ipc, num_classes, metadata.image_shape)
    assume(budget.bytes <= 400_000)  # keeps compressing the check file fast
    provenance = {"encoder": "d3codec test", "seed": seed, "objective": "mmd", "iterations": 400}
    try:
        plan = plan_budget(metadata, budget, provenance=provenance, weight_dtype=weight_dtype,
                           constant_logvar=constant_logvar)
    except BudgetError as exc:
        need = int(str(exc).split("at least ")[1].split(" ")[0].replace(",", ""))
        assert need > budget.bytes
        return
    assert plan.bound <= budget.bytes
    assert sum(plan.breakdown.values()) == plan.bound and min(plan.breakdown.values()) >= 0
    assert encoded_size(_finished_file(plan, metadata, provenance, seed, constant_logvar)) <= budget.bytes


def test_size_estimate_sits_just_above_a_trained_like_file() -> None:
    """Weights and codes count as Gaussian values compress: the estimate never undercuts such a
    file, and stays within 6% of it, so plans fill the budget (counting values raw left 10-25%
    of CIFAR-10 budgets unused)."""
    metadata = _metadata(10, (3, 32, 32))
    budget = parse_budget("1ipc", 10, metadata.image_shape)  # K below its cap: nothing stops the fill
    provenance = {"encoder": "d3codec test", "seed": 0}
    plan = plan_budget(metadata, budget, provenance=provenance, labels="hard", constant_logvar=True)
    real = encoded_size(_finished_file(plan, metadata, provenance, seed=1, constant_logvar=True))
    assert not plan.guaranteed
    assert real <= plan.bound <= 1.06 * real
    assert plan.bound >= 0.97 * budget.bytes


def test_impossible_budget_names_a_budget_that_works() -> None:
    metadata = _metadata(10, (1, 8, 8))
    with pytest.raises(BudgetError, match="too small") as info:
        plan_budget(metadata, parse_budget("300", 10, (1, 8, 8)))
    message = str(info.value)
    assert "\n" not in message
    need = int(message.split("at least ")[1].split(" ")[0].replace(",", ""))
    plan = plan_budget(metadata, parse_budget(str(need), 10, (1, 8, 8)))
    assert plan.bound <= need


def test_more_budget_buys_a_wider_decoder_and_more_latents() -> None:
    metadata = _metadata(10, (3, 32, 32))
    small = plan_budget(metadata, parse_budget("1ipc", 10, (3, 32, 32)))
    large = plan_budget(metadata, parse_budget("10ipc", 10, (3, 32, 32)))
    assert large.num_params > small.num_params
    assert large.latents_per_class > small.latents_per_class > 1
    assert "plan: decoder" in small.summary() and "budget" in small.summary()


def test_int8_weights_fit_more_parameters_than_float32() -> None:
    metadata = _metadata(10, (1, 28, 28))
    budget = parse_budget("1ipc", 10, (1, 28, 28))
    i8 = plan_budget(metadata, budget, weight_dtype="I8")
    f32 = plan_budget(metadata, budget, weight_dtype="F32")
    assert i8.num_params > 2 * f32.num_params


def test_bad_planner_settings_are_config_errors() -> None:
    metadata = _metadata(10, (1, 8, 8))
    budget = parse_budget("10ipc", 10, (1, 8, 8))
    with pytest.raises(ConfigError, match="weight dtype"):
        plan_budget(metadata, budget, weight_dtype="I4")
    with pytest.raises(ConfigError, match="labels"):
        plan_budget(metadata, budget, labels="fuzzy")
    with pytest.raises(ConfigError, match="square"):
        plan_budget(_metadata(10, (1, 8, 16)), parse_budget("10ipc", 10, (1, 8, 16)))


def test_fixed_choices_are_honoured() -> None:
    metadata = _metadata(10, (1, 28, 28))
    plan = plan_budget(metadata, parse_budget("2ipc", 10, (1, 28, 28)), latents_per_class=3, latent_dim=16, width=8,
                       labels="hard")
    assert (plan.latents_per_class, plan.latent_dim, plan.hparams["width"], plan.labels.kind) == (3, 16, 8, "hard")
    free = plan_budget(metadata, parse_budget("2ipc", 10, (1, 28, 28)), latent_dim=16, width=8)
    assert free.latents_per_class > 3 and free.labels.kind != "hard"  # components fill the bytes left
    assert math.isclose(plan.budget.ipc, 2.0)


def test_components_never_outnumber_the_real_images_of_a_class() -> None:
    metadata = _metadata(10, (1, 28, 28))
    plan = plan_budget(metadata, parse_budget("10ipc", 10, (1, 28, 28)), max_latents_per_class=4)
    assert plan.latents_per_class == 4  # 10ipc would buy far more than 4 components per class


def test_at_the_component_cap_the_code_grows_while_the_decoder_keeps_half_its_width() -> None:
    from d3codec.distill.planner import MAX_LATENT_DIM_GROWTH, MIN_WIDTH_KEPT, default_latent_dim

    metadata = _metadata(10, (3, 16, 16))
    budget = parse_budget("10ipc", 10, (3, 16, 16))
    d0 = default_latent_dim(metadata.image_shape)
    base = plan_budget(metadata, budget, max_latents_per_class=100, latent_dim=d0)
    grown = plan_budget(metadata, budget, max_latents_per_class=100)
    assert base.latents_per_class == grown.latents_per_class == 100  # capped: the classes hold 100 images
    assert d0 < grown.latent_dim <= MAX_LATENT_DIM_GROWTH * d0
    assert MIN_WIDTH_KEPT * base.hparams["width"] <= grown.hparams["width"] < base.hparams["width"]
    assert grown.bound <= budget.bytes
    if grown.latent_dim < MAX_LATENT_DIM_GROWTH * d0:  # it stopped because the next code would starve the decoder
        try:
            longer = plan_budget(metadata, budget, latents_per_class=100, latent_dim=2 * grown.latent_dim)
            assert longer.hparams["width"] < MIN_WIDTH_KEPT * base.hparams["width"]
        except BudgetError:
            pass
    # Below the cap, D stays the image size's default: the bytes go to more components.
    assert plan_budget(metadata, parse_budget("1ipc", 10, (3, 16, 16))).latent_dim == d0


def test_codes_sharing_one_prior_std_lie_on_its_grid_and_compress() -> None:
    """I8 latent means whose components share one prior std s are stored on a grid of CODE_STEP x s
    (rounding moves them less than a draw's noise) and compress far better than min-max int8;
    learnt (varied) log-variances keep min-max storage, other dtypes their own."""
    import zstandard

    from d3codec.distill.planner import CODE_STEP
    g = torch.Generator().manual_seed(0)
    mean = 0.5 * torch.randn(10, 100, 32, generator=g)
    const = torch.full_like(mean, 2 * math.log(0.1))
    grid = store_priors(mean, const, "I8").mean
    assert grid.scale == pytest.approx((CODE_STEP * 0.1,)) and grid.zero_point == (0,)
    assert (grid.dequantize() - mean).abs().max() <= CODE_STEP * 0.1 / 2 + 1e-6
    minmax = store_priors(mean, const + 0.01 * torch.randn(mean.shape, generator=g), "I8").mean
    assert minmax.scale[0] < 0.05  # min-max over the range: a fine grid
    size = lambda s: len(zstandard.ZstdCompressor(level=19).compress(s.raw.numpy().tobytes()))  # noqa: E731
    assert size(grid) < 0.7 * size(minmax)
    assert store_priors(mean, const, "F16").mean.dtype == "F16"
