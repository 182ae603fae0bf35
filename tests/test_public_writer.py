"""The public writer beside the reader: `d3codec.encode` and `d3codec.plan` (the name is free since
the training code lives in `d3codec.distill`), and `import d3codec` still loads no torch."""
from __future__ import annotations

import subprocess
import sys

import pytest

import d3codec
from d3codec.errors import ConfigError


def test_import_d3codec_then_reading_the_names_loads_no_torch() -> None:
    code = "import sys, d3codec; d3codec.__all__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]


def test_plan_names_the_choices_without_training(tmp_path) -> None:
    plan = d3codec.plan("digits", "1ipc", cache_dir=str(tmp_path), quiet=True)
    assert plan.latents_per_class >= 1 and plan.bound <= plan.budget.bytes
    assert "latents/class" in plan.summary()
    assert not list(tmp_path.rglob("*.d3"))


def test_encode_writes_a_file_that_loads_and_decodes(tmp_path) -> None:
    out = tmp_path / "digits.d3"
    d3 = d3codec.encode("digits", "1ipc", str(out), cache_dir=str(tmp_path / "cache"), quiet=True, device="cpu",
                        fit_steps=20, iterations=2, expert_epochs=1)
    assert isinstance(d3, d3codec.D3File) and out.is_file()
    assert d3codec.load(str(out)).metadata.num_classes == 10
    x, y = next(iter(d3codec.D3Dataset(str(out), batch_size=8, device="cpu")))
    assert x.shape[0] == 8 and y.shape[0] == 8


def test_unknown_options_are_one_line_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown option"):
        d3codec.plan("digits", "1ipc", cache_dir=str(tmp_path), latents=3)
    with pytest.raises(ConfigError, match="unknown option"):
        d3codec.encode("digits", "1ipc", str(tmp_path / "x.d3"), cache_dir=str(tmp_path), dry_run=True)
