"""The decoders' matmul stem (`d3codec.decode.fastpath`): same images as the plain eager decoder,
per sample, for every family and norm; the size rule; the Renderer and D3Dataset use it on CPU."""
from __future__ import annotations

import itertools

import pytest
import torch

from d3codec.decode import D3Dataset, Renderer
from d3codec.decode import fastpath
from d3codec.decode.fastpath import FastDecoder, build_stem, fast_decoder, plan_stem
from d3codec.models import build_decoder

#: (family, hparams, fused) covering every stem kind: small -> fused (z of 8), medium with a wide z ->
#: tiled after its Linear, large -> tiled straight from z; tilings "pixels" and "rows".
CASES = {
    "small": ({"width": 8, "latent_dim": 8}, True),
    "medium": ({"width": 16, "latent_dim": 256}, False),
    "medium-narrow-z": ({"width": 16, "latent_dim": 8}, True),
    "large": ({"width": 16, "latent_dim": 64}, False),
}


def _decoder(case: str, norm: str, size: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    family = case.split("-")[0]
    m = build_decoder(family, 1, {"channels": 3, "image_size": size, "norm": norm, **CASES[case][0]})
    g = torch.Generator().manual_seed(seed + 1)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.3)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.2)
        if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
            mod.weight.data.uniform_(0.5, 1.5, generator=g)
            mod.bias.data.normal_(0, 0.2, generator=g)
    return m.eval()


@pytest.mark.parametrize("case,norm,size,tiling",
                         list(itertools.product(CASES, ("batch", "instance", "none"), (16, 12), fastpath.TILINGS)))
def test_fast_decoder_draws_the_plain_decoders_images_per_sample(case: str, norm: str, size: int,
                                                                  tiling: str) -> None:
    m = _decoder(case, norm, size)
    fast = fast_decoder(m, tiling=tiling)
    kind = "fused" if CASES[case][1] else tiling
    assert isinstance(fast, FastDecoder) and fast.stem.kind == kind
    z = torch.randn(9, m.latent_dim) * 2
    with torch.inference_mode():
        plain, batch = m(z), fast(z)
        alone = torch.cat([fast(z[i:i + 1]) for i in range(len(z))])
        other = fast(torch.cat([z[:1], torch.randn(20, m.latent_dim) * 5]))
    assert batch.shape == plain.shape == (9, 3, size, size)
    assert torch.allclose(batch, plain, atol=1e-5)
    assert torch.allclose(alone, batch, atol=1e-5) and torch.allclose(other[:1], batch[:1], atol=1e-5)
    with torch.inference_mode():
        assert torch.equal(fast(z), batch)  # deterministic


@pytest.mark.parametrize("tiling,blocks", [("pixels", 25), ("rows", 40)])
def test_tiled_stem_is_the_transposed_conv_as_a_linear_map(tiling: str, blocks: int) -> None:
    """On the identity basis (and zero, for the bias) the stem gives the conv's own outputs: the
    matrices are the conv weights rearranged, the dense matrix's 64 blocks never all stored."""
    m = _decoder("large", "none", 16)
    stem = build_stem(m, tiling)
    conv = m.blocks[0].conv
    basis = torch.cat([torch.zeros(1, m.latent_dim), torch.eye(m.latent_dim)])
    with torch.inference_mode():
        want = conv(basis.view(-1, m.widths[0], 2, 2))
        got = stem(basis)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    cin, cout = conv.in_channels, conv.out_channels
    assert sum(w.numel() for w in stem.weights) == blocks * cin * cout < 64 * cin * cout


def test_channels_last_option_is_followed_after_the_stem() -> None:
    m = _decoder("large", "none", 16)
    z = torch.randn(4, m.latent_dim)
    with torch.inference_mode():
        contiguous = fast_decoder(m, channels_last=False)(z)
        cl = fast_decoder(m.to(memory_format=torch.channels_last), channels_last=True)(z)
    assert contiguous.is_contiguous() and cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(contiguous, cl, atol=1e-5)


