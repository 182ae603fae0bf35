"""d3codec: a labelled image dataset in one small `.d3` file, and training batches drawn from it.

Public surface (imports are lazy, so `import d3codec` stays light):

- `encode(dataset, budget, output, **options) -> D3File`, `plan(dataset, budget, **options) -> Plan`:
  the writer (distillation; `d3codec encode` in Python).
- `D3Dataset(path, batch_size=..., device=..., seed=...)`: the reader, training batches from a file.
- `load(path) -> D3File`, `save(d3file, path, budget=...)`: the `.d3` format.
- `D3Error`, `D3FormatError`: what bad input raises.

`d3codec.models.ConvNet` is the classifier `d3codec eval` and `examples/` train on a file (that
import loads torch; `import d3codec` alone does not).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from d3codec._version import __version__
from d3codec.errors import D3Error

_LAZY = {
    "load": ("d3codec.format.io", "load"),
    "save": ("d3codec.format.io", "save"),
    "D3File": ("d3codec.format.types", "D3File"),
    "D3FormatError": ("d3codec.format.errors", "D3FormatError"),
    "D3Dataset": ("d3codec.decode.dataset", "D3Dataset"),
    "encode": ("d3codec.distill.public", "encode"),
    "plan": ("d3codec.distill.public", "plan"),
}

# Spelled out (not `*_LAZY`) so linters and IDEs see the names; `_LAZY` must list the same ones.
__all__ = ["__version__", "D3Error", "encode", "plan", "D3Dataset", "load", "save", "D3File", "D3FormatError"]

if TYPE_CHECKING:  # pragma: no cover
    from d3codec.decode.dataset import D3Dataset
    from d3codec.distill.public import encode, plan
    from d3codec.format.errors import D3FormatError
    from d3codec.format.io import load, save
    from d3codec.format.types import D3File


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'd3codec' has no attribute {name!r}")
