"""A file's decoders as modules, class-routed batched decoding, pixel spaces, labels, mean images.

- `build_decoders(d3, device)`: one eval-mode module per decoder entry, weights loaded and checked.
- `Renderer(d3, device, ...)`: latents + classes -> images, each class through its own decoder
  (federated files), under `inference_mode`, optional channels-last, autocast and compile
  (`DecodeOptions` groups those speed options).
- `OutputSpace`: decoder values -> pixels [0, 1] -> `(p - mean) / std`, per `Metadata`.
- `LabelTable`: per-component labels as [B, num_classes] probabilities (dense or rebuilt top-k)
  or int64 class ids.
- `mean_images(d3)`: every component's mean image [N, K, C, H, W].
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from d3codec._version import __version__
from d3codec.decode.fastpath import fast_decoder
from d3codec.decode.sampling import PriorTensors
from d3codec.errors import ConfigError
from d3codec.format.errors import InvalidFieldError
from d3codec.format.types import D3File, Labels, Metadata
from d3codec.models.registry import (DecoderError, UnknownDecoderError, UnknownHparamError, build_decoder,
                                     fold_batchnorm)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_device(device: Union[str, torch.device] = "auto") -> torch.device:
    """`device` as a torch.device. "auto" is CUDA when `torch.cuda.is_available()`, else the CPU;
    an unknown name, or CUDA where torch sees none, is a one-line `ConfigError` naming the fix."""
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda (cuda:N picks one GPU)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use auto, cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "torch sees no CUDA device"
            raise ConfigError(f"device {str(device)!r} was asked for but {why}; use cpu, or auto (CUDA "
                              "when there is one, else the CPU)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {str(device)!r} was asked for but torch sees {torch.cuda.device_count()} "
                              "CUDA device(s); use cuda (the first) or a smaller index")
    return dev


def writer_version(d3: D3File) -> Optional[str]:
    """The d3codec version that wrote the file, from its provenance (None if not recorded)."""
    prov = d3.provenance or {}
    for key in ("encoder", "d3codec", "writer"):
        value = prov.get(key)
        if isinstance(value, str):
            m = re.search(r"(\d+\.\d+(?:\.\d+)?\S*)", value)
            if m:
                return m.group(1)
    return None


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def _unsupported(d3: D3File) -> str:
    """What to do about a decoder (or hyper-parameter) this d3codec does not define: install a newer
    d3codec only when a newer one wrote the file; else the file is invalid or from another writer."""
    wrote = writer_version(d3)
    fmt = f"file format {d3.format_version[0]}.{d3.format_version[1]}"
    if wrote is None:
        return (f"this d3codec {__version__} cannot decode it ({fmt}, writer not recorded); a newer d3codec "
                "may (pip install -U d3codec), else the file is invalid")
    if _version_tuple(wrote) > _version_tuple(__version__):
        return (f"this d3codec {__version__} cannot decode it ({fmt}, written by d3codec {wrote}); "
                f"install d3codec>={wrote} (pip install -U d3codec)")
    return (f"d3codec {__version__} cannot decode it, yet the file says d3codec {wrote} wrote it, which does not "
            f"define it either ({fmt}); the file is invalid or was altered: re-encode it")


def _entry_module(d3: D3File, i: int) -> nn.Module:
    """Decoder entry `i` of `d3` built (no weights loaded) and checked against the file's shapes."""
    c, h, w = d3.metadata.image_shape
    entry = d3.decoders[i]
    what = f"decoder {i} ({entry.family} v{entry.version})"
    try:
        module = build_decoder(entry.family, entry.version, entry.hparams)
    except UnknownDecoderError as exc:
        raise UnknownDecoderError(f"{what}: {_unsupported(d3)}") from exc
    except UnknownHparamError as exc:
        raise InvalidFieldError(f"{what}: {str(exc).split('; ')[0]}; {_unsupported(d3)}") from exc
    except DecoderError as exc:
        raise InvalidFieldError(f"{what}: {exc}") from exc
    out_shape = (getattr(module, "channels", c), getattr(module, "image_size", h), getattr(module, "image_size", w))
    if out_shape != (c, h, w):
        raise InvalidFieldError(f"{what} draws {out_shape} images but the metadata says {(c, h, w)}; "
                                "the file is inconsistent: re-encode it")
    if getattr(module, "latent_dim", d3.priors.dim) != d3.priors.dim:
        raise InvalidFieldError(f"{what} takes latents of dimension {module.latent_dim} but the priors have "
                                f"{d3.priors.dim}; the file is inconsistent: re-encode it")
    _check_weights(module, entry.weights, what)
    return module


