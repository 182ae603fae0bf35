"""The decoder families as spec/d3-format.md section 13 defines them, checked against the code.

`_widths` and `_keys` restate the spec's formulas and `_decode` its layer-by-layer definition in
plain NumPy (no torch modules): the registry's modules must have exactly those state-dict keys and
shapes and compute the same images, and the golden vectors' stored latents must decode to their
expected images through `_decode` alone, as a reader in another language would decode them.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from d3codec.format import load
from d3codec.models import build_decoder, export_state, fold_batchnorm

VECTORS = Path(__file__).resolve().parents[2] / "spec" / "vectors"
#: Spec 13: per family, the defaults of the optional hparams and the first conv's kernel.
DEFAULTS = {
    "small": {"width": 256, "slope": 0.2, "floor": lambda w: max(1, w // 8), "kernel": 4, "fc": True},
    "medium": {"width": 512, "slope": 0.01, "floor": lambda w: max(1, w // 16), "kernel": 3, "fc": True},
    "large": {"width": 1024, "slope": 0.01, "floor": lambda w: max(1, w // 16), "kernel": 3, "fc": False},
}
EPS = 1e-5


def _resolve(family: str, hp: dict[str, Any]) -> dict[str, Any]:
    d = DEFAULTS[family]
    width = hp.get("width", d["width"])
    return {"C": hp["channels"], "S": hp["image_size"], "w": width,
            "D": hp.get("latent_dim", 4 * width), "norm": hp.get("norm", "batch"),
            "slope": hp.get("slope", d["slope"]), "m": hp.get("min_width", d["floor"](width))}


def _widths(family: str, hp: dict[str, Any]) -> list[int]:
    """Spec 13.1: P = the smallest power of two >= max(S, 4), n = log2(P) - 1 blocks, widths w_0..w_n."""
    r = _resolve(family, hp)
    p = 4
    while p < r["S"]:
        p *= 2
    n = int(math.log2(p)) - 1
    if family == "small":
        return [r["w"]] + [max(r["m"], r["w"] // 2**i) for i in range(1, n + 1)]
    main = [max(r["m"], r["w"] // 2**i) for i in range(n)]
    return main + [main[-1]]


def _keys(family: str, hp: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Spec 13.2: state-dict key -> shape."""
    r, w = _resolve(family, hp), _widths(family, hp)
    k = DEFAULTS[family]["kernel"]
    out: dict[str, tuple[int, ...]] = {}
    if DEFAULTS[family]["fc"]:
        out["fc.weight"], out["fc.bias"] = (4 * w[0], r["D"]), (4 * w[0],)
    for i in range(len(w) - 1):
        out[f"blocks.{i}.conv.weight"], out[f"blocks.{i}.conv.bias"] = (w[i], w[i + 1], k, k), (w[i + 1],)
        names = {"batch": ("weight", "bias", "running_mean", "running_var"), "instance": ("weight", "bias"),
                 "none": ()}[r["norm"]]
        for name in names:
            out[f"blocks.{i}.norm.{name}"] = (w[i + 1],)
    out["out.weight"], out["out.bias"] = (r["C"], w[-1], 3, 3), (r["C"],)
    return out


def _conv_transpose(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Spec 13.3: out[o, 2y - 1 + a, 2x - 1 + b] += in[i, y, x] * W[i, o, a, b], kept where inside [0, 2H) x [0, 2W)."""
    bsz, _, h, w = x.shape
    k = weight.shape[2]
    full = np.zeros((bsz, weight.shape[1], 2 * h + k, 2 * w + k))
    for a in range(k):
        for b in range(k):
            full[:, :, a:a + 2 * h:2, b:b + 2 * w:2] += np.einsum("nihw,io->nohw", x, weight[:, :, a, b])
    return full[:, :, 1:1 + 2 * h, 1:1 + 2 * w] + bias[None, :, None, None]


def _conv3x3(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Spec 13.3: out[o, y, x] = bias[o] + sum in[i, y + a - 1, x + b - 1] * W[o, i, a, b], zeros outside."""
    _, _, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = sum(np.einsum("nihw,oi->nohw", xp[:, :, a:a + h, b:b + w], weight[:, :, a, b])
              for a in range(3) for b in range(3))
    return out + bias[None, :, None, None]


def _decode(family: str, hp: dict[str, Any], state: dict[str, np.ndarray], z: np.ndarray) -> np.ndarray:
    """Spec 13.3: latents [B, D] -> decoder values [B, C, S, S], in float64."""
    r, widths = _resolve(family, hp), _widths(family, hp)
    s = {k: v.astype(np.float64) for k, v in state.items()}
    h = z.astype(np.float64)
    if DEFAULTS[family]["fc"]:
        h = h @ s["fc.weight"].T + s["fc.bias"]
    h = h.reshape(len(z), widths[0], 2, 2)
    for i in range(len(widths) - 1):
        h = _conv_transpose(h, s[f"blocks.{i}.conv.weight"], s[f"blocks.{i}.conv.bias"])
        g, beta = (s.get(f"blocks.{i}.norm.{n}") for n in ("weight", "bias"))
        if r["norm"] == "batch":
            mu, var = s[f"blocks.{i}.norm.running_mean"], s[f"blocks.{i}.norm.running_var"]
            h = (h - mu[:, None, None]) / np.sqrt(var[:, None, None] + EPS) * g[:, None, None] + beta[:, None, None]
        elif r["norm"] == "instance":
            mu, var = h.mean(axis=(2, 3), keepdims=True), h.var(axis=(2, 3), keepdims=True)
            h = (h - mu) / np.sqrt(var + EPS) * g[:, None, None] + beta[:, None, None]
        h = np.where(h >= 0, h, r["slope"] * h)
    v = np.tanh(_conv3x3(h, s["out.weight"], s["out.bias"]))
    c = (v.shape[2] - r["S"]) // 2
    return v[:, :, c:c + r["S"], c:c + r["S"]]


def _random_module(family: str, hp: dict[str, Any], seed: int) -> torch.nn.Module:
    """A decoder with seeded weights scaled so tanh is not saturated, and non-trivial norm statistics."""
    g = torch.Generator().manual_seed(seed)
    module = build_decoder(family, 1, hp).eval()
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("norm.weight",)):
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            elif t.is_floating_point():
                fan = t[0].numel() if t.dim() > 1 else 10
                t.copy_(torch.randn(t.shape, generator=g) * (1.0 / fan) ** 0.5)
    return module


