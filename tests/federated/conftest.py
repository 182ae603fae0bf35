"""Shared setup of the federated tests: the embedded `digits` dataset (10 classes, 8x8), tiny
settings (a few iterations, one 1-epoch expert per subtask) and a way to run the real CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

import pytest

#: Budget, subtasks and training settings every federated test shares (seconds per run on CPU).
BUDGET, SUBTASKS = "10ipc", 3
TINY = ["--iterations", "6", "--fit-steps", "4", "--experts", "1", "--expert-epochs", "1", "--checkpoint-every", "2",
        "--labels", "soft"]  # the global teacher's labels (auto is hard for this short teacher)


def encode_args(output: str, cache: str, *extra: str) -> list[str]:
    """`d3codec encode digits ...` arguments of the shared federated run."""
    return ["encode", "digits", "--budget", BUDGET, "--subtasks", str(SUBTASKS), *TINY, "--cache-dir", cache,
            "-o", output, *extra]


def run_cli(args: Sequence[str], *, torchrun: int = 0, check: bool = True, timeout: float = 300,
            cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m d3codec ARGS` (or under `torch.distributed.run` with `torchrun` ranks)."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable]
    if torchrun:
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun)]
    cmd += ["-m", "d3codec", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def serial_run(tmp_path_factory) -> str:
    """The reference: the shared federated run, serial, uninterrupted, in its own cache."""
    root = tmp_path_factory.mktemp("serial")
    out = str(root / "serial.d3")
    run_cli(encode_args(out, str(root / "cache"), "-q"))
    return out
