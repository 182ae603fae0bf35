"""In-memory form of a `.d3` file: what the reader returns and the writer takes.

These dataclasses are the contract between `format/` (bytes), `decode/` (sampling) and
`encode/` (training). They hold tensors exactly as stored (dtype and quantisation), so that
`load` then `save` gives back the same bytes; `Stored.dequantize()` gives float32 for use.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch

#: On-disk dtype names (the safetensors names) and their torch dtypes, in one place.
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
}
#: Bytes per element of each on-disk dtype (spec section 5): the one table every size count uses.
DTYPE_BYTES: dict[str, int] = {name: dt.itemsize for name, dt in STORAGE_DTYPES.items()}
FLOAT_DTYPES = ("F32", "F16", "BF16")
QUANT_DTYPES = ("I8", "U8")
INDEX_DTYPES = ("U8", "I16", "I32", "I64")
#: The tensor fields of `Priors` and of `Labels`, in the order the file stores them.
PRIOR_TENSORS = ("mean", "logvar", "factor", "cholesky", "weights")
LABEL_TENSORS = ("probs", "indices", "values")

CovarianceKind = Literal["diag", "lowrank", "full"]
LabelKind = Literal["hard", "soft"]
LabelLayout = Literal["dense", "topk"]


def dtype_name(dtype: torch.dtype) -> str:
    """The on-disk name of a torch dtype (`torch.float16` -> `"F16"`)."""
    for name, dt in STORAGE_DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"dtype {dtype} cannot be stored in a .d3 file")


@dataclass(frozen=True)
class Stored:
    """A tensor as it lies on disk: raw values in a storage dtype, plus affine quantisation.

    Quantised (`I8`/`U8` with `scale`): value = (raw - zero_point) * scale, per tensor
    (`axis is None`, one scale) or per channel along `axis` (one scale per index).
    """

    raw: torch.Tensor
    scale: Optional[tuple[float, ...]] = None
    zero_point: Optional[tuple[int, ...]] = None
    axis: Optional[int] = None

    @property
    def dtype(self) -> str:
        return dtype_name(self.raw.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.raw.shape)

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    @property
    def nbytes(self) -> int:
        return self.raw.numel() * self.raw.element_size()

    def dequantize(self) -> torch.Tensor:
        """Float32 values (integers without quantisation are returned unchanged)."""
        if self.scale is None:
            if self.raw.dtype in (torch.float16, torch.bfloat16, torch.float32):
                return self.raw.to(torch.float32)
            return self.raw
        x = self.raw.to(torch.float32)
        scale = torch.tensor(self.scale, dtype=torch.float32)
        zp = torch.tensor(self.zero_point or (0,) * len(self.scale), dtype=torch.float32)
        if self.axis is not None:
            view = [1] * x.dim()
            view[self.axis] = -1
            scale, zp = scale.view(view), zp.view(view)
        return (x - zp) * scale

    @staticmethod
    def encode(x: torch.Tensor, dtype: str = "F32", axis: Optional[int] = None) -> "Stored":
        """Store a tensor in `dtype`; `I8`/`U8` of a float tensor quantise it (min-max affine).

        Integer tensors (indices) are stored as they are in an integer `dtype`.
        """
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"unknown storage dtype {dtype!r}; choose one of {sorted(STORAGE_DTYPES)}")
        target = STORAGE_DTYPES[dtype]
        x = x.detach().cpu()
        if dtype in FLOAT_DTYPES:
            return Stored(x.to(target).contiguous())
        if not x.is_floating_point():
            return Stored(x.to(target).contiguous())
        if dtype not in QUANT_DTYPES:
            raise ValueError(f"float tensors are quantised only to I8 or U8, not {dtype}")
        return _quantize(x.to(torch.float32), dtype, axis)

    @staticmethod
    def on_grid(x: torch.Tensor, step: float) -> "Stored":
        """I8 values on a fixed grid of `step` (zero point 0), one scale for the tensor.

        A coarser grid than min-max leaves fewer distinct values, which the writer's zstd entropy-codes
        into fewer bits; the step widens (never clips) where |x| would pass 127 steps.
        """
        x = x.detach().cpu().to(torch.float32)
        if not step > 0 or not math.isfinite(step):
            raise ValueError(f"grid step must be a positive finite number, got {step}")
        top = float(x.abs().max()) if x.numel() else 0.0
        step = float(torch.tensor(max(step, top / 127.0), dtype=torch.float32))  # as the header holds it
        q = torch.clamp(torch.round(x / step), -127, 127).to(torch.int8).contiguous()
        return Stored(q, scale=(step,), zero_point=(0,), axis=None)


def _quantize(x: torch.Tensor, dtype: str, axis: Optional[int]) -> Stored:
    """Min-max affine quantisation with an integer zero point (so 0.0 stays exact)."""
    qmin, qmax = (-128, 127) if dtype == "I8" else (0, 255)
    if axis is None:
        lo = torch.clamp(x.min(), max=0.0).reshape(1) if x.numel() else torch.zeros(1)
        hi = torch.clamp(x.max(), min=0.0).reshape(1) if x.numel() else torch.zeros(1)
    else:
        axis = axis % x.dim()
        moved = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        lo = torch.clamp(moved.min(dim=1).values, max=0.0)
        hi = torch.clamp(moved.max(dim=1).values, min=0.0)
    scale = ((hi - lo) / (qmax - qmin)).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int64)
    if axis is None:
        s, z = scale, zp
    else:
        view = [1] * x.dim()
        view[axis] = -1
        s, z = scale.view(view), zp.view(view)
    q = torch.clamp(torch.round(x / s) + z, qmin, qmax).to(STORAGE_DTYPES[dtype]).contiguous()
    return Stored(
        q,
        scale=tuple(float(v) for v in scale.tolist()),
        zero_point=tuple(int(v) for v in zp.tolist()),
        axis=axis,
    )


@dataclass
class Metadata:
    """What the images are: classes, shape, and how decoder outputs map to pixels.

    The decoder emits values in `value_range` (linear in pixel intensity: `value_range[0]` is
    black, `value_range[1]` is white). Training images are `(pixel01 - mean) / std` per channel.
    """

    name: str
    num_classes: int
    class_names: list[str]
    image_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    value_range: tuple[float, float] = (-1.0, 1.0)
    fingerprint: Optional[str] = None


@dataclass
class Priors:
    """K Gaussian components of dimension D per class.

    Shapes: `mean` [N, K, D]; `logvar` [N, K, D] (diag and lowrank: the diagonal part);
    `factor` [N, K, D, R] (lowrank: cov = factor @ factor.T + diag(exp(logvar)));
    `cholesky` [N, K, D, D] lower-triangular (full: cov = L @ L.T); `weights` [N, K]
    non-negative mixture weights (None means uniform).
    """

    kind: CovarianceKind
    mean: Stored
    logvar: Optional[Stored] = None
    factor: Optional[Stored] = None
    cholesky: Optional[Stored] = None
    weights: Optional[Stored] = None

    @property
    def num_classes(self) -> int:
        return self.mean.shape[0]

    @property
    def latents_per_class(self) -> int:
        return self.mean.shape[1]

    @property
    def dim(self) -> int:
        return self.mean.shape[2]

    @property
    def rank(self) -> Optional[int]:
        return self.factor.shape[3] if self.factor is not None else None

    def tensors(self) -> dict[str, Stored]:
        """The tensors present, by field name, in file order."""
        return {k: s for k in PRIOR_TENSORS if (s := getattr(self, k)) is not None}


@dataclass
class DecoderEntry:
    """One decoder network: a named architecture, its hyper-parameters and its weights.

    `classes` lists the class indices this decoder draws (federated files: one decoder per
    subtask). `weights` maps state-dict keys of the built module to stored tensors.
    """

    family: str
    version: int
    hparams: dict[str, Any]
    classes: list[int]
    weights: dict[str, Stored]


@dataclass
class Labels:
    """Labels of the latent components.

    `hard`: each component is labelled with its class (no tensors). `soft`, `dense`:
    `probs` [N, K, num_classes]. `soft`, `topk`: `indices` [N, K, k] (integer class ids) and
    `values` [N, K, k] (probabilities); the remaining mass 1 - sum(values) is spread evenly over
    the other classes.
    """

    kind: LabelKind = "hard"
    layout: Optional[LabelLayout] = None
    probs: Optional[Stored] = None
    indices: Optional[Stored] = None
    values: Optional[Stored] = None

    def tensors(self) -> dict[str, Stored]:
        """The tensors present, by field name, in file order (none for hard labels)."""
        return {k: s for k in LABEL_TENSORS if (s := getattr(self, k)) is not None}


@dataclass
class Budget:
    """The byte budget the file was made for, and how it was given (`2ipc`, `500KB`, ...)."""

    bytes: int
    unit: str  # "bytes" | "ipc" | "ipc-u8"
    ipc: Optional[float] = None
    spec: Optional[str] = None  # the string the user gave, e.g. "2ipc"


@dataclass
class D3File:
    """A whole `.d3` file in memory."""

    metadata: Metadata
    priors: Priors
    decoders: list[DecoderEntry]
    labels: Labels = field(default_factory=Labels)
    budget: Optional[Budget] = None
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: tuple[int, int] = (1, 0)
    #: Set by the reader: total size on disk and the byte breakdown (part -> bytes, summing to it).
    file_bytes: Optional[int] = None
    breakdown: Optional[dict[str, int]] = None

    def decoder_of_class(self) -> list[int]:
        """For each class, the index of the decoder that draws it."""
        owner = [-1] * self.metadata.num_classes
        for i, dec in enumerate(self.decoders):
            for c in dec.classes:
                owner[c] = i
        return owner

    def replace(self, **changes: Any) -> "D3File":
        return dataclasses.replace(self, **changes)
