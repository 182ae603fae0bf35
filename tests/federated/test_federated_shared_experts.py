"""More ranks than subtasks: the extra ranks share a subtask's expert training. Each expert is
trained by exactly one rank of the subtask's group into the shared cache, the lead distils once
all are there, and the file is byte-identical to the serial run; the dry run's wall estimate
counts the sharing; a member's failure stops its lead instead of leaving it waiting."""
from __future__ import annotations

import json
import os
import re

import pytest

from conftest import run_cli

from d3codec.data import open_dataset
from d3codec.distill.api import EncodeOptions
from d3codec.distill.cost import render_estimate
from d3codec.distill.federated import (SharedExpertFailed, assigned_tasks, expert_owner, expert_shares,
                                      part_path, plan_federated, ranks_with_work, run_subtask,
                                      subtask_group)

#: One subtask, two 1-epoch experts, a few iterations: seconds per run.
SHARED = ["--budget", "10ipc", "--subtasks", "1", "--experts", "2", "--expert-epochs", "1", "--iterations", "6",
          "--fit-steps", "4", "--checkpoint-every", "2", "--labels", "soft"]  # soft: a teacher is trained too


def _args(output: str, cache: str, *extra: str) -> list[str]:
    return ["encode", "digits", *SHARED, "--cache-dir", cache, "-o", output, *extra]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def serial_one_subtask(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("serial1")
    out = str(root / "serial.d3")
    run_cli(_args(out, str(root / "cache"), "-q"))
    return out


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return open_dataset("digits", cache_dir=str(tmp_path_factory.mktemp("cache")), progress=False)


def _expert_folders(cache: str) -> dict[int, list[str]]:
    """Expert cache folders, by training seed -> their expert files (the teacher and the one
    subtask both cover all 10 classes: their folders differ by seed)."""
    root = os.path.join(cache, "experts")
    out: dict[int, list[str]] = {}
    for name in sorted(os.listdir(root)):
        with open(os.path.join(root, name, "config.json")) as f:
            seed = json.load(f)["config"]["seed"]
        out[seed] = sorted(n for n in os.listdir(os.path.join(root, name)) if n.endswith(".safetensors"))
    return out


@pytest.mark.parametrize("launcher", ["torchrun", "nproc"])
def test_two_ranks_share_one_subtasks_experts_and_equal_serial(serial_one_subtask: str, tmp_path,
                                                               launcher: str) -> None:
    out, cache = str(tmp_path / "shared.d3"), str(tmp_path / "cache")
    if launcher == "torchrun":
        proc, who = run_cli(_args(out, cache), torchrun=2), "rank"
    else:
        proc, who = run_cli(_args(out, cache, "--nproc", "2")), "process"
    assert _read(out) == _read(serial_one_subtask)
    log = proc.stderr
    # Each rank trained exactly one of the subtask's two experts; the lead waited for the other.
    trained = sorted(re.findall(rf"\[{who} (\d)\] subtask 0: expert (\d) of 2 trained", log))
    assert trained == [("0", "0"), ("1", "1")], log[-3000:]
    assert f"[{who} 0] subtask 0: expert 1 from rank 1" in log and "training it here" not in log
    # The cache holds the subtask's two experts in one folder (the one its distillation read: no
    # third folder of experts retrained under another key) and the teacher's one expert.
    folders = _expert_folders(cache)
    assert sorted(map(len, folders.values())) == [1, 2], folders
    assert not os.path.exists(out + ".parts")  # markers cleaned with the parts


def test_groups_split_each_subtasks_experts_once(digits) -> None:
    fplan = plan_federated(digits, "10ipc", EncodeOptions(num_experts=5, quiet=True, labels="soft"), subtasks=2)
    assert fplan.num_tasks == 3                            # 2 subtasks + the teacher
    assert subtask_group(0, 2, 5) == [0, 2, 4] and subtask_group(1, 2, 5) == [1, 3]
    assert subtask_group(1, 2, 2) == [1] and subtask_group(2, 3, 2) == [0]  # no sharing: its one rank
    for world in (3, 5, 8):
        owners = {(s, i): expert_owner(fplan, s, i, world) for s in range(2) for i in range(5)}
        shares = {(s, i): r for r in range(world) for s, mine in expert_shares(fplan, r, world) for i in mine}
        assert shares == owners                            # every expert, exactly one rank, in its group
        assert all(r % 2 == s for (s, _), r in owners.items())
    assert [expert_owner(fplan, 0, i, 5) for i in range(5)] == [0, 2, 4, 0, 2]
    assert expert_shares(fplan, 0, 2) == [] and expert_shares(fplan, 1, 2) == []  # world <= subtasks
    # Ranks past the last expert share and the last task get no process.
    fewer = plan_federated(digits, "10ipc", EncodeOptions(num_experts=2, quiet=True, labels="soft"), subtasks=1)
    assert ranks_with_work(fewer, 4) == [0, 1] and assigned_tasks(fewer.num_tasks, 1, 4) == [1]


def test_dry_run_wall_estimate_counts_shared_experts(digits) -> None:
    fplan = plan_federated(digits, "10ipc", EncodeOptions(num_experts=2, quiet=True, labels="soft"), subtasks=1)
    hour = 3600.0
    cost = {"seconds_per_iteration": 1.0, "seconds_per_expert_image": 1e-3,
            "subtask 0": 3 * hour, "subtask 0 experts": 2 * hour, "teacher": 1 * hour}
    # 1 rank: experts 2 h + distil 1 h + teacher 1 h; 2 ranks: (expert + distil) || (expert + teacher).
    assert "4.00 h wall with 1 process(es)" in render_estimate(cost, fplan, 1)
    assert "2.00 h wall with 2 process(es)" in render_estimate(cost, fplan, 2)
    assert "about 4.00 CPU-process-hours in all" in render_estimate(cost, fplan, 2)


def test_lead_stops_when_a_member_failed_its_expert(digits, tmp_path) -> None:
    fplan = plan_federated(digits, "10ipc", EncodeOptions(num_experts=2, quiet=True, labels="soft", cache_dir=str(tmp_path)),
                           subtasks=1)
    path = part_path(str(tmp_path), 0)
    with open(path + ".expert-0001.failed", "w") as f:
        json.dump({"rank": 1, "error": "RuntimeError: out of memory"}, f)
    with pytest.raises(SharedExpertFailed, match=r"rank 1 failed training expert 1 of subtask 0 \(RuntimeError: "
                                                 r"out of memory\); rerun the same command"):
        run_subtask(digits, fplan, 0, path, shared={1: 1}, log=lambda s: None)
    assert not os.path.exists(path)
