"""D3Dataset on CUDA (skipped without a GPU): same API, deterministic, close to CPU, fast options work."""
from __future__ import annotations

import pytest
import torch

from d3codec.decode import D3Dataset, mean_images

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _all(ds: D3Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*list(ds))
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("family", ["small", "medium", "large"])
def test_batches_live_on_the_gpu_and_are_deterministic(make_d3, family: str) -> None:
    d3 = make_d3(family, kind="lowrank", labels="dense", decoders=2)
    a = _all(D3Dataset(d3, batch_size=8, device="cuda", seed=1))
    b = _all(D3Dataset(d3, batch_size=8, device="cuda", seed=1))
    assert a[0].is_cuda and a[1].is_cuda and a[0].dtype == torch.float32
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.isfinite(a[0]).all()


def test_mean_images_match_cpu(make_d3) -> None:
    d3 = make_d3("small", width=16)
    assert torch.allclose(mean_images(d3, "cuda").cpu(), mean_images(d3, "cpu"), atol=1e-4)


@pytest.mark.parametrize("precision,tol", [("bf16", 2e-2), ("fp16", 3e-3)])
def test_autocast_within_stated_tolerance(make_d3, precision: str, tol: float) -> None:
    d3 = make_d3("small", width=32)
    ref = _all(D3Dataset(d3, batch_size=32, device="cuda", mode="mean", denormalize=True))[0]
    low = _all(D3Dataset(d3, batch_size=32, device="cuda", mode="mean", denormalize=True, precision=precision))[0]
    assert low.dtype == torch.float32 and (ref - low).abs().max() < tol


def test_augmentation_and_compile_on_gpu(make_d3) -> None:
    d3 = make_d3("small")
    eager = _all(D3Dataset(d3, batch_size=16, device="cuda", augment=True))[0]
    compiled = _all(D3Dataset(d3, batch_size=16, device="cuda", augment=True, compile=True))[0]
    assert torch.allclose(eager, compiled, atol=1e-3)
