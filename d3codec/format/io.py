"""Read and write `.d3` files: `load`/`loads`, `save`/`dumps`, `encoded_size`, `size_upper_bound`.

Layout (spec/d3-format.md): a 32-byte prelude, the header (canonical JSON, zstd when smaller),
zero padding to 8 bytes, the sections (safetensors blobs, each raw or one zstd frame, each
starting 8-aligned), and a CRC-32 of every preceding byte. The reader validates in the order the
spec gives and raises only `D3FormatError` subclasses on bad bytes.
"""
from __future__ import annotations

import mmap
import os
import struct
import zlib
from pathlib import Path
from typing import Union

import torch

from d3codec.errors import BudgetError
from d3codec.format import _safetensors, _zstd
from d3codec.format._json import canonical_json
from d3codec.format.atomic import TempFileError, write_atomic
from d3codec.format.errors import (
    BadMagicError,
    ChecksumError,
    FileAccessError,
    HeaderTooLargeError,
    OutOfRangeError,
    OverBudgetError,
    TruncatedError,
    UnsupportedVersionError,
)
from d3codec.format.header import (
    FORMAT_MAJOR,
    FORMAT_MINOR,
    ErrorContext,
    Declaration,
    SectionEntry,
    TensorDecl,
    check_quant,
    check_structure,
    f32_json,
    header_object,
    parse_header,
    parse_json,
    plan_of,
    tensor_bytes,
)
from d3codec.format.limits import DEFAULT_LIMITS, ReaderLimits
from d3codec.format.types import Budget, D3File, DecoderEntry, Labels, Priors, Stored

MAGIC = b"\x89D3F\r\n\x1a\n"
#: magic, major, minor, header codec (0 none, 1 zstd), reserved u8, reserved u16,
#: header stored length, header raw length, file length.
PRELUDE = struct.Struct("<8sHHBBHIIQ")
PRELUDE_SIZE = PRELUDE.size  # 32
TRAILER_SIZE = 4
ALIGN = 8
#: zstd levels: strong for small sections (where bytes matter most), fast for big ones.
SMALL_SECTION = 1 << 20
LEVEL_SMALL, LEVEL_LARGE = 19, 9
#: Widest JSON text of a float32 scale (e.g. 1234567900000000.0) and of an I8/U8 zero point.
SCALE_JSON_CHARS, ZERO_POINT_JSON_CHARS = 18, 4

#: Section storage choices of the writer: zstd when smaller ("auto") or always raw ("none").
COMPRESSION = ("auto", "none")

PathLike = Union[str, os.PathLike]
BudgetArg = Union[Budget, int, None]


def _align(n: int) -> int:
    return n + (-n % ALIGN)


# ================================================================ writing

def _resolve_budget(d3: D3File, budget: BudgetArg) -> D3File:
    if budget is None:
        return d3
    if isinstance(budget, bool) or not isinstance(budget, (int, Budget)):
        raise BudgetError(f"cannot save: budget must be a Budget, an int or None, not {type(budget).__name__}; "
                          "parse strings with d3codec.format.budget.parse_budget")
    if isinstance(budget, int):
        budget = Budget(bytes=budget, unit="bytes", ipc=None, spec=str(budget))
    return d3.replace(budget=budget)


def _writer_plan(d3: D3File) -> tuple[Declaration, dict[str, dict[str, Stored]]]:
    """Checked declarations and the stored tensors of each section, in file order."""
    ctx = ErrorContext("cannot save", "fix the D3File before saving")
    plan = plan_of(d3)
    for section, decls in plan.section_tensors().items():
        for name, decl in decls.items():
            check_quant(decl, ctx, f"{section}.{name}")
    check_structure(plan, ctx)
    p, lab = d3.priors, d3.labels
    tensors: dict[str, dict[str, Stored]] = {
        "priors": p.tensors()
    }
    for i, dec in enumerate(d3.decoders):
        tensors[f"decoder.{i}"] = dict(dec.weights)
    if lab.kind == "soft":
        tensors["labels"] = lab.tensors()
    _check_content(tensors, plan, ctx)
    return plan, tensors


def _header_bytes(plan: Declaration) -> tuple[int, bytes, int]:
    """(codec, stored bytes, raw length) of the header: zstd only when strictly smaller."""
    raw = canonical_json(header_object(plan))
    packed = _zstd.compress(raw, LEVEL_SMALL)
    if len(packed) < len(raw):
        return 1, packed, len(raw)
    return 0, raw, len(raw)


