"""Federated runs end to end on CPU: the merged file is valid and covers every class once, and
serial, two-rank gloo torchrun, --nproc and separate --subtask jobs + merge give the same bytes;
a killed run, rerun, finishes only what was missing and writes the same file."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from conftest import SUBTASKS, encode_args, run_cli

from d3codec.format.io import load


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_merged_file_verifies_and_covers_every_class_once(serial_run: str) -> None:
    d3 = load(serial_run)
    assert run_cli(["verify", serial_run]).returncode == 0
    assert d3.file_bytes <= d3.budget.bytes == 25_600
    assert len(d3.decoders) == SUBTASKS
    seen = sorted(c for dec in d3.decoders for c in dec.classes)
    assert seen == list(range(10))                       # every class exactly once
    assert d3.decoder_of_class() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]  # contiguous split 4/3/3
    assert d3.priors.mean.shape[0] == 10 and d3.metadata.num_classes == 10
    assert d3.metadata.class_names == [str(i) for i in range(10)] or len(set(d3.metadata.class_names)) == 10
    # Global soft labels: one distribution over all 10 classes per component.
    from d3codec.decode.decoders import LabelTable

    k = d3.priors.latents_per_class
    assert d3.labels.kind == "soft"
    probs = LabelTable(d3.labels, 10).lookup(torch.arange(10).repeat_interleave(k), torch.arange(k).repeat(10))
    assert probs.shape == (10 * k, 10) and torch.allclose(probs.sum(-1), torch.ones(10 * k), atol=1e-4)
    # The work dir of parts is cleaned up once the merged file is written.
    assert not os.path.exists(serial_run + ".parts")


def test_torchrun_two_ranks_equals_serial_byte_for_byte(serial_run: str, tmp_path) -> None:
    out = str(tmp_path / "torchrun.d3")
    proc = run_cli(encode_args(out, str(tmp_path / "cache")), torchrun=2)
    assert "[rank 1] subtask 1:" in proc.stderr and "[rank 0] subtask 2:" in proc.stderr  # round-robin
    assert "h wall with 2 process(es)" in proc.stderr                              # the estimate first,
    assert "federated run took" in proc.stderr and "with 2 process(es) (estimate" in proc.stderr  # the run against it
    assert _read(out) == _read(serial_run)


def test_local_processes_equal_serial(serial_run: str, tmp_path) -> None:
    out = str(tmp_path / "nproc.d3")
    run_cli(encode_args(out, str(tmp_path / "cache"), "--nproc", "2", "-q"))
    assert _read(out) == _read(serial_run)


def test_separate_subtask_jobs_then_merge_equal_serial(serial_run: str, tmp_path) -> None:
    cache = str(tmp_path / "cache")
    out = str(tmp_path / "out.d3")
    os.makedirs(out + ".parts")
    parts = []
    for i in range(SUBTASKS):
        part = out + f".parts/part-{i:03d}.d3"
        run_cli(encode_args(part, cache, "--subtask", str(i), "-q"))
        assert load(part).provenance["federated"]["subtask"] == i
        parts.append(part)
    merged = str(tmp_path / "merged.d3")
    run_cli(["merge", *reversed(parts), "-o", merged, "-q"])   # order of the parts does not matter
    assert _read(merged) == _read(serial_run)
    # The full command finds every part done (as after a crash during the merge): it only merges.
    rerun = run_cli(encode_args(out, cache))
    assert rerun.stderr.count("already done") == SUBTASKS and "objective" not in rerun.stderr
    assert _read(out) == _read(serial_run)


def test_killed_run_reruns_only_unfinished_subtasks(serial_run: str, tmp_path) -> None:
    out = str(tmp_path / "killed.d3")
    cache = str(tmp_path / "cache")
    first_part = out + ".parts/part-000.d3"
    cmd = [sys.executable, "-m", "d3codec", *encode_args(out, cache, "-q")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 240
    while not os.path.exists(first_part) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(first_part), "the run ended before its first part was written"
    assert not os.path.exists(out)                        # no partial output file
    rerun = run_cli(encode_args(out, cache))
    assert "subtask 0: already done" in rerun.stderr
    assert "subtask 1: 3 classes" in rerun.stderr and "subtask 0: 4 classes" not in rerun.stderr
    assert _read(out) == _read(serial_run)