CASES = [
    ("small", {"channels": 3, "image_size": 8, "latent_dim": 5, "width": 16}),
    ("small", {"channels": 1, "image_size": 28, "latent_dim": 7, "width": 64, "min_width": 4, "slope": 0.1}),
    ("small", {"channels": 3, "image_size": 4, "latent_dim": 2}),
    ("medium", {"channels": 3, "image_size": 16, "latent_dim": 6, "width": 16, "norm": "instance"}),
    ("medium", {"channels": 2, "image_size": 28, "latent_dim": 3, "width": 40, "min_width": 3, "norm": "none"}),
    ("medium", {"channels": 3, "image_size": 64, "latent_dim": 2048}),
    ("large", {"channels": 3, "image_size": 8, "width": 8}),
    ("large", {"channels": 1, "image_size": 12, "width": 12, "latent_dim": 48, "norm": "instance", "slope": 0.0}),
    ("large", {"channels": 3, "image_size": 64}),
]


@pytest.mark.parametrize("family,hp", CASES)
def test_state_dict_keys_and_shapes_are_the_spec_formulas(family: str, hp: dict[str, Any]) -> None:
    with torch.device("meta"):
        module = build_decoder(family, 1, hp)
    assert {k: tuple(v.shape) for k, v in export_state(module).items()} == _keys(family, hp)
    assert list(module.widths) == _widths(family, hp)


@pytest.mark.parametrize("family,hp", [c for c in CASES if c[1].get("width", 999) <= 64])
def test_the_spec_forward_pass_matches_the_module(family: str, hp: dict[str, Any]) -> None:
    module = _random_module(family, hp, seed=len(str(hp)))
    z = torch.randn(3, module.latent_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = module(z).double().numpy()
    state = {k: v.numpy() for k, v in export_state(module).items()}
    got = _decode(family, hp, state, z.numpy())
    assert got.shape == want.shape and 0.05 < np.abs(want).mean() < 0.95  # not saturated, not trivial
    assert np.abs(got - want).max() < 1e-5


@pytest.mark.parametrize("family", ["small", "medium", "large"])
def test_the_folded_form_of_the_spec_is_what_fold_batchnorm_stores(family: str) -> None:
    hp = {"channels": 3, "image_size": 8, "width": 8, **({} if family == "large" else {"latent_dim": 4})}
    module = _random_module(family, hp, seed=7)
    folded_hp, folded = fold_batchnorm(module)
    assert folded_hp["norm"] == "none" and set(folded) == set(_keys(family, folded_hp))
    s = {k: v.double() for k, v in export_state(module).items()}
    for i in range(len(_widths(family, hp)) - 1):  # spec 13.4: W' = W s, b' = (b - mu) s + beta
        p = f"blocks.{i}."
        scale = s[p + "norm.weight"] / torch.sqrt(s[p + "norm.running_var"] + EPS)
        assert torch.allclose(folded[p + "conv.weight"].double(), s[p + "conv.weight"] * scale.view(1, -1, 1, 1), atol=1e-6)
        bias = (s[p + "conv.bias"] - s[p + "norm.running_mean"]) * scale + s[p + "norm.bias"]
        assert torch.allclose(folded[p + "conv.bias"].double(), bias, atol=1e-6)
    z = np.random.default_rng(0).standard_normal((2, module.latent_dim)).astype(np.float32)
    plain = _decode(family, hp, {k: v.numpy() for k, v in export_state(module).items()}, z)
    assert np.abs(_decode(family, folded_hp, {k: v.numpy() for k, v in folded.items()}, z) - plain).max() < 1e-5


@pytest.mark.parametrize("path", sorted(VECTORS.glob("*.d3")), ids=lambda p: p.stem)
def test_golden_vectors_decode_through_the_spec_alone(path: Path) -> None:
    """Spec 14: the stored latents, through the decoder that draws each class and the output
    mapping of spec 13.5, give the expected images within 1e-4."""
    d3 = load(path)
    with np.load(path.with_suffix(".expected.npz")) as f:
        want = {k: f[k] for k in f.files}
    owner = d3.decoder_of_class()
    m = d3.metadata
    lo, hi = m.value_range
    images = np.zeros(want["images"].shape)
    for i, dec in enumerate(d3.decoders):
        rows = np.array([owner[c] == i for c in want["classes"]])
        if rows.any():
            state = {k: s.dequantize().numpy() for k, s in dec.weights.items()}
            images[rows] = _decode(dec.family, dec.hparams, state, want["latents"][rows])
    pixels = (images - lo) / (hi - lo)
    normalised = (pixels - np.array(m.mean)[:, None, None]) / np.array(m.std)[:, None, None]
    assert np.abs(normalised - want["images"]).max() <= 1e-4
