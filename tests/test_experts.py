"""Expert trajectories: shapes and order, determinism, resume after an interruption (bit-identical),
reuse from the cache, class subsets, the held-out report and the `experts` command."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from d3codec.cli import cli
from d3codec.data import open_dataset
from d3codec.distill import experts as experts_mod
from d3codec.distill.experts import ensure_experts
from d3codec.errors import ConfigError
from d3codec.models.convnet import flatten_params

SMALL = dict(epochs=3, width=16, batch_size=128)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("data"))
    return (open_dataset("digits", cache_dir=cache, progress=False),
            open_dataset("digits", split="test", cache_dir=cache, progress=False))


def test_trajectories_shape_order_and_accuracy(digits, tmp_path):
    train, test = digits
    es = ensure_experts(train, num_experts=2, test_dataset=test, cache_dir=str(tmp_path), progress=False, **SMALL)
    assert (es.num_experts, es.num_epochs, es.num_classes) == (2, 3, 10)
    traj = es.trajectory(1)
    assert traj.shape == (4, es.num_params) and traj.dtype == torch.float32
    assert not torch.equal(traj[0], traj[-1])  # training moved the parameters
    assert not torch.equal(es.trajectory(0)[0], traj[0])  # experts start from different inits
    named = es.params_at(1, 2)
    model = es.build_model()
    assert list(named) == es.param_names == [n for n, _ in model.named_parameters()]
    assert torch.equal(flatten_params(named), traj[2])
    assert torch.equal(flatten_params(es.model_at(1, 2)), traj[2])
    assert torch.equal(flatten_params(es.teacher()), es.trajectory(0)[-1])
    rows = es.report()
    assert [r["expert"] for r in rows] == [0, 1]
    assert all(r["test_accuracy"] > 0.3 for r in rows)  # chance is 0.1
    assert es.accuracy(0) == rows[0]["test_accuracy"]


def test_same_seed_same_bytes_other_seed_differs(digits, tmp_path):
    train, _ = digits
    a = ensure_experts(train, num_experts=1, cache_dir=str(tmp_path / "a"), progress=False, **SMALL)
    b = ensure_experts(train, num_experts=1, cache_dir=str(tmp_path / "b"), progress=False, **SMALL)
    c = ensure_experts(train, num_experts=1, seed=1, cache_dir=str(tmp_path / "c"), progress=False, **SMALL)
    assert torch.equal(a.trajectory(0), b.trajectory(0))
    assert not torch.equal(a.trajectory(0), c.trajectory(0))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_interrupted_run_resumes_identically(digits, tmp_path, monkeypatch, momentum):
    train, _ = digits
    settings = dict(num_experts=2, momentum=momentum, progress=False, **SMALL)
    reference = ensure_experts(train, cache_dir=str(tmp_path / "ref"), **settings)

    real_train = experts_mod.train_classifier
    starts = []

    def interrupted(*args, **kwargs):  # Ctrl-C after expert 1's first epoch is saved
        starts.append(kwargs["start_epoch"])
        save = kwargs["on_epoch_end"]

        def save_then_stop(epoch, *rest):
            save(epoch, *rest)
            if len(starts) == 2 and epoch == 0:
                raise KeyboardInterrupt

        return real_train(*args, **{**kwargs, "on_epoch_end": save_then_stop})

    monkeypatch.setattr(experts_mod, "train_classifier", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_experts(train, cache_dir=str(tmp_path / "cut"), **settings)
    monkeypatch.setattr(experts_mod, "train_classifier", lambda *a, **k: (starts.append(k["start_epoch"]),
                                                                          real_train(*a, **k))[1])
    resumed = ensure_experts(train, cache_dir=str(tmp_path / "cut"), **settings)
    assert starts == [0, 0, 1]  # expert 0 was complete; expert 1 resumed after its first epoch
    for i in range(2):
        assert torch.equal(resumed.trajectory(i), reference.trajectory(i))


def test_cached_experts_are_reused_and_extended(digits, tmp_path, monkeypatch):
    train, _ = digits
    ensure_experts(train, num_experts=1, cache_dir=str(tmp_path), progress=False, **SMALL)
    calls = []
    real_train = experts_mod.train_classifier
    monkeypatch.setattr(experts_mod, "train_classifier", lambda *a, **k: (calls.append(1), real_train(*a, **k))[1])
    again = ensure_experts(train, num_experts=1, cache_dir=str(tmp_path), progress=False, **SMALL)
    assert calls == [] and again.num_experts == 1
    more = ensure_experts(train, num_experts=2, cache_dir=str(tmp_path), progress=False, **SMALL)
    assert calls == [1] and torch.equal(more.trajectory(0), again.trajectory(0))
    other = ensure_experts(train, num_experts=1, cache_dir=str(tmp_path), lr=0.02, progress=False, **SMALL)
    assert calls == [1, 1] and other.path != again.path  # settings are part of the key


def test_class_subset_experts(digits, tmp_path):
    train, test = digits
    es = ensure_experts(train, num_experts=1, classes=[3, 8, 1], test_dataset=test, cache_dir=str(tmp_path),
                        progress=False, **SMALL)
    assert es.classes == [3, 8, 1] and es.num_classes == 3
    assert es.model_at(0)(torch.zeros(2, 1, 8, 8)).shape == (2, 3)
    assert es.report()[0]["test_accuracy"] > 0.4  # chance is 1/3
    with pytest.raises(ConfigError, match="at least 2 classes"):
        ensure_experts(train, num_experts=1, classes=[4], cache_dir=str(tmp_path), progress=False, **SMALL)


def test_bad_settings(digits, tmp_path):
    train, _ = digits
    with pytest.raises(ConfigError, match="expert-epochs"):
        ensure_experts(train, num_experts=1, epochs=0, cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="--experts"):
        ensure_experts(train, num_experts=0, epochs=1, cache_dir=str(tmp_path))


def test_experts_command_reports_held_out_accuracy(tmp_path):
    args = ["experts", "digits", "--experts", "2", "--expert-epochs", "2", "--width", "8", "--classes", "0-4",
            "--cache-dir", str(tmp_path), "-q"]
    result = CliRunner().invoke(cli, args + ["--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["classes"] == [0, 1, 2, 3, 4] and out["epochs"] == 2 and len(out["experts"]) == 2
    text = CliRunner().invoke(cli, args)
    assert text.exit_code == 0 and "held-out accuracy" in text.output and "held out of the source" in text.output
    bad = CliRunner().invoke(cli, ["experts", "digits", "--classes", "x", "--cache-dir", str(tmp_path)])
    assert bad.exit_code == 1 and bad.output.startswith("error: cannot read --classes")


def test_concurrent_encodes_train_a_shared_expert_once(digits, tmp_path, monkeypatch):
    """Two encodes started together (a budget sweep, say) share the cache: the second waits for the
    first's expert instead of training it again into the same partial folder (which crashed)."""
    import threading

    train, _ = digits
    calls = []
    real_train = experts_mod.train_classifier
    monkeypatch.setattr(experts_mod, "train_classifier", lambda *a, **k: (calls.append(1), real_train(*a, **k))[1])
    start, results, errors = threading.Barrier(2), [], []

    def encode_side() -> None:
        start.wait()
        try:
            results.append(ensure_experts(train, num_experts=1, cache_dir=str(tmp_path), progress=False, **SMALL))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=encode_side) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and calls == [1]
    assert torch.equal(results[0].trajectory(0), results[1].trajectory(0))
