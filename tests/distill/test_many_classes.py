"""The plan's rules at many classes and large images: the fit's length follows the pixels and the
budget, K stays where the fit can still learn every target, the decoder narrows with the image size,
and an MMD update draws a bounded number of classes; the small sets' plans do not move."""
from __future__ import annotations

import math
from typing import Callable

import torch

from d3codec.data import open_dataset
from d3codec.distill.api import EncodeOptions, plan_for
from d3codec.distill.distiller import (FIT_PASSES, MAX_FIT_STEPS, MIN_FIT_PASSES, Distiller, cpu_defaults,
                                      DistillConfig, default_fit_steps, fit_latent_cap, images_per_class,
                                      max_fit_steps, mmd_chunk_classes, mmd_class_count)
from d3codec.distill.experts import ensure_experts
from d3codec.distill.planner import WIDTHS, max_width, plan_budget
from d3codec.format.budget import parse_budget
from d3codec.format.types import Metadata

from many_classes import many_classes_npz


def _metadata(classes: int, size: int, channels: int = 3) -> Metadata:
    return Metadata(name="many", num_classes=classes, class_names=[f"c{i}" for i in range(classes)],
                    image_shape=(channels, size, size), mean=[0.5] * channels, std=[0.25] * channels)


def test_the_fit_cap_follows_pixels_and_the_budget() -> None:
    assert max_fit_steps((3, 32, 32)) == MAX_FIT_STEPS
    assert max_fit_steps((1, 28, 28)) == MAX_FIT_STEPS  # at most MAX_FIT_STEPS per budgeted image
    assert max_fit_steps((3, 64, 64)) == MAX_FIT_STEPS // 4
    assert max_fit_steps((3, 64, 64), ipc=2) == MAX_FIT_STEPS // 2
    assert max_fit_steps((3, 64, 64), ipc=10) == 10 * MAX_FIT_STEPS // 4
    assert images_per_class(4_915_200, 100, (3, 64, 64)) == 1.0
    cfg = cpu_defaults()
    # FIT_PASSES views of every target, between the configured floor and the cap.
    assert default_fit_steps(10, cfg, (3, 64, 64)) == cfg.fit_steps
    assert default_fit_steps(100 * 128, cfg, (3, 64, 64)) == MAX_FIT_STEPS // 4
    assert default_fit_steps(5000, cfg, (3, 32, 32)) == math.ceil(FIT_PASSES * 5000 / cfg.fit_batch)


def test_k_stays_where_the_capped_fit_sees_every_target_often_enough() -> None:
    cfg = cpu_defaults()
    for classes, size, ipc in [(100, 64, 1.0), (1000, 64, 1.0), (1000, 64, 2.0), (100, 64, 10.0)]:
        cap = fit_latent_cap(classes, (3, size, size), cfg, ipc)
        views = max_fit_steps((3, size, size), ipc) * cfg.fit_batch
        assert views // (classes * cap) >= MIN_FIT_PASSES
        assert views // (classes * (cap + 1)) < MIN_FIT_PASSES
    assert fit_latent_cap(1000, (3, 64, 64), cfg) == 12  # ImageNet-1K at 1ipc: the paper's regime (1-10)
    # 10-class sets at 28-32 px keep their K (up to 1,000 per class).
    assert fit_latent_cap(10, (3, 32, 32), cfg) >= 1000 and fit_latent_cap(10, (1, 28, 28), cfg) >= 1000


def test_the_default_decoder_narrows_with_the_image_size() -> None:
    assert max_width((3, 32, 32)) == 256 and max_width((3, 64, 64)) == 128 and max_width((3, 1024, 1024)) == 8192 // 1024
    assert max_width((1, 8192, 8192)) == WIDTHS[-1] == 4
    meta = _metadata(100, 64)
    plan = plan_budget(meta, parse_budget("10ipc", 100, (3, 64, 64)), max_latents_per_class=8)
    assert plan.hparams["width"] <= 128
    forced = plan_budget(meta, parse_budget("10ipc", 100, (3, 64, 64)), max_latents_per_class=8, width=256)
    assert forced.hparams["width"] == 256  # a width the user asks for is honoured


def test_a_many_class_plan_caps_k_by_the_fit_and_grows_the_code_instead(tmp_path) -> None:
    data = many_classes_npz(tmp_path / "many.npz", classes=50, per_class=12, size=16)
    ds = open_dataset(data, split="train", cache_dir=str(tmp_path / "cache"), progress=False)
    # A fit batch of 2 makes the fit cap K (4000 steps x 2 / (50 classes x 20 passes) = 8) below the
    # 10-11 images a class holds.
    options = EncodeOptions(cache_dir=str(tmp_path / "cache"), quiet=True, overrides={"fit_batch": 2})
    plan, cfg, real, _ = plan_for(ds, "1ipc", options)
    cap = fit_latent_cap(50, (3, 16, 16), cfg, images_per_class(plan.budget.bytes, 50, (3, 16, 16)))
    assert cap < int(real.class_counts().min())
    assert plan.latents_per_class == cap
    assert cfg.fit_iterations <= max_fit_steps((3, 16, 16))
    free = plan_for(ds, "1ipc", EncodeOptions(cache_dir=str(tmp_path / "cache"), quiet=True))[0]
    assert free.latents_per_class == int(real.class_counts().min())  # the default batch: the class size caps K
    assert plan.latent_dim >= free.latent_dim  # K capped lower: the code does not shrink


