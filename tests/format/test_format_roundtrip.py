"""Bytes in equal bytes out: load/save round trips, determinism, the budget and the size bound."""
import os

import pytest
import safetensors.torch
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d3codec.format import (
    Budget,
    FileAccessError,
    InvalidFieldError,
    OverBudgetError,
    Stored,
    dumps,
    encoded_size,
    load,
    loads,
    save,
    size_upper_bound,
)
from d3codec.format.errors import D3FormatError
from d3codec.format.io import PRELUDE, PRELUDE_SIZE
from d3codec.errors import BudgetError
from d3codec.format.testing import random_d3
from d3bytes import assert_same, split

files = st.builds(
    random_d3,
    seed=st.integers(0, 2**31),
    num_classes=st.integers(1, 6),
    image_shape=st.sampled_from([(1, 8, 8), (3, 4, 4), (3, 16, 16)]),
    latents_per_class=st.integers(1, 3),
    dim=st.integers(1, 6),
    kind=st.sampled_from(["diag", "lowrank", "full"]),
    rank=st.integers(1, 3),
    mixture=st.booleans(),
    decoders=st.integers(1, 3),
    width=st.integers(1, 5),
    labels=st.sampled_from(["hard", "dense", "topk"]),
    topk=st.integers(1, 4),
    index_dtype=st.sampled_from(["U8", "I16", "I32", "I64"]),
    dtype=st.sampled_from(["F32", "F16", "BF16", "I8", "U8"]),
    per_channel=st.booleans(),
    budget=st.none() | st.builds(Budget, bytes=st.integers(10**6, 10**9), unit=st.sampled_from(["bytes", "ipc", "ipc-u8"]),
                                 ipc=st.none() | st.floats(0.01, 100), spec=st.none() | st.text(max_size=8)),
).filter(lambda d: len(d.decoders) <= d.metadata.num_classes)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files)
def test_round_trip_bytes_and_contents(d3):
    data = dumps(d3)
    back = loads(data)
    assert_same(d3, back)
    assert dumps(back) == data  # load -> save gives identical bytes
    assert back.file_bytes == len(data) == encoded_size(d3)
    assert sum(back.breakdown.values()) == len(data)
    assert encoded_size(d3) <= size_upper_bound(d3)


def test_same_file_same_bytes():
    assert dumps(random_d3(7, labels="topk", dtype="I8")) == dumps(random_d3(7, labels="topk", dtype="I8"))
    assert dumps(random_d3(7)) != dumps(random_d3(8))


def test_sections_are_standard_safetensors():
    d3 = random_d3(3, decoders=2, labels="dense", dtype="BF16")
    data = dumps(d3)
    _, head, area = split(data)
    dctx = zstandard.ZstdDecompressor()
    for sec in head["sections"]:
        blob = area[sec["offset"] : sec["offset"] + sec["length"]]
        if sec["codec"] == "zstd":
            blob = dctx.decompress(blob)
        assert len(blob) == sec["raw_length"]
        tensors = safetensors.torch.load(blob)
        if sec["name"] == "priors":
            assert torch.equal(tensors["mean"], d3.priors.mean.raw)
        elif sec["name"] == "decoder.1":
            assert torch.equal(tensors["fc.weight"], d3.decoders[1].weights["fc.weight"].raw)


def test_quantised_values_survive_and_dequantise():
    x = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(0))
    d3 = random_d3(0, num_classes=4, latents_per_class=6, dim=5)
    d3.priors.mean = Stored.encode(x, "I8", axis=0)
    back = loads(dumps(d3))
    err = (back.priors.mean.dequantize() - x).abs().max()
    assert err <= max(back.priors.mean.scale) / 2 + 1e-6
    assert torch.equal(back.priors.mean.dequantize(), d3.priors.mean.dequantize())


def test_grid_values_survive_and_widen_rather_than_clip():
    """`Stored.on_grid`: I8 multiples of one float32 step (zero point 0) that round-trip exactly; a
    value past 127 steps widens the step instead of being clipped."""
    x = 0.5 * torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(0))
    d3 = random_d3(0, num_classes=4, latents_per_class=6, dim=5)
    d3.priors.mean = Stored.on_grid(x, 0.2)
    assert d3.priors.mean.scale == (float(torch.tensor(0.2)),) and d3.priors.mean.zero_point == (0,)
    back = loads(dumps(d3))
    assert torch.equal(back.priors.mean.raw, d3.priors.mean.raw)
    assert (back.priors.mean.dequantize() - x).abs().max() <= 0.1 + 1e-6
    wide = Stored.on_grid(torch.tensor([100.0, -0.3]), 0.2)
    assert wide.scale[0] > 0.2 and wide.dequantize()[0] == pytest.approx(100.0, rel=1e-6)
    with pytest.raises(ValueError, match="positive finite"):
        Stored.on_grid(x, 0.0)


def test_big_sections_compress_only_when_smaller():
    d3 = random_d3(0, num_classes=2, latents_per_class=2, dim=4)
    d3.decoders[0].weights["zeros"] = Stored(torch.zeros(50_000))
    d3.decoders[0].weights["noise"] = Stored(torch.rand(1000))
    _, head, _ = split(dumps(d3))
    codecs = {s["name"]: s["codec"] for s in head["sections"]}
    assert codecs["decoder.0"] == "zstd"
    for sec in head["sections"]:
        assert sec["length"] <= sec["raw_length"]


