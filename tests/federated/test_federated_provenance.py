"""Federated files record what their bytes depend on, as single-task files do: the `compute`
record, with one thread (every federated process computes with one), the same in every part and
in the merged file; a merge of parts encoded under different computes records each part's."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from conftest import SUBTASKS, encode_args, run_cli

from d3codec.distill.api import compute_record
from d3codec.distill.merge import merged_provenance
from d3codec.format.io import load


def test_parts_and_merged_file_record_one_thread(serial_run: str, tmp_path) -> None:
    one = compute_record("cpu", threads=1)
    assert one["threads"] == 1 and one["torch"] == torch.__version__
    assert load(serial_run).provenance["compute"] == one
    part = str(tmp_path / "part-001.d3")
    run_cli(encode_args(part, str(tmp_path / "cache"), "--subtask", "1", "-q"))
    prov = load(part).provenance
    assert prov["compute"] == one and prov["federated"]["merged"]["compute"] == one
    assert prov["federated"]["subtasks"] == SUBTASKS


def _part(compute, merged) -> SimpleNamespace:
    prov: dict = {"federated": {"merged": merged}}
    if compute is not None:
        prov["compute"] = compute
    return SimpleNamespace(d3=SimpleNamespace(provenance=prov), record=prov["federated"])


def test_merged_provenance_keeps_one_record_when_parts_agree_else_one_per_part() -> None:
    a = {"torch": "2.13.0", "device": "cpu", "cpu_capability": "AVX512", "threads": 1}
    b = {**a, "cpu_capability": "AVX2"}
    merged = {"encoder": "d3codec 0.1.0", "seed": 0, "compute": a}
    assert merged_provenance([_part(a, merged), _part(a, merged)]) == merged
    assert merged_provenance([_part(a, merged), _part(b, merged), _part(a, merged)])["compute"] == [a, b, a]
    assert merged_provenance([_part(a, merged), _part(b, merged)])["seed"] == 0
    old = {"encoder": "d3codec 0.0.9", "seed": 0}  # parts written before the record existed
    assert merged_provenance([_part(None, old), _part(None, old)]) == old
