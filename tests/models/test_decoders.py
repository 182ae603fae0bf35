"""Decoder families: pinned parameter counts, shapes, ranges, batch independence, BN folding, errors."""
from __future__ import annotations

import pytest
import torch

from d3codec.errors import D3Error
from d3codec.models import (DecoderHparamsError, UnknownDecoderError, build_decoder, decoder_specs, export_state,
                            fold_batchnorm, is_registered, num_parameters, register_decoder)

FAMILIES = ("small", "medium", "large")


def _hp(family: str, size: int = 16, channels: int = 3, width: int = 16, norm: str = "batch", **extra: object) -> dict:
    hp = {"channels": channels, "image_size": size, "width": width, "norm": norm, **extra}
    hp["latent_dim"] = 4 * width if family == "large" else extra.get("latent_dim", 8)
    return hp


def _randomise_bn(module: torch.nn.Module, seed: int = 0) -> None:
    """Give BatchNorm layers non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)


# ---- the paper's architectures, pinned ----

def test_small_at_64px_has_the_papers_789187_parameters() -> None:
    assert num_parameters("small", 1, {"channels": 3, "image_size": 64, "latent_dim": 64, "width": 256}) == 789_187


def test_medium_at_64px_has_the_papers_5774691_parameters() -> None:
    assert num_parameters("medium", 1, {"channels": 3, "image_size": 64, "latent_dim": 2048}) == 5_774_691


def test_large_at_64px_has_the_papers_6308547_parameters() -> None:
    assert num_parameters("large", 1, {"channels": 3, "image_size": 64}) == 6_308_547


@pytest.mark.parametrize("family,size,widths", [
    ("small", 64, (256, 128, 64, 32, 32, 32)),
    ("small", 32, (256, 128, 64, 32, 32)),
    ("medium", 64, (512, 256, 128, 64, 32, 32)),
    ("medium", 32, (512, 256, 128, 64, 64)),
    ("large", 64, (1024, 512, 256, 128, 64, 64)),
])
def test_block_widths_follow_the_paper(family: str, size: int, widths: tuple[int, ...]) -> None:
    hp = {"channels": 3, "image_size": size, "latent_dim": 64 if family == "small" else (2048 if family == "medium" else 4096)}
    with torch.device("meta"):
        m = build_decoder(family, 1, hp)
    assert m.widths == widths
    assert len(m.blocks) == len(widths) - 1


def test_builtin_families_are_registered() -> None:
    assert {("large", 1), ("medium", 1), ("small", 1)} <= {(s.family, s.version) for s in decoder_specs()}
    assert all(is_registered(f, 1) for f in FAMILIES)
    assert not is_registered("small", 99)


# ---- behaviour at every resolution ----

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [8, 16, 28, 32, 64])
def test_output_shape_range_and_finiteness(family: str, size: int) -> None:
    channels = 1 if size == 28 else 3
    m = build_decoder(family, 1, _hp(family, size, channels=channels, width=8)).eval()
    with torch.no_grad():
        x = m(torch.randn(3, m.latent_dim, generator=torch.Generator().manual_seed(0)) * 3)
    assert x.shape == (3, channels, size, size) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.abs().max() <= 1.0


def test_128px_small_decoder() -> None:
    m = build_decoder("small", 1, _hp("small", 128, width=8)).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 8)).shape == (2, 3, 128, 128)


def test_28px_is_the_centre_crop_of_the_32px_drawing() -> None:
    torch.manual_seed(0)
    m28 = build_decoder("small", 1, _hp("small", 28, channels=1, width=8)).eval()
    m32 = build_decoder("small", 1, _hp("small", 32, channels=1, width=8)).eval()
    m32.load_state_dict(m28.state_dict())
    z = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(m28(z), m32(z)[:, :, 2:30, 2:30])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_in_eval_a_sample_does_not_depend_on_its_batch_mates(family: str, norm: str) -> None:
    torch.manual_seed(1)
    m = build_decoder(family, 1, _hp(family, 16, width=16, norm=norm))
    _randomise_bn(m)
    m.eval()
    z = torch.randn(9, m.latent_dim)
    with torch.no_grad():
        batch = m(z)
        alone = torch.cat([m(z[i:i + 1]) for i in range(len(z))])
        other = m(torch.cat([z[:1], torch.randn(30, m.latent_dim) * 5]))
    assert torch.allclose(batch, alone, atol=1e-5)
    assert torch.allclose(batch[:1], other[:1], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_latents_and_weights(family: str) -> None:
    m = build_decoder(family, 1, _hp(family, 8, width=8)).train()
    z = torch.randn(4, m.latent_dim, requires_grad=True)
    m(z).square().sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.parameters())


# ---- stored state and BatchNorm folding ----

def test_export_state_drops_bn_counters_and_loads_strictly() -> None:
    m = build_decoder("small", 1, _hp("small", 16))
    state = export_state(m)
    assert not any(k.endswith("num_batches_tracked") for k in state)
    assert {"fc.weight", "blocks.0.conv.weight", "blocks.0.norm.running_var", "out.bias"} <= set(state)
    fresh = build_decoder("small", 1, m.hparams)
    fresh.load_state_dict(state, strict=True)
    for k, v in state.items():
        assert torch.equal(fresh.state_dict()[k], v)


@pytest.mark.parametrize("family", FAMILIES)
def test_folding_batchnorm_gives_a_norm_none_decoder_with_the_same_outputs(family: str) -> None:
    torch.manual_seed(2)
    m = build_decoder(family, 1, _hp(family, 32, width=16))
    _randomise_bn(m, seed=3)
    m.eval()
    hp, state = fold_batchnorm(m)
    assert hp["norm"] == "none" and hp["width"] == 16
    assert not any(".norm." in k for k in state)
    folded = build_decoder(family, 1, hp).eval()
    folded.load_state_dict(state, strict=True)
    z = torch.randn(6, m.latent_dim)
    with torch.no_grad():
        assert torch.allclose(folded(z), m(z), atol=1e-5)
    assert sum(v.numel() for v in state.values()) < sum(v.numel() for v in export_state(m).values())


def test_folding_a_decoder_without_batchnorm_changes_nothing() -> None:
    m = build_decoder("small", 1, _hp("small", 16, norm="instance"))
    hp, state = fold_batchnorm(m)
    assert hp["norm"] == "instance" and state.keys() == export_state(m).keys()


def test_builds_on_meta_device_for_planning() -> None:
    with torch.device("meta"):
        m = build_decoder("medium", 1, {"channels": 3, "image_size": 64, "latent_dim": 2048})
    assert all(v.is_meta for v in export_state(m).values())


# ---- errors ----

def test_unknown_family_names_it_and_the_fix() -> None:
    with pytest.raises(UnknownDecoderError, match=r"decoder family 'xl' is unknown to d3codec .*a newer d3codec may define it"):
        build_decoder("xl", 1, {})


def test_unknown_version_names_the_known_ones() -> None:
    with pytest.raises(UnknownDecoderError, match=r"'small' version 7 \(this d3codec knows versions 1\)"):
        build_decoder("small", 7, _hp("small"))


@pytest.mark.parametrize("family,hparams,match", [
    ("small", {"image_size": 16, "latent_dim": 8}, "needs hyper-parameter 'channels'"),
    ("small", {"channels": 3, "image_size": "16", "latent_dim": 8}, "image_size must be an integer"),
    ("small", {"channels": 3, "image_size": 2, "latent_dim": 8}, r"image_size must be an integer in \[4, 1024\]"),
    ("small", {"channels": 3, "image_size": 16, "latent_dim": 8, "norm": "layer"}, "norm must be one of"),
    ("small", {"channels": 3, "image_size": 16, "latent_dim": 8, "dropout": 0.1}, "unknown hyper-parameter 'dropout'"),
    ("medium", {"channels": 3, "image_size": 16, "latent_dim": True}, "latent_dim must be an integer"),
    ("large", {"channels": 3, "image_size": 16, "width": 8, "latent_dim": 64}, r"latent_dim must be 4 \* width = 32"),
])
def test_bad_hparams_raise_one_line_d3_errors(family: str, hparams: dict, match: str) -> None:
    with pytest.raises(DecoderHparamsError, match=match) as info:
        build_decoder(family, 1, hparams)
    assert isinstance(info.value, D3Error) and "\n" not in str(info.value)


def test_registering_a_new_family_makes_it_buildable() -> None:
    @register_decoder("test-only-identity", 1)
    def _builder(hparams: dict) -> torch.nn.Module:
        return torch.nn.Identity()

    assert isinstance(build_decoder("test-only-identity", 1, {}), torch.nn.Identity)
    with pytest.raises(ValueError, match="already registered"):
        register_decoder("test-only-identity", 1)(lambda hp: torch.nn.Identity())
