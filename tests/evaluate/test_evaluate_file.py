"""Evaluating a .d3 file: networks trained only on D3Dataset batches, scored on the real test split,
with storage (file bytes, IPC-equivalents) and compute beside the accuracy."""
from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from d3codec.cli import cli
from d3codec.data import open_dataset
from d3codec.errors import ConfigError
from d3codec.evaluate import Recipe, evaluate_file
from d3codec.format.io import save
from d3codec.format.testing import random_d3


@pytest.fixture(scope="module")
def digits_test(tmp_path_factory):
    return open_dataset("digits", split="test", cache_dir=str(tmp_path_factory.mktemp("data")), progress=False)


def _digits_file(path: str, digits_test, soft: bool) -> str:
    """A real decodable file for the digits shape: a small decoder with random weights."""
    pytest.importorskip("d3codec.decode.dataset", reason="D3Dataset (decode/dataset.py) has not landed yet")
    from d3codec.format.types import DecoderEntry, Labels, Metadata, Priors, Stored
    from d3codec.models import build_decoder

    hparams = {"channels": 1, "image_size": 8, "latent_dim": 4, "width": 16}
    decoder = build_decoder("small", 1, hparams)
    g = torch.Generator().manual_seed(0)
    weights = {k: Stored.encode(v) for k, v in decoder.state_dict().items()}
    labels = Labels()
    if soft:
        probs = torch.softmax(torch.randn(10, 2, 10, generator=g), dim=-1)
        labels = Labels(kind="soft", layout="dense", probs=Stored.encode(probs))
    meta = digits_test.metadata()
    d3 = random_d3(0, num_classes=10, image_shape=(1, 8, 8), latents_per_class=2, dim=4).replace(
        metadata=Metadata(name=meta.name, num_classes=10, class_names=meta.class_names, image_shape=(1, 8, 8),
                          mean=meta.mean, std=meta.std, fingerprint=meta.fingerprint),
        priors=Priors(kind="diag", mean=Stored.encode(torch.randn(10, 2, 4, generator=g)),
                      logvar=Stored.encode(torch.zeros(10, 2, 4))),
        decoders=[DecoderEntry("small", 1, hparams, list(range(10)), weights)], labels=labels)
    save(d3, path)
    return path


@pytest.mark.parametrize("soft", [False, True])
def test_evaluate_file_reports_accuracy_storage_compute(tmp_path, digits_test, soft):
    path = _digits_file(str(tmp_path / "d.d3"), digits_test, soft)
    recipe = Recipe(epochs=3, runs=2, batch_size=16)
    report = evaluate_file(path, digits_test, recipe)
    assert report["kind"] == "d3" and report["labels"] == ("soft" if soft else "hard")
    assert report["same_source"] is True
    assert len(report["accuracy"]["runs"]) == 2 and all(0 <= a <= 1 for a in report["accuracy"]["runs"])
    size = os.path.getsize(path)
    assert report["storage"]["bytes"] == size
    assert report["storage"]["ipc_float32"] == pytest.approx(size / (10 * 64 * 4))
    assert report["storage"]["ipc_uint8"] == pytest.approx(size / (10 * 64))
    assert report["compute"]["images_seen_per_run"] > 0
    assert evaluate_file(path, digits_test, recipe)["accuracy"] == report["accuracy"]  # seeded


def test_eval_file_command(tmp_path, digits_test):
    path = _digits_file(str(tmp_path / "d.d3"), digits_test, soft=False)
    result = CliRunner().invoke(cli, ["eval", path, "--test", "digits", "--epochs", "2", "--runs", "1",
                                      "--cache-dir", str(tmp_path), "--json", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["storage"]["bytes"] == os.path.getsize(path)


def test_file_and_test_set_must_match(tmp_path, digits_test):
    path = str(tmp_path / "three.d3")
    save(random_d3(0, num_classes=3, image_shape=(1, 8, 8)), path)
    with pytest.raises(ConfigError, match="holds 3 classes"):
        evaluate_file(path, digits_test, Recipe(epochs=1, runs=1))
    result = CliRunner().invoke(cli, ["eval", path, "--test", "digits", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 1 and "pass the dataset the file was made from" in result.output


def test_steps_train_exactly_that_many_steps_for_files_and_baselines(tmp_path, digits_test):
    from d3codec.evaluate import evaluate_baseline

    path = _digits_file(str(tmp_path / "d.d3"), digits_test, soft=True)
    recipe = Recipe(steps=7, runs=1, batch_size=16)
    report = evaluate_file(path, digits_test, recipe)
    assert report["compute"]["optimizer_steps_per_run"] == 7
    assert report["compute"]["images_seen_per_run"] == 7 * 16
    assert report["recipe"]["epochs"] == 7 and report["recipe"]["epoch"] == "one batch"
    train = digits_test.other_split()
    # 40 images in batches of 16: 3 batches a pass; 7 steps are 7 batches, not 7 passes.
    base = evaluate_baseline("random", train, digits_test, 2560, recipe)
    assert base["compute"]["optimizer_steps_per_run"] == 7
    assert base["compute"]["images_seen_per_run"] == 16 + 16 + 8 + 16 + 16 + 8 + 16