def test_save_is_atomic_and_refuses_over_budget(tmp_path):
    d3 = random_d3(1, decoders=2, labels="topk")
    path = tmp_path / "x.d3"
    size = save(d3, path)
    assert size == path.stat().st_size == encoded_size(d3)
    assert load(path).file_bytes == size
    before = path.read_bytes()
    with pytest.raises(OverBudgetError) as err:
        save(d3, path, budget=size - 10)
    msg = str(err.value)
    assert "over the budget" in msg and "largest part is" in msg and "\n" not in msg
    assert isinstance(err.value, BudgetError) and isinstance(err.value, D3FormatError)
    assert path.read_bytes() == before  # the old file is untouched
    assert sorted(os.listdir(tmp_path)) == ["x.d3"]  # and no temporary file is left behind
    budget_size = save(d3, path, budget=size + 100)  # a budget in the header can cost bytes itself
    back = load(path)
    assert back.budget.bytes == size + 100 and back.file_bytes == budget_size <= size + 100


def test_exact_budget_fits(tmp_path):
    d3 = random_d3(1)
    need = encoded_size(d3, budget=9999)
    assert 1000 < need < 9999  # same number of digits as any 4-digit budget, so the same header length
    assert save(d3, tmp_path / "a.d3", budget=need) == need
    with pytest.raises(OverBudgetError, match="1 over"):
        save(d3, tmp_path / "b.d3", budget=need - 1)


def test_save_and_load_path_errors(tmp_path):
    d3 = random_d3(0)
    with pytest.raises(FileAccessError, match="no such file"):
        load(tmp_path / "missing.d3")
    with pytest.raises(FileAccessError, match="folder"):
        load(tmp_path)
    with pytest.raises(FileAccessError):
        save(d3, tmp_path / "no" / "such" / "dir" / "x.d3")
    with pytest.raises(FileAccessError, match="folder"):
        save(d3, tmp_path)


def test_writer_rejects_inconsistent_files():
    d3 = random_d3(0, num_classes=3)
    d3.decoders[0].classes = [0, 1]  # class 2 has no decoder
    with pytest.raises(InvalidFieldError, match="class 2 has no decoder"):
        dumps(d3)
    d3 = random_d3(0, num_classes=3, labels="topk")
    d3.labels.indices = Stored(torch.full(d3.labels.indices.shape, 3, dtype=torch.int16))
    with pytest.raises(InvalidFieldError, match="outside"):
        dumps(d3)
    d3 = random_d3(0, kind="full")
    d3.priors.cholesky = Stored(torch.ones(d3.priors.cholesky.shape))
    with pytest.raises(InvalidFieldError, match="lower-triangular"):
        dumps(d3)
    d3 = random_d3(0)
    d3.provenance = {"lr": float("nan")}
    with pytest.raises(InvalidFieldError, match="JSON"):
        dumps(d3)
    d3 = random_d3(0)
    d3.priors.logvar = Stored(torch.zeros(1, 2, 3))
    with pytest.raises(InvalidFieldError, match="priors.logvar"):
        dumps(d3)
    d3 = random_d3(0)
    d3.priors.mean = Stored(torch.zeros(d3.priors.mean.shape, dtype=torch.int32))
    with pytest.raises(InvalidFieldError, match="without a scale"):
        dumps(d3)


def test_size_upper_bound_holds_for_any_scale_values():
    d3 = random_d3(2, dtype="I8", per_channel=True, decoders=2)
    bound = size_upper_bound(d3)
    widest = Stored(d3.priors.mean.raw, scale=(1234567900000000.0,) * 3, zero_point=(-128,) * 3, axis=0)
    d3.priors.mean = widest
    assert encoded_size(d3) <= bound


def test_prelude_layout():
    data = dumps(random_d3(0))
    magic, major, minor, hcodec, r1, r2, hstored, hraw, length = PRELUDE.unpack_from(data, 0)
    assert magic == b"\x89D3F\r\n\x1a\n" and (major, minor) == (1, 0) and (r1, r2) == (0, 0)
    assert length == len(data) and PRELUDE_SIZE == 32 and hcodec in (0, 1) and hstored <= hraw


def test_loaded_tensors_are_writable_and_independent_of_input():
    data = bytearray(dumps(random_d3(0)))
    d3 = loads(data)
    data[:] = bytes(len(data))
    assert d3.priors.mean.raw.abs().sum() > 0
    d3.priors.mean.raw.add_(1)  # writable, no warning


def test_bad_budget_argument():
    with pytest.raises(BudgetError):
        dumps(random_d3(0), budget="2ipc")


def test_compression_none_stores_every_section_raw():
    d3 = random_d3(3, decoders=2, labels="topk")
    data = dumps(d3, compression="none")
    _, head, _ = split(data)
    assert {s["codec"] for s in head["sections"]} == {"none"}
    assert_same(loads(data), d3)
    assert len(data) >= len(dumps(d3)) and len(data) <= size_upper_bound(d3)


def test_memory_mapped_load_is_private_and_equals_read(tmp_path):
    d3 = random_d3(9, decoders=2, labels="dense", dtype="F16")
    path = tmp_path / "m.d3"
    save(d3, path, compression="none")
    before = path.read_bytes()
    mapped, read = load(path), load(path, memory_map=False)
    assert_same(mapped, read)
    assert_same(mapped, d3)
    mapped.decoders[0].weights["fc.weight"].raw.fill_(7)  # copy-on-write: the file is untouched
    assert path.read_bytes() == before
    assert load(path).decoders[0].weights["fc.weight"].raw.equal(d3.decoders[0].weights["fc.weight"].raw)
