"""Regenerate the golden `.d3` vectors and their expected `d3codec info --json` output.

    python spec/vectors/make_vectors.py          # rewrite the vectors in this folder
    python spec/vectors/make_vectors.py --check  # exit 1 if regenerating would change a file

Deterministic: fixed seeds, explicit generators, no clock. zstd output may differ between
zstandard library versions, so tests only read these files (load + info --json); they never
compare freshly written bytes against them (load, info --json, and decoding with D3Dataset).
Every decoder is a real registry architecture, so each vector is a fully decodable file.

`<name>.expected.npz` holds each vector's first decoded batch (`expected_decode`). Decoding
differs between CPUs and thread counts in the last bits, so it is rewritten (and `--check`
reports it) only when a fresh decode is off by more than `TOLERANCE` or its labels differ.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from d3codec.decode import D3Dataset
from d3codec.format import Stored, dumps, loads
from d3codec.format.budget import parse_budget
from d3codec.format.summary import describe
from d3codec.format.testing import random_d3
from d3codec.models import build_decoder, export_state, fold_batchnorm

HERE = Path(__file__).resolve().parent
#: Largest absolute difference allowed between a decode and `<name>.expected.npz` (spec section 14).
TOLERANCE = 1e-4


def _decoder(family: str, hparams: dict, seed: int, fold: bool = False) -> tuple[str, int, dict, dict]:
    """A real decoder `(family, 1, hparams, state)` with seeded random weights (fan-in scaled, so
    the tanh output is not saturated) and non-trivial norm statistics; `fold` folds BatchNorm
    into the convolutions (a `norm="none"` decoder)."""
    g = torch.Generator().manual_seed(seed)
    module = build_decoder(family, 1, hparams).eval()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                w = m.weight
                fan_in = w.numel() // (w.shape[1] if isinstance(m, torch.nn.ConvTranspose2d) else w.shape[0])
                w.copy_(torch.randn(w.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                m.weight.copy_(1 + torch.randn(m.weight.shape, generator=g) * 0.1)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
    if fold:
        folded, state = fold_batchnorm(module)
        return family, 1, folded, state
    return family, 1, dict(hparams), export_state(module)


def _vectors() -> dict[str, object]:
    """Name -> D3File with real, decodable decoders (registry architectures, tiny widths, seeded
    random weights): one and several decoders; small, medium and large families with batch,
    instance and folded (none) norms; hard, dense soft and top-k soft labels; diag, lowrank and
    full covariance; float32/float16/bfloat16 and int8/uint8 (per tensor and per channel) storage."""
    out = {}
    hp = {"channels": 1, "image_size": 16, "latent_dim": 4, "width": 8}
    out["one-decoder-diag-hard-f32"] = random_d3(
        1, num_classes=3, image_shape=(1, 16, 16), latents_per_class=2, dim=4, kind="diag", labels="hard",
        dtype="F32", budget=parse_budget("2ipc", 3, (1, 16, 16)), decoder_states=[_decoder("small", hp, 11)],
    )
    hp = {"channels": 3, "image_size": 8, "latent_dim": 6, "width": 8}
    medium = _decoder("medium", hp, 22, fold=True)
    two = random_d3(
        2, num_classes=4, image_shape=(3, 8, 8), latents_per_class=2, dim=6, kind="lowrank", rank=2,
        mixture=True, labels="topk", topk=2, index_dtype="U8", dtype="I8", per_channel=True,
        budget=parse_budget("8KiB", 4, (3, 8, 8)), decoder_states=[_decoder("small", hp, 21), medium],
    )
    two.priors.mean = Stored.encode(two.priors.mean.dequantize(), "I8")  # per-tensor next to per-channel
    two.decoders[1].weights = {k: Stored.encode(v, "I8") for k, v in medium[3].items()}  # per-tensor decoder
    out["two-decoders-lowrank-topk-i8"] = two
    hp = {"channels": 3, "image_size": 8, "latent_dim": 8}
    three = random_d3(
        3, num_classes=5, image_shape=(3, 8, 8), latents_per_class=1, dim=8, kind="full", labels="dense",
        dtype="F16", decoder_states=[_decoder("small", {**hp, "width": 4}, 31),
                                     _decoder("medium", {**hp, "width": 4, "norm": "instance"}, 32),
                                     _decoder("large", {**hp, "width": 2}, 33)],
    )
    three.decoders[2].weights = {k: Stored(v.raw.to(torch.bfloat16)) for k, v in three.decoders[2].weights.items()}
    three.metadata.fingerprint = "sha256:" + "0" * 64
    out["three-decoders-full-dense-f16"] = three
    return out


def expected_decode(path: Path) -> dict[str, np.ndarray]:
    """The arrays of `<name>.expected.npz`: the first batch of
    `D3Dataset(path, batch_size=16, seed=0, labels="hard", device="cpu")` (`images` float32
    [16, C, H, W], normalised; `labels` int64 [16]) and the draws it decoded (`classes`,
    `components` int64 [16]; `latents` float32 [16, D]), so a reader can check its decoders alone."""
    ds = D3Dataset(path, batch_size=16, seed=0, labels="hard", device="cpu")
    images, labels = next(iter(ds))
    draw = ds.latents(0, 16, epoch=0)
    return {"images": images.numpy(), "labels": labels.numpy(), "classes": draw.classes.numpy(),
            "components": draw.comps.numpy(), "latents": draw.z.numpy()}


def decode_mismatch(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> str:
    """Why `actual` does not match `expected` ("" when it does): every array present, of the same
    shape and dtype; integer arrays equal; float arrays within `TOLERANCE` absolute."""
    for key, want in expected.items():
        got = actual.get(key)
        if got is None:
            return f"{key}: missing"
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"{key}: {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"
        if np.issubdtype(want.dtype, np.floating):
            diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)), initial=0.0))
            if not diff <= TOLERANCE:  # NaN fails too
                return f"{key}: off by {diff:.3g}, more than {TOLERANCE:g}"
        elif not np.array_equal(got, want):
            return f"{key}: {int(np.sum(got != want))} values differ"
    return ""


def _write_expected(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    changed = []
    for name, d3 in _vectors().items():
        data = dumps(d3)
        info = json.dumps(describe(loads(data)), sort_keys=True, indent=2) + "\n"
        for path, content in ((HERE / f"{name}.d3", data), (HERE / f"{name}.info.json", info.encode())):
            if not path.exists() or path.read_bytes() != content:
                changed.append(path.name)
                if not check:
                    path.write_bytes(content)
        npz = HERE / f"{name}.expected.npz"
        fresh = expected_decode(HERE / f"{name}.d3")
        if not npz.exists() or decode_mismatch({k: v for k, v in np.load(npz).items()}, fresh):
            changed.append(npz.name)
            if not check:
                _write_expected(npz, fresh)
    if check and changed:
        print("would change: " + ", ".join(changed), file=sys.stderr)
        return 1
    print(("rewrote: " + ", ".join(changed)) if changed else "vectors up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
