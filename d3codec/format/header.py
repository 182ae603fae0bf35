"""The `.d3` header: D3File <-> canonical JSON object, and the structural checks both sides share.

The writer builds the header from a `D3File` (`plan_of`, `header_object`); the reader parses it
back into declarations (`parse_header`) and checks every shape and field before any tensor is
allocated. `parse_header` reads JSON into typed records, checking only what reading needs (JSON
types of what it descends into, the reader's limits, counts that must agree with shapes);
`check_structure` checks every fact about the values, once, for writer and reader alike: it is
the one place that knows which tensors a file must hold and their shapes.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from d3codec.format._json import strict_loads
from d3codec.format.errors import InvalidFieldError, OutOfRangeError
from d3codec.format.limits import ReaderLimits
from d3codec.format.types import (
    DTYPE_BYTES,
    FLOAT_DTYPES,
    INDEX_DTYPES,
    QUANT_DTYPES,
    STORAGE_DTYPES,
    Budget,
    D3File,
    Metadata,
    Stored,
)

FORMAT_MAJOR = 1
FORMAT_MINOR = 0
CODECS = ("none", "zstd")
BUDGET_UNITS = ("bytes", "ipc", "ipc-u8")
_INT_RANGE = {"I8": (-128, 127), "U8": (0, 255)}
_MAX_INT = 2**63 - 1


class ErrorContext:
    """Where an error happened and how to fix it, for one-line messages."""

    def __init__(self, where: str, fix: str) -> None:
        self.where, self.fix = where, fix

    def invalid(self, problem: str) -> InvalidFieldError:
        return InvalidFieldError(f"{self.where}: {problem}; {self.fix}")

    def out_of_range(self, problem: str) -> OutOfRangeError:
        return OutOfRangeError(f"{self.where}: {problem}; {self.fix}")


@dataclass(frozen=True)
class TensorDecl:
    """A tensor as the header declares it: dtype, shape and quantisation, no data."""

    dtype: str
    shape: tuple[int, ...]
    scale: Optional[tuple[float, ...]] = None
    zero_point: Optional[tuple[int, ...]] = None
    axis: Optional[int] = None

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    @staticmethod
    def of(stored: Stored) -> "TensorDecl":
        axis = stored.axis
        if axis is not None and stored.raw.dim() > 0:
            axis = axis % stored.raw.dim() if -stored.raw.dim() <= axis < stored.raw.dim() else axis
        return TensorDecl(
            stored.dtype,
            stored.shape,
            None if stored.scale is None else tuple(_f32(s) for s in stored.scale),
            None if stored.zero_point is None else tuple(int(z) for z in stored.zero_point),
            axis,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape)}
        if self.scale is not None:
            out["scale"] = [f32_json(v) for v in self.scale]
        if self.zero_point is not None:
            out["zero_point"] = list(self.zero_point)
        if self.axis is not None:
            out["axis"] = self.axis
        return out


def _f32(x: float) -> float:
    """`x` rounded to float32 (scales are float32), as the Python float of exactly that value; beyond
    float32's range it is inf, silently (the checks that follow reject it with a one-line error)."""
    with np.errstate(over="ignore"):
        return float(np.float32(x))


def f32_json(x: float) -> float:
    """The Python float whose repr is the shortest decimal that reads back as float32 `x`."""
    with np.errstate(over="ignore"):
        return float(str(np.float32(x)))


# ---------------------------------------------------------------- JSON helpers

