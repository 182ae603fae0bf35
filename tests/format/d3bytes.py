"""Test helpers: take a valid `.d3` file apart and put it back with a valid CRC.

Lets tests reach the checks behind the checksum (header fields, section table, zstd frames)
with one precise lie each, instead of random corruption the CRC would catch first.
"""
from __future__ import annotations

import json
import struct
import zlib
from typing import Any, Callable, Optional

import torch

from d3codec.format.io import MAGIC, PRELUDE, PRELUDE_SIZE, _align
from d3codec.format.types import D3File


def recrc(data: bytes) -> bytes:
    """`data` with its last 4 bytes replaced by the right CRC-32."""
    body = data[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def split(data: bytes) -> tuple[tuple, dict[str, Any], bytes]:
    """(prelude fields, header object, data area) of a valid file written by d3codec."""
    fields = PRELUDE.unpack_from(data, 0)
    hcodec, hstored = fields[3], fields[6]
    head = data[PRELUDE_SIZE : PRELUDE_SIZE + hstored]
    if hcodec == 1:
        import zstandard

        head = zstandard.ZstdDecompressor().decompress(head)
    start = _align(PRELUDE_SIZE + hstored)
    return fields, json.loads(head), data[start:-4]


def rebuild(
    data: bytes,
    header: Optional[Callable[[dict], Any]] = None,
    area: Optional[Callable[[bytes], bytes]] = None,
    major: Optional[int] = None,
    minor: Optional[int] = None,
    raw_header: Optional[bytes] = None,
) -> bytes:
    """Re-assemble `data` after editing its header object / data area; lengths and CRC made right."""
    fields, head, body = split(data)
    if header is not None:
        header(head)
    if area is not None:
        body = area(body)
    hbytes = raw_header if raw_header is not None else json.dumps(head, sort_keys=True, separators=(",", ":")).encode()
    start = _align(PRELUDE_SIZE + len(hbytes))
    length = start + len(body) + 4
    prelude = PRELUDE.pack(MAGIC, fields[1] if major is None else major, fields[2] if minor is None else minor,
                           0, 0, 0, len(hbytes), len(hbytes), length)
    out = prelude + hbytes + bytes(start - PRELUDE_SIZE - len(hbytes)) + body + b"\0\0\0\0"
    return recrc(out)


def assert_same(a: D3File, b: D3File) -> None:
    """Two files hold the same metadata, structure and (bit-identical) tensors."""
    assert a.metadata == b.metadata
    assert a.budget == b.budget
    assert a.provenance == b.provenance
    assert a.labels.kind == b.labels.kind and a.labels.layout == b.labels.layout
    pairs = [(getattr(a.priors, k), getattr(b.priors, k)) for k in ("mean", "logvar", "factor", "cholesky", "weights")]
    pairs += [(getattr(a.labels, k), getattr(b.labels, k)) for k in ("probs", "indices", "values")]
    assert a.priors.kind == b.priors.kind
    assert len(a.decoders) == len(b.decoders)
    for da, db in zip(a.decoders, b.decoders):
        assert (da.family, da.version, da.hparams, da.classes) == (db.family, db.version, db.hparams, db.classes)
        assert set(da.weights) == set(db.weights)
        pairs += [(da.weights[k], db.weights[k]) for k in da.weights]
    for x, y in pairs:
        assert (x is None) == (y is None)
        if x is not None:
            assert x.raw.dtype == y.raw.dtype and torch.equal(x.raw, y.raw)
            assert (x.scale, x.zero_point, x.axis) == (y.scale, y.zero_point, y.axis)


def replace_section(data: bytes, index: int, payload: bytes, codec: str, raw_length: int) -> bytes:
    """`data` with section `index` replaced by `payload` (stored as `codec`), later sections moved."""
    _, head, area = split(data)
    secs = head["sections"]
    chunks = [area[s["offset"] : s["offset"] + s["length"]] for s in secs]
    chunks[index] = payload
    secs[index].update(codec=codec, length=len(payload), raw_length=raw_length)
    new_area = b""
    for sec, chunk in zip(secs, chunks):
        new_area += bytes(-len(new_area) % 8)
        sec["offset"] = len(new_area)
        new_area += chunk

    def header(h: dict) -> None:
        h["sections"] = secs

    return rebuild(data, header=header, area=lambda _: new_area)


def section_blob(data: bytes, name: str) -> bytes:
    """The decompressed safetensors blob of section `name`."""
    _, head, area = split(data)
    sec = next(s for s in head["sections"] if s["name"] == name)
    blob = area[sec["offset"] : sec["offset"] + sec["length"]]
    if sec["codec"] == "zstd":
        import zstandard

        blob = zstandard.ZstdDecompressor().decompress(blob)
    return blob
