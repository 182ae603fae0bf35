"""Decoder registry: named architectures built from header hyper-parameters, never code.

Families register a builder with `@register_decoder(family, version)`; `build_decoder(family,
version, hparams)` builds the module a `.d3` file names. Unknown families, versions or
hyper-parameters raise a `DecoderError` (a `D3Error`) naming the fix, never a crash. A
registered (family, version) never changes its architecture or state-dict keys: new options get
new hyper-parameters with defaults that keep old files decoding the same, or a new version.

`export_state` gives the tensors a file stores; `fold_batchnorm` folds eval-mode BatchNorm into
the preceding transposed convolutions (an equivalent `norm="none"` decoder, fewer bytes).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import nn

from d3codec._version import __version__
from d3codec.errors import D3Error
from d3codec.models._upsample import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

#: Modules that register the built-in families when first needed.
_BUILTIN_MODULES = ("d3codec.models.small", "d3codec.models.medium", "d3codec.models.large")

Builder = Callable[[dict[str, Any]], nn.Module]


class DecoderError(D3Error):
    """A decoder cannot be built: unknown family or version, or bad hyper-parameters."""


class UnknownDecoderError(DecoderError):
    """The (family, version) is not registered in this d3codec (a newer one may know it)."""


class DecoderHparamsError(DecoderError):
    """The hyper-parameters are missing, of the wrong type, out of range, or unknown."""


class UnknownHparamError(DecoderHparamsError):
    """A hyper-parameter this d3codec does not define (a newer one may)."""


@dataclass(frozen=True)
class DecoderSpec:
    """A registered architecture: its name, version, builder and the d3codec release that added it."""

    family: str
    version: int
    builder: Builder
    since: str
    summary: str


_REGISTRY: dict[tuple[str, int], DecoderSpec] = {}
_loaded = False


def register_decoder(family: str, version: int = 1, *, since: str = "0.1.0") -> Callable[[Builder], Builder]:
    """Decorator: register `builder(hparams) -> nn.Module` as decoder `family` version `version`."""

    def wrap(builder: Builder) -> Builder:
        key = (family, version)
        if key in _REGISTRY and _REGISTRY[key].builder is not builder:
            raise ValueError(f"decoder {family} v{version} is already registered")
        doc = (builder.__doc__ or "").strip().splitlines()
        _REGISTRY[key] = DecoderSpec(family, version, builder, since, doc[0] if doc else "")
        return builder

    return wrap


def _ensure_builtins() -> None:
    global _loaded
    if not _loaded:
        for name in _BUILTIN_MODULES:
            importlib.import_module(name)
        _loaded = True


def decoder_specs() -> list[DecoderSpec]:
    """Every registered decoder, sorted by family and version."""
    _ensure_builtins()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def is_registered(family: str, version: int) -> bool:
    """Whether this d3codec can build decoder `family` version `version`."""
    _ensure_builtins()
    return (family, version) in _REGISTRY


def image_size_range() -> tuple[int, int]:
    """(smallest, largest) image side, in pixels, that the built-in decoder families draw."""
    return MIN_IMAGE_SIZE, MAX_IMAGE_SIZE


def _known() -> str:
    return ", ".join(f"{s.family} v{s.version}" for s in decoder_specs())


def build_decoder(family: str, version: int, hparams: Mapping[str, Any]) -> nn.Module:
    """The decoder module `family` v`version` with `hparams`, freshly initialised (load weights next).

    Raises `UnknownDecoderError` for an unregistered family or version and `DecoderHparamsError`
    for bad hyper-parameters. The module has `family`, `version` and resolved `hparams`.
    """
    _ensure_builtins()
    if not isinstance(hparams, Mapping):
        raise DecoderHparamsError(f"decoder {family} v{version}: hparams must be a JSON object, got {type(hparams).__name__}")
    spec = _REGISTRY.get((family, version))
    if spec is None:
        versions = sorted(v for f, v in _REGISTRY if f == family)
        what = (f"decoder family {family!r} version {version} (this d3codec knows versions "
                f"{', '.join(map(str, versions))})" if versions else f"decoder family {family!r}")
        raise UnknownDecoderError(f"{what} is unknown to d3codec {__version__} (it knows {_known()}); "
                                  "a newer d3codec may define it (pip install -U d3codec)")
    return spec.builder(dict(hparams))


def num_parameters(family: str, version: int, hparams: Mapping[str, Any]) -> int:
    """Parameters (weights, biases, norm affine; not running statistics) of a decoder, built on `meta`."""
    with torch.device("meta"):
        module = build_decoder(family, version, hparams)
    return sum(p.numel() for p in module.parameters())


# ---- hyper-parameter checking, shared by the family builders ----

class Hparams:
    """Typed access to a decoder's hparams that reports every problem as a `DecoderHparamsError`."""

    def __init__(self, family: str, version: int, hparams: Mapping[str, Any], allowed: Iterable[str]) -> None:
        self.name = f"decoder {family} v{version}"
        self.raw = dict(hparams)
        unknown = sorted(set(self.raw) - set(allowed))
        if unknown:
            raise UnknownHparamError(f"{self.name} has unknown hyper-parameter {unknown[0]!r} (known: "
                                     f"{', '.join(sorted(allowed))}); d3codec {__version__} does not define it")
        self.resolved: dict[str, Any] = {}

    def int(self, key: str, default: Optional[int] = None, lo: int = 1, hi: int = 1 << 20) -> int:
        value = self.raw.get(key, default)
        if value is None:
            raise DecoderHparamsError(f"{self.name} needs hyper-parameter {key!r} (an integer); add it to hparams")
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise DecoderHparamsError(f"{self.name}: {key} must be an integer in [{lo}, {hi}], got {value!r}; fix hparams")
        self.resolved[key] = value
        return value

    def float(self, key: str, default: float, lo: float, hi: float) -> float:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
            raise DecoderHparamsError(f"{self.name}: {key} must be a number in [{lo}, {hi}], got {value!r}; fix hparams")
        self.resolved[key] = float(value)
        return float(value)

    def choice(self, key: str, default: str, choices: Iterable[str]) -> str:
        choices = tuple(choices)
        value = self.raw.get(key, default)
        if value not in choices:
            raise DecoderHparamsError(f"{self.name}: {key} must be one of {', '.join(choices)}, got {value!r}; fix hparams")
        self.resolved[key] = value
        return value

    def fail(self, message: str) -> DecoderHparamsError:
        return DecoderHparamsError(f"{self.name}: {message}")


