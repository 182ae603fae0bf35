"""Safetensors blobs, written canonically and read strictly into zero-copy torch tensors.

A `.d3` section (after zstd, if any) is a standard safetensors file: u64 LE header length, JSON
header `{name: {dtype, shape, data_offsets}}`, then the tensor bytes. We write it ourselves so
the bytes are canonical (names sorted, data in name order, header space-padded to 8 bytes) and
read it ourselves so every offset is checked against what the `.d3` header declares.
"""
from __future__ import annotations

import json
import struct
from typing import Any, Mapping

import torch

from d3codec.format._json import strict_object
from d3codec.format.errors import InvalidFieldError, OutOfRangeError
from d3codec.format.types import DTYPE_BYTES, STORAGE_DTYPES, dtype_name


def itemsize(dtype: str) -> int:
    """Bytes per element of an on-disk dtype name."""
    return DTYPE_BYTES[dtype]


def _header(specs: list[tuple[str, str, tuple[int, ...]]]) -> tuple[bytes, int]:
    """Canonical padded JSON header for tensors given as (name, dtype, shape); also data size."""
    entries: dict[str, dict] = {}
    pos = 0
    for name, dtype, shape in sorted(specs):
        n = itemsize(dtype)
        for d in shape:
            n *= d
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    return raw, pos


def blob_size(specs: list[tuple[str, str, tuple[int, ...]]]) -> int:
    """Exact byte size of the blob `encode` writes for tensors of these names, dtypes, shapes."""
    head, data = _header(specs)
    return 8 + len(head) + data


def encode_parts(tensors: Mapping[str, torch.Tensor]) -> list:
    """The canonical safetensors bytes of `tensors` as buffers to concatenate, without copying
    tensor data (contiguous CPU tensors are viewed in place; others are copied once)."""
    specs = [(name, dtype_name(t.dtype), tuple(t.shape)) for name, t in tensors.items()]
    head, _ = _header(specs)
    parts: list = [struct.pack("<Q", len(head)) + head]
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        if t.numel():
            parts.append(memoryview(t.view(torch.uint8).numpy()))
    return parts


def encode(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The canonical safetensors bytes of `tensors` (CPU, any layout; names sorted)."""
    return b"".join(encode_parts(tensors))


def decode(
    buf: Any,
    start: int,
    length: int,
    expected: Mapping[str, tuple[str, tuple[int, ...]]],
    where: str,
    max_header: int,
) -> dict[str, torch.Tensor]:
    """Tensors of the safetensors blob `buf[start:start+length]` (a writable buffer: bytearray or
    copy-on-write mmap), as views into `buf` where aligned.

    The blob must hold exactly the `expected` names with those dtypes and shapes, with data
    offsets that tile the data area in order; anything else raises a `D3FormatError` subclass.
    """
    fix = "the file is corrupted, re-create it"
    if length < 8:
        raise OutOfRangeError(f"{where}: safetensors blob is {length} bytes, too short; {fix}")
    (hlen,) = struct.unpack_from("<Q", buf, start)
    if hlen > length - 8 or hlen > max_header:
        raise OutOfRangeError(f"{where}: safetensors header length {hlen} exceeds its {length}-byte section; {fix}")
    try:
        head = json.loads(bytes(buf[start + 8 : start + 8 + hlen]).decode("utf-8"), object_pairs_hook=strict_object)
    except (ValueError, RecursionError) as exc:
        raise InvalidFieldError(f"{where}: safetensors header is not valid JSON ({exc}); {fix}") from None
    if not isinstance(head, dict):
        raise InvalidFieldError(f"{where}: safetensors header is not a JSON object; {fix}")
    head.pop("__metadata__", None)
    if set(head) != set(expected):
        missing = sorted(set(expected) - set(head))[:3]
        extra = sorted(set(head) - set(expected))[:3]
        raise InvalidFieldError(f"{where}: tensors differ from the header (missing {missing}, unexpected {extra}); {fix}")
    data_start = start + 8 + hlen
    data_len = length - 8 - hlen
    spans = []
    for name, (dtype, shape) in expected.items():
        entry = head[name]
        if not isinstance(entry, dict):
            raise InvalidFieldError(f"{where}: safetensors entry {name!r} is not an object; {fix}")
        offs = entry.get("data_offsets")
        if entry.get("dtype") != dtype or entry.get("shape") != list(shape):
            raise InvalidFieldError(
                f"{where}: tensor {name!r} is {entry.get('dtype')} {entry.get('shape')} but the header declares {dtype} {list(shape)}; {fix}"
            )
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
            raise InvalidFieldError(f"{where}: tensor {name!r} has malformed data_offsets; {fix}")
        nbytes = itemsize(dtype)
        for d in shape:
            nbytes *= d
        if offs[1] - offs[0] != nbytes:
            raise OutOfRangeError(f"{where}: tensor {name!r} spans {offs[1] - offs[0]} bytes, its shape needs {nbytes}; {fix}")
        spans.append((offs[0], offs[1], name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise OutOfRangeError(f"{where}: tensor {name!r} data does not follow the previous tensor (gap or overlap); {fix}")
        pos = end
    if pos != data_len:
        raise OutOfRangeError(f"{where}: tensor data is {pos} bytes but the blob holds {data_len}; {fix}")
    out: dict[str, torch.Tensor] = {}
    for begin, end, name in spans:
        dtype, shape = expected[name]
        dt = STORAGE_DTYPES[dtype]
        count = (end - begin) // itemsize(dtype)
        if count == 0:
            out[name] = torch.empty(shape, dtype=dt)
            continue
        offset = data_start + begin
        if offset % itemsize(dtype):
            out[name] = torch.frombuffer(bytearray(buf[offset:offset + end - begin]), dtype=dt).view(shape)
        else:
            out[name] = torch.frombuffer(buf, dtype=dt, count=count, offset=offset).view(shape)
    return out
