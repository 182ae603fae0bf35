"""Hostile bytes: every way a file can be wrong gives the right `D3FormatError` subclass, fast and
with bounded memory, and never any other exception."""
import json
import struct
import tracemalloc

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from d3codec.format import (
    BadMagicError,
    ChecksumError,
    D3FormatError,
    HeaderTooLargeError,
    InvalidFieldError,
    OutOfRangeError,
    ReaderLimits,
    TruncatedError,
    UnsupportedVersionError,
    dumps,
    loads,
)
from d3codec.format.io import MAGIC, PRELUDE, PRELUDE_SIZE
from d3codec.format.testing import random_d3
from d3bytes import rebuild, recrc, replace_section, section_blob, split

SMALL = dumps(random_d3(5, num_classes=3, decoders=2, labels="topk", kind="lowrank", dtype="I8", width=2))
COMPRESSED = dumps(random_d3(6, num_classes=2, decoders=1, dim=64, latents_per_class=8, dtype="U8"))


def _error(data: bytes, **kw) -> D3FormatError:
    with pytest.raises(D3FormatError) as err:
        loads(data, **kw)
    msg = str(err.value)
    assert msg.startswith("<bytes>: ") and "\n" not in msg
    return err.value


def test_small_file_is_valid():
    assert loads(SMALL).file_bytes == len(SMALL) < 4096
    _, head, _ = split(COMPRESSED)
    assert "zstd" in {s["codec"] for s in head["sections"]}


def test_truncation_at_every_offset():
    for n in range(len(SMALL)):
        assert isinstance(_error(SMALL[:n]), TruncatedError), n


def test_trailing_bytes():
    assert isinstance(_error(SMALL + b"\0"), OutOfRangeError)


def test_every_single_bit_flip():
    length_field = range(24, 32)
    for pos in range(len(SMALL)):
        for bit in range(8):
            data = bytearray(SMALL)
            data[pos] ^= 1 << bit
            err = _error(bytes(data))
            if pos < 8:
                assert isinstance(err, BadMagicError)
            elif pos in (8, 9):
                assert isinstance(err, UnsupportedVersionError)
            elif pos in length_field:
                assert isinstance(err, (TruncatedError, OutOfRangeError))
            else:
                assert isinstance(err, ChecksumError), (pos, bit, err)


def test_bit_flips_in_a_compressed_file():
    for pos in range(0, len(COMPRESSED), 7):
        data = bytearray(COMPRESSED)
        data[pos] ^= 0x10
        _error(bytes(data))


def test_future_major_version():
    err = _error(rebuild(SMALL, major=2))
    assert isinstance(err, UnsupportedVersionError) and "2.0" in str(err) and "upgrade" in str(err)


def test_newer_minor_version_with_unknown_fields_loads():
    def add(head):
        head["future_field"] = {"x": 1}
        head["metadata"]["future"] = [1, 2]
        head["decoders"][0]["tensors"]["fc.weight"]["future"] = True

    data = rebuild(SMALL, header=add, minor=7)
    d3 = loads(data)
    assert d3.format_version == (1, 7)
    assert d3.decoders[0].weights["fc.weight"].raw.equal(loads(SMALL).decoders[0].weights["fc.weight"].raw)


def test_unknown_section_of_a_newer_minor_is_ignored():
    def add(head):
        end = max(s["offset"] + s["length"] for s in head["sections"])
        head["sections"].append({"name": "future", "codec": "none", "offset": end + (-end % 8), "length": 3, "raw_length": 3})

    data = rebuild(SMALL, header=add, area=lambda a: a + bytes(-len(a) % 8) + b"abc", minor=1)
    d3 = loads(data)
    assert d3.breakdown["other"] >= 3 + 4 and sum(d3.breakdown.values()) == len(data)


def _prelude_lie(data: bytes, **fields) -> bytes:
    names = ["magic", "major", "minor", "hcodec", "r1", "r2", "hstored", "hraw", "length"]
    values = dict(zip(names, PRELUDE.unpack_from(data, 0)))
    values.update(fields)
    return recrc(PRELUDE.pack(*(values[n] for n in names)) + data[PRELUDE_SIZE:])


@pytest.mark.parametrize(
    "fields, error",
    [
        ({"hstored": 2**32 - 1}, HeaderTooLargeError),
        ({"hraw": 17 << 20}, HeaderTooLargeError),
        ({"hstored": 100_000, "hraw": 100_000}, OutOfRangeError),
        ({"hstored": 10, "hraw": 10}, InvalidFieldError),
        ({"hcodec": 1}, D3FormatError),
        ({"hcodec": 9}, InvalidFieldError),
    ],
)
def test_header_length_lies(fields, error):
    data = rebuild(SMALL)  # uncompressed header
    assert isinstance(_error(_prelude_lie(data, **fields)), error)


def test_header_length_off_by_a_few():
    data = rebuild(SMALL)
    hstored = PRELUDE.unpack_from(data, 0)[6]
    for delta in (-9, -1, 1, 8):
        _error(_prelude_lie(data, hstored=hstored + delta, hraw=hstored + delta))


