"""Distillation checkpoints: tensors in safetensors, everything else as JSON in its metadata. No pickle.

One file (`<output>.ckpt`) holds the trainable tensors, optimiser states, RNG states (as uint8
tensors) and a JSON document (iteration, config, optimiser hyper-parameters). It is written
atomically (`d3codec.format.atomic`), so a crash mid-write leaves the previous checkpoint intact,
and resuming from it continues to the identical final file.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from d3codec.errors import ConfigError
from d3codec.format.atomic import atomic_path

_META_KEY = "d3codec_checkpoint"


def optimizer_to_flat(prefix: str, state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into tensors (named `prefix.<param>.<key>`) and JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            name = f"{prefix}.{pid}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(prefix: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `optimizer_to_flat`: a state dict `optimizer.load_state_dict` accepts."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            pid, key = name[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name[len(prefix) + 1:].split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Write tensors and JSON-able `meta` to `path` atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                  metadata={_META_KEY: json.dumps(meta, sort_keys=True)})


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by `save_checkpoint`; a damaged one raises `ConfigError`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"cannot read checkpoint {path} ({exc}); delete it to start over") from None
    if raw is None:
        raise ConfigError(f"{path} is not a d3codec checkpoint; delete it or choose another output")
    return tensors, json.loads(raw)


def checkpoint_iteration(path: str | os.PathLike) -> Optional[int]:
    """The iteration a checkpoint was saved at (read from its metadata only), or None if unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
        return int(json.loads(raw)["iteration"]) if raw else None
    except (SafetensorError, OSError, ValueError, KeyError, TypeError):
        return None