def _encode(d3: D3File, budget: BudgetArg, compression: str = "auto") -> tuple[list, dict[str, int], D3File]:
    """The file as a list of byte buffers, its breakdown, and the D3File it encodes."""
    if compression not in COMPRESSION:
        raise ValueError(f"compression must be one of {COMPRESSION}, not {compression!r}")
    d3 = _resolve_budget(d3, budget)
    plan, tensors = _writer_plan(d3)
    try:
        canonical_json(header_object(plan))  # fail before compressing anything
    except (TypeError, ValueError) as exc:
        raise ErrorContext("cannot save", "use only JSON values (finite numbers, strings, lists, dicts with string keys)").invalid(
            f"metadata, hparams or provenance cannot be written as JSON ({exc})") from None
    payloads = []
    offset = 0
    for name, stored in tensors.items():
        raw = _safetensors.encode_parts({k: v.raw for k, v in stored.items()})
        raw_length = sum(len(part) for part in raw)
        codec, data, length = "none", raw, raw_length
        if compression == "auto":
            packed = _zstd.compress(b"".join(raw), LEVEL_SMALL if raw_length <= SMALL_SECTION else LEVEL_LARGE)
            if len(packed) < raw_length:
                codec, data, length = "zstd", [packed], len(packed)
        offset = _align(offset)
        plan.sections.append(SectionEntry(name, codec, offset, length, raw_length))
        payloads.append(data)
        offset += length
    codec, head, head_raw = _header_bytes(plan)
    data_start = _align(PRELUDE_SIZE + len(head))
    file_length = data_start + offset + TRAILER_SIZE
    prelude = PRELUDE.pack(MAGIC, FORMAT_MAJOR, FORMAT_MINOR, codec, 0, 0, len(head), head_raw, file_length)
    parts: list = [prelude, head, bytes(data_start - PRELUDE_SIZE - len(head))]
    pos = 0
    for sec, data in zip(plan.sections, payloads):
        parts.append(bytes(sec.offset - pos))
        parts.extend(data)
        pos = sec.offset + sec.length
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    parts.append(struct.pack("<I", crc))
    breakdown = _breakdown(PRELUDE_SIZE + len(head), plan.sections, file_length)
    return parts, breakdown, d3


def _breakdown(header: int, sections: list[SectionEntry], file_length: int) -> dict[str, int]:
    """Part name -> bytes: header (prelude + header), each known section, other (padding, CRC, unknown)."""
    out = {"header": header, "priors": 0}
    for sec in sections:
        if sec.name == "priors" or sec.name.startswith("decoder."):
            out[sec.name] = sec.length
    out["labels"] = next((s.length for s in sections if s.name == "labels"), 0)
    out["other"] = file_length - sum(out.values())
    return out


def _over_budget(d3: D3File, size: int, breakdown: dict[str, int]) -> None:
    if d3.budget is not None and size > d3.budget.bytes:
        largest = max(breakdown, key=lambda k: breakdown[k])
        raise OverBudgetError(
            f"cannot save: the file would be {size:,} bytes, {size - d3.budget.bytes:,} over the budget of "
            f"{d3.budget.bytes:,} ({d3.budget.spec or d3.budget.unit}); largest part is {largest} "
            f"({breakdown[largest]:,} bytes): store it smaller (fewer latents, F16/I8 storage) or raise the budget"
        )


def dumps(d3: D3File, budget: BudgetArg = None, *, compression: str = "auto") -> bytes:
    """The bytes of `d3` as a `.d3` file (same input, same bytes); over budget -> `OverBudgetError`."""
    parts, breakdown, d3 = _encode(d3, budget, compression)
    data = b"".join(parts)
    _over_budget(d3, len(data), breakdown)
    return data


