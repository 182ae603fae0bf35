"""Canonical and strict JSON, as the `.d3` header and the safetensors headers of sections use it.

Writing: sorted keys, no whitespace, the shortest float repr, no NaN/Infinity (spec section 3).
Reading: duplicate keys and NaN/Infinity are refused (`ValueError`, turned into one-line
`D3FormatError`s by the callers).
"""
from __future__ import annotations

import json
from typing import Any


def canonical_json(obj: Any) -> bytes:
    """Canonical UTF-8 JSON: sorted keys, no spaces, shortest float repr, no NaN/Infinity."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def strict_object(pairs: list) -> dict:
    """A JSON object hook that refuses duplicate keys (the spec forbids them)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def strict_loads(text: str) -> Any:
    """JSON `text` with duplicate keys and NaN/Infinity refused (`ValueError`, `RecursionError`)."""
    return json.loads(text, object_pairs_hook=strict_object, parse_constant=_no_constants)
