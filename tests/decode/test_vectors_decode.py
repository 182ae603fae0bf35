"""Golden vectors decode: every file in spec/vectors holds real decoder architectures that
`D3Dataset` builds, loads and draws training batches from, on CPU, deterministically; and the
first batch matches `<name>.expected.npz` within the spec's tolerance at 1 and 2 threads."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from d3codec.decode import D3Dataset
from d3codec.decode.dataset import Draw
from d3codec.format import load
from d3codec.models import is_registered

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "spec" / "vectors"
FILES = sorted(VECTORS.glob("*.d3"))
IDS = [f.stem for f in FILES]


def _make_vectors():
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MV = _make_vectors()


def _expected(path: Path) -> dict[str, np.ndarray]:
    with np.load(path.with_suffix(".expected.npz")) as z:
        return {k: z[k] for k in z.files}


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


# ---- expected decodes (spec section 14): what a reader in any language checks itself against ----

_DECODE_AT = """
import sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(int(sys.argv[2]))
import importlib.util, json
import numpy as np
spec = importlib.util.spec_from_file_location("make_vectors", sys.argv[3])
mv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mv)
import d3codec
for path in sys.argv[5:]:
    name = path.rsplit("/", 1)[-1][:-3]
    np.savez(f"{sys.argv[4]}/{name}.npz", **mv.expected_decode(path))
print(json.dumps({"threads": torch.get_num_threads(), "d3codec": d3codec.__file__}))
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_vectors_decode_to_their_expected_arrays_within_the_tolerance(threads, tmp_path):
    """Each in a fresh process with the thread count set before decoding, using this tree's code."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", _DECODE_AT, str(ROOT), str(threads), str(VECTORS / "make_vectors.py"),
                          str(tmp_path)] + [str(f) for f in FILES], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    ran = json.loads(run.stdout.strip().splitlines()[-1])
    assert ran["threads"] == threads and Path(ran["d3codec"]).resolve().is_relative_to(ROOT)
    for f in FILES:
        with np.load(tmp_path / f"{f.stem}.npz") as z:
            actual = {k: z[k] for k in z.files}
        assert MV.decode_mismatch(_expected(f), actual) == "", f.stem


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_expected_arrays_are_the_documented_first_batch(path):
    d3, want = load(path), _expected(path)
    c, h, w = d3.metadata.image_shape
    assert set(want) == {"images", "labels", "classes", "components", "latents"}
    assert want["images"].dtype == np.float32 and want["images"].shape == (16, c, h, w)
    assert want["labels"].dtype == np.int64 and want["labels"].shape == (16,)
    assert want["latents"].dtype == np.float32 and want["latents"].shape == (16, d3.priors.dim)
    assert np.array_equal(want["labels"], want["classes"])  # labels="hard": each image's class
    images, labels = next(iter(D3Dataset(path, batch_size=16, seed=0, labels="hard", device="cpu")))
    assert MV.decode_mismatch(want, {**want, "images": images.numpy(), "labels": labels.numpy()}) == ""


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_stored_latents_decode_to_the_expected_images(path):
    """A reader can check its decoders alone: the stored draws decode to the stored images."""
    want = _expected(path)
    ds = D3Dataset(path, batch_size=16, seed=0, labels="hard", device="cpu")
    classes, comps = torch.from_numpy(want["classes"]), torch.from_numpy(want["components"])
    draw = Draw(classes, comps, torch.ones(16, dtype=torch.bool), torch.from_numpy(want["latents"]))
    images, labels = ds.decode(draw)
    assert np.abs(images.numpy() - want["images"]).max() <= MV.TOLERANCE
    assert np.array_equal(labels.numpy(), want["labels"])


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_the_tolerance_check_catches_a_wrong_decode(path):
    want = _expected(path)
    assert MV.decode_mismatch(want, want) == ""
    nudged = want["images"].copy()
    nudged.flat[37] += 0.5 * MV.TOLERANCE  # within the tolerance: the last-bit differences it allows
    assert MV.decode_mismatch(want, {**want, "images": nudged}) == ""
    nudged.flat[37] += 2 * MV.TOLERANCE
    assert "images: off by" in MV.decode_mismatch(want, {**want, "images": nudged})
    nan = want["images"].copy()
    nan.flat[0] = np.nan
    assert "images" in MV.decode_mismatch(want, {**want, "images": nan})
    relabelled = want["labels"].copy()
    relabelled[3] = (relabelled[3] + 1) % load(path).metadata.num_classes
    assert "labels: 1 values differ" == MV.decode_mismatch(want, {**want, "labels": relabelled})
    assert "missing" in MV.decode_mismatch(want, {k: v for k, v in want.items() if k != "latents"})
    assert "float64" in MV.decode_mismatch(want, {**want, "images": want["images"].astype(np.float64)})
    other_seed, _ = next(iter(D3Dataset(path, batch_size=16, seed=1, labels="hard", device="cpu")))
    assert "images: off by" in MV.decode_mismatch(want, {**want, "images": other_seed.numpy()})