def check_decoders(d3: D3File) -> None:
    """Raise what `build_decoders` would for `d3` (unknown family or version, bad hparams, weights that
    do not fit the architecture), building each decoder on the `meta` device: no weights are allocated."""
    for i in range(len(d3.decoders)):
        with torch.device("meta"):
            _entry_module(d3, i)


def build_decoders(d3: D3File, device: Union[str, torch.device] = "cpu") -> list[nn.Module]:
    """Eval-mode decoder modules of `d3` on `device`, weights dequantised to float32 and loaded.

    Unknown families raise `UnknownDecoderError` naming the family, its version and what to do (a
    newer d3codec only when a newer one wrote the file); weights or hparams that disagree with the
    file raise `InvalidFieldError`.
    """
    modules = []
    for i, entry in enumerate(d3.decoders):
        module = _entry_module(d3, i)
        module.load_state_dict({k: stored.dequantize() for k, stored in entry.weights.items()}, strict=False)
        modules.append(module.to(device).eval())
    return modules


def _check_weights(module: nn.Module, weights: dict[str, Any], what: str) -> None:
    """The stored weights name exactly the architecture's tensors (BatchNorm counters optional), in its shapes."""
    expected = {k: v for k, v in module.state_dict().items()}
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(weights) - optional)
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        problem = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise InvalidFieldError(f"{what}: stored weights do not match its architecture ({problem}, "
                                f"{len(missing)} missing, {len(unexpected)} unexpected); the file is damaged or "
                                "was written for another architecture")
    for k, stored in weights.items():
        if tuple(stored.shape) != tuple(expected[k].shape):
            raise InvalidFieldError(f"{what}: weight {k!r} has shape {tuple(stored.shape)} but the architecture needs "
                                    f"{tuple(expected[k].shape)}; the file is damaged or its hparams are wrong")


class OutputSpace:
    """Decoder values -> training images: pixel p = (v - lo) / (hi - lo); x = (p - mean) / std.

    `denormalize=True` stops at pixels in [0, 1]. One fused affine per channel.
    """

    def __init__(self, metadata: Metadata, denormalize: bool = False, device: Union[str, torch.device] = "cpu") -> None:
        lo, hi = (float(v) for v in metadata.value_range)
        if not hi > lo:
            raise ConfigError(f"metadata value_range {metadata.value_range} is empty; the file is inconsistent")
        c = metadata.image_shape[0]
        mean = torch.tensor(metadata.mean, dtype=torch.float64).reshape(-1)
        std = torch.tensor(metadata.std, dtype=torch.float64).reshape(-1)
        if denormalize:
            mean, std = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
        scale = 1.0 / ((hi - lo) * std)
        shift = (-lo / (hi - lo) - mean) / std
        self.scale = scale.to(device, torch.float32).view(1, c, 1, 1)
        self.shift = shift.to(device, torch.float32).view(1, c, 1, 1)
        self.denormalize = denormalize

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, values.float(), self.scale)


