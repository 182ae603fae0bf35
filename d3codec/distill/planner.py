"""Budget planner: from a byte budget, the classes and the image shape, choose what the file holds.

It picks the decoder (family and width), K latent components per class, latent dimension D, the storage
dtype of every tensor and the label storage, so that the finished file fits: its size is estimated on
a placeholder file of exactly the planned names, dtypes, shapes, metadata and provenance, with
decoder weights and latent codes compressed as Gaussian values compress (trained ones compress at
least as well: `estimate_trained_size`), soft labels counted raw and the headers as they compress,
plus a margin. `encode` checks the real size before writing and keeps fewer components in the rare
case it is over (`distill.trim`); where the strict shape-only bound (`format.io.size_upper_bound`)
is smaller, it is used and the fit is guaranteed.
A share of the bytes goes to components (latents with soft labels), the rest to the widest decoder
that fits; then more components fill what the decoder's width steps leave. Where K is capped (every
class has as many components as real images, or `MAX_LATENTS_PER_CLASS`), D doubles while the
decoder keeps half its width.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import torch

from d3codec.distill.labels import LabelStorage, placeholder_labels
from d3codec.errors import BudgetError, ConfigError
from d3codec.format import size as size_model
from d3codec.format.io import LEVEL_LARGE, size_upper_bound
from d3codec.format.size import MODEL_SAMPLE as _MODEL_SAMPLE
from d3codec.format.size import constant_prior_std, raw_parts
from d3codec.format.types import DTYPE_BYTES as _DTYPE_BYTES
from d3codec.format.types import Budget, D3File, DecoderEntry, Metadata, Priors, Stored
from d3codec.models.registry import build_decoder, export_state

#: Decoder widths (channels of the first feature map) the planner tries, widest first.
WIDTHS: tuple[int, ...] = (512, 480, 448, 416, 384, 352, 320, 288, 256, 224, 192, 160, 128, 112, 96, 80, 64, 56, 48, 40, 36, 32, 28, 24, 20, 16, 12, 10, 8, 6, 4)
#: Storage dtypes of decoder weights a user may force (`--weights-dtype`); the planner default is I8.
WEIGHT_DTYPES = ("I8", "F16", "F32")
#: Share of the budget the components (latents and their labels) take by default; the decoder gets the rest.
COMPONENT_SHARE = 0.3
#: Most latent components per class the planner chooses (CIFAR-10 10ipc: 1000 scored 57.64%, 500
#: 55.77%, two eval seeds each; RESULTS.md, "Quality, session 7").
MAX_LATENTS_PER_CLASS = 1000
#: Where K is at its cap, D doubles, up to this many times the default D, while the widest decoder
#: that still fits keeps at least `MIN_WIDTH_KEPT` of the default D's width: on CIFAR-10 10ipc each
#: doubling of D sharpened the fit by about 1.7 dB and halving the decoder's width cost about 0.5 dB
#: (RESULTS.md, "Quality, session 5" and "session 6").
MAX_LATENT_DIM_GROWTH = 4
MIN_WIDTH_KEPT = 0.5
#: The default decoder is at most `WIDTH_PIXELS` // H wide (256 at 32x32, 128 at 64x64): every fit
#: and objective step decodes a batch, and its cost grows with width^2 x pixels, so larger images get
#: a narrower decoder (at 64x64, width 352 took 2.4 s a fit step on 2 cores, width 128 about a third).
WIDTH_PIXELS = 8192
#: I8 latent means of components that share one prior std s lie on a grid of `CODE_STEP` x s
#: (`store_priors`); the size estimate takes their std as `CODE_SPREAD` x s (trained files:
#: 4-8 s on CIFAR-10, MNIST and digits; RESULTS.md, "Quality, session 7").
CODE_STEP = 2.0
CODE_SPREAD = 8.0
#: Tensors smaller than this are stored as F16 even when weights are I8 (scales would cost more).
MIN_QUANT_NUMEL = 64
DECODER_FAMILY, DECODER_VERSION = "small", 1


@dataclass(frozen=True)
class Plan:
    """What the encoder will train and how each part is stored."""

    family: str
    version: int
    hparams: dict[str, Any]  # as stored in the file (BatchNorm folded: norm "none")
    latents_per_class: int
    latent_dim: int
    weight_dtype: str
    latent_dtype: str
    labels: LabelStorage
    budget: Budget
    bound: int  # upper bound (guaranteed) or estimate of the finished file size, bytes
    breakdown: dict[str, int] = field(default_factory=dict)  # part -> bytes (bounds, or estimates)
    num_params: int = 0
    guaranteed: bool = True  # bound from shapes alone; False: compressed-size estimate with a margin
    train_hparams: dict[str, Any] = field(default_factory=dict)  # the decoder trained (BatchNorm)

    def summary(self) -> str:
        """Several lines for the terminal: the choices and the byte breakdown."""
        b = self.budget
        lines = [
            f"plan: decoder {self.family} v{self.version} width {self.hparams.get('width')} "
            f"({self.num_params:,} params, {self.weight_dtype}), K={self.latents_per_class} latents/class, "
            f"D={self.latent_dim} ({self.latent_dtype}), labels {self.labels.describe()}",
            f"budget {b.bytes:,} bytes ({b.spec or b.unit}); file "
            f"{'at most' if self.guaranteed else 'estimated at (compressed, with margin)'} {self.bound:,} bytes "
            f"({100.0 * self.bound / b.bytes:.1f}% of budget)",
        ]
        for part, n in self.breakdown.items():
            lines.append(f"  {part:<10} {'<=' if self.guaranteed else '~ '} {n:>12,} bytes")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = asdict(self.labels)
        d["budget"] = asdict(self.budget)
        return d


def decoder_hparams(metadata: Metadata, width: int, latent_dim: int, norm: str = "batch") -> dict[str, Any]:
    """Hyper-parameters of the decoder trained for these images (BatchNorm while training)."""
    c, h, w = metadata.image_shape
    if h != w:
        raise ConfigError(f"images are {h}x{w}; the decoders draw square images: pass --resolution to resize")
    return {"channels": c, "image_size": h, "latent_dim": latent_dim, "width": width, "norm": norm}


def file_hparams(family: str, version: int, train_hparams: dict[str, Any]) -> dict[str, Any]:
    """Hyper-parameters the file stores: the trained decoder's, resolved, with its BatchNorm folded
    into the convolutions (`norm="none"`, as `models.registry.fold_batchnorm` exports it)."""
    with torch.device("meta"):
        module = build_decoder(family, version, train_hparams)
    hp = dict(getattr(module, "hparams", train_hparams))
    if hp.get("norm") == "batch":
        hp["norm"] = "none"
    return hp


def decoder_shapes(family: str, version: int, hparams: dict[str, Any]) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Names, shapes and dtypes of the stored (exported) state of a decoder, built without memory."""
    with torch.device("meta"):
        module = build_decoder(family, version, hparams)
    return {k: (v.shape, v.dtype) for k, v in export_state(module).items()}


