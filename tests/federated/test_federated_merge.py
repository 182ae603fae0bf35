"""`merge` refuses parts that do not fit together, each misfit with its own error class and a
one-line message naming the part; good parts merge in any order to the same file."""
from __future__ import annotations

import shutil
import struct
import zlib

import pytest
import torch
from conftest import BUDGET, SUBTASKS, run_cli

from d3codec.distill.api import EncodeOptions
from d3codec.distill.federated import encode_federated
from d3codec.distill.merge import (ClassOverlapError, DataSpec, FingerprintMismatchError, FormatVersionMismatchError,
                                  MissingClassesError, NotAPartError, PartError, PartOverBudgetError,
                                  RunMismatchError, merge_parts)
from d3codec.errors import D3Error
from d3codec.format.io import load, save
from d3codec.format.testing import random_d3
from d3codec.format.types import Stored

OPTIONS = dict(iterations=2, num_experts=1, expert_epochs=1, quiet=True, labels="soft")


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    """Subtask parts of one run (seed 0), one part of a run with seed 1, and the cache they share."""
    root = tmp_path_factory.mktemp("parts")
    data = DataSpec.of("digits", cache_dir=str(root / "cache"))
    made = {}
    for i in range(SUBTASKS):
        made[i] = str(root / f"part-{i}.d3")
        encode_federated(data, BUDGET, made[i], EncodeOptions(**OPTIONS), subtasks=SUBTASKS, subtask=i)
    made["seed1"] = str(root / "seed1-part-0.d3")
    encode_federated(data, BUDGET, made["seed1"], EncodeOptions(seed=1, **OPTIONS), subtasks=SUBTASKS, subtask=0)
    made["root"] = root
    return made


def _refused(paths, tmp_path, error: type) -> str:
    with pytest.raises(error) as info:
        merge_parts(paths, str(tmp_path / "out.d3"), quiet=True)
    message = str(info.value)
    assert isinstance(info.value, PartError) and isinstance(info.value, D3Error)
    assert "\n" not in message
    assert not (tmp_path / "out.d3").exists()
    return message


def test_good_parts_merge_in_any_order_to_the_same_bytes(parts, tmp_path) -> None:
    a = merge_parts([parts[0], parts[1], parts[2]], str(tmp_path / "a.d3"), quiet=True)
    merge_parts([parts[2], parts[0], parts[1]], str(tmp_path / "b.d3"), quiet=True)
    assert (tmp_path / "a.d3").read_bytes() == (tmp_path / "b.d3").read_bytes()
    assert sorted(c for d in a.decoders for c in d.classes) == list(range(10))
    assert a.file_bytes <= a.budget.bytes


def test_latent_codes_on_one_grid_merge_exactly(parts, tmp_path) -> None:
    """Parts whose means share one grid (one scale, zero point 0) are copied raw, not re-quantised:
    the merged file draws exactly what each subtask trained."""
    merged = merge_parts([parts[i] for i in range(SUBTASKS)], str(tmp_path / "m.d3"), quiet=True)
    for i in range(SUBTASKS):
        part = load(parts[i])
        classes = [int(c) for c in part.provenance["classes"]]
        assert part.priors.mean.scale == merged.priors.mean.scale and merged.priors.mean.zero_point == (0,)
        assert torch.equal(merged.priors.mean.raw[classes], part.priors.mean.raw)


def test_missing_subtask_is_refused_naming_it(parts, tmp_path) -> None:
    message = _refused([parts[0], parts[1]], tmp_path, MissingClassesError)
    assert "subtask(s) [2]" in message


def test_same_part_twice_is_an_overlap(parts, tmp_path) -> None:
    copy = str(tmp_path / "copy-of-part-1.d3")
    shutil.copy(parts[1], copy)
    message = _refused([parts[0], parts[1], copy, parts[2]], tmp_path, ClassOverlapError)
    assert copy in message and parts[1] in message


def test_part_of_another_run_is_refused(parts, tmp_path) -> None:
    message = _refused([parts[1], parts[2], parts["seed1"]], tmp_path, RunMismatchError)
    assert parts["seed1"] in message


def test_part_of_other_data_is_refused(parts, tmp_path) -> None:
    other = load(parts[2])
    other.metadata.fingerprint = "0" * 32
    path = str(tmp_path / "other-data.d3")
    save(other, path)
    message = _refused([parts[0], parts[1], path], tmp_path, FingerprintMismatchError)
    assert path in message and "fingerprint" in message


def test_part_over_its_share_is_refused(parts, tmp_path) -> None:
    part = load(parts[1])
    bigger = part.priors
    bigger.mean = Stored.encode(bigger.mean.dequantize(), "F32")
    bigger.logvar = Stored.encode(bigger.logvar.dequantize(), "F32")
    decoder = part.decoders[0]
    decoder.weights = {k: Stored.encode(v.dequantize().float(), "F32") if v.raw.is_floating_point() or v.quantized
                       else v for k, v in decoder.weights.items()}
    path = str(tmp_path / "fat-part-1.d3")
    save(part.replace(budget=None), path, compression="none")
    assert load(path).file_bytes > part.provenance["federated"]["share"]
    message = _refused([parts[0], path, parts[2]], tmp_path, PartOverBudgetError)
    assert path in message and "share" in message


def _with_minor_version(src: str, dst: str, minor: int) -> None:
    data = bytearray(open(src, "rb").read())
    struct.pack_into("<H", data, 10, minor)              # prelude: magic(8), major u16, minor u16
    struct.pack_into("<I", data, len(data) - 4, zlib.crc32(bytes(data[:-4])))
    open(dst, "wb").write(bytes(data))


def test_parts_of_different_format_versions_are_refused(parts, tmp_path) -> None:
    newer = str(tmp_path / "newer-part-2.d3")
    _with_minor_version(parts[2], newer, 1)
    assert load(newer).format_version == (1, 1)
    message = _refused([parts[0], parts[1], newer], tmp_path, FormatVersionMismatchError)
    assert newer in message and "1.1" in message


def test_a_file_that_is_not_a_part_is_refused(parts, tmp_path) -> None:
    plain = str(tmp_path / "plain.d3")
    save(random_d3(0, num_classes=10), plain)
    message = _refused([parts[0], plain], tmp_path, NotAPartError)
    assert plain in message


def test_merge_command_reports_one_line_and_exit_1(parts, tmp_path) -> None:
    proc = run_cli(["merge", parts[0], parts[1], "-o", str(tmp_path / "x.d3")], check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "subtask(s) [2]" in lines[0]
    assert not (tmp_path / "x.d3").exists()
