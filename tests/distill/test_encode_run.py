"""`encode` end to end on the embedded digits: a valid file within budget, byte-identical for a
seed, resumable to the identical file, and clear errors for bad input."""
from __future__ import annotations

import os
import signal

import pytest
import torch
from click.testing import CliRunner

from d3codec.cli import cli
from d3codec.data import open_dataset
from d3codec.distill import distiller
from d3codec.distill.api import EncodeOptions, encode
from d3codec.errors import BudgetError, ConfigError
from d3codec.format.io import load

ITERS = 6
FIT = 4  # reconstruction iterations before the objective: the crash/interrupt tests cross the boundary


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def digits(cache):
    return open_dataset("digits", cache_dir=cache, progress=False)


def _options(cache: str, **kw) -> EncodeOptions:
    base = dict(iterations=ITERS, fit_steps=FIT, seed=0, cache_dir=cache, quiet=True, checkpoint_every=2, expert_epochs=3,
                labels="soft",  # the teacher's labels path end to end (auto is hard for this short teacher)
                overrides={"samples_per_class": 6, "real_per_class": 6, "calibration_samples": 200})
    base.update(kw)
    return EncodeOptions(**base)


@pytest.fixture(scope="module")
def reference(digits, cache, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("ref") / "digits.d3"
    encode(digits, "1ipc", str(out), _options(cache))
    return out.read_bytes()


def test_encode_writes_a_valid_file_within_budget(reference, tmp_path) -> None:
    path = tmp_path / "a.d3"
    path.write_bytes(reference)
    d3 = load(path)
    assert d3.file_bytes == len(reference) <= 2560 == d3.budget.bytes
    assert d3.metadata.num_classes == 10 and d3.metadata.image_shape == (1, 8, 8)
    assert d3.priors.mean.shape[0] == 10 and d3.decoders[0].classes == list(range(10))
    assert d3.provenance["seed"] == 0 and d3.provenance["iterations"] == ITERS
    assert d3.provenance["fit_steps"] == FIT
    assert d3.labels.kind == "soft"
    from d3codec.decode.decoders import LabelTable

    table = LabelTable(d3.labels, 10)
    k = d3.priors.latents_per_class
    classes = torch.arange(10).repeat_interleave(k)
    probs = table.lookup(classes, torch.arange(k).repeat(10))
    assert torch.allclose(probs.sum(-1), torch.ones(10 * k), atol=1e-4)


def test_decoded_samples_are_images_independent_of_batch_mates(reference, tmp_path) -> None:
    from d3codec.models.registry import build_decoder

    path = tmp_path / "a.d3"
    path.write_bytes(reference)
    d3 = load(path)
    entry = d3.decoders[0]
    dec = build_decoder(entry.family, entry.version, entry.hparams)
    dec.load_state_dict({k: v.dequantize() for k, v in entry.weights.items()})
    dec.eval()
    mu = d3.priors.mean.dequantize().reshape(-1, d3.priors.dim)
    with torch.no_grad():
        batch = dec(mu)
        alone = dec(mu[:1])
    assert batch.shape == (10 * d3.priors.latents_per_class, 1, 8, 8)
    assert torch.isfinite(batch).all() and batch.abs().max() <= 1.0
    assert torch.allclose(batch[:1], alone, atol=1e-5)
    assert batch.std() > 0  # not a constant image


def test_same_seed_gives_identical_bytes_and_another_seed_differs(digits, cache, reference, tmp_path) -> None:
    same = tmp_path / "same.d3"
    encode(digits, "1ipc", str(same), _options(cache))
    assert same.read_bytes() == reference
    other = tmp_path / "other.d3"
    encode(digits, "1ipc", str(other), _options(cache, seed=1))
    assert other.read_bytes() != reference


def test_resume_after_a_crash_gives_the_identical_file(digits, cache, reference, tmp_path, monkeypatch) -> None:
    out = tmp_path / "resumed.d3"
    real_step = distiller.Distiller.step

    def crash_at_5(self):
        if self.iteration == 5:
            raise RuntimeError("simulated crash")
        return real_step(self)

    monkeypatch.setattr(distiller.Distiller, "step", crash_at_5)
    with pytest.raises(RuntimeError, match="simulated"):
        encode(digits, "1ipc", str(out), _options(cache))
    assert not out.exists() and (tmp_path / "resumed.d3.ckpt").exists()  # checkpoint of iteration 4
    monkeypatch.setattr(distiller.Distiller, "step", real_step)
    encode(digits, "1ipc", str(out), _options(cache, resume=True))
    assert out.read_bytes() == reference
    assert not (tmp_path / "resumed.d3.ckpt").exists()


def test_ctrl_c_checkpoints_and_resume_gives_the_identical_file(digits, cache, reference, tmp_path, monkeypatch) -> None:
    out = tmp_path / "interrupted.d3"
    real_step = distiller.Distiller.step

    def interrupt_at_3(self):
        if self.iteration == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the iteration finishes, then it stops
        return real_step(self)

    monkeypatch.setattr(distiller.Distiller, "step", interrupt_at_3)
    with pytest.raises(KeyboardInterrupt):
        encode(digits, "1ipc", str(out), _options(cache, checkpoint_every=0))
    assert not out.exists()
    monkeypatch.setattr(distiller.Distiller, "step", real_step)
    encode(digits, "1ipc", str(out), _options(cache, resume=True, checkpoint_every=0))
    assert out.read_bytes() == reference


def test_resume_refuses_a_checkpoint_of_other_settings(digits, cache, tmp_path, monkeypatch) -> None:
    out = tmp_path / "x.d3"
    real_step = distiller.Distiller.step

    def crash(self):
        if self.iteration == 3:
            raise RuntimeError("crash")
        return real_step(self)

    monkeypatch.setattr(distiller.Distiller, "step", crash)
    with pytest.raises(RuntimeError):
        encode(digits, "1ipc", str(out), _options(cache))
    monkeypatch.setattr(distiller.Distiller, "step", real_step)
    with pytest.raises(ConfigError, match="other settings"):
        encode(digits, "1ipc", str(out), _options(cache, resume=True, seed=5))


def test_mtt_objective_runs_and_fits(digits, cache, tmp_path) -> None:
    out = tmp_path / "mtt.d3"
    d3 = encode(digits, "2ipc", str(out), _options(cache, iterations=2, objective="mtt+mmd", num_experts=1,
                                                  expert_epochs=3, overrides={"syn_steps": 2, "unroll_batch": 20,
                                                                              "samples_per_class": 4,
                                                                              "real_per_class": 4,
                                                                              "max_start_epoch": 2,
                                                                              "calibration_samples": 100}))
    assert d3.file_bytes <= d3.budget.bytes and d3.provenance["objective"] == "mtt+mmd"


def test_bad_inputs_get_clear_errors(digits, cache, tmp_path) -> None:
    with pytest.raises(BudgetError, match="at least"):
        encode(digits, "100", str(tmp_path / "x.d3"), _options(cache))
    with pytest.raises(ConfigError, match="objective"):
        encode(digits, "1ipc", str(tmp_path / "x.d3"), _options(cache, objective="gan"))
    with pytest.raises(ConfigError, match="iterations"):
        encode(digits, "1ipc", str(tmp_path / "x.d3"), _options(cache, iterations=0, fit_steps=0))
    with pytest.raises(ConfigError, match="does not exist"):
        encode(digits, "1ipc", str(tmp_path / "missing" / "x.d3"), _options(cache))
    assert not list(tmp_path.iterdir())


def test_cli_dry_run_prints_the_plan_and_errors_are_one_line(cache, tmp_path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["encode", "digits", "--budget", "1ipc", "--dry-run", "--cache-dir", cache])
    assert res.exit_code == 0, res.output
    assert "plan: decoder" in res.output and "budget 2,560 bytes" in res.output
    res = runner.invoke(cli, ["encode", "digits", "--budget", "100", "-o", str(tmp_path / "x.d3"),
                              "--cache-dir", cache])
    assert res.exit_code == 1
    assert res.output.startswith("error: budget 100 bytes is too small") and res.output.count("\n") == 1
    res = runner.invoke(cli, ["encode", "digits", "--budget", "1ipc", "--cache-dir", cache])
    assert res.exit_code == 1 and "output" in res.output