def tensor_dtype(shape: Sequence[int], weight_dtype: str) -> tuple[str, Optional[int]]:
    """(storage dtype, quantisation axis) of a float decoder tensor under `weight_dtype`.

    I8: tensors of at least MIN_QUANT_NUMEL values are quantised, per output channel (axis 0) when
    each channel has at least 128 values (so the per-channel scales stay a small overhead), else
    per tensor; smaller tensors (biases, norm parameters) are F16.
    """
    numel = math.prod(shape)
    if weight_dtype != "I8":
        return weight_dtype, None
    if numel < MIN_QUANT_NUMEL:
        return "F16", None
    if len(shape) >= 2 and numel // shape[0] >= 128:
        return "I8", 0
    return "I8", None


def store_decoder_state(state: dict[str, torch.Tensor], weight_dtype: str) -> dict[str, Stored]:
    """Exported decoder state -> stored tensors, each in the dtype `tensor_dtype` gives."""
    out: dict[str, Stored] = {}
    for name, value in state.items():
        if not value.is_floating_point():
            out[name] = Stored.encode(value, "I64")
            continue
        dtype, axis = tensor_dtype(tuple(value.shape), weight_dtype)
        out[name] = Stored.encode(value.float(), dtype, axis=axis)
    return out


def store_priors(mean: torch.Tensor, logvar: torch.Tensor, dtype: str) -> Priors:
    """Diagonal priors [N, K, D] in `dtype` (I8: quantised per tensor; means as `store_means`)."""
    return Priors(kind="diag", mean=store_means(mean, logvar, dtype), logvar=Stored.encode(logvar.float(), dtype))


