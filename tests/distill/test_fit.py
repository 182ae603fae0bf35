"""The reconstruction phase (`init="real"`): the decoder and latent means learn to draw K real
images per class before the objective runs, and the priors start at the fit's noise level."""
from __future__ import annotations

import math

import pytest
import torch

from d3codec.data import open_dataset
from d3codec.distill.api import EncodeOptions, plan_for
from d3codec.distill.distiller import PCA_CODE_STD, Distiller
from d3codec.distill.experts import ensure_experts
from d3codec.errors import ConfigError

FIT = 150


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    digits = open_dataset("digits", cache_dir=cache, progress=False)
    options = EncodeOptions(latents_per_class=3, latent_dim=8, iterations=0, fit_steps=FIT, cache_dir=cache,
                            quiet=True, expert_epochs=1, overrides={"calibration_samples": 200, "fit_noise": 0.1})
    plan, cfg, real, _ = plan_for(digits, "4ipc", options)
    experts = ensure_experts(digits, num_experts=1, epochs=1, seed=0, cache_dir=cache, progress=False)
    distiller = Distiller(plan, real.metadata(), real, experts, cfg)
    losses = [distiller.step()["fit"] for _ in range(FIT)]
    return distiller, real, losses


def test_fit_reconstructs_the_chosen_real_images(fitted) -> None:
    distiller, real, losses = fitted
    assert sum(losses[-5:]) < 0.3 * sum(losses[:5])
    n, k = distiller.mean.shape[:2]
    targets = real.batch(distiller.fit_targets.reshape(-1).numpy())
    assert distiller.fit_targets.shape == (n, k)
    # The targets are distinct real images of their own class.
    assert all(len(set(row.tolist())) == k for row in distiller.fit_targets)
    labels = real.label_tensor(distiller.fit_targets.reshape(-1).numpy())
    assert torch.equal(labels, torch.arange(n).repeat_interleave(k))
    means = torch.cat(list(distiller.mean_image_batches())).reshape(n * k, -1)
    dist = torch.cdist(means, targets.reshape(n * k, -1))
    own = (dist.argmin(dim=1) == torch.arange(n * k)).float().mean()
    assert own >= 0.8, f"only {own:.0%} of mean images are nearest their own target"


def test_priors_start_at_the_fit_noise(fitted) -> None:
    distiller, _, _ = fitted
    assert torch.allclose(distiller.logvar, torch.full_like(distiller.logvar, 2 * math.log(0.1)))
    assert distiller.iteration == FIT and distiller.config.total_iterations == FIT


def test_fit_settings_are_checked() -> None:
    from d3codec.distill.distiller import DistillConfig

    with pytest.raises(ConfigError, match="init"):
        DistillConfig(init="gan").validate()
    with pytest.raises(ConfigError, match="fit_noise"):
        DistillConfig(fit_noise=0.0).validate()


def test_cpu_objective_keeps_the_log_variances_at_one_value(tmp_path) -> None:
    """On CPU the objective does not train log-variances, so the file's stay one repeated value
    (the planner counts them as compressed: a file that trained them could overrun the budget)."""
    cache = str(tmp_path / "cache")
    digits = open_dataset("digits", cache_dir=cache, progress=False)
    options = EncodeOptions(latents_per_class=2, latent_dim=8, iterations=3, fit_steps=3, cache_dir=cache, quiet=True,
                            overrides={"calibration_samples": 100, "samples_per_class": 4, "real_per_class": 4})
    plan, cfg, real, _ = plan_for(digits, "4ipc", options)
    assert cfg.learn_logvar is False
    experts = ensure_experts(digits, num_experts=1, epochs=1, seed=0, cache_dir=cache, progress=False)
    distiller = Distiller(plan, real.metadata(), real, experts, cfg)
    mean_before = None
    for i in range(cfg.total_iterations):
        distiller.step()
        if i == cfg.fit_iterations - 1:
            mean_before = distiller.mean.detach().clone()
    assert not torch.equal(mean_before, distiller.mean.detach())  # the objective did train the means
    assert torch.all(distiller.logvar == 2 * math.log(cfg.fit_noise))


