"""An encoded file records what its bytes depend on besides its data and settings: the torch
version, device, CPU capability and the intra-op thread count it computed with (`compute`)."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from d3codec.cli import cli
from d3codec.data import open_dataset
from d3codec.distill.api import EncodeOptions, compute_record, plan_for
from d3codec.format.io import load


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def _expected(threads: int) -> dict:
    return {"torch": torch.__version__, "device": "cpu", "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": threads}


def test_compute_record_names_torch_capability_and_threads(restore_threads) -> None:
    torch.set_num_threads(1)
    assert compute_record("cpu") == _expected(1)
    assert compute_record("cpu", threads=3) == _expected(3)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_plan_records_the_thread_count_it_computes_with(cache, restore_threads, threads) -> None:
    digits = open_dataset("digits", cache_dir=cache, progress=False)
    torch.set_num_threads(threads)
    _, _, _, prov = plan_for(digits, "1ipc", EncodeOptions(iterations=2, fit_steps=2, cache_dir=cache, quiet=True))
    assert prov["compute"] == _expected(threads)


def test_cli_encode_with_threads_writes_the_record_and_info_shows_it(cache, tmp_path, restore_threads) -> None:
    out = str(tmp_path / "d.d3")
    run = CliRunner().invoke(cli, ["encode", "digits", "--budget", "1ipc", "-o", out, "--threads", "1", "--iterations",
                                   "2", "--fit-steps", "2", "--experts", "1", "--expert-epochs", "1", "--cache-dir",
                                   cache, "-q"])
    assert run.exit_code == 0, run.output
    assert load(out).provenance["compute"] == _expected(1)
    info = CliRunner().invoke(cli, ["info", out])
    assert f"encoded   torch {torch.__version__} on cpu, CPU capability " in info.output
    assert ", 1 thread\n" in info.output