def parse_json(raw: bytes, ctx: ErrorContext) -> dict[str, Any]:
    """Strict JSON object: UTF-8, no duplicate keys, no NaN/Infinity."""
    try:
        obj = strict_loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ctx.invalid(f"header is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(obj, dict):
        raise ctx.invalid("header is not a JSON object")
    return obj


def _field(obj: dict, key: str, kinds: Any, ctx: ErrorContext, path: str, optional: bool = False) -> Any:
    if key not in obj or (optional and obj[key] is None):
        if optional:
            return None
        raise ctx.invalid(f"header field {path}.{key} is missing")
    value = obj[key]
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ctx.invalid(f"header field {path}.{key} must be {_kind_name(kinds)}, not a boolean")
    if not isinstance(value, kinds):
        raise ctx.invalid(f"header field {path}.{key} must be {_kind_name(kinds)}, not {type(value).__name__}")
    return value


def _required(obj: dict, key: str, ctx: ErrorContext, path: str) -> Any:
    """The value of `key`, of any JSON type (`check_structure` checks it)."""
    if key not in obj:
        raise ctx.invalid(f"header field {path}.{key} is missing")
    return obj[key]


def _kind_name(kinds: Any) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object", bool: "a boolean"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _int(obj: dict, key: str, ctx: ErrorContext, path: str, lo: int = 0, hi: int = _MAX_INT, optional: bool = False) -> Optional[int]:
    value = _field(obj, key, int, ctx, path, optional)
    if value is not None and not lo <= value <= hi:
        raise ctx.out_of_range(f"header field {path}.{key} = {value} is outside [{lo}, {hi}]")
    return value


def _num(value: Any, ctx: ErrorContext, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ctx.invalid(f"header field {path} must be a finite number")
    return float(value)


def _num_list(obj: dict, key: str, ctx: ErrorContext, path: str) -> tuple[float, ...]:
    values = _field(obj, key, list, ctx, path)
    return tuple(_num(v, ctx, f"{path}.{key}[{i}]") for i, v in enumerate(values))


# ---------------------------------------------------------------- tensors

def parse_tensor(obj: Any, ctx: ErrorContext, path: str, limits: ReaderLimits) -> TensorDecl:
    """A tensor declaration, with dtype, rank, dims and quantisation checked against the limits."""
    if not isinstance(obj, dict):
        raise ctx.invalid(f"header field {path} must be an object")
    dtype = _field(obj, "dtype", str, ctx, path)
    if dtype not in STORAGE_DTYPES:
        raise ctx.invalid(f"{path}.dtype {dtype!r} is not one of {sorted(STORAGE_DTYPES)}")
    shape = _field(obj, "shape", list, ctx, path)
    if len(shape) > limits.max_rank:
        raise ctx.out_of_range(f"{path} has rank {len(shape)}, over the limit {limits.max_rank}")
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= limits.max_dim:
            raise ctx.out_of_range(f"{path}.shape {shape} has a dimension outside [0, {limits.max_dim}]")
    scale = obj.get("scale")
    zero_point = obj.get("zero_point")
    axis = _int(obj, "axis", ctx, path, 0, max(len(shape) - 1, 0), optional=True)
    if scale is not None:
        if not isinstance(scale, list) or not scale:
            raise ctx.invalid(f"{path}.scale must be a non-empty list of numbers")
        scale = tuple(_f32(_num(s, ctx, f"{path}.scale")) for s in scale)
    if zero_point is not None:
        if not isinstance(zero_point, list) or any(isinstance(z, bool) or not isinstance(z, int) for z in zero_point):
            raise ctx.invalid(f"{path}.zero_point must be a list of integers")
        zero_point = tuple(zero_point)
    decl = TensorDecl(dtype, tuple(shape), scale, zero_point, axis)
    check_quant(decl, ctx, path)
    return decl


def check_quant(decl: TensorDecl, ctx: ErrorContext, path: str) -> None:
    """Quantisation parameters agree with dtype and shape (writer and reader)."""
    if decl.scale is None:
        if decl.zero_point is not None or decl.axis is not None:
            raise ctx.invalid(f"{path} has zero_point/axis without scale")
        return
    if decl.dtype not in QUANT_DTYPES:
        raise ctx.invalid(f"{path} is {decl.dtype} but only I8/U8 tensors carry a quantisation scale")
    if decl.axis is not None and not 0 <= decl.axis < len(decl.shape):
        raise ctx.invalid(f"{path}.axis {decl.axis} is outside the tensor's {len(decl.shape)} dimensions")
    n = 1 if decl.axis is None else decl.shape[decl.axis]
    if len(decl.scale) != n:
        raise ctx.invalid(f"{path} has {len(decl.scale)} scales, expected {n}")
    if any(not (math.isfinite(s) and s > 0) for s in decl.scale):
        raise ctx.invalid(f"{path}.scale holds a value that is not a positive finite float32")
    if decl.zero_point is not None:
        lo, hi = _INT_RANGE[decl.dtype]
        if len(decl.zero_point) != n or any(not lo <= z <= hi for z in decl.zero_point):
            raise ctx.invalid(f"{path}.zero_point must be {n} integers in [{lo}, {hi}]")


def tensor_bytes(decl: TensorDecl) -> int:
    """Bytes of the tensor's raw data (Python ints: no overflow)."""
    n = DTYPE_BYTES[decl.dtype]
    for d in decl.shape:
        n *= d
    return n


def _value_tensor(decl: Optional[TensorDecl], ctx: ErrorContext, path: str, shape: tuple[int, ...]) -> None:
    """A tensor of real values: float, or I8/U8 with a scale; of exactly `shape`."""
    if decl is None:
        raise ctx.invalid(f"tensor {path} is missing")
    if decl.shape != shape:
        raise ctx.invalid(f"tensor {path} has shape {list(decl.shape)}, expected {list(shape)}")
    if decl.dtype not in FLOAT_DTYPES and not decl.quantized:
        raise ctx.invalid(f"tensor {path} is {decl.dtype} without a scale; store values as F32/F16/BF16 or quantised I8/U8")


# ---------------------------------------------------------------- the header object

@dataclass(frozen=True)
class DecoderDecl:
    """A decoder as the header declares it: architecture, hyper-parameters, classes, tensors."""

    family: str
    version: int
    hparams: dict[str, Any]
    classes: list[int]
    tensors: dict[str, TensorDecl]

    def to_json(self) -> dict[str, Any]:
        return {"family": self.family, "version": self.version, "hparams": self.hparams, "classes": list(self.classes),
                "tensors": {k: v.to_json() for k, v in self.tensors.items()}}


@dataclass(frozen=True)
class SectionEntry:
    """One row of the section table: where a section lies in the data area and how it is stored."""

    name: str
    codec: str  # one of CODECS
    offset: int  # from the start of the data area
    length: int  # stored bytes
    raw_length: int  # bytes after decompression

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Declaration:
    """What a header declares: everything of a D3File but the tensor data, plus the section table."""

    metadata: Metadata
    priors_kind: str
    priors: dict[str, TensorDecl]
    decoders: list[DecoderDecl]
    labels_kind: str
    labels_layout: Optional[str]
    labels: dict[str, TensorDecl]
    budget: Optional[Budget]
    provenance: dict[str, Any]
    sections: list[SectionEntry]

    def section_tensors(self) -> dict[str, dict[str, TensorDecl]]:
        """Section name -> the tensors it must hold."""
        out = {"priors": self.priors}
        for i, dec in enumerate(self.decoders):
            out[f"decoder.{i}"] = dec.tensors
        if self.labels_kind == "soft":
            out["labels"] = self.labels
        return out


def plan_of(d3: D3File) -> Declaration:
    """The declarations of an in-memory file (the writer's side of `parse_header`)."""
    p = d3.priors
    priors = {k: TensorDecl.of(s) for k, s in p.tensors().items()}
    lab = d3.labels
    labels = {k: TensorDecl.of(s) for k, s in lab.tensors().items()}
    m = d3.metadata
    metadata = Metadata(
        name=m.name,
        num_classes=m.num_classes,
        class_names=list(m.class_names),
        image_shape=tuple(m.image_shape),
        mean=tuple(float(v) for v in m.mean),
        std=tuple(float(v) for v in m.std),
        value_range=tuple(float(v) for v in m.value_range),
        fingerprint=m.fingerprint,
    )
    decoders = [DecoderDecl(d.family, d.version, d.hparams,
                            list(d.classes) if isinstance(d.classes, (list, tuple)) else d.classes,  # checked later
                            {k: TensorDecl.of(v) for k, v in d.weights.items()}) for d in d3.decoders]
    budget = d3.budget
    if budget is not None:
        budget = Budget(bytes=budget.bytes, unit=budget.unit, ipc=None if budget.ipc is None else float(budget.ipc), spec=budget.spec)
    return Declaration(metadata, p.kind, priors, decoders, lab.kind, lab.layout, labels, budget, d3.provenance, [])


def header_object(plan: Declaration) -> dict[str, Any]:
    """The header JSON object of a plan whose `sections` are filled in."""
    m = plan.metadata
    meta: dict[str, Any] = {
        "name": m.name, "num_classes": m.num_classes, "class_names": list(m.class_names),
        "image_shape": list(m.image_shape), "mean": list(m.mean), "std": list(m.std),
        "value_range": list(m.value_range),
    }
    if m.fingerprint is not None:
        meta["fingerprint"] = m.fingerprint
    n, k, d = plan.priors["mean"].shape  # checked by check_structure
    priors: dict[str, Any] = {
        "kind": plan.priors_kind, "num_classes": n, "latents_per_class": k, "dim": d,
        "tensors": {k: v.to_json() for k, v in plan.priors.items()},
    }
    if "factor" in plan.priors and len(plan.priors["factor"].shape) == 4:
        priors["rank"] = plan.priors["factor"].shape[3]
    labels: dict[str, Any] = {"kind": plan.labels_kind, "tensors": {k: v.to_json() for k, v in plan.labels.items()}}
    if plan.labels_layout is not None:
        labels["layout"] = plan.labels_layout
    if plan.labels_layout == "topk" and "indices" in plan.labels and plan.labels["indices"].shape:
        labels["k"] = plan.labels["indices"].shape[-1]
    head: dict[str, Any] = {
        "format_version": [FORMAT_MAJOR, FORMAT_MINOR],
        "metadata": meta,
        "priors": priors,
        "decoders": [d.to_json() for d in plan.decoders],
        "labels": labels,
        "provenance": plan.provenance,
        "sections": [s.to_json() for s in plan.sections],
    }
    if plan.budget is not None:
        b = plan.budget
        budget: dict[str, Any] = {"bytes": b.bytes, "unit": b.unit}
        if b.ipc is not None:
            budget["ipc"] = b.ipc
        if b.spec is not None:
            budget["spec"] = b.spec
        head["budget"] = budget
    return head


def parse_header(obj: dict[str, Any], ctx: ErrorContext, limits: ReaderLimits) -> Declaration:
    """Declarations of a header JSON object; unknown keys are ignored (newer minor versions)."""
    version = _field(obj, "format_version", list, ctx, "header")
    if len(version) != 2 or version[0] != FORMAT_MAJOR:
        raise ctx.invalid(f"header field format_version {version} disagrees with the prelude's major version {FORMAT_MAJOR}")
    m = _field(obj, "metadata", dict, ctx, "header")
    num_classes = _required(m, "num_classes", ctx, "metadata")
    if isinstance(num_classes, int) and num_classes > limits.max_classes:  # before anything sized by it
        raise ctx.out_of_range(f"header field metadata.num_classes = {num_classes} is over the limit {limits.max_classes}")
    names = _field(m, "class_names", list, ctx, "metadata")
    if any(not isinstance(n, str) for n in names):
        raise ctx.invalid("metadata.class_names must be a list of strings")
    shape = _field(m, "image_shape", list, ctx, "metadata")
    if len(shape) != 3 or any(isinstance(d, bool) or not isinstance(d, int) for d in shape):
        raise ctx.invalid(f"metadata.image_shape {shape} must be three integers [C, H, W]")
    metadata = Metadata(
        name=_field(m, "name", str, ctx, "metadata"),
        num_classes=num_classes,
        class_names=list(names),
        image_shape=tuple(shape),
        mean=_num_list(m, "mean", ctx, "metadata"),
        std=_num_list(m, "std", ctx, "metadata"),
        value_range=_num_list(m, "value_range", ctx, "metadata"),
        fingerprint=_field(m, "fingerprint", str, ctx, "metadata", optional=True),
    )
    count = [0]

    def tensors(parent: dict, path: str) -> dict[str, TensorDecl]:
        t = _field(parent, "tensors", dict, ctx, path)
        count[0] += len(t)
        if count[0] > limits.max_tensors:
            raise ctx.out_of_range(f"the header declares more than {limits.max_tensors} tensors")
        return {name: parse_tensor(v, ctx, f"{path}.{name}", limits) for name, v in t.items()}

    p = _field(obj, "priors", dict, ctx, "header")
    priors_kind = _field(p, "kind", str, ctx, "priors")
    priors = tensors(p, "priors")
    mean = priors.get("mean")
    if mean is not None and len(mean.shape) == 3:
        for key, value in zip(("num_classes", "latents_per_class", "dim"), mean.shape):
            if _int(p, key, ctx, "priors") != value:
                raise ctx.invalid(f"priors.{key} = {p[key]} disagrees with priors.mean shape {list(mean.shape)}")
    factor = priors.get("factor")
    if factor is not None and len(factor.shape) == 4 and _int(p, "rank", ctx, "priors") != factor.shape[3]:
        raise ctx.invalid(f"priors.rank = {p['rank']} disagrees with priors.factor shape {list(factor.shape)}")
    decs = _field(obj, "decoders", list, ctx, "header")
    if len(decs) > limits.max_sections:
        raise ctx.out_of_range(f"the header declares {len(decs)} decoders, over the limit {limits.max_sections}")
    decoders = []
    for i, d in enumerate(decs):
        path = f"decoders[{i}]"
        if not isinstance(d, dict):
            raise ctx.invalid(f"header field {path} must be an object")
        decoders.append(DecoderDecl(
            family=_required(d, "family", ctx, path),
            version=_required(d, "version", ctx, path),
            hparams=_required(d, "hparams", ctx, path),
            classes=_required(d, "classes", ctx, path),
            tensors=tensors(d, path),
        ))
    lab = _field(obj, "labels", dict, ctx, "header")
    labels_kind = _field(lab, "kind", str, ctx, "labels")
    labels_layout = _field(lab, "layout", str, ctx, "labels", optional=True)
    labels = tensors(lab, "labels")
    indices = labels.get("indices")
    if labels_layout == "topk" and indices is not None and indices.shape:
        if _int(lab, "k", ctx, "labels") != indices.shape[-1]:
            raise ctx.invalid(f"labels.k = {lab['k']} disagrees with labels.indices shape {list(indices.shape)}")
    budget = None
    b = _field(obj, "budget", dict, ctx, "header", optional=True)
    if b is not None:
        ipc = b.get("ipc")
        budget = Budget(
            bytes=_required(b, "bytes", ctx, "budget"),
            unit=_required(b, "unit", ctx, "budget"),
            ipc=None if ipc is None else _num(ipc, ctx, "budget.ipc"),
            spec=_field(b, "spec", str, ctx, "budget", optional=True),
        )
    provenance = _required(obj, "provenance", ctx, "header")
    secs = _field(obj, "sections", list, ctx, "header")
    if len(secs) > limits.max_sections:
        raise ctx.out_of_range(f"the header declares {len(secs)} sections, over the limit {limits.max_sections}")
    sections = []
    for i, s in enumerate(secs):
        path = f"sections[{i}]"
        if not isinstance(s, dict):
            raise ctx.invalid(f"header field {path} must be an object")
        codec = _field(s, "codec", str, ctx, path)
        if codec not in CODECS:
            raise ctx.invalid(f"{path}.codec {codec!r} is not one of {list(CODECS)}")
        sections.append(SectionEntry(
            name=_field(s, "name", str, ctx, path),
            codec=codec,
            offset=_int(s, "offset", ctx, path),
            length=_int(s, "length", ctx, path),
            raw_length=_int(s, "raw_length", ctx, path),
        ))
    plan = Declaration(metadata, priors_kind, priors, decoders, labels_kind, labels_layout, labels, budget, provenance, sections)
    check_structure(plan, ctx)
    return plan


def check_structure(plan: Declaration, ctx: ErrorContext) -> None:
    """Every declared field and shape is consistent: the checks writer and reader share."""
    m = plan.metadata
    n = m.num_classes
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ctx.invalid(f"metadata.num_classes must be a positive integer, got {n!r:.40}")
    if len(m.class_names) != n:
        raise ctx.invalid(f"metadata has {len(m.class_names)} class names for {n} classes")
    c, h, w = m.image_shape
    if not (1 <= c <= 64 and 1 <= h <= 65536 and 1 <= w <= 65536):
        raise ctx.invalid(f"metadata.image_shape {list(m.image_shape)} is not a sane [C<=64, H<=65536, W<=65536] image shape")
    if len(m.mean) != c or len(m.std) != c:
        raise ctx.invalid(f"metadata.mean and metadata.std need {c} values (one per channel)")
    if any(not math.isfinite(v) for v in (*m.mean, *m.std, *m.value_range)) or any(s <= 0 for s in m.std):
        raise ctx.invalid("metadata.mean/std/value_range must be finite and std positive")
    if len(m.value_range) != 2 or not m.value_range[0] < m.value_range[1]:
        raise ctx.invalid(f"metadata.value_range {list(m.value_range)} must be [low, high] with low < high")
    # priors
    kind, pr = plan.priors_kind, plan.priors
    allowed = {"diag": {"mean", "logvar", "weights"}, "lowrank": {"mean", "logvar", "factor", "weights"},
               "full": {"mean", "cholesky", "weights"}}
    if kind not in allowed:
        raise ctx.invalid(f"priors.kind {kind!r} is not one of diag, lowrank, full")
    extra = set(pr) - allowed[kind]
    if extra:
        raise ctx.invalid(f"{kind} priors must not carry tensors {sorted(extra)}")
    mean = pr.get("mean")
    if mean is None or len(mean.shape) != 3 or mean.shape[0] != n or 0 in mean.shape:
        got = None if mean is None else list(mean.shape)
        raise ctx.invalid(f"priors.mean must be [{n}, K, D] with K, D >= 1, got {got}")
    _, k, d = mean.shape
    _value_tensor(mean, ctx, "priors.mean", (n, k, d))
    if kind in ("diag", "lowrank"):
        _value_tensor(pr.get("logvar"), ctx, "priors.logvar", (n, k, d))
    if kind == "lowrank":
        f = pr.get("factor")
        if f is None or len(f.shape) != 4 or f.shape[3] < 1:
            raise ctx.invalid(f"priors.factor must be [{n}, {k}, {d}, R] with R >= 1")
        _value_tensor(f, ctx, "priors.factor", (n, k, d, f.shape[3]))
    if kind == "full":
        _value_tensor(pr.get("cholesky"), ctx, "priors.cholesky", (n, k, d, d))
    if "weights" in pr:
        _value_tensor(pr["weights"], ctx, "priors.weights", (n, k))
    # decoders
    if not plan.decoders:
        raise ctx.invalid("the file has no decoder")
    owner = [-1] * n
    for i, dec in enumerate(plan.decoders):
        if not isinstance(dec.family, str) or not dec.family:
            raise ctx.invalid(f"decoders[{i}].family must be a non-empty string")
        if isinstance(dec.version, bool) or not isinstance(dec.version, int) or dec.version < 0:
            raise ctx.invalid(f"decoders[{i}].version must be a non-negative integer")
        if not isinstance(dec.hparams, dict):
            raise ctx.invalid(f"decoders[{i}].hparams must be a dict")
        if not isinstance(dec.classes, list):
            raise ctx.invalid(f"decoders[{i}].classes must be a list of class indices")
        for cls in dec.classes:
            if isinstance(cls, bool) or not isinstance(cls, int) or not 0 <= cls < n:
                raise ctx.invalid(f"decoders[{i}].classes holds {cls!r:.40}, not a class index in [0, {n})")
            if owner[cls] != -1:
                raise ctx.invalid(f"class {cls} is drawn by decoders {owner[cls]} and {i}; each class needs exactly one decoder")
            owner[cls] = i
    if -1 in owner:
        raise ctx.invalid(f"class {owner.index(-1)} has no decoder; each class needs exactly one decoder")
    # labels
    lab, layout = plan.labels, plan.labels_layout
    if plan.labels_kind == "hard":
        if layout is not None or lab:
            raise ctx.invalid("hard labels carry no layout and no tensors")
    elif plan.labels_kind == "soft":
        if layout == "dense":
            if set(lab) != {"probs"}:
                raise ctx.invalid(f"dense soft labels carry exactly the tensor 'probs', got {sorted(lab)}")
            _value_tensor(lab["probs"], ctx, "labels.probs", (n, k, n))
        elif layout == "topk":
            if set(lab) != {"indices", "values"}:
                raise ctx.invalid(f"top-k soft labels carry exactly 'indices' and 'values', got {sorted(lab)}")
            idx = lab["indices"]
            if len(idx.shape) != 3 or idx.shape[:2] != (n, k) or not 1 <= idx.shape[2] <= n:
                raise ctx.invalid(f"labels.indices must be [{n}, {k}, k] with 1 <= k <= {n}, got {list(idx.shape)}")
            if idx.dtype not in INDEX_DTYPES or idx.quantized:
                raise ctx.invalid(f"labels.indices must be an unquantised integer tensor ({', '.join(INDEX_DTYPES)})")
            _value_tensor(lab["values"], ctx, "labels.values", idx.shape)
        else:
            raise ctx.invalid(f"soft labels need layout 'dense' or 'topk', got {layout!r}")
    else:
        raise ctx.invalid(f"labels.kind {plan.labels_kind!r} is not 'hard' or 'soft'")
    # budget
    b = plan.budget
    if b is not None:
        if isinstance(b.bytes, bool) or not isinstance(b.bytes, int) or b.bytes < 1:
            raise ctx.invalid(f"budget.bytes must be a positive integer, got {b.bytes!r:.40}")
        if not isinstance(b.unit, str) or b.unit not in BUDGET_UNITS:
            raise ctx.invalid(f"budget.unit {b.unit!r:.40} is not one of {list(BUDGET_UNITS)}")
        if b.ipc is not None and not (math.isfinite(b.ipc) and b.ipc > 0):
            raise ctx.invalid("budget.ipc must be a positive finite number")
    if not isinstance(plan.provenance, dict):
        raise ctx.invalid("provenance must be a dict")
