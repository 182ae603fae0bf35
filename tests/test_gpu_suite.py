"""`benchmarks/gpu_suite.py`: `--smoke` runs every step at toy size on the CPU and reports each in
JSON and Markdown; a failing step is recorded and the suite goes on."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.py"
STEPS = ["cuda_tests", "decode_throughput", "cifar10_encode", "federated_tiny"]


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, str(SUITE), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)


@pytest.mark.slow
def test_smoke_runs_every_step_and_reports_json_and_markdown(tmp_path) -> None:
    out = tmp_path / "smoke"
    proc = _run(["-o", str(out), "--smoke"], timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "gpu_suite.json").read_text())
    assert results["smoke"] is True and results["environment"]["device"] == "cpu"
    assert [s["name"] for s in results["steps"]] == STEPS
    assert all(s["status"] == "ok" for s in results["steps"]), results["steps"]
    steps = {s["name"]: s["result"] for s in results["steps"]}
    assert steps["cuda_tests"]["tests"] > 0 and steps["cuda_tests"]["failures"] == 0
    rows = steps["decode_throughput"]["rows"]
    assert {(r["family"], r["resolution"]) for r in rows} == {(f, p) for f in ("small", "medium", "large")
                                                              for p in (16, 32)}
    for r in rows:
        assert min(r["ours_images_per_s"], r["naive_images_per_s"], r["convnet_images_per_s"],
                   r["resnet18_images_per_s"]) > 0
    for name in ("cifar10_encode", "federated_tiny"):
        r = steps[name]
        assert 0 <= r["accuracy"]["mean"] <= 1 and r["bytes"] > 0 and r["eval_device"] == "cpu"
    assert "mtt+mmd" in steps["cifar10_encode"]["encode_args"]
    assert "--subtasks" in steps["federated_tiny"]["encode_args"]
    md = (out / "gpu_suite.md").read_text()
    assert "decoding >= 1,000,000 images/s for the small decoder at 64 px" in md
    for name in STEPS:
        assert f"| {name} | ok |" in md
    assert md.count("\n| small |") == 2 and md.count("\n| large |") == 2


def test_a_failing_step_is_recorded_and_the_suite_goes_on(tmp_path) -> None:
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _run(["-o", str(out), "--device", "cpu", "--cifar10", str(empty), "--only", "cifar10_encode,federated_tiny"],
                timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    results = json.loads((out / "gpu_suite.json").read_text())
    status = {s["name"]: s for s in results["steps"]}
    assert [s["name"] for s in results["steps"]] == STEPS
    assert status["cuda_tests"]["status"] == "skipped" and "--only" in status["cuda_tests"]["reason"]
    assert status["cifar10_encode"]["status"] == "failed" and "d3codec encode exited 1" in status["cifar10_encode"]["reason"]
    assert status["federated_tiny"]["status"] == "skipped" and "--tiny" in status["federated_tiny"]["reason"]
    md = (out / "gpu_suite.md").read_text()
    assert "| cifar10_encode | failed |" in md and "| federated_tiny | skipped |" in md
    assert (out / "logs" / "cifar10_encode.log").is_file()
