"""`d3codec sample`: a PNG grid, one row per class, the mean image first, then random samples."""
from __future__ import annotations

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

from d3codec.cli import cli
from d3codec.decode import mean_images, sample_grid
from d3codec.decode.grid import grid_tensor
from d3codec.format.io import save


def test_grid_layout_and_mean_column(make_d3, tmp_path) -> None:
    d3 = make_d3("small", num_classes=4, k=2, image_shape=(3, 16, 16))
    path = str(tmp_path / "f.d3")
    save(d3, path)
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(cli, ["sample", path, "-n", "3", "-o", str(out), "--classes", "1,3", "--seed", "2"])
    assert result.exit_code == 0, result.output
    img = np.asarray(Image.open(out))
    pad = 2
    assert img.shape == (2 * (16 + pad) + pad, 4 * (16 + pad) + pad, 3)
    # row 0 is class 1: its first cell is component 0's mean image, in [0, 1] pixels
    cell = torch.from_numpy(img[pad:pad + 16, pad:pad + 16].astype(np.float32) / 255).permute(2, 0, 1)
    assert torch.allclose(cell, mean_images(d3)[1, 0], atol=1 / 255 + 1e-6)
    assert "wrote" in result.output


def test_default_rows_are_the_first_20_classes_and_grey_for_one_channel(make_d3) -> None:
    d3 = make_d3("small", num_classes=22, k=1, image_shape=(1, 8, 8))
    img = sample_grid(d3, n=2, scale=2)
    assert img.mode == "L" and img.size == (3 * (16 + 2) + 2, 20 * (16 + 2) + 2)


def test_samples_are_seeded_and_differ_from_the_mean(make_d3) -> None:
    d3 = make_d3("small")
    a, b, c = grid_tensor(d3, 4, [0], seed=1), grid_tensor(d3, 4, [0], seed=1), grid_tensor(d3, 4, [0], seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0, 0], a[0, 1])


def test_bad_class_is_a_one_line_error(make_d3, tmp_path) -> None:
    path = str(tmp_path / "f.d3")
    save(make_d3("small", num_classes=4), path)
    result = CliRunner().invoke(cli, ["sample", path, "-o", str(tmp_path / "g.png"), "--classes", "7"])
    assert result.exit_code == 1 and "error: class 7 is out of range" in result.output
    assert not (tmp_path / "g.png").exists()
    missing = CliRunner().invoke(cli, ["sample", path, "-o", str(tmp_path / "no" / "g.png")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