def save(d3: D3File, path: PathLike, budget: BudgetArg = None, *, compression: str = "auto") -> int:
    """Write `d3` to `path` atomically and return its size in bytes.

    `budget` (a `Budget`, a byte count, or None for `d3.budget`) is recorded in the file; a file
    over it is refused with `OverBudgetError` and nothing is written. The file appears whole or
    not at all: it is written to a temporary file in the same folder, then renamed.
    `compression="auto"` stores each section as zstd when that is smaller; `"none"` stores all
    sections raw (bigger file, loads at memory speed: no decompression).
    """
    parts, breakdown, d3 = _encode(d3, budget, compression)
    size = sum(len(p) for p in parts)
    _over_budget(d3, size, breakdown)
    target = Path(path)
    if target.is_dir():
        raise FileAccessError(f"cannot save: {target} is a folder; give a file path such as {target / 'out.d3'}")
    try:
        write_atomic(target, parts)
    except TempFileError as exc:
        raise FileAccessError(f"cannot save {target}: {exc.strerror or exc}; check that the folder exists and is writable") from None
    except OSError as exc:
        raise FileAccessError(f"cannot save {target}: {exc.strerror or exc}; check free space and permissions") from None
    return size


def encoded_size(d3: D3File, budget: BudgetArg = None, *, compression: str = "auto") -> int:
    """Exact size in bytes `save(d3, path, budget)` would write (compresses, so not free)."""
    parts, _, _ = _encode(d3, budget, compression)
    return sum(len(p) for p in parts)


def size_upper_bound(d3: D3File, budget: BudgetArg = None) -> int:
    """A cheap upper bound on `encoded_size(d3, budget)`, from dtypes and shapes only.

    Assumes every section and the header stored raw and every padding maximal. Tensor values
    do not matter: quantisation scales and zero points are counted at their widest JSON form,
    so placeholder tensors of the planned names, dtypes, shapes and quantisation structure
    (per tensor / per channel) give a bound that holds for the real ones. Metadata, hparams,
    provenance and budget must be the ones that will be saved (they are counted as given).
    """
    d3 = _resolve_budget(d3, budget)
    plan = plan_of(d3)
    offset = 0
    slack = 0
    for name, decls in plan.section_tensors().items():
        raw = _safetensors.blob_size([(k, v.dtype, v.shape) for k, v in decls.items()])
        plan.sections.append(SectionEntry(name, "none", offset, raw, raw))
        offset = _align(offset + raw)
        for decl in decls.values():
            for s in decl.scale or ():
                slack += max(0, SCALE_JSON_CHARS - len(repr(f32_json(s))))
            for z in decl.zero_point or ():
                slack += max(0, ZERO_POINT_JSON_CHARS - len(str(z)))
    head = len(canonical_json(header_object(plan))) + slack
    return PRELUDE_SIZE + head + (ALIGN - 1) + offset + TRAILER_SIZE


# ================================================================ reading