def test_size_rule_of_the_papers_decoders() -> None:
    hp = {"small": {"width": 256, "latent_dim": 64}, "medium": {"width": 512, "latent_dim": 2048},
          "large": {"width": 1024, "latent_dim": 4096}}
    with torch.device("meta"):
        ms = {f: build_decoder(f, 1, {"channels": 3, "image_size": 64, **h}) for f, h in hp.items()}
    assert {f: plan_stem(m) for f, m in ms.items()} == {
        "small": ("fused", 64 * 16 * 128),  # Linear composed in: 64 x (4 x 4 x 128)
        "medium": ("fused", 2048 * 16 * 256),  # composed: fewer multiply-adds than Linear + 40 row blocks
        "large": ("pixels", 25 * 1024 * 512)}  # 50 MiB: 2.8x the conv's 9 taps, not the dense 64 blocks
    assert plan_stem(ms["large"], tiling="rows") == ("rows", 40 * 1024 * 512)
    with pytest.raises(ValueError, match="tiling must be one of"):
        plan_stem(ms["large"], tiling="columns")


def test_the_plan_follows_the_shapes_not_the_thread_count(monkeypatch) -> None:
    """A DataLoader worker runs with one intra-op thread: it must build the stem its parent built."""
    with torch.device("meta"):
        ms = [build_decoder(f, 1, {"channels": 3, "image_size": 32, "width": w, "latent_dim": 4096})
              for f, w in (("medium", 256), ("large", 1024))]
    plans = []
    for threads in (1, 2, 8):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        plans.append([plan_stem(m) for m in ms])
    assert plans[0] == plans[1] == plans[2] and [p[0] for p in plans[0]] == ["rows", "pixels"]


def test_over_the_size_cap_or_in_training_the_module_is_kept(monkeypatch) -> None:
    m = _decoder("large", "none", 16)
    monkeypatch.setattr(fastpath, "MAX_STEM_ELEMENTS", 25 * 16 * 8 - 1)
    assert plan_stem(m, tiling="pixels") is None and fast_decoder(m, tiling="pixels") is m
    monkeypatch.setattr(fastpath, "MAX_STEM_ELEMENTS", 25 * 16 * 8)
    assert isinstance(fast_decoder(m, tiling="pixels"), FastDecoder) and fast_decoder(m, tiling="rows") is m
    assert fast_decoder(m.train()) is m
    assert fast_decoder(torch.nn.Linear(4, 4).eval()).__class__ is torch.nn.Linear


@pytest.mark.parametrize("family", ["small", "medium", "large"])
def test_dataset_images_equal_the_plain_eager_decoders(make_d3, family: str) -> None:
    d3 = make_d3(family, decoders=2, dim=16)
    fast = D3Dataset(d3, batch_size=8, seed=4)
    assert all(isinstance(m, FastDecoder) for m in fast.renderer.modules)  # on by default on CPU
    plain = D3Dataset(d3, batch_size=8, seed=4, fold_bn=False, channels_last=False, stem_matmul=False)
    assert not any(isinstance(m, FastDecoder) for m in plain.renderer.modules)
    xf, yf = zip(*fast)
    xp, yp = zip(*plain)
    assert torch.allclose(torch.cat(xf), torch.cat(xp), atol=1e-5) and torch.equal(torch.cat(yf), torch.cat(yp))


def test_renderer_stem_option_and_its_default_for_other_devices(make_d3) -> None:
    d3 = make_d3("large", dim=16)
    off = Renderer(d3, "cpu", stem_matmul=False)
    assert not isinstance(off.modules[0], FastDecoder)
    z, cls = torch.randn(5, 16), torch.zeros(5, dtype=torch.int64)
    assert torch.allclose(Renderer(d3, "cpu")(z, cls), off(z, cls), atol=1e-5)
    meta = Renderer(d3, "meta", fold_bn=False, decoders=[build_decoder("large", 1, d3.decoders[0].hparams).to("meta").eval()])
    assert not isinstance(meta.modules[0], FastDecoder)  # GPUs (any non-CPU device): unmeasured, off by default


def test_fused_stem_composes_the_linear_exactly_in_float64() -> None:
    m = _decoder("small", "none", 16).double()
    stem = build_stem(m)
    z = torch.randn(6, m.latent_dim, dtype=torch.float64)
    with torch.inference_mode():
        want = m.blocks[0].conv(m.fc(z).view(6, m.widths[0], 2, 2))
        got = stem(z)
    assert got.dtype == torch.float64 and torch.allclose(got, want, atol=1e-12)