def _mmd_distiller(tmp_path, classes: int, **overrides) -> tuple[Distiller, Callable[[], Distiller]]:
    """A distiller of `classes` 8x8 classes ready for MMD updates (no fit), and a maker of more."""
    data = many_classes_npz(tmp_path / "many.npz", classes=classes, per_class=6, size=8)
    cache = str(tmp_path / "cache")
    ds = open_dataset(data, split="train", cache_dir=cache, progress=False)
    options = EncodeOptions(cache_dir=cache, quiet=True, latents_per_class=2, latent_dim=8, width=8, fit_steps=0,
                            iterations=2, overrides={"samples_per_class": 4, "real_per_class": 4,
                                                     "final_fraction": 0.0, **overrides})
    plan, cfg, real, _ = plan_for(ds, "4ipc", options)
    experts = ensure_experts(ds, num_experts=1, epochs=1, seed=0, cache_dir=cache, progress=False)
    make = lambda: Distiller(plan, real.metadata(), real, experts, cfg)  # noqa: E731
    return make(), make


def _one_mmd_update(distiller: Distiller) -> tuple[list[int], torch.Tensor]:
    """Run one MMD backward; the classes it drew and each class's gradient on its means."""
    chosen: list[int] = []
    draw = distiller.mmd_classes
    distiller.mmd_classes = lambda: chosen.extend(draw()) or list(chosen)  # record the update's classes
    distiller._zero()
    distiller._mmd_backward()
    return chosen, distiller.mean.grad.abs().sum(dim=(1, 2))


def test_an_mmd_update_draws_at_most_mmd_classes_and_leaves_the_others_alone(tmp_path) -> None:
    distiller, make = _mmd_distiller(tmp_path, 30, mmd_classes=4)
    cfg = distiller.config
    drawn = [distiller.mmd_classes() for _ in range(20)]
    assert all(len(d) == 4 and d == sorted(set(d)) and 0 <= d[0] and d[-1] < 30 for d in drawn)
    assert len({c for d in drawn for c in d}) > 8  # different classes each update
    before = distiller.mean.detach().clone()
    chosen, grad = _one_mmd_update(distiller)
    assert len(chosen) == 4 and set(torch.nonzero(grad).flatten().tolist()) <= set(chosen)
    assert torch.equal(distiller.mean.detach(), before)
    # At or below mmd_classes every class is in every update, and no random draw is spent on it.
    assert mmd_class_count(cfg, 3) == 3 and mmd_class_count(cfg, 30) == 4
    small = make()
    small.config.mmd_classes = 30
    state = small.generator.get_state()
    assert small.mmd_classes() == list(range(30))
    assert torch.equal(small.generator.get_state(), state)


def test_mmd_chunks_hold_fewer_classes_of_larger_images(tmp_path) -> None:
    """At 32 px and below a chunk holds `mmd_chunk` classes (CPU and GPU settings alike); at 64 px
    fewer, which bounds the objective's memory; and every class of an update still gets its
    gradient when the update spans several chunks."""
    for cfg in (cpu_defaults(), DistillConfig()):
        for shape in ((1, 8, 8), (1, 28, 28), (3, 32, 32)):
            assert mmd_chunk_classes(cfg, shape) == cfg.mmd_chunk == 16
        assert 1 <= mmd_chunk_classes(cfg, (3, 64, 64)) < 10
    assert mmd_chunk_classes(cpu_defaults(), (3, 512, 512)) == 1
    distiller, _ = _mmd_distiller(tmp_path, 12, mmd_classes=5, mmd_chunk=2)
    chosen, grad = _one_mmd_update(distiller)
    assert len(chosen) == 5 and set(torch.nonzero(grad).flatten().tolist()) == set(chosen)  # 3 chunks, all seen


def test_the_small_sets_plans_do_not_move() -> None:
    """CIFAR-10, MNIST and digits-like shapes: the fit cap and the width cap do not bind."""
    cfg = cpu_defaults()
    for classes, shape, budget in [(10, (3, 32, 32), "10ipc"), (10, (1, 28, 28), "10ipc"), (10, (1, 8, 8), "1ipc")]:
        b = parse_budget(budget, classes, shape)
        ipc = images_per_class(b.bytes, classes, shape)
        assert fit_latent_cap(classes, shape, cfg, ipc) >= 1000
        assert max_width(shape) >= 192