def load(path: PathLike, *, limits: ReaderLimits = DEFAULT_LIMITS, memory_map: bool = True) -> D3File:
    """Read and validate a `.d3` file; bad bytes raise a `D3FormatError` subclass.

    The returned `D3File` has `file_bytes` and `breakdown` (part -> bytes) filled in. With
    `memory_map` (the default) the file is mapped copy-on-write and raw sections become tensors
    without a copy (the CRC pass has already paged them in); writing to them never touches the
    file. Do not modify the file in place while its tensors are alive (d3codec's own writer
    replaces files atomically, which is safe); pass `memory_map=False` to read it into memory.
    An unreadable path raises `FileAccessError`.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if memory_map and size:
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                got = len(buf)
            else:
                buf = bytearray(size)
                got = f.readinto(buf) if size else 0
    except FileNotFoundError:
        raise FileAccessError(f"{p}: no such file; check the path") from None
    except IsADirectoryError:
        raise FileAccessError(f"{p}: is a folder, not a .d3 file; give the path of a .d3 file") from None
    except (OSError, ValueError) as exc:
        raise FileAccessError(f"{p}: cannot read ({getattr(exc, 'strerror', None) or exc}); check the path and permissions") from None
    if got != size:
        raise TruncatedError(f"{p}: file changed size while being read; read it again when it is complete")
    return _decode(buf, str(p), limits)


def loads(data: Union[bytes, bytearray, memoryview], *, limits: ReaderLimits = DEFAULT_LIMITS) -> D3File:
    """`load` from bytes in memory (copied, so the tensors do not alias `data`)."""
    return _decode(bytearray(data), "<bytes>", limits)


def _decode(buf: Union[bytearray, mmap.mmap], where: str, limits: ReaderLimits) -> D3File:
    fix = "the file is corrupted or was not written by a d3codec writer; re-create it"
    ctx = ErrorContext(where, fix)
    size = len(buf)
    if size == 0:
        raise TruncatedError(f"{where}: file is empty; copy or download it again")
    if size < len(MAGIC) and MAGIC.startswith(bytes(buf)):
        raise TruncatedError(f"{where}: file is {size} bytes, cut short inside the magic; {fix}")
    if bytes(buf[: len(MAGIC)]) != MAGIC:
        raise BadMagicError(f"{where}: not a .d3 file (wrong magic bytes); give a file written by d3codec")
    if size < PRELUDE_SIZE + TRAILER_SIZE:
        raise TruncatedError(f"{where}: file is {size} bytes, shorter than the {PRELUDE_SIZE + TRAILER_SIZE}-byte minimum; {fix}")
    _, major, minor, hcodec, _r1, _r2, hstored, hraw, file_length = PRELUDE.unpack_from(buf, 0)
    if major != FORMAT_MAJOR:
        raise UnsupportedVersionError(
            f"{where}: format version {major}.{minor} is not supported (this reader reads {FORMAT_MAJOR}.x); "
            "upgrade d3codec or re-create the file"
        )
    if size < file_length:
        raise TruncatedError(f"{where}: file is {size} bytes but declares {file_length}; it was cut short, download or copy it again")
    if size > file_length:
        raise OutOfRangeError(f"{where}: {size - file_length} bytes follow the declared end of the file; {fix}")
    body = memoryview(buf)[: size - TRAILER_SIZE]
    (crc,) = struct.unpack_from("<I", buf, size - TRAILER_SIZE)
    actual = zlib.crc32(body)
    body.release()
    if crc != actual:
        raise ChecksumError(f"{where}: CRC-32 mismatch (stored {crc:08x}, computed {actual:08x}): the file is corrupted; copy it again or re-create it")
    # ---- header
    if hraw > limits.max_header_bytes or hstored > limits.max_header_bytes:
        raise HeaderTooLargeError(
            f"{where}: header of {max(hraw, hstored):,} bytes exceeds the {limits.max_header_bytes:,}-byte limit; "
            "re-create the file or raise ReaderLimits.max_header_bytes"
        )
    if PRELUDE_SIZE + hstored > size - TRAILER_SIZE:
        raise OutOfRangeError(f"{where}: header length {hstored} runs past the end of the file; {fix}")
    hview = memoryview(buf)[PRELUDE_SIZE : PRELUDE_SIZE + hstored]
    if hcodec == 0:
        if hstored != hraw:
            raise OutOfRangeError(f"{where}: uncompressed header stores {hstored} bytes but declares {hraw}; {fix}")
        head_raw = bytes(hview)
    elif hcodec == 1:
        head_raw = bytes(_zstd.decompress_bounded(hview, hraw, f"{where}: header", limits.max_window_bytes))
    else:
        raise ctx.invalid(f"header codec {hcodec} is not 0 (none) or 1 (zstd)")
    hview.release()
    plan = parse_header(parse_json(head_raw, ctx), ctx, limits)
    # ---- section table against the data area, before any allocation
    data_start = _align(PRELUDE_SIZE + hstored)
    data_end = size - TRAILER_SIZE
    if data_start > data_end:
        raise OutOfRangeError(f"{where}: header padding runs past the end of the file; {fix}")
    if any(buf[PRELUDE_SIZE + hstored : data_start]):
        raise ctx.invalid("padding after the header is not zero")
    expected = plan.section_tensors()
    order = [s.name for s in plan.sections if s.name in expected]
    if order != list(expected):
        raise ctx.invalid(f"sections {order} do not match the declared parts {list(expected)} (names, order or duplicates)")
    pos = 0
    total_raw = 0
    for sec in plan.sections:
        if sec.offset != _align(pos):
            raise OutOfRangeError(f"{where}: section {sec.name!r} starts at {sec.offset}, expected {_align(pos)}; {fix}")
        end = sec.offset + sec.length
        if data_start + end > data_end:
            raise OutOfRangeError(f"{where}: section {sec.name!r} ends at byte {data_start + end}, past the data end {data_end}; {fix}")
        if any(buf[data_start + pos : data_start + sec.offset]):
            raise ctx.invalid(f"padding before section {sec.name!r} is not zero")
        if sec.codec == "none" and sec.length != sec.raw_length:
            raise OutOfRangeError(f"{where}: uncompressed section {sec.name!r} stores {sec.length} bytes but declares {sec.raw_length}; {fix}")
        total_raw += sec.raw_length
        if sec.name in expected:
            need = 8 + sum(tensor_bytes(d) for d in expected[sec.name].values())
            if sec.raw_length < need:
                raise OutOfRangeError(f"{where}: section {sec.name!r} declares {sec.raw_length} bytes, its tensors need at least {need}; {fix}")
        pos = end
    if data_start + pos != data_end:
        raise OutOfRangeError(f"{where}: sections end at byte {data_start + pos}, not at the checksum ({data_end}); {fix}")
    if total_raw > limits.max_total_raw_bytes:
        raise OutOfRangeError(
            f"{where}: sections decompress to {total_raw:,} bytes, over the {limits.max_total_raw_bytes:,}-byte limit; "
            "raise ReaderLimits.max_total_raw_bytes if you trust the file"
        )
    # ---- sections: decompress (bounded) and parse
    loaded: dict[str, dict[str, Stored]] = {}
    for sec in plan.sections:
        name = sec.name
        if name not in expected:
            continue
        start = data_start + sec.offset
        label = f"{where}: section {name!r}"
        if sec.codec == "zstd":
            view = memoryview(buf)[start : start + sec.length]
            src = _zstd.decompress_bounded(view, sec.raw_length, label, limits.max_window_bytes)
            view.release()
            base = 0
        else:
            src, base = buf, start
        decls = expected[name]
        raw = _safetensors.decode(src, base, sec.raw_length, {k: (d.dtype, d.shape) for k, d in decls.items()},
                                  label, limits.max_header_bytes)
        loaded[name] = {k: _stored(raw[k], d) for k, d in decls.items()}
    _check_content(loaded, plan, ctx)
    d3 = _assemble(plan, loaded, (major, minor))
    d3.file_bytes = size
    d3.breakdown = _breakdown(PRELUDE_SIZE + hstored, plan.sections, size)
    if d3.budget is not None and size > d3.budget.bytes:
        raise OutOfRangeError(f"{where}: file is {size:,} bytes, over its own budget of {d3.budget.bytes:,}; {fix}")
    return d3


def _stored(raw: torch.Tensor, decl: TensorDecl) -> Stored:
    return Stored(raw, scale=decl.scale, zero_point=decl.zero_point, axis=decl.axis)


def _assemble(plan: Declaration, loaded: dict[str, dict[str, Stored]], version: tuple[int, int]) -> D3File:
    pr = loaded["priors"]
    priors = Priors(kind=plan.priors_kind, mean=pr["mean"], logvar=pr.get("logvar"), factor=pr.get("factor"),
                    cholesky=pr.get("cholesky"), weights=pr.get("weights"))
    decoders = [
        DecoderEntry(family=d.family, version=d.version, hparams=d.hparams, classes=list(d.classes),
                     weights=loaded[f"decoder.{i}"])
        for i, d in enumerate(plan.decoders)
    ]
    lab = loaded.get("labels", {})
    labels = Labels(kind=plan.labels_kind, layout=plan.labels_layout, probs=lab.get("probs"),
                    indices=lab.get("indices"), values=lab.get("values"))
    return D3File(metadata=plan.metadata, priors=priors, decoders=decoders, labels=labels, budget=plan.budget,
                  provenance=plan.provenance, format_version=version)


def _check_content(tensors: dict[str, dict[str, Stored]], plan: Declaration, ctx: ErrorContext) -> None:
    """Checks that need tensor values: label indices in range, Cholesky factors lower-triangular,
    mixture weights non-negative. Runs on both sides, after shapes are known to be right."""
    n = plan.metadata.num_classes
    lab = tensors.get("labels", {})
    idx = lab.get("indices")
    if idx is not None and idx.raw.numel() and (int(idx.raw.min()) < 0 or int(idx.raw.max()) >= n):
        raise ctx.invalid(f"labels.indices holds a class index outside [0, {n})")
    pr = tensors["priors"]
    chol = pr.get("cholesky")
    if chol is not None and bool(torch.triu(chol.dequantize(), diagonal=1).ne(0).any()):
        raise ctx.invalid("priors.cholesky is not lower-triangular (nonzero above the diagonal)")
    w = pr.get("weights")
    if w is not None:
        wf = w.dequantize()
        if not bool(torch.isfinite(wf).all()) or bool((wf < 0).any()):
            raise ctx.invalid("priors.weights must be finite and non-negative")
