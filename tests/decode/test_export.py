"""`d3codec export`: N images per class (mean images first, then seeded draws) with their labels,
as an ImageFolder of PNGs or one torch file, written into a new folder atomically."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from d3codec.cli import cli
from d3codec.decode import mean_images
from d3codec.decode.decoders import LabelTable
from d3codec.decode.export import class_folders, export
from d3codec.errors import ConfigError
from d3codec.format.io import save


def _pt(path) -> dict:
    return torch.load(os.path.join(path, "images.pt"), weights_only=True)


@pytest.mark.parametrize("kind,labels,mixture", [("diag", "dense", False), ("lowrank", "topk", True),
                                                 ("full", "hard", False)])
def test_pt_holds_mean_images_first_then_draws_with_labels(make_d3, tmp_path, kind, labels, mixture) -> None:
    d3 = make_d3("small", kind=kind, labels=labels, decoders=2, k=3, mixture=mixture)
    result = export(d3, str(tmp_path / "out"), per_class=7, fmt="pt", seed=3, device="cpu", batch_size=5)
    data = _pt(tmp_path / "out")
    n, k = 4, 3
    assert result.images == n * 7 and result.mean_images_per_class == k and result.device == "cpu"
    images, targets = data["images"], data["targets"]
    assert images.shape == (n * 7, 3, 16, 16) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert np.bincount(targets.numpy()).tolist() == [7] * n
    assert torch.equal(targets, torch.arange(n).repeat_interleave(7))
    per = images.view(n, 7, 3, 16, 16)
    assert torch.allclose(per[:, :k], mean_images(d3).clamp(0, 1), atol=1e-5)
    is_mean = data["is_mean"].view(n, 7)
    assert is_mean[:, :k].all() and not is_mean[:, k:].any()
    assert torch.equal(data["components"].view(n, 7)[:, :k], torch.arange(k).expand(n, k))
    # draws are fresh images, not copies of the means
    assert (per[:, k:].unsqueeze(2) - per[:, :k].unsqueeze(1)).abs().amax(dim=(3, 4, 5)).min() > 1e-3
    table = LabelTable(d3.labels, n)
    assert data["soft"] == (labels != "hard")
    expected = table.lookup(targets, data["components"])
    assert torch.allclose(data["labels"], expected) if data["soft"] else torch.equal(data["labels"], targets)
    if data["soft"]:
        assert data["labels"].shape == (n * 7, n) and torch.allclose(data["labels"].sum(1), torch.ones(n * 7))
    assert data["class_names"] == list(d3.metadata.class_names)
    assert data["mean"] == list(d3.metadata.mean) and data["std"] == list(d3.metadata.std)
    manifest = json.loads((tmp_path / "out" / "export.json").read_text())
    assert manifest["per_class"] == 7 and manifest["seed"] == 3 and manifest["format"] == "pt"


def test_seeds_reproduce_draws_and_batch_size_does_not_matter(make_d3, tmp_path) -> None:
    d3 = make_d3("small", kind="lowrank", labels="dense", k=2, mixture=True)
    a = export(d3, str(tmp_path / "a"), 6, "pt", seed=1, batch_size=4) and _pt(tmp_path / "a")
    b = export(d3, str(tmp_path / "b"), 6, "pt", seed=1, batch_size=4) and _pt(tmp_path / "b")
    c = export(d3, str(tmp_path / "c"), 6, "pt", seed=1, batch_size=64) and _pt(tmp_path / "c")
    d = export(d3, str(tmp_path / "d"), 6, "pt", seed=2, batch_size=4) and _pt(tmp_path / "d")
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["components"], b["components"])
    assert torch.allclose(a["images"], c["images"], atol=1e-5) and torch.equal(a["components"], c["components"])
    mean = a["is_mean"]
    assert torch.allclose(a["images"][mean], d["images"][mean], atol=1e-6)
    assert (a["images"][~mean] - d["images"][~mean]).abs().max() > 1e-2
    # more images per class keep the first ones: draw r of a class depends on (seed, class, r) only
    e = export(d3, str(tmp_path / "e"), 9, "pt", seed=1) and _pt(tmp_path / "e")
    assert torch.allclose(e["images"].view(4, 9, 3, 16, 16)[:, :6], a["images"].view(4, 6, 3, 16, 16), atol=1e-5)


def test_fewer_images_than_components_are_all_mean_images(make_d3, tmp_path) -> None:
    d3 = make_d3("small", k=3)
    export(d3, str(tmp_path / "o"), 2, "pt")
    data = _pt(tmp_path / "o")
    assert data["is_mean"].all() and data["images"].shape[0] == 8
    assert torch.allclose(data["images"].view(4, 2, 3, 16, 16), mean_images(d3)[:, :2].clamp(0, 1), atol=1e-5)


def test_imagefolder_pngs_in_imagefolder_order_with_soft_labels(make_d3, tmp_path) -> None:
    d3 = make_d3("small", labels="dense", k=2)
    export(d3, str(tmp_path / "pt"), 11, "pt", seed=5)
    export(d3, str(tmp_path / "f"), 11, "imagefolder", seed=5)
    ref, root = _pt(tmp_path / "pt"), tmp_path / "f"
    rec = torch.load(root / "labels.pt", weights_only=True)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == rec["folders"] == class_folders(list(d3.metadata.class_names))
    # torchvision's ImageFolder: class i is the i-th folder in sorted order, files sorted within it
    walk = [f"{d}/{f}" for d in folders for f in sorted(os.listdir(root / d))]
    assert walk == rec["paths"] and len(walk) == 44
    assert [folders.index(p.split("/")[0]) for p in walk] == rec["targets"].tolist()
    for i, rel in enumerate(walk):
        arr = np.asarray(Image.open(root / rel))
        expected = (ref["images"][i] * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        assert arr.dtype == np.uint8 and np.abs(arr.astype(int) - expected.astype(int)).max() <= 1
    assert torch.allclose(rec["labels"], ref["labels"]) and rec["labels"].shape == (44, 4) and rec["soft"]


def test_grey_images_are_l_pngs(make_d3, tmp_path) -> None:
    export(make_d3("medium", image_shape=(1, 16, 16)), str(tmp_path / "o"), 3)
    first = sorted(p for p in (tmp_path / "o").iterdir() if p.is_dir())[0]
    assert Image.open(sorted(first.iterdir())[0]).mode == "L"


def test_class_folders_sort_in_class_order() -> None:
    assert class_folders(["cat", "dog"]) == ["cat", "dog"]
    assert class_folders(["dog", "cat"]) == ["0_dog", "1_cat"]
    assert class_folders(["a/b", "a_b"]) == ["0_a_b", "1_a_b"]
    assert class_folders(["Cat", "cat"]) == ["0_Cat", "1_cat"]
    assert class_folders([str(i) for i in range(12)])[:3] == ["00_0", "01_1", "02_2"]
    assert class_folders(["", ".."]) == ["0", "1"]


def test_refuses_a_non_empty_folder_and_replaces_only_an_earlier_export(make_d3, tmp_path) -> None:
    d3 = make_d3("small")
    path = str(tmp_path / "in.d3")
    save(d3, path)
    runner = CliRunner()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    result = runner.invoke(cli, ["export", path, "-o", str(tmp_path / "busy"), "--per-class", "2"])
    assert result.exit_code == 1 and result.output.startswith("error: ") and "--overwrite" in result.output
    result = runner.invoke(cli, ["export", path, "-o", str(tmp_path / "busy"), "--per-class", "2", "--overwrite"])
    assert result.exit_code == 1 and "not written by d3codec export" in result.output
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    result = runner.invoke(cli, ["export", path, "-o", str(tmp_path / "empty"), "--per-class", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "8 images" in result.output and (tmp_path / "empty" / "labels.pt").is_file()
    result = runner.invoke(cli, ["export", path, "-o", str(tmp_path / "empty"), "--per-class", "3", "--format", "pt",
                                 "--overwrite"])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / "empty")) == ["export.json", "images.pt"]
    assert sorted(os.listdir(tmp_path)) == ["busy", "empty", "in.d3"]  # no stage folders left
    # an export folder holding the input is never replaced
    os.replace(path, tmp_path / "empty" / "in.d3")
    inside = str(tmp_path / "empty" / "in.d3")
    result = runner.invoke(cli, ["export", inside, "-o", str(tmp_path / "empty"), "--per-class", "2", "--overwrite"])
    assert result.exit_code == 1 and "would delete it" in result.output and os.path.isfile(inside)
    result = runner.invoke(cli, ["export", inside, "-o", str(tmp_path / "nope" / "x"), "--per-class", "2"])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_a_failed_export_leaves_nothing(make_d3, tmp_path, monkeypatch) -> None:
    d3 = make_d3("small")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        export(d3, str(tmp_path / "o"), 3)
    assert os.listdir(tmp_path) == []


def test_bad_arguments_are_config_errors(make_d3, tmp_path) -> None:
    d3 = make_d3("small")
    with pytest.raises(ConfigError, match="positive"):
        export(d3, str(tmp_path / "o"), 0)
    with pytest.raises(ConfigError, match="format"):
        export(d3, str(tmp_path / "o"), 1, "zip")
    with pytest.raises(ConfigError, match="use auto, cpu or cuda"):
        export(d3, str(tmp_path / "o"), 1, device="tpu")
    assert os.listdir(tmp_path) == []