def test_file_length_lies():
    assert isinstance(_error(_prelude_lie(SMALL, length=len(SMALL) + 1)), TruncatedError)
    assert isinstance(_error(_prelude_lie(SMALL, length=2**64 - 1)), TruncatedError)


def test_random_bytes_and_empty():
    assert isinstance(_error(b""), TruncatedError)
    assert isinstance(_error(MAGIC[:5]), TruncatedError)
    assert isinstance(_error(b"PK\x03\x04" + bytes(100)), BadMagicError)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_hypothesis(data):
    _error(data)
    _error(MAGIC + data)
    if len(data) >= 24:  # right magic, version, length and CRC: reaches the header checks
        _error(recrc(PRELUDE.pack(MAGIC, 1, 0, data[0] % 3, 0, 0, data[1], data[1], 36 + len(data)) + data + b"\0\0\0\0"))


_HEADER_EDITS = {
    "metadata missing": (lambda h: h.pop("metadata"), InvalidFieldError),
    "num_classes not int": (lambda h: h["metadata"].update(num_classes="3"), InvalidFieldError),
    "num_classes bool": (lambda h: h["metadata"].update(num_classes=True), InvalidFieldError),
    "too many classes": (lambda h: h["metadata"].update(num_classes=10**7), OutOfRangeError),
    "class names short": (lambda h: h["metadata"]["class_names"].pop(), InvalidFieldError),
    "image shape silly": (lambda h: h["metadata"].update(image_shape=[3, 0, 8]), InvalidFieldError),
    "std zero": (lambda h: h["metadata"].update(std=[0.0]), InvalidFieldError),
    "priors kind": (lambda h: h["priors"].update(kind="banana"), InvalidFieldError),
    "priors K lies": (lambda h: h["priors"].update(latents_per_class=99), InvalidFieldError),
    "mean shape": (lambda h: h["priors"]["tensors"]["mean"].update(shape=[3, 2, 5]), InvalidFieldError),
    "huge shape": (lambda h: h["priors"]["tensors"]["mean"].update(shape=[2**31 - 1] * 3), InvalidFieldError),
    "negative dim": (lambda h: h["decoders"][0]["tensors"]["fc.bias"].update(shape=[-8]), OutOfRangeError),
    "rank too big": (lambda h: h["decoders"][0]["tensors"]["fc.bias"].update(shape=[1] * 9), OutOfRangeError),
    "weight shape lies": (lambda h: h["decoders"][0]["tensors"]["fc.bias"].update(shape=[7]), InvalidFieldError),
    "huge weight": (lambda h: h["decoders"][0]["tensors"]["fc.bias"].update(shape=[2**31 - 1] * 8), OutOfRangeError),
    "dtype unknown": (lambda h: h["decoders"][0]["tensors"]["fc.bias"].update(dtype="F64"), InvalidFieldError),
    "dtype lies": (lambda h: h["decoders"][0]["tensors"]["fc.bias"].update(dtype="U8"), InvalidFieldError),
    "scale negative": (lambda h: h["decoders"][0]["tensors"]["fc.bias"].update(scale=[-1.0]), InvalidFieldError),
    "scale count": (lambda h: h["decoders"][0]["tensors"]["fc.bias"].update(scale=[1.0, 2.0]), InvalidFieldError),
    "zero point range": (lambda h: h["decoders"][0]["tensors"]["fc.bias"].update(zero_point=[300]), InvalidFieldError),
    "extra tensor": (lambda h: h["decoders"][0]["tensors"].update(x={"dtype": "F32", "shape": [1]}), D3FormatError),
    "class twice": (lambda h: h["decoders"][1].update(classes=h["decoders"][0]["classes"]), InvalidFieldError),
    "class out of range": (lambda h: h["decoders"][0]["classes"].append(3), InvalidFieldError),
    "no decoders": (lambda h: h.update(decoders=[]), InvalidFieldError),
    "labels kind": (lambda h: h["labels"].update(kind="fuzzy"), InvalidFieldError),
    "labels k lies": (lambda h: h["labels"].update(k=1), InvalidFieldError),
    "section missing": (lambda h: h["sections"].pop(1), InvalidFieldError),
    "sections swapped": (lambda h: h["sections"].reverse(), InvalidFieldError),
    "section offset": (lambda h: h["sections"][1].update(offset=h["sections"][1]["offset"] + 8), OutOfRangeError),
    "section length": (lambda h: h["sections"][1].update(length=h["sections"][1]["length"] + 1), D3FormatError),
    "section beyond file": (lambda h: h["sections"][-1].update(length=10**12), OutOfRangeError),
    "raw length lies": (lambda h: h["sections"][0].update(raw_length=h["sections"][0]["raw_length"] + 8), OutOfRangeError),
    "codec unknown": (lambda h: h["sections"][0].update(codec="lz4"), InvalidFieldError),
    "codec lies": (lambda h: h["sections"][0].update(codec={"none": "zstd", "zstd": "none"}[h["sections"][0]["codec"]]), D3FormatError),
    "budget below size": (lambda h: h.update(budget={"bytes": 100, "unit": "bytes"}), OutOfRangeError),
    "budget unit": (lambda h: h.update(budget={"bytes": 10**6, "unit": "floppies"}), InvalidFieldError),
    "format version": (lambda h: h.update(format_version=[2, 0]), InvalidFieldError),
}