def test_fit_starts_from_principal_component_codes(fitted) -> None:
    """The fit's starting latents are the targets' PCA coordinates at std PCA_CODE_STD: identical
    images get identical codes, different ones different codes (GLO's initialisation)."""
    distiller, _, _ = fitted
    n, k, d = distiller.mean.shape
    targets = distiller.fit_targets.clone()
    targets[1, 0] = targets[0, 0]  # one image twice
    codes = distiller._pca_latents(targets).reshape(n * k, d)
    assert torch.allclose(codes.std(0), torch.full((d,), PCA_CODE_STD), atol=1e-4)
    assert torch.allclose(codes[0], codes[k]) and not torch.allclose(codes[0], codes[1])
    two = targets[0, :2].repeat(n * k)[:n * k].reshape(n, k)  # 2 distinct images: rank 1
    few = distiller._pca_latents(two)
    assert torch.isfinite(few).all() and (few[..., 1:] == 0).all()


def test_default_fit_steps_grow_with_the_targets(tmp_path) -> None:
    """Many components get a longer fit (each image seen about FIT_PASSES times), within bounds;
    a fit length the user gives is kept."""
    from d3codec.distill.distiller import FIT_PASSES, MAX_FIT_STEPS, DistillConfig, default_fit_steps

    cfg = DistillConfig(fit_steps=1000, fit_batch=256)
    assert default_fit_steps(10 * 30, cfg) == 1000
    assert default_fit_steps(10 * 500, cfg) == math.ceil(FIT_PASSES * 5000 / 256)
    assert default_fit_steps(1000 * 500, cfg) == MAX_FIT_STEPS
    digits = open_dataset("digits", cache_dir=str(tmp_path), progress=False)
    auto = EncodeOptions(latents_per_class=100, latent_dim=8, cache_dir=str(tmp_path), overrides={"fit_batch": 64})
    _, cfg_auto, _, prov = plan_for(digits, "100ipc", auto)
    assert cfg_auto.fit_steps == default_fit_steps(10 * 100, cpu_cfg := auto.distill_config()) > cpu_cfg.fit_steps
    assert prov["fit_steps"] == cfg_auto.fit_steps
    given = EncodeOptions(latents_per_class=100, latent_dim=8, fit_steps=300, cache_dir=str(tmp_path),
                          overrides={"fit_batch": 64})
    _, cfg_given, _, _ = plan_for(digits, "100ipc", given)
    assert cfg_given.fit_steps == 300


def test_final_phase_trains_the_means_the_file_stores(tmp_path) -> None:
    """Once frozen (the final phase), draws start from the latent means as `store_priors` stores
    them, as the decoder's weights are fake-quantised: what the last iterations optimise is the file."""
    from d3codec.distill.planner import store_priors

    cache = str(tmp_path / "cache")
    digits = open_dataset("digits", cache_dir=cache, progress=False)
    options = EncodeOptions(latents_per_class=2, latent_dim=8, iterations=4, fit_steps=3, cache_dir=cache, quiet=True,
                            overrides={"calibration_samples": 100, "samples_per_class": 4, "real_per_class": 4,
                                       "final_fraction": 0.5})
    plan, cfg, real, _ = plan_for(digits, "4ipc", options)
    experts = ensure_experts(digits, num_experts=1, epochs=1, seed=0, cache_dir=cache, progress=False)
    distiller = Distiller(plan, real.metadata(), real, experts, cfg)
    assert torch.equal(distiller._means(), distiller.mean)
    for _ in range(cfg.total_iterations):
        distiller.step()
    assert distiller.frozen
    stored = store_priors(distiller.mean.detach(), distiller.logvar.detach(), plan.latent_dtype).mean.dequantize()
    assert torch.equal(distiller._means().detach(), stored)
    assert not torch.equal(stored, distiller.mean.detach())