# ---- stored state ----

def export_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a `.d3` file stores for `module`: its state dict without BatchNorm's
    `num_batches_tracked` counters (unused in eval; `load_state_dict` accepts their absence)."""
    return {k: v.detach() for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}


def fold_batchnorm(module: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Fold eval-mode BatchNorm into the preceding transposed convs: `(hparams, state)` of an
    equivalent `norm="none"` decoder of the same family and version (same outputs in eval, fewer
    tensors to store). A decoder without BatchNorm is returned as it is."""
    hparams = dict(getattr(module, "hparams", {}))
    if hparams.get("norm", "batch") != "batch":
        return hparams, export_state(module)
    state: dict[str, torch.Tensor] = {}
    for name, child in module.named_modules():
        if not (isinstance(child, nn.BatchNorm2d) and name.endswith(".norm")):
            continue
        prefix = name[: -len("norm")]
        conv = module.get_submodule(prefix + "conv")
        if not isinstance(conv, nn.ConvTranspose2d) or conv.bias is None:  # pragma: no cover - our blocks
            raise ValueError(f"cannot fold {name}: it does not follow a ConvTranspose2d with bias")
        var = child.running_var.detach().double()
        s = child.weight.detach().double() / torch.sqrt(var + child.eps)
        w = conv.weight.detach().double() * s.view(1, -1, 1, 1)  # ConvTranspose2d weight: [in, out, kh, kw]
        b = (conv.bias.detach().double() - child.running_mean.detach().double()) * s + child.bias.detach().double()
        state[prefix + "conv.weight"] = w.to(conv.weight.dtype)
        state[prefix + "conv.bias"] = b.to(conv.bias.dtype)
    for k, v in export_state(module).items():
        if ".norm." not in k and k not in state:
            state[k] = v
    hparams["norm"] = "none"
    return hparams, state
