"""The user-facing examples work as documented: `examples/*.py` train on a real (tiny) digits
`.d3` file and print a test accuracy well above chance, and the README's Python snippets run in
order in a folder holding `digits.d3`, as the README says they do.

One real `d3codec encode digits` (few fit steps, one objective iteration, a short expert) makes
the file in seconds, with soft labels; its hard-label twin is the same file with `Labels()`, so
both label kinds the examples handle are exercised without a second encode.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import d3codec
from d3codec.cli import cli
from d3codec.format.types import Labels

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
ACCURACY = re.compile(r"^test accuracy: (\d+\.\d+)% on (\d+) real digits test images", re.MULTILINE)
#: 30 SGD steps on the tiny file score about 60-80% on the 179 held-out digits; chance is 10%.
MIN_ACCURACY = 30.0


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """{"soft": a real soft-label digits file, "hard": the same file with hard labels, "cache": the
    d3codec cache folder both the encode and the examples use (so nothing lands in ~/.cache)}."""
    root = tmp_path_factory.mktemp("examples")
    cache = root / "cache"
    soft = root / "soft.d3"
    result = CliRunner().invoke(cli, ["encode", "digits", "--budget", "1ipc", "-o", str(soft), "--labels", "soft",
                                      "--fit-steps", "300", "--iterations", "1", "--expert-epochs", "10",
                                      "--cache-dir", str(cache), "-q"])
    assert result.exit_code == 0, result.output
    hard = root / "hard.d3"
    f = d3codec.load(soft)
    assert f.labels.kind == "soft"
    d3codec.save(f.replace(labels=Labels()), hard)  # each component labelled with its class
    return {"soft": soft, "hard": hard, "cache": cache}


def _run(args: list[str], cache: Path, cwd: Path) -> str:
    """Run a command with the test cache and one thread per process; returns stdout, asserting exit 0."""
    env = dict(os.environ, D3CODEC_CACHE=str(cache), OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _accuracy(stdout: str) -> float:
    match = ACCURACY.search(stdout)
    assert match, f"no accuracy line in:\n{stdout}"
    assert int(match.group(2)) == 179  # the digits test split: a held-out 10% of each class
    return float(match.group(1))


@pytest.mark.parametrize("labels", ["soft", "hard"])
def test_train_example_learns_from_the_file(files, tmp_path, labels):
    out = _run([sys.executable, str(EXAMPLES / "train.py"), str(files[labels]), "--test", "digits",
                "--steps", "30", "--device", "cpu", "--seed", "1"], files["cache"], tmp_path)
    assert f"({labels} labels, 30 steps)" in out
    assert "step 30/30" in out
    assert _accuracy(out) > MIN_ACCURACY


def test_train_example_rejects_a_test_set_of_another_shape(files, tmp_path):
    """The file's classes and image shape are checked against the test set before training."""
    other = tmp_path / "three.npz"
    rng = np.random.default_rng(0)
    np.savez(other, x=rng.integers(0, 256, (60, 8, 8), dtype=np.uint8), y=np.repeat(np.arange(3), 20))
    env = dict(os.environ, D3CODEC_CACHE=str(files["cache"]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "train.py"), str(files["hard"]), "--test", str(other),
                           "--steps", "1"], cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 2 and "pass the file's dataset" in proc.stderr, proc.stderr[-2000:]


def test_ddp_example_ranks_draw_different_batches(files, tmp_path):
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                str(EXAMPLES / "train_ddp.py"), str(files["soft"]), "--test", "digits", "--steps", "20",
                "--device", "cpu", "--seed", "1"], files["cache"], tmp_path)
    checksums = re.search(r"first-batch checksums per rank: \[(.*)\] \(all different: (\w+)\)", out)
    assert checksums, out
    assert len(checksums.group(1).split(",")) == 2 and checksums.group(2) == "True"
    assert "(soft labels, 20 steps on 2 ranks)" in out
    assert _accuracy(out) > MIN_ACCURACY


def _readme_python_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def test_readme_python_snippets_run_in_order(files, tmp_path, monkeypatch):
    """Every ```python block of README.md, executed in order in one namespace (the `...` loop body
    is a valid statement), in a folder holding the `digits.d3` the snippets load."""
    blocks = _readme_python_blocks()
    assert len(blocks) >= 2, "README.md lost its Python snippets"
    (tmp_path / "digits.d3").write_bytes(files["hard"].read_bytes())
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102 (the point)
    # What the snippets promise: batches of [B, C, H, W] images with [B] or [B, classes] labels ...
    images, labels = namespace["images"], namespace["labels"]
    assert images.shape[1:] == (1, 8, 8) and labels.shape[0] == images.shape[0]
    # ... and `save` writes the loaded file back byte for byte.
    assert (tmp_path / "copy.d3").read_bytes() == (tmp_path / "digits.d3").read_bytes()
