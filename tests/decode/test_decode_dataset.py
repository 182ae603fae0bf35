"""D3Dataset: batches for every family/kind/dtype/label kind, determinism, balance, routing, epochs, errors."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from d3codec.decode import D3Dataset, mean_images
from d3codec.errors import ConfigError
from d3codec.format.errors import InvalidFieldError
from d3codec.format.io import load, save
from d3codec.format.testing import random_d3
from d3codec.models import UnknownDecoderError


def _all(ds: D3Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*list(ds))
    return torch.cat(xs), torch.cat(ys)


def _check_batch(x: torch.Tensor, y: torch.Tensor, d3, soft: bool, denormalize: bool = False) -> None:
    c, h, w = d3.metadata.image_shape
    assert x.dtype == torch.float32 and x.shape[1:] == (c, h, w) and torch.isfinite(x).all()
    if denormalize:
        assert x.min() >= 0 and x.max() <= 1
    else:  # tanh range mapped through (p - 0.5) / 0.25
        assert x.min() >= -2 - 1e-5 and x.max() <= 2 + 1e-5
    if soft:
        assert y.dtype == torch.float32 and y.shape == (len(x), d3.metadata.num_classes)
        assert (y >= 0).all() and torch.allclose(y.sum(1), torch.ones(len(x)), atol=1e-5)
    else:
        assert y.dtype == torch.int64 and y.shape == (len(x),)
        assert ((y >= 0) & (y < d3.metadata.num_classes)).all()


# ---- every family, covariance kind, dtype and label kind ----

@pytest.mark.parametrize("family,kind", list(itertools.product(("small", "medium", "large"), ("diag", "lowrank", "full"))))
def test_every_family_and_covariance_kind(make_d3, family: str, kind: str) -> None:
    labels = {"diag": "hard", "lowrank": "dense", "full": "topk"}[kind]
    d3 = make_d3(family, kind=kind, labels=labels, mixture=kind == "lowrank")
    ds = D3Dataset(d3, batch_size=5, seed=0)
    batches = list(ds)
    assert sum(len(x) for x, _ in batches) == ds.epoch_size == 2 * 4 * 2
    for x, y in batches:
        _check_batch(x, y, d3, soft=labels != "hard")


@pytest.mark.parametrize("dtype,labels", list(itertools.product(("F32", "F16", "BF16", "I8"), ("hard", "dense", "topk"))))
def test_every_dtype_and_label_kind_through_a_real_file(make_d3, tmp_path, dtype: str, labels: str) -> None:
    d3 = make_d3("small", kind="diag", dtype=dtype, labels=labels)
    path = tmp_path / "f.d3"
    save(d3, path)
    from_file = D3Dataset(path, batch_size=6, seed=3, denormalize=True)
    x, y = _all(from_file)
    _check_batch(x, y, d3, soft=labels != "hard", denormalize=True)
    # the file decodes exactly as the in-memory object it was written from
    x2, y2 = _all(D3Dataset(load(path), batch_size=6, seed=3, denormalize=True))
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_int8_weights_decode_close_to_float_weights(make_d3) -> None:
    xf, _ = _all(D3Dataset(make_d3("small", dtype="F32"), batch_size=16, mode="mean", denormalize=True))
    xq, _ = _all(D3Dataset(make_d3("small", dtype="I8"), batch_size=16, mode="mean", denormalize=True))
    assert (xf - xq).abs().max() < 0.1 and not torch.equal(xf, xq)


def test_normalisation_follows_metadata(make_d3) -> None:
    d3 = make_d3("small")
    norm, _ = _all(D3Dataset(d3, batch_size=8, seed=1))
    pix, _ = _all(D3Dataset(d3, batch_size=8, seed=1, denormalize=True))
    mean = torch.tensor(d3.metadata.mean).view(1, -1, 1, 1)
    std = torch.tensor(d3.metadata.std).view(1, -1, 1, 1)
    assert torch.allclose(norm, (pix - mean) / std, atol=1e-5)


# ---- determinism ----

def test_same_seed_same_batches_other_seed_other_batches(make_d3) -> None:
    d3 = make_d3("small", kind="lowrank", labels="dense")
    a, b, c = (list(D3Dataset(d3, batch_size=4, seed=s)) for s in (5, 5, 6))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(torch.cat([x for x, _ in a]), torch.cat([x for x, _ in c]))


def test_samples_do_not_depend_on_batch_size(make_d3) -> None:
    d3 = make_d3("medium", kind="full", labels="topk")
    x5, y5 = _all(D3Dataset(d3, batch_size=5, seed=2))
    x16, y16 = _all(D3Dataset(d3, batch_size=16, seed=2))
    assert torch.allclose(x5, x16, atol=1e-5) and torch.equal(y5, y16)


def test_set_epoch_changes_the_stream_reproducibly(make_d3) -> None:
    ds = D3Dataset(make_d3("small"), batch_size=8, seed=0)
    e0 = _all(ds)[0]
    ds.set_epoch(1)
    e1 = _all(ds)[0]
    ds.set_epoch(0)
    assert torch.equal(_all(ds)[0], e0) and not torch.equal(e0, e1)


def test_endless_runs_into_the_next_epoch(make_d3) -> None:
    d3 = make_d3("small")
    endless = D3Dataset(d3, batch_size=16, seed=0, endless=True)
    with pytest.raises(TypeError, match="endless"):
        len(endless)
    got = list(itertools.islice(iter(endless), 2))  # one epoch is exactly 16 samples
    later = D3Dataset(d3, batch_size=16, seed=0)
    later.set_epoch(1)
    assert torch.equal(got[1][0], next(iter(later))[0])


def test_len_epoch_size_and_drop_last(make_d3) -> None:
    d3 = make_d3("small")
    ds = D3Dataset(d3, batch_size=5, epoch_size=23)
    assert len(ds) == 5 and [len(x) for x, _ in ds] == [5, 5, 5, 5, 3]
    dl = D3Dataset(d3, batch_size=5, epoch_size=23, drop_last=True)
    assert len(dl) == 4 and [len(x) for x, _ in dl] == [5, 5, 5, 5]


def test_default_epoch_is_whole_rounds_filling_a_batch(make_d3) -> None:
    d3 = make_d3("small", num_classes=4, k=2)  # a mixed round is 16 samples
    assert D3Dataset(d3, batch_size=10).epoch_size == 16
    assert D3Dataset(d3, batch_size=40).epoch_size == 48
    assert D3Dataset(d3, batch_size=10, world_size=2, rank=1).epoch_size == 32
    assert D3Dataset(d3, batch_size=40, mode="random").epoch_size == 40


def test_documented_attributes(make_d3, tmp_path) -> None:
    d3 = make_d3("small", num_classes=4, k=2)
    ds = D3Dataset(d3, batch_size=10, seed=5)
    assert ds.d3 is d3 and ds.source is None and ds.num_classes == d3.metadata.num_classes == 4
    assert (ds.batch_size, ds.seed, ds.mode, ds.device, ds.epoch) == (10, 5, "mixed", torch.device("cpu"), 0)
    assert (ds.epoch_size, ds.rank, ds.world_size, ds.shard_size) == (16, 0, 1, 16)
    path = tmp_path / "f.d3"
    save(d3, path)
    loaded = D3Dataset(path)
    assert loaded.source == str(path) and loaded.d3.metadata == d3.metadata


def test_rank_and_world_size_are_checked(make_d3) -> None:
    d3 = make_d3("small")
    for bad in ({"world_size": 0}, {"world_size": True}, {"rank": -1}, {"rank": 1.0}):
        with pytest.raises(ConfigError, match="rank|world_size"):
            D3Dataset(d3, **bad)
    # a rank given alone may only fit the world once init_process_group has run: checked when used
    alone = D3Dataset(d3, batch_size=10, rank=1)
    assert alone.world_size == 1 and "epoch_size=16" in repr(alone)
    with pytest.raises(ConfigError, match="rank 1 is not below the world size 1"):
        list(alone)


def test_works_as_a_dataloader_with_batch_size_none(make_d3) -> None:
    d3 = make_d3("small", labels="dense")
    direct = list(D3Dataset(d3, batch_size=6, seed=4))
    ds = D3Dataset(d3, batch_size=6, seed=4)
    loaded = list(DataLoader(ds, batch_size=None))
    assert len(loaded) == len(direct) == len(ds)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(direct, loaded))


def test_len_counts_batches_and_ds_i_is_the_ith_batch_of_the_next_iteration(make_d3) -> None:
    d3 = make_d3("small", labels="topk")  # a mixed epoch of 16 samples: batches 5, 5, 5, 1
    ds = D3Dataset(d3, batch_size=5, seed=9, augment=True)
    items = [ds[i] for i in range(len(ds))] + [ds[-1], ds[-4]]
    assert ds.epoch == 0  # reading does not advance the epoch
    batches = list(ds)
    assert len(ds) == len(batches) == 4 and [len(x) for x, _ in items] == [5, 5, 5, 1, 1, 5]
    for (xi, yi), (x, y) in zip(items, batches + [batches[-1], batches[0]]):
        assert torch.equal(xi, x) and torch.equal(yi, y)  # the same batch, augmentation included
    assert torch.equal(ds[0][1], next(iter(ds))[1])  # now the next iteration's: epoch 2's
    for bad in (4, -5):
        with pytest.raises(IndexError, match="this rank yields 4 batches per epoch"):
            ds[bad]
    with pytest.raises(TypeError):
        ds[1.0]
    # drop_last, a rank's shard, and an endless stream running on into the next epochs
    dropped = D3Dataset(d3, batch_size=3, seed=9, drop_last=True, rank=1, world_size=2)  # 8 per rank: 3, 3
    items = [dropped[i][1] for i in range(len(dropped))]
    assert len(items) == 2 and all(torch.equal(a, y) for a, (_, y) in zip(items, dropped, strict=True))
    endless = D3Dataset(d3, batch_size=8, seed=9, endless=True)
    stream = [y for _, (_, y) in zip(range(5), endless)]
    fresh = D3Dataset(d3, batch_size=8, seed=9, endless=True)
    assert all(torch.equal(fresh[i][1], y) for i, y in enumerate(stream))
    with pytest.raises(IndexError, match="endless"):
        fresh[-1]


def test_sample_is_one_position_of_the_epoch_unsharded_and_unaugmented(make_d3) -> None:
    d3 = make_d3("small", labels="topk")
    x, y = _all(D3Dataset(d3, batch_size=4, seed=9))
    ds = D3Dataset(d3, batch_size=3, seed=9, augment=True, rank=1, world_size=2)
    assert ds.num_samples == ds.epoch_size == 16
    for i in (0, 5, 15, -1):
        xi, yi = ds.sample(i)
        assert torch.allclose(xi, x[i], atol=1e-5) and torch.equal(yi, y[i])
    later = D3Dataset(d3, batch_size=4, seed=9)
    later.set_epoch(1)
    assert torch.allclose(ds.sample(3, epoch=1)[0], _all(later)[0][3], atol=1e-5)
    for bad in (16, -17):
        with pytest.raises(IndexError, match="epoch of 16 samples"):
            ds.sample(bad)


# ---- what is drawn ----

def test_mixed_epoch_is_every_mean_once_plus_one_draw_per_component(make_d3) -> None:
    ds = D3Dataset(make_d3("small", num_classes=5, k=3), batch_size=7)
    d = ds.latents(0, ds.epoch_size)
    assert ds.epoch_size == 2 * 5 * 3
    for random in (False, True):
        sel = d.random == random
        pairs = sorted(zip(d.classes[sel].tolist(), d.comps[sel].tolist()))
        assert pairs == [(c, j) for c in range(5) for j in range(3)]
    means = ds.priors.mean[d.classes[~d.random], d.comps[~d.random]]
    assert torch.equal(d.z[~d.random], means) and not torch.equal(d.z[d.random], ds.priors.mean[d.classes[d.random], d.comps[d.random]])


def test_mean_mode_decodes_the_mean_images(make_d3) -> None:
    d3 = make_d3("small", k=2)
    ds = D3Dataset(d3, batch_size=3, mode="mean", denormalize=True)
    d = ds.latents(0, ds.epoch_size)
    x, _ = _all(ds)
    assert torch.allclose(x, mean_images(d3)[d.classes, d.comps], atol=1e-5)


def test_classes_are_balanced_over_many_epochs(make_d3) -> None:
    ds = D3Dataset(make_d3("small", num_classes=4, k=3), batch_size=64, mode="random", epoch_size=1000)
    counts = torch.bincount(ds.latents(0, 1000).classes, minlength=4)
    assert (counts - 250).abs().max() <= 3  # 83 full rounds of 12 slots, then a random part of one


def test_class_weights_are_followed(make_d3) -> None:
    w = [0.1, 0.2, 0.3, 0.4]
    ds = D3Dataset(make_d3("small"), mode="random", class_weights=w, epoch_size=20000)
    freq = torch.bincount(ds.latents(0, 20000).classes, minlength=4).float() / 20000
    # binomial standard deviation at n=20000 is < 0.0035: 5 sigma
    assert torch.allclose(freq, torch.tensor(w), atol=0.0175)
    zero = D3Dataset(make_d3("small"), mode="random", class_weights=[0, 1, 0, 1], epoch_size=500)
    assert set(zero.latents(0, 500).classes.tolist()) == {1, 3}


def test_mixture_weights_choose_components(make_d3) -> None:
    d3 = make_d3("small", k=3, mixture=True)
    ds = D3Dataset(d3, mode="random", epoch_size=30000)
    d = ds.latents(0, 30000)
    w = d3.priors.weights.dequantize()
    w = w / w.sum(1, keepdim=True)
    for c in range(4):
        freq = torch.bincount(d.comps[d.classes == c], minlength=3).float()
        assert torch.allclose(freq / freq.sum(), w[c], atol=0.03)


@pytest.mark.parametrize("kind", ["diag", "lowrank", "full"])
def test_empirical_mean_and_covariance_match_the_stored_ones(make_d3, kind: str) -> None:
    from d3codec.decode import sample_latents
    from d3codec.decode.sampling import PriorTensors

    d3 = make_d3("small", kind=kind, dim=6)
    pt = PriorTensors.from_priors(d3.priors)
    n = 40000
    for c, j in ((0, 0), (3, 1)):
        cls, comp = torch.full((n,), c), torch.full((n,), j)
        z = sample_latents(pt, cls, comp, torch.Generator().manual_seed(c))
        cov = pt.covariance()[c, j]
        scale = cov.diagonal().sqrt()
        assert torch.allclose(z.mean(0), pt.mean[c, j], atol=float(5 * scale.max() / n ** 0.5))
        emp = torch.cov(z.T)
        assert torch.allclose(emp, cov, atol=float(0.05 * cov.diagonal().max()))


def test_dataset_latents_follow_the_stored_distribution(make_d3) -> None:
    d3 = make_d3("small", kind="lowrank", num_classes=1, k=1, dim=4)
    ds = D3Dataset(d3, mode="random", epoch_size=30000)
    z = ds.latents(0, 30000).z
    cov = ds.priors.covariance()[0, 0]
    assert torch.allclose(z.mean(0), ds.priors.mean[0, 0], atol=0.05)
    assert torch.allclose(torch.cov(z.T), cov, atol=0.05 * float(cov.diagonal().max()))


# ---- routing and labels ----

def test_each_class_is_decoded_by_its_own_decoder(make_d3) -> None:
    d3 = make_d3("small", num_classes=6, decoders=3)
    owner = d3.decoder_of_class()
    for i, entry in enumerate(d3.decoders):  # decoder i draws the constant image tanh(0.1 * (i + 1))
        out_w = entry.weights["out.weight"].dequantize()
        entry.weights["out.weight"] = type(entry.weights["out.weight"]).encode(torch.zeros_like(out_w))
        entry.weights["out.bias"] = type(entry.weights["out.bias"]).encode(torch.full((3,), 0.1 * (i + 1)))
    ds = D3Dataset(d3, batch_size=5, denormalize=True, labels="hard")
    x, y = _all(ds)
    expect = (torch.tanh(0.1 * (torch.tensor(owner)[y] + 1)) + 1) / 2
    assert torch.allclose(x.mean(dim=(1, 2, 3)), expect, atol=1e-5)
    assert torch.allclose(x.amax(dim=(1, 2, 3)), x.amin(dim=(1, 2, 3)), atol=1e-5)
    assert len(set(owner)) == 3


def test_soft_labels_are_the_components_labels(make_d3) -> None:
    d3 = make_d3("small", labels="dense")
    ds = D3Dataset(d3, batch_size=4)
    d = ds.latents(0, ds.epoch_size)
    _, y = _all(ds)
    probs = d3.labels.probs.dequantize()
    probs = probs / probs.sum(-1, keepdim=True)
    assert torch.allclose(y, probs[d.classes, d.comps], atol=1e-6)
    _, hard = _all(D3Dataset(d3, batch_size=4, labels="hard"))
    assert hard.dtype == torch.int64 and torch.equal(hard, d.classes)


def test_topk_labels_spread_the_remaining_mass_evenly() -> None:
    from d3codec.decode.decoders import LabelTable
    from d3codec.format.types import Labels, Stored

    idx = torch.tensor([[[2, 0]]])
    val = torch.tensor([[[0.6, 0.2]]])
    table = LabelTable(Labels("soft", "topk", indices=Stored.encode(idx, "I64"), values=Stored.encode(val)), 5)
    row = table.lookup(torch.tensor([0]), torch.tensor([0]))[0]
    assert torch.allclose(row, torch.tensor([0.2, 0.2 / 3, 0.6, 0.2 / 3, 0.2 / 3]))


# ---- options ----

def test_augmentation_is_applied_deterministically(make_d3) -> None:
    d3 = make_d3("small")
    plain = _all(D3Dataset(d3, batch_size=8, seed=0))[0]
    a1 = _all(D3Dataset(d3, batch_size=8, seed=0, augment=True))[0]
    a2 = _all(D3Dataset(d3, batch_size=8, seed=0, augment=True))[0]
    assert torch.equal(a1, a2) and not torch.equal(a1, plain)


def test_bf16_autocast_stays_within_its_stated_tolerance(make_d3) -> None:
    d3 = make_d3("small", width=16)
    fp32 = _all(D3Dataset(d3, batch_size=16, denormalize=True))[0]
    bf16 = _all(D3Dataset(d3, batch_size=16, denormalize=True, precision="bf16"))[0]
    assert bf16.dtype == torch.float32 and (fp32 - bf16).abs().max() < 2e-2


def test_compile_failure_falls_back_to_eager_with_a_warning(make_d3, monkeypatch) -> None:
    d3 = make_d3("small")
    eager = _all(D3Dataset(d3, batch_size=16))[0]

    def broken_compile(module, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    ds = D3Dataset(d3, batch_size=16, compile=True)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        compiled = _all(ds)[0]
    assert torch.equal(eager, compiled)


# ---- errors ----

def test_unknown_family_names_it_and_the_version_needed(make_d3) -> None:
    d3 = make_d3("small")
    d3.decoders[0].family = "xlarge"
    d3.provenance = {"encoder": "d3codec 0.4.2"}
    with pytest.raises(UnknownDecoderError, match=r"decoder 0 \(xlarge v1\).*install d3codec>=0\.4\.2"):
        D3Dataset(d3)


def test_weights_that_do_not_fit_the_architecture_are_a_format_error() -> None:
    d3 = random_d3(0)  # the format's random files carry placeholder weights
    with pytest.raises(InvalidFieldError, match=r"decoder 0 \(small v1\): stored weights do not match"):
        D3Dataset(d3)


def test_wrong_image_shape_in_hparams_is_a_format_error(make_d3) -> None:
    d3 = make_d3("small")
    d3.metadata.image_shape = (3, 32, 32)
    with pytest.raises(InvalidFieldError, match="draws .* images but the metadata says"):
        D3Dataset(d3)


@pytest.mark.parametrize("kwargs,match", [
    ({"batch_size": 0}, "batch_size"),
    ({"mode": "best"}, "mode must be one of"),
    ({"epoch_size": -3}, "epoch_size"),
    ({"class_weights": [1, 2]}, "class_weights must be 4"),
    ({"class_weights": [0, 0, 0, 0]}, "positive sum"),
    ({"labels": "onehot"}, "labels must be"),
    ({"precision": "fp8"}, "precision must be one of"),
])
def test_bad_arguments_raise_config_errors(make_d3, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        D3Dataset(make_d3("small"), **kwargs)


def test_missing_path_is_a_clear_error(tmp_path) -> None:
    from d3codec.errors import D3Error

    with pytest.raises(D3Error):
        D3Dataset(tmp_path / "missing.d3")


def test_speed_options_do_not_change_the_images(make_d3) -> None:
    d3 = make_d3("medium", width=16, decoders=2)
    plain = _all(D3Dataset(d3, batch_size=8, fold_bn=False, channels_last=False))[0]
    fast = _all(D3Dataset(d3, batch_size=8))[0]  # BatchNorm folded, channels-last
    assert torch.allclose(plain, fast, atol=1e-5)


def test_speed_options_as_one_object_or_as_keywords(make_d3) -> None:
    from d3codec.decode import DecodeOptions

    d3 = make_d3("small")
    opts = DecodeOptions(fold_bn=False, channels_last=False, stem_matmul=False)
    grouped = D3Dataset(d3, batch_size=8, seed=2, options=opts)
    keywords = D3Dataset(d3, batch_size=8, seed=2, fold_bn=False, channels_last=False, stem_matmul=False)
    assert grouped.options == keywords.options == opts and D3Dataset(d3).options == DecodeOptions()
    assert all(torch.equal(a[0], b[0]) for a, b in zip(grouped, keywords))
    with pytest.raises(ConfigError, match="not both"):
        D3Dataset(d3, options=opts, fold_bn=False)
    with pytest.raises(ConfigError, match="precision must be one of"):
        DecodeOptions(precision="fp8")
    with pytest.raises(AttributeError):
        opts.precision = "bf16"  # frozen: one options object may serve many datasets
