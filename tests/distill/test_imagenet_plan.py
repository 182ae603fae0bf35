"""ImageNet-1K planned and costed: `encode imagenet --data-dir DIR --dry-run` on a generated
1,000-class ImageFolder (tiny images, three per class, so it runs in seconds) prints the plan, the
paper's configuration at that budget beside it and an estimate of time and peak memory, single-task
and federated; the paper's table is checked against its own storage arithmetic."""
from __future__ import annotations

import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from d3codec.cli import cli
from d3codec.distill.paper import IMAGENET_64, paper_config
from d3codec.format.budget import parse_budget

SIZE = 16


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory) -> str:
    """`train/<wnid>/` folders of 1,000 classes, three 16x16 PNGs each (a colour per class plus noise):
    one is held out as the test split, and MMD needs two real images per class."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for c in range(1000):
        d = root / "train" / f"n{c:08d}"
        d.mkdir(parents=True)
        base = rng.integers(0, 256, size=3)
        for i in range(3):
            img = np.clip(base + rng.normal(0, 30, size=(SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i}.png")
    return str(root)


def _dry_run(imagenet_dir: str, budget: str, *extra: str) -> str:
    args = ["encode", "imagenet", "--data-dir", imagenet_dir, "--budget", budget, "--dry-run", "--device", "cpu",
            "--cache-dir", imagenet_dir + "/cache", *extra]  # one cache for the module: decoded once
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stderr


def test_single_task_dry_run_prints_plan_paper_and_estimate(imagenet_dir) -> None:
    out = _dry_run(imagenet_dir, "2ipc", "--threads", "1")
    assert re.search(r"^plan: decoder \w+ v\d+ width \d+ ", out, re.M), out
    assert ("paper (D3, ImageNet-1K at 64x64, 2 IPC): 2 subtasks x 500 classes, K=2, D=2048, decoder medium "
            "(linear input) (5,774,691 params each, float32), soft labels, 10,000 iterations; 21,741,382 scalars = "
            "86,965,528 bytes") in out
    budget = 2 * 1000 * 3 * SIZE * SIZE * 4
    m = re.search(r"^this plan: 1 task of 1,000 classes, K=(\d+), D=(\d+), decoder .*; (?:at most|about) ([\d,]+) bytes "
                  r"\(([\d.]+)% of this budget\)$", out, re.M)
    assert m, out
    assert int(m.group(3).replace(",", "")) <= budget
    assert f"this data is 3x{SIZE}x{SIZE}" in out
    assert re.search(r"^estimate on this machine \(cpu, 1 thread, .*total about \S+; peak memory about [\d.]+ [MG]B$",
                     out, re.M), out


def test_federated_dry_run_prints_plan_paper_and_estimate(imagenet_dir) -> None:
    out = _dry_run(imagenet_dir, "1ipc", "--subtasks", "5")
    assert "federated plan: 5 subtasks (contiguous split) of 1,000 classes" in out
    assert "subtask 4: classes 800-999 (200 classes, 400 images)" in out  # one of each class's 3 held out for test
    assert ("paper (D3, ImageNet-1K at 64x64, 1 IPC): 5 subtasks x 200 classes, K=1, D=64, decoder small (k=256) "
            "(789,187 params each, float32)") in out
    assert re.search(r"^this plan: 5 subtasks x 200 classes, K=\d+, D=\d+, decoder small width \d+ ", out, re.M), out
    assert re.search(r"about [\d.]+ CPU-process-hours in all .*, [\d.]+ h wall with 1 process\(es\); "
                     r"peak memory about [\d.]+ [MG]B per process$", out, re.M), out


def test_paper_table_adds_up_and_matches_only_its_budgets() -> None:
    for ipc, cfg in IMAGENET_64.items():
        components = 1000 * cfg.latents_per_class
        latents = components * cfg.latent_dim * 2               # means and log-variances
        assert cfg.scalars == latents + cfg.subtasks * cfg.params_per_decoder + components * 1000
        assert cfg.subtasks * cfg.classes_per_subtask == 1000
        assert paper_config(1000, parse_budget(f"{ipc}ipc", 1000, (3, 64, 64))) is cfg
    assert paper_config(1000, parse_budget("2ipc-u8", 1000, (3, 64, 64))) is None
    assert paper_config(1000, parse_budget("2.5ipc", 1000, (3, 64, 64))) is None
    assert paper_config(1000, parse_budget("3ipc", 1000, (3, 64, 64))) is None
    assert paper_config(100, parse_budget("2ipc", 100, (3, 64, 64))) is None
    assert paper_config(1000, parse_budget("50MB", 1000, (3, 64, 64))) is None
