"""Golden vectors decode: every file in spec/vectors holds real decoder architectures that
`D3Dataset` builds, loads and draws training batches from, on CPU, deterministically."""
from pathlib import Path

import pytest
import torch

from d3codec.decode import D3Dataset
from d3codec.format import load
from d3codec.models import is_registered

VECTORS = Path(__file__).resolve().parents[2] / "spec" / "vectors"
FILES = sorted(VECTORS.glob("*.d3"))
IDS = [f.stem for f in FILES]


def _batch(path: Path, seed: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(D3Dataset(path, batch_size=16, seed=seed, **kwargs)))


def test_vectors_cover_every_family_covariance_and_label_kind():
    files = [load(f) for f in FILES]
    assert {d.family for f in files for d in f.decoders} == {"small", "medium", "large"}
    assert {f.priors.kind for f in files} == {"diag", "lowrank", "full"}
    assert {(f.labels.kind, f.labels.layout) for f in files} == {("hard", None), ("soft", "dense"), ("soft", "topk")}
    assert {d.hparams.get("norm", "batch") for f in files for d in f.decoders} == {"batch", "instance", "none"}
    quantised = [s for f in files for d in f.decoders for s in d.weights.values() if s.quantized and s.raw.dim() > 1]
    assert {s.axis is None for s in quantised} == {True, False}  # per-tensor and per-channel I8 weights
    assert all(is_registered(d.family, d.version) for f in files for d in f.decoders)


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_vector_decodes_to_normalised_images_with_its_label_kind(path):
    d3 = load(path)
    images, labels = _batch(path, seed=0)
    c, h, w = d3.metadata.image_shape
    assert images.shape == (16, c, h, w) and images.dtype == torch.float32
    assert images.isfinite().all()
    mean = torch.tensor(d3.metadata.mean).view(1, c, 1, 1)
    std = torch.tensor(d3.metadata.std).view(1, c, 1, 1)
    pixels = images * std + mean  # back to [0, 1]: decoder tanh output mapped through value_range
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert images.std() > 1e-3  # the random weights draw something, not a constant
    n = d3.metadata.num_classes
    if d3.labels.kind == "soft":
        assert labels.shape == (16, n) and labels.dtype == torch.float32
        assert torch.allclose(labels.sum(dim=1), torch.ones(16), atol=1e-5) and (labels >= 0).all()
    else:
        assert labels.shape == (16,) and labels.dtype == torch.int64
        assert ((labels >= 0) & (labels < n)).all()


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_vector_decoding_is_deterministic_for_a_seed(path):
    a_images, a_labels = _batch(path, seed=3, mode="random")
    b_images, b_labels = _batch(path, seed=3, mode="random")
    assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    c_images, _ = _batch(path, seed=4, mode="random")
    assert not torch.equal(a_images, c_images)


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_vector_denormalised_images_are_pixels(path):
    images, _ = _batch(path, seed=0, denormalize=True)
    assert images.min() >= -1e-5 and images.max() <= 1 + 1e-5
