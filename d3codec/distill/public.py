"""The writer beside the reader: `d3codec.encode(dataset, budget, output, **options) -> D3File`
and `d3codec.plan(dataset, budget, **options) -> Plan`, the Python form of `d3codec encode`.

`dataset` is what the CLI takes (a builtin name such as "cifar10", an ImageFolder, a `.tar` of
one, an `.npz`, or "digits") or an opened `ImageDataset`; `options` are `EncodeOptions` fields
(`seed`, `device`, `latents_per_class`, ...) plus the dataset's `data_dir`, `resolution`,
`cache_dir` and `skip_bad_images`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Union

from d3codec.data import open_dataset
from d3codec.distill.api import EncodeOptions, encode as _encode, plan_for
from d3codec.distill.planner import Plan
from d3codec.errors import ConfigError
from d3codec.format.types import Budget, D3File

_DATA_OPTIONS = ("data_dir", "resolution", "skip_bad_images")
_FIELDS = {f.name for f in dataclasses.fields(EncodeOptions)} - {"dry_run"}


def _split(dataset: Any, options: dict[str, Any]) -> tuple[Any, EncodeOptions]:
    unknown = sorted(set(options) - _FIELDS - set(_DATA_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; encode and plan take "
                          f"{', '.join(sorted(_FIELDS | set(_DATA_OPTIONS)))}")
    data = {k: options.pop(k) for k in _DATA_OPTIONS if k in options}
    if isinstance(dataset, str):
        dataset = open_dataset(dataset, split="train", cache_dir=options.get("cache_dir"),
                               progress=not options.get("quiet", False), **data)
    elif data:
        raise ConfigError(f"{', '.join(data)} apply to a dataset given by name or path, not to an opened one")
    return dataset, EncodeOptions(**options)


def encode(dataset: Any, budget: Union[str, int, Budget], output: str, **options: Any) -> D3File:
    """Distil `dataset`'s train split into a `.d3` file at `output` (at most `budget` bytes:
    "1ipc", "500KB", 31360, ...) and return it as `d3codec.load` reads it."""
    ds, opts = _split(dataset, dict(options))
    result = _encode(ds, budget, output, opts)
    if not isinstance(result, D3File):  # dry_run is not an option here, so this is a bug
        raise TypeError(f"encode returned {type(result).__name__}, not a D3File")
    return result


def plan(dataset: Any, budget: Union[str, int, Budget], **options: Any) -> Plan:
    """What `encode` would train and store for `dataset` at `budget`: decoder, K, D, dtypes, labels
    and the byte breakdown (`Plan.summary()`), without training or timing anything."""
    ds, opts = _split(dataset, dict(options))
    return plan_for(ds, budget, opts)[0]