def store_means(mean: torch.Tensor, logvar: torch.Tensor, dtype: str) -> Stored:
    """Latent means [N, K, D] in `dtype`, as `store_priors` stores them.

    Where every component has the same prior std s (the CPU default keeps the fit's noise), I8
    means lie on a grid of `CODE_STEP` x s: the decoder was trained to draw from noise of std s, so
    rounding error of std 0.58 s moves its images less than one draw does, and the coarse grid
    entropy-codes in about 3.5 bits per value instead of 6 (RESULTS.md, "Quality, session 7").
    """
    mean, logvar = mean.float(), logvar.float()
    shared = dtype == "I8" and logvar.numel() > 0 and bool((logvar == logvar.flatten()[0]).all())
    step = CODE_STEP * math.exp(0.5 * float(logvar.flatten()[0])) if shared else 0.0
    return Stored.on_grid(mean, step) if 0 < step < math.inf else Stored.encode(mean, dtype)


def _placeholder(metadata: Metadata, family: str, version: int, hparams: dict[str, Any], k: int, d: int,
                 weight_dtype: str, latent_dtype: str, labels: LabelStorage, classes: Sequence[int],
                 provenance: dict[str, Any], budget: Budget, zeros: bool = False) -> tuple[D3File, int]:
    """A file of the planned structure: smooth values (the structure is all the bound reads), or
    all zeros (`zeros`: the payload then compresses away, leaving the value-independent parts)."""

    def values(shape: Sequence[int]) -> torch.Tensor:
        if zeros:
            return torch.zeros(tuple(shape))
        return torch.linspace(-1, 1, math.prod(shape)).reshape(tuple(shape))

    shapes = decoder_shapes(family, version, hparams)
    state = {name: (torch.zeros(shape, dtype=dt) if not dt.is_floating_point else values(shape))
             for name, (shape, dt) in shapes.items()}
    weights = store_decoder_state(state, weight_dtype)
    n = len(classes)
    z = values((n, k, d))
    lab = placeholder_labels(labels, metadata.num_classes, k)
    d3 = D3File(metadata=metadata, priors=store_priors(z, z, latent_dtype),
                decoders=[DecoderEntry(family, version, hparams, list(classes), weights)],
                labels=lab, budget=budget, provenance=provenance)
    params = sum(math.prod(s) for s, dt in shapes.values() if dt.is_floating_point)
    return d3, params


def _decoder_bytes(family: str, version: int, hparams: dict[str, Any], weight_dtype: str) -> int:
    """Bytes of the decoder's stored tensor values (no headers), from shapes alone."""
    total = 0
    for shape, dt in decoder_shapes(family, version, hparams).values():
        kind = tensor_dtype(tuple(shape), weight_dtype)[0] if dt.is_floating_point else "I64"
        total += math.prod(shape) * _DTYPE_BYTES[kind]
    return total


def _estimate(metadata: Metadata, family: str, version: int, hparams: dict[str, Any], k: int, d: int,
              weight_dtype: str, latent_dtype: str, labels: LabelStorage, classes: Sequence[int],
              provenance: dict[str, Any], budget: Budget, constant_logvar: bool = False) -> dict[str, int]:
    """Size estimate per part for budgets the strict bound cannot serve: `estimate_parts` of the
    planned layout. With `constant_logvar` (the encoder keeps every log-variance at one value) the
    log-variances compress away and I8 means lie on `store_priors`' grid."""
    d3, _ = _placeholder(metadata, family, version, hparams, k, d, weight_dtype, latent_dtype, labels, classes,
                         provenance, budget, zeros=True)
    return estimate_parts(d3, **constant_prior_std(d3, constant_logvar))