class LabelTable:
    """Labels of components on a device: `lookup(classes, comps)` -> [B, num_classes] float32
    probabilities (soft files) or [B] int64 class ids (hard files, or `hard=True`).

    Soft rows are renormalised to sum to 1 (quantised storage rarely sums exactly). Top-k rows
    put `values` at `indices` and spread the remaining mass 1 - sum(values) evenly over the other
    classes.
    """

    def __init__(self, labels: Labels, num_classes: int, device: Union[str, torch.device] = "cpu",
                 hard: bool = False) -> None:
        self.num_classes = num_classes
        self.soft = labels.kind == "soft" and not hard
        self.dense: Optional[torch.Tensor] = None
        self.indices: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None
        if not self.soft:
            return
        if labels.layout == "dense":
            if labels.probs is None:
                raise InvalidFieldError("soft dense labels need a probs tensor; the file is incomplete")
            p = labels.probs.dequantize().to(device, torch.float32).clamp_min(0)
            self.dense = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        elif labels.layout == "topk":
            if labels.indices is None or labels.values is None:
                raise InvalidFieldError("soft top-k labels need indices and values tensors; the file is incomplete")
            self.indices = labels.indices.raw.to(device, torch.int64)
            self.values = labels.values.dequantize().to(device, torch.float32).clamp_min(0)
        else:
            raise InvalidFieldError(f"soft labels have unknown layout {labels.layout!r}; use dense or topk")

    def lookup(self, classes: torch.Tensor, comps: torch.Tensor) -> torch.Tensor:
        if not self.soft:
            return classes.to(torch.int64)
        if self.dense is not None:
            return self.dense[classes, comps]
        idx, val = self.indices[classes, comps], self.values[classes, comps]  # [B, k]
        k = idx.shape[1]
        rest = (1.0 - val.sum(dim=1, keepdim=True)).clamp_min(0)
        others = max(self.num_classes - k, 1)
        out = (rest / others).expand(-1, self.num_classes).clone() if k < self.num_classes else \
            torch.zeros(idx.shape[0], self.num_classes, device=val.device)
        out.scatter_(1, idx, val)
        return out / out.sum(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass(frozen=True)
class DecodeOptions:
    """How decoding runs (`Renderer`, `D3Dataset(..., options=...)`): speed only, the images stay
    the same within float rounding (autocast aside, see `precision`).

    precision: "fp32", "bf16" or "fp16" (autocast when decoding; bf16 changes pixels by about
        1e-2, fp16 by about 1e-3).
    channels_last: channels-last memory (None: on).
    compile: wrap each decoder in `torch.compile` (pays on GPUs, not on CPUs).
    fold_bn: fold eval BatchNorm into the transposed convs.
    stem_matmul: each decoder's stem as block-structured matmuls (None: on for the CPU only).
    """

    precision: str = "fp32"
    channels_last: Optional[bool] = None
    compile: bool = False
    fold_bn: bool = True
    stem_matmul: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")

    def renderer(self, d3: D3File, device: Union[str, torch.device]) -> "Renderer":
        """The `Renderer` of `d3`'s decoders on `device` with these options."""
        return Renderer(d3, device, precision=self.precision, channels_last=self.channels_last,
                        compile=self.compile, fold_bn=self.fold_bn, stem_matmul=self.stem_matmul)


class Renderer:
    """Latents of given classes -> decoder values [B, C, H, W] (float32), each class through its own
    decoder. Eval mode and `inference_mode` always: a sample never depends on its batch-mates.

    `precision` "fp32" | "bf16" | "fp16" (autocast on the device); `channels_last` (default on:
    measured ~1.7-2x faster on CPU as well); `fold_bn` folds eval BatchNorm into the transposed
    convs (same images within float rounding, one memory pass less per block); `stem_matmul`
    computes each decoder's stem (Linear + first ConvTranspose on the 2x2 map) as block-structured
    matmuls (`d3codec.decode.fastpath`; default on for CPU, where it makes `large` ~1.4x faster;
    unmeasured on GPUs, so off there unless asked; its matrices are copies taken here, so decoders
    passed in must not be trained afterwards); `compile` wraps each decoder in
    `torch.compile`, falling back to eager if that fails (it pays on GPUs, not on CPUs).
    """

    def __init__(self, d3: D3File, device: Union[str, torch.device] = "cpu", *, precision: str = "fp32",
                 channels_last: Optional[bool] = None, compile: bool = False, fold_bn: bool = True,
                 stem_matmul: Optional[bool] = None, decoders: Optional[Sequence[nn.Module]] = None) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.device = torch.device(device)
        self.modules = list(decoders) if decoders is not None else build_decoders(d3, self.device)
        if fold_bn:
            self.modules = [_folded(m) for m in self.modules]
        self.autocast_dtype = PRECISIONS[precision]
        if channels_last is None:
            channels_last = True
        if channels_last:
            self.modules = [m.to(memory_format=torch.channels_last) for m in self.modules]
        if stem_matmul is None:
            stem_matmul = self.device.type == "cpu"
        if stem_matmul:
            self.modules = [fast_decoder(m, channels_last) for m in self.modules]
        self._eager = list(self.modules)
        self._compiled = [torch.compile(m, dynamic=False) for m in self.modules] if compile else None
        owner = d3.decoder_of_class()
        missing = [c for c, o in enumerate(owner) if o < 0]
        if missing:
            raise InvalidFieldError(f"class {missing[0]} is drawn by no decoder; the file is inconsistent: re-encode it")
        self.owner = torch.tensor(owner, dtype=torch.int64, device=self.device)
        self.single = len(self.modules) == 1
        self.shape = tuple(d3.metadata.image_shape)

    def _run(self, i: int, z: torch.Tensor) -> torch.Tensor:
        if self._compiled is not None:
            try:
                return self._compiled[i](z)
            except Exception as exc:  # noqa: BLE001 - any compile failure: fall back to eager, once
                warnings.warn(f"torch.compile failed ({type(exc).__name__}); decoding eagerly", RuntimeWarning)
                self._compiled = None
        return self._eager[i](z)

    def __call__(self, z: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            z = z.to(self.device, torch.float32)
            if self.autocast_dtype is not None:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                    return self._route(z, classes).float()
            return self._route(z, classes).float()

    def _route(self, z: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        if self.single:
            return self._run(0, z)
        owner = self.owner[classes.to(self.device)]
        out = torch.empty((z.shape[0], *self.shape), device=self.device, dtype=torch.float32)
        for i in range(len(self.modules)):
            idx = torch.nonzero(owner == i).squeeze(1)
            if idx.numel():
                out.index_copy_(0, idx, self._run(i, z.index_select(0, idx)).float())
        return out


def _folded(module: nn.Module) -> nn.Module:
    """An eval-mode copy of `module` with BatchNorm folded into the preceding convs (or `module`)."""
    if getattr(module, "hparams", {}).get("norm") != "batch":
        return module
    hparams, state = fold_batchnorm(module)
    device = next(module.parameters()).device
    folded = build_decoder(module.family, module.version, hparams)
    folded.load_state_dict(state)
    return folded.to(device).eval()


def mean_images(d3: D3File, device: Union[str, torch.device] = "cpu", *, space: str = "pixels",
                batch_size: int = 1024) -> torch.Tensor:
    """Every component's mean image, [N, K, C, H, W] float32 on `device`.

    `space`: "pixels" ([0, 1]), "normalized" (the file's training normalisation) or "values"
    (raw decoder output).
    """
    n, k = d3.priors.num_classes, d3.priors.latents_per_class
    values = torch.cat(list(mean_image_batches(d3, device, space=space, batch_size=batch_size)))
    return values.view(n, k, *values.shape[1:])


def mean_image_batches(d3: D3File, device: Union[str, torch.device] = "cpu", *, space: str = "pixels",
                       batch_size: int = 1024) -> Iterator[torch.Tensor]:
    """The mean images of `mean_images`, `batch_size` at a time in component order (class-major):
    memory bounded by one batch whatever the component count."""
    if space not in ("pixels", "normalized", "values"):
        raise ConfigError(f"space must be pixels, normalized or values, not {space!r}")
    pt = PriorTensors.from_priors(d3.priors, device)
    n, k = pt.num_classes, pt.latents_per_class
    classes = torch.arange(n, device=device).repeat_interleave(k)
    comps = torch.arange(k, device=device).repeat(n)
    render = Renderer(d3, device)
    output = None if space == "values" else OutputSpace(d3.metadata, denormalize=space == "pixels", device=device)
    for s in range(0, n * k, batch_size):
        values = render(pt.sample(classes[s:s + batch_size], comps[s:s + batch_size]), classes[s:s + batch_size])
        yield values if output is None else output(values)
