"""Equal-bytes baselines: balanced, within budget, seeded; codecs count real encoded bytes; the
evaluation trains with the one recipe and reports final accuracy beside storage and compute."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from d3codec.cli import cli
from d3codec.data import open_dataset
from d3codec.errors import BudgetError, ConfigError
from d3codec.evaluate import Recipe, evaluate_baseline, select_baseline
from d3codec.evaluate.baselines import encode_image


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("data"))
    return (open_dataset("digits", cache_dir=cache, progress=False),
            open_dataset("digits", split="test", cache_dir=cache, progress=False))


def test_uint8_baseline_holds_budget_over_pixels_balanced(digits):
    train, _ = digits
    chosen = select_baseline(train, 2560, "random", seed=3)  # 1ipc of 8x8x1 float32
    assert len(chosen.labels) == 2560 // 64 == 40 and chosen.bytes_used == 2560
    assert chosen.per_class(10) == [4] * 10
    for img, idx, label in zip(chosen.images, chosen.indices, chosen.labels):
        assert train.labels[idx] == label and np.array_equal(img, train.uint8([idx])[0])
    odd = select_baseline(train, 64 * 13, "random")
    assert sorted(odd.per_class(10)) == [1] * 7 + [2] * 3


def test_same_seed_same_images(digits):
    train, _ = digits
    a = select_baseline(train, 5000, "png", seed=1)
    b = select_baseline(train, 5000, "png", seed=1)
    c = select_baseline(train, 5000, "png", seed=2)
    assert np.array_equal(a.indices, b.indices) and not np.array_equal(a.indices, c.indices)


@pytest.mark.parametrize("codec", ["png", "jpeg", "webp"])
def test_compressed_baselines_count_encoded_bytes(digits, codec):
    train, _ = digits
    budget = 6000
    chosen = select_baseline(train, budget, codec, seed=0)
    sizes = [encode_image(train.uint8([i])[0], codec, chosen.quality)[0] for i in chosen.indices]
    assert sum(sizes) == chosen.bytes_used <= budget
    counts = chosen.per_class(10)
    assert max(counts) - min(counts) <= 1
    # the next image in round-robin order would not have fitted
    assert budget - chosen.bytes_used < max(sizes) * 3
    if codec == "png":  # lossless
        assert all(np.array_equal(img, train.uint8([i])[0]) for img, i in zip(chosen.images, chosen.indices))


def test_encode_image_matches_pillow(digits):
    train, _ = digits
    img = train.uint8([5])[0]
    buf = io.BytesIO()
    Image.fromarray(img[..., 0], "L").save(buf, format="JPEG", quality=75, optimize=True)
    size, decoded = encode_image(img, "jpeg", 75)
    assert size == len(buf.getvalue()) and decoded.shape == img.shape


def test_png_beats_uint8_on_real_mnist_sized_images(tmp_path, shared_data_dir):
    # The sanity figure, on the shared MNIST when present: 31,360 B = 4 uint8 images per
    # class but about 11 PNG images per class.
    import os

    mnist = str(shared_data_dir / "mnist")
    if not os.path.isdir(mnist):
        pytest.skip("shared MNIST (../shared/data/mnist) is not on this machine")
    train = open_dataset("mnist", data_dir=mnist, cache_dir=str(tmp_path), progress=False)
    assert select_baseline(train, 31360, "random").per_class(10) == [4] * 10
    png = np.mean(select_baseline(train, 31360, "png").per_class(10))
    assert 9 <= png <= 14


def test_errors(digits):
    train, _ = digits
    with pytest.raises(BudgetError, match="holds no jpeg image"):
        select_baseline(train, 10, "jpeg")
    with pytest.raises(ConfigError, match="unknown --baseline"):
        select_baseline(train, 1000, "gif")
    with pytest.raises(ConfigError, match="quality"):
        select_baseline(train, 1000, "png", quality=50)


def test_evaluate_baseline_in_seconds(digits):
    train, test = digits
    recipe = Recipe(epochs=20, runs=2, batch_size=64, seed=0)
    report = evaluate_baseline("random", train, test, 2560 * 5, recipe)
    acc = report["accuracy"]
    assert len(acc["runs"]) == 2 and acc["runs"][0] != acc["runs"][1]  # runs differ (their own inits)
    assert acc["mean"] > 0.5  # 20 real images per class of 8x8 digits: far above chance (0.1)
    assert report["storage"]["bytes"] == 12800 and report["storage"]["ipc_float32"] == pytest.approx(5)
    assert report["storage"]["ipc_uint8"] == pytest.approx(20)
    comp = report["compute"]
    assert comp["images_seen_per_run"] == 20 * 200 and comp["optimizer_steps_per_run"] == 20 * 4
    assert comp["train_flops_per_run_estimate"] == 3 * comp["forward_flops_per_image"] * 4000
    assert report["recipe"]["reported"].startswith("final accuracy")
    cheap = Recipe(epochs=2, runs=1, batch_size=64, seed=0)
    first = evaluate_baseline("random", train, test, 2560, cheap)
    assert evaluate_baseline("random", train, test, 2560, cheap)["accuracy"] == first["accuracy"]  # seeded


def test_final_not_best_accuracy(digits, monkeypatch):
    """The reported accuracy is measured once, after the last epoch."""
    from d3codec.evaluate import recipe as recipe_mod

    calls = []
    real = recipe_mod.evaluate_accuracy
    monkeypatch.setattr(recipe_mod, "evaluate_accuracy", lambda *a, **k: calls.append(1) or real(*a, **k))
    train, test = digits
    evaluate_baseline("random", train, test, 2560, Recipe(epochs=4, runs=1, augment=False))
    assert calls == [1]


def test_eval_baseline_command_json(tmp_path):
    args = ["eval", "--baseline", "png", "--train", "digits", "--test", "digits", "--budget", "2ipc",
            "--epochs", "3", "--runs", "1", "--cache-dir", str(tmp_path), "--json", "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["baseline"] == "png" and report["storage"]["budget_bytes"] == 5120
    assert report["storage"]["bytes"] <= 5120 and report["test"]["held_out"] is True
    text = CliRunner().invoke(cli, args[:-2] + ["-q"])
    assert text.exit_code == 0 and "accuracy" in text.output and "ipc float32" in text.output


@pytest.mark.parametrize("args, message", [
    (["eval", "--test", "digits"], "give a .d3 FILE"),
    (["eval", "--baseline", "png", "--test", "digits"], "needs --train"),
    (["eval", "x.d3", "--baseline", "png", "--train", "digits", "--test", "digits", "--budget", "1ipc"], "not both"),
    (["eval", "--baseline", "png", "--train", "digits", "--test", "digits", "--budget", "3 apples"], "budget"),
    (["eval", "--baseline", "png", "--train", "digits", "--test", "digits", "--budget", "1ipc", "--epochs", "0"],
     "--epochs"),
])
def test_eval_command_errors(tmp_path, args, message):
    result = CliRunner().invoke(cli, args + ["--cache-dir", str(tmp_path)])
    assert result.exit_code == 1 and result.output.startswith("error:") and message in result.output
