"""The encode's cost estimate: the dry run prints every phase, a total and a peak memory from a
short probe; the estimate grows with the work (fit steps, classes, images) and counts cached
experts as free; a real encode prints its time beside the estimate and keeps it out of the file."""
from __future__ import annotations

import re
from dataclasses import replace

import pytest
from click.testing import CliRunner

from d3codec.cli import cli
from d3codec.data import open_dataset
from d3codec.distill.api import EncodeOptions, plan_for
from d3codec.distill.cost import estimate_single, render_single, run_probe

from many_classes import many_classes_npz

ESTIMATE = re.compile(r"^estimate on this machine \(cpu, 1 thread, from a \d+ s probe\): experts (\S+)(?: \(.*\))?, "
                      r"fit (\S+), objective (\S+), labels (\S+); total about (\S+); "
                      r"peak memory about ([\d.]+) (MB|GB)$",
                      re.M)


def _seconds(text: str) -> int:
    """`45s`, `3m05s`, `2h04m` -> seconds."""
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    assert m and text, text
    h, mi, s = (int(g or 0) for g in m.groups())
    return 3600 * h + 60 * mi + s


def _run(tmp_path, data: str, *extra: str):
    args = ["encode", data, "--budget", "1ipc", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
            "--experts", "1", "--expert-epochs", "1", "--threads", "1", *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> str:
    return many_classes_npz(tmp_path_factory.mktemp("many") / "many.npz")


def test_dry_run_prints_every_phase_a_total_and_peak_memory(many, tmp_path) -> None:
    res = _run(tmp_path, many, "--dry-run", "--labels", "soft")
    assert res.exit_code == 0, res.output
    m = ESTIMATE.search(res.stderr)
    assert m, res.stderr
    experts, fit, objective, labels, total = (_seconds(g) for g in m.groups()[:5])
    assert total >= max(experts, fit, objective, labels) and total <= experts + fit + objective + labels + 4
    memory = float(m.group(6)) * (1e3 if m.group(7) == "GB" else 1.0)
    assert 50 < memory < 8000  # MB: at least the interpreter and torch, far below the machine
    assert not list(tmp_path.glob("*.d3"))


def test_the_estimate_grows_with_the_work_and_counts_cached_experts_as_free(many, tmp_path) -> None:
    ds = open_dataset(many, split="train", cache_dir=str(tmp_path / "cache"), progress=False)
    plan, cfg, real, _ = plan_for(ds, "1ipc", EncodeOptions(cache_dir=str(tmp_path / "cache")))
    probe = run_probe(real, plan, cfg, "cpu", epochs=2)
    assert probe.classes <= 8 and probe.expert_image > 0 and probe.fit_step > 0 and probe.objective_per_class > 0

    def est(cfg=cfg, classes=50, images=300, cached=0):
        return estimate_single(probe, plan, cfg, classes=classes, train_images=images, image_shape=(3, 16, 16),
                               experts=1, epochs=2, cached_experts=cached)

    base = est()
    assert set(base.seconds) == {"experts", "fit", "objective", "labels"} and base.seconds["labels"] == 0.0
    longer = est(cfg=replace(cfg, fit_steps=10 * cfg.fit_steps))
    assert longer.seconds["fit"] > 5 * base.seconds["fit"] and longer.total > base.total
    every = replace(cfg, mmd_classes=0)  # an MMD update over every class costs in proportion to them
    assert est(cfg=every, classes=500).seconds["objective"] > 5 * est(cfg=every).seconds["objective"]
    assert cfg.mmd_classes == 10 and est(classes=500).seconds["objective"] == base.seconds["objective"]
    assert est(images=3000).seconds["experts"] > 5 * base.seconds["experts"]
    assert est(images=300_000).peak_bytes > base.peak_bytes + 50_000_000  # the cache is read in full
    cached = est(cached=1)
    assert cached.seconds["experts"] == 0.0 and cached.seconds["fit"] == base.seconds["fit"]
    assert "experts 0s (1 of 1 experts cached)" in render_single(cached)


def test_an_encode_prints_its_time_beside_the_estimate_and_the_file_holds_no_times(many, tmp_path) -> None:
    out = tmp_path / "out.d3"
    res = _run(tmp_path, many, "-o", str(out), "--iterations", "2", "--fit-steps", "3")
    assert res.exit_code == 0, res.output
    assert ESTIMATE.search(res.stderr), res.stderr
    took = re.search(r"^took (\S+) \(estimate (\S+)\); per phase, actual \(estimate\): experts \S+ \(\S+\), "
                     r"fit \S+ \(\S+\), objective \S+ \(\S+\), labels \S+ \(\S+\), write \S+; "
                     r"peak memory [\d.]+ [MG]B \(estimate [\d.]+ [MG]B\)$", res.stderr, re.M)
    assert took, res.stderr
    from d3codec.format.io import load

    text = repr(load(str(out)).provenance)
    assert "timing" not in text and "seconds" not in text
    # The expert is cached now: a dry run with the same settings counts it as free.
    again = _run(tmp_path, many, "--dry-run", "--iterations", "2", "--fit-steps", "3")
    m = ESTIMATE.search(again.stderr)
    assert m and m.group(1) == "0s" and "(1 of 1 experts cached)" in again.stderr, again.stderr


def test_quiet_encode_runs_no_probe(many, tmp_path) -> None:
    res = _run(tmp_path, many, "-o", str(tmp_path / "q.d3"), "--iterations", "1", "--fit-steps", "1", "-q")
    assert res.exit_code == 0, res.output
    assert "estimate" not in res.stderr and "took" not in res.stderr