#: The compressed-size model (`format.size`) with this planner's code grid: I8 latent means on a
#: grid of `CODE_STEP` prior stds, modelled as codes of `CODE_SPREAD` prior stds.
_grid_ratio = functools.partial(size_model.grid_ratio, step=CODE_STEP, spread=CODE_SPREAD)
estimate_parts = functools.partial(size_model.estimate_parts, step=CODE_STEP, spread=CODE_SPREAD)
estimate_trained_size = functools.partial(size_model.estimate_trained_size, step=CODE_STEP, spread=CODE_SPREAD)


def _fit_size(d3: D3File, budget: Budget, spec: dict[str, Any]) -> tuple[int, bool, dict[str, int]]:
    """(size, guaranteed, breakdown): the compressed-size estimate, or the strict shape-only bound
    where that is smaller (guaranteed then), and its bytes per part.

    The strict bound counts every header and per-tensor header raw and no compression at all, so it
    leaves 10-25% of a typical budget unused; the estimate compresses decoder weights and latent
    codes as Gaussian values compress (`estimate_trained_size`) and headers as they compress.
    `encode` checks the real size before writing and, in the rare case it is over, keeps fewer
    components (`distill.trim`).
    """
    bound = size_upper_bound(d3)
    parts = _estimate(**spec, budget=budget)
    estimate = sum(parts.values())
    if bound <= estimate:
        return bound, True, raw_parts(d3, bound)
    return estimate, False, parts


def _label_choice_per_component(latent_dim: int, latent_dtype: str, num_classes: int, wanted: str) -> LabelStorage:
    """Soft labels that cost at most half of a component's latents: dense U8 probabilities when
    they do, else the largest top-k (at least 2) that does; `hard` when asked."""
    if wanted == "hard":
        return LabelStorage("hard")
    cap = latent_dim * _DTYPE_BYTES[latent_dtype]  # half of mean + log-variance
    if num_classes <= cap:
        return LabelStorage("dense", dtype="U8")
    k = cap // (2 if num_classes <= 256 else 3)
    return LabelStorage("topk", k=max(2, min(k, num_classes - 1)), dtype="U8")


def default_latent_dim(image_shape: Sequence[int]) -> int:
    """D from the image size: the power of two nearest sqrt(C*H*W) / 2, in 8..64 (16 for 28x28 grey,
    32 for 32x32 RGB, 64 for 64x64 RGB): latents grow slower than pixels."""
    c, h, w = image_shape
    target = math.sqrt(c * h * w) / 2
    return int(min(64, max(8, 2 ** round(math.log2(max(target, 1.0))))))