@pytest.mark.parametrize("name", sorted(_HEADER_EDITS))
def test_header_lies(name):
    edit, error = _HEADER_EDITS[name]
    err = _error(rebuild(SMALL, header=edit))
    assert isinstance(err, error), (name, err)


@pytest.mark.parametrize("raw", [b"", b"[1,2]", b"{", b"\xff\xfe", b'{"a":1,"a":2}', b'{"x":NaN}', b"[" * 100_000])
def test_header_not_json(raw):
    assert isinstance(_error(rebuild(SMALL, raw_header=raw)), InvalidFieldError)


def test_label_index_out_of_range_in_data():
    n = loads(SMALL).metadata.num_classes
    _, head, _ = split(SMALL)
    index = [s["name"] for s in head["sections"]].index("labels")
    blob = bytearray(section_blob(SMALL, "labels"))
    (hlen,) = struct.unpack_from("<Q", blob)
    start = 8 + hlen + json.loads(blob[8 : 8 + hlen])["indices"]["data_offsets"][0]
    assert loads(replace_section(SMALL, index, bytes(blob), "none", len(blob))).file_bytes  # still valid raw
    struct.pack_into("<h", blob, start, n)
    err = _error(replace_section(SMALL, index, bytes(blob), "none", len(blob)))
    assert isinstance(err, InvalidFieldError) and "class index" in str(err)


def test_safetensors_lies_inside_a_section():
    blob = section_blob(SMALL, "priors")
    (hlen,) = struct.unpack_from("<Q", blob)
    meta = json.loads(blob[8 : 8 + hlen])
    for edit, error in [
        (lambda m: m["mean"].update(dtype="U8"), InvalidFieldError),
        (lambda m: m["mean"].update(shape=[1]), InvalidFieldError),
        (lambda m: m["mean"].update(data_offsets=[0, 10**9]), OutOfRangeError),
        (lambda m: m.pop("mean"), InvalidFieldError),
        (lambda m: m["logvar"].update(data_offsets=m["mean"]["data_offsets"]), OutOfRangeError),
    ]:
        m = json.loads(blob[8 : 8 + hlen])
        edit(m)
        text = json.dumps(m).encode()
        text += b" " * (-len(text) % 8)
        new = struct.pack("<Q", len(text)) + text + blob[8 + hlen :]
        assert isinstance(_error(replace_section(SMALL, 0, new, "none", len(new))), error)
    too_long = struct.pack("<Q", 2**63) + blob[8:]
    assert isinstance(_error(replace_section(SMALL, 0, too_long, "none", len(too_long))), OutOfRangeError)
    assert meta  # the unedited blob parses


def _bomb_file(frame: bytes, raw_length: int) -> bytes:
    """SMALL with its priors section replaced by the zstd `frame` declared as `raw_length` bytes."""
    return replace_section(SMALL, 0, frame, "zstd", raw_length)


def _peak_mib(fn) -> float:
    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak / 2**20


def test_zstd_bomb_with_declared_size():
    frame = zstandard.ZstdCompressor(level=19).compress(bytes(100 << 20))  # 100 MiB of zeros, ~3 KB
    assert len(frame) < 10_000
    data = _bomb_file(frame, 1000)
    peak = _peak_mib(lambda: _error(data))
    assert peak < 8, f"peak {peak:.1f} MiB"


def test_zstd_bomb_without_declared_size():
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(100 << 20))
    data = _bomb_file(frame, 1000)
    assert isinstance(_error(data), InvalidFieldError)


def test_zstd_bomb_lying_frame_header_is_bounded():
    # A frame whose header declares 1000 bytes but whose blocks hold 100 MiB: decoding stops early.
    frame = bytearray(zstandard.ZstdCompressor(level=3).compress(bytes(100 << 20)))
    fhd = frame[4]
    offset = 4 + 1 + (0 if fhd & 0x20 else 1) + (0, 1, 2, 4)[fhd & 3]
    struct.pack_into({2: "<I", 3: "<Q"}[fhd >> 6], frame, offset, 1000)  # the content size field
    data = _bomb_file(bytes(frame), 1000)
    peak = _peak_mib(lambda: _error(data))
    assert peak < 8, f"peak {peak:.1f} MiB"


def test_huge_declared_total_is_refused_before_allocation():
    limits = ReaderLimits(max_total_raw_bytes=1000)
    err = _error(SMALL, limits=limits)
    assert isinstance(err, OutOfRangeError) and "max_total_raw_bytes" in str(err)
    err = _error(SMALL, limits=ReaderLimits(max_header_bytes=100))
    assert isinstance(err, HeaderTooLargeError)