def default_latents_per_class(budget: Budget, num_classes: int, latent_dim: int, latent_dtype: str,
                              label_bytes: int = 0, constant_logvar: bool = False) -> int:
    """K: as many components as `COMPONENT_SHARE` of the budget holds (mean and log-variance of D
    values each, plus its label), 1..`MAX_LATENTS_PER_CLASS`. More components, each a real image
    the decoder learnt to draw, buy more accuracy than decoder width (measured: RESULTS.md).
    With `constant_logvar` the log-variances compress away and I8 means cost what their grid
    compresses to (`store_priors`)."""
    if constant_logvar:
        per_value = _grid_ratio((_MODEL_SAMPLE,), LEVEL_LARGE) if latent_dtype == "I8" else _DTYPE_BYTES[latent_dtype]
        per = latent_dim * per_value + label_bytes
    else:
        per = 2 * latent_dim * _DTYPE_BYTES[latent_dtype] + label_bytes
    return int(min(MAX_LATENTS_PER_CLASS, max(1, COMPONENT_SHARE * budget.bytes // (num_classes * per))))


def label_bytes(storage: LabelStorage, num_classes: int) -> int:
    """Stored bytes of one component's soft label (0 for hard labels)."""
    if storage.kind == "hard":
        return 0
    if storage.kind == "dense":
        return num_classes
    return storage.k * (2 if num_classes <= 256 else 3)


def _widest(attempt: Callable[[int], Optional[Plan]], widths: Sequence[int]) -> Optional[Plan]:
    """The plan of the widest width that fits (`widths` widest first; the file grows with width,
    so a bisection finds it in a few tries)."""
    last = attempt(widths[-1])
    if last is None or len(widths) == 1:
        return last
    lo, hi, best = 0, len(widths) - 2, last  # find the smallest index that fits
    while lo <= hi:
        mid = (lo + hi) // 2
        plan = attempt(widths[mid])
        if plan is not None:
            best, hi = plan, mid - 1
        else:
            lo = mid + 1
    return best


def max_width(image_shape: Sequence[int]) -> int:
    """The widest default decoder for images of `image_shape` (C, H, W): `WIDTH_PIXELS` // H."""
    return max(WIDTHS[-1], WIDTH_PIXELS // max(1, int(image_shape[-2])))


def component_cap(max_latents_per_class: int) -> int:
    """The most components per class a plan takes: `MAX_LATENTS_PER_CLASS`, or fewer real images."""
    return max(1, min(MAX_LATENTS_PER_CLASS, max_latents_per_class))


def _grow_latent_dim(base: Plan, d0: int, cap: int, plan_at: Callable[[int], Plan]) -> Plan:
    """`base` (planned at the default D), or the plan with the largest doubled D that keeps K at
    its cap `cap` and the decoder at least `MIN_WIDTH_KEPT` as wide: once every class has all the
    components it can use, a longer code per component buys more sharpness than decoder width."""
    best = base
    if base.latents_per_class < cap:
        return best
    d = 2 * d0
    while d <= MAX_LATENT_DIM_GROWTH * d0:
        try:
            plan = plan_at(d)
        except BudgetError:
            break
        if plan.hparams["width"] < MIN_WIDTH_KEPT * base.hparams["width"]:
            break
        best, d = plan, 2 * d
    return best


def plan_budget(metadata: Metadata, budget: Budget, *, classes: Optional[Sequence[int]] = None,
                provenance: Optional[dict[str, Any]] = None, latents_per_class: Optional[int] = None,
                latent_dim: Optional[int] = None, width: Optional[int] = None, weight_dtype: str = "I8",
                latent_dtype: str = "I8", labels: str = "auto", family: str = DECODER_FAMILY,
                version: int = DECODER_VERSION, norm: str = "batch", constant_logvar: bool = False,
                max_latents_per_class: int = MAX_LATENTS_PER_CLASS) -> Plan:
    """The plan that fits `budget`, or `BudgetError` naming the smallest budget that works.

    `classes` are the (global) class ids this file draws (default: all). Fixed choices
    (`latents_per_class`, `latent_dim`, `width`) are honoured; the others are searched: D from the
    image size, K from `COMPONENT_SHARE` of the budget, the widest decoder in the rest, then K
    raised to fill what the decoder's width steps leave, then (K at its cap) D doubled while the decoder
    keeps half its width (`_grow_latent_dim`). `provenance` must be the one the file
    will carry (it counts in the header). `constant_logvar`: the encoder stores one log-variance
    value throughout (it does not train them), so they take almost no bytes.
    `max_latents_per_class` caps the chosen K (the encoder passes the smallest class's image count:
    more components than real images would only repeat them).
    """
    if latent_dim is None and latents_per_class is None:
        fixed = dict(classes=classes, provenance=provenance, width=width, weight_dtype=weight_dtype,
                     latent_dtype=latent_dtype, labels=labels, family=family, version=version, norm=norm,
                     constant_logvar=constant_logvar, max_latents_per_class=max_latents_per_class)
        d0 = default_latent_dim(metadata.image_shape)
        base = plan_budget(metadata, budget, latent_dim=d0, **fixed)
        return _grow_latent_dim(base, d0, component_cap(max_latents_per_class),
                                lambda d: plan_budget(metadata, budget, latent_dim=d,
                                                      latents_per_class=base.latents_per_class, **fixed))
    if weight_dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"weight dtype {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    if latent_dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"latent dtype {latent_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    if labels not in ("auto", "soft", "hard"):
        raise ConfigError(f"labels must be auto, soft or hard, not {labels!r}")
    classes = list(range(metadata.num_classes)) if classes is None else list(classes)
    provenance = dict(provenance or {})
    n = len(classes)
    d = latent_dim or default_latent_dim(metadata.image_shape)
    widths = [width] if width else [w for w in WIDTHS if w <= max_width(metadata.image_shape)]
    smallest: Optional[int] = None

    def attempt(k: int, wd: int, lab: LabelStorage) -> Optional[Plan]:
        nonlocal smallest
        train_hp = decoder_hparams(metadata, wd, d, norm)
        hp = file_hparams(family, version, train_hp)
        if _decoder_bytes(family, version, hp, weight_dtype) > budget.bytes:
            return None  # the decoder's tensors alone are over: no need to build the file
        d3, params = _placeholder(metadata, family, version, hp, k, d, weight_dtype, latent_dtype, lab,
                                  classes, provenance, budget)
        spec = dict(metadata=metadata, family=family, version=version, hparams=hp, k=k, d=d,
                    weight_dtype=weight_dtype, latent_dtype=latent_dtype, labels=lab, classes=classes,
                    provenance=provenance, constant_logvar=constant_logvar)
        bound, guaranteed, parts = _fit_size(d3, budget, spec)
        if bound > budget.bytes:
            smallest = bound if smallest is None else min(smallest, bound)
            return None
        return Plan(family, version, hp, k, d, weight_dtype, latent_dtype, lab, budget, bound, parts,
                    params, guaranteed, train_hp)

    soft = _label_choice_per_component(d, latent_dtype, metadata.num_classes, labels)
    label_options = [soft] + ([LabelStorage("hard")] if labels == "auto" and soft.kind != "hard" else [])
    for lab in label_options:  # soft labels at any width before hard ones
        cap = component_cap(max_latents_per_class)
        k0 = latents_per_class or min(cap, default_latents_per_class(budget, n, d, latent_dtype,
                                                                     label_bytes(lab, metadata.num_classes),
                                                                     constant_logvar))
        ks = [k0] if latents_per_class else sorted({max(1, k0 >> i) for i in range(12)}, reverse=True)
        for k in ks:
            plan = _widest(lambda wd: attempt(k, wd, lab), widths)
            if plan is None:
                continue
            if latents_per_class is None:  # fill what the width step left with more components
                wd = plan.hparams["width"]
                lo, hi = k, cap
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    bigger = attempt(mid, wd, lab)
                    if bigger is not None:
                        plan, lo = bigger, mid
                    else:
                        hi = mid - 1
            return plan
    # Nothing fits: the smallest configuration gives the smallest budget that works.
    hp = file_hparams(family, version, decoder_hparams(metadata, width or WIDTHS[-1], d, norm))
    lab = LabelStorage("hard") if labels != "soft" else LabelStorage("topk", k=1)
    need = 0
    for _ in range(4):  # the budget's own digits count in the header: iterate to a fixed point
        trial = replace(budget, bytes=need or budget.bytes)
        need = max(need, sum(_estimate(metadata, family, version, hp, latents_per_class or 1,
                                       d, weight_dtype, latent_dtype, lab, classes,
                                       provenance, trial).values()))
    spec = f"{budget.spec} = " if budget.spec and budget.unit != "bytes" else ""
    raise BudgetError(f"budget {spec}{budget.bytes:,} bytes is too small: the smallest file that works here needs "
                      f"{need:,} bytes; raise --budget to at least {need:,} (or fewer fixed latents/width)")
