"""Byte budgets: parse `2ipc`, `2ipc-u8`, `250000`, `500KB`, `1.5MiB` into an exact byte count.

`Nipc` counts as the D3 paper does: N images per class of float32 pixels, so
bytes = floor(N x classes x C x H x W x 4). `Nipc-u8` counts one byte per pixel. Decimal units
are powers of 1000 (KB, MB, GB, TB), binary units powers of 1024 (KiB, MiB, GiB, TiB).
See spec/d3-format.md, "Budgets".
"""
from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Union

from d3codec.errors import BudgetError
from d3codec.format.types import Budget

#: Multiplier of each byte unit (lower-case; matching is case-insensitive).
BYTE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
#: Bytes per pixel of each IPC convention.
IPC_UNITS: dict[str, int] = {"ipc": 4, "ipc-u8": 1}

_FORMS = "accepted forms: 2ipc, 0.5ipc, 2ipc-u8, 250000, 500KB, 1.5MiB (KB/MB/GB = 1000^n, KiB/MiB/GiB = 1024^n)"
_PATTERN = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z][A-Za-z0-9-]*)?$")


def ipc_bytes(ipc: Union[float, Fraction, str], num_classes: int, image_shape: tuple[int, int, int],
              bytes_per_pixel: int = 4) -> int:
    """Bytes of `ipc` images per class: floor(ipc x classes x C x H x W x bytes_per_pixel)."""
    c, h, w = image_shape
    return math.floor(Fraction(str(ipc)) * num_classes * c * h * w * bytes_per_pixel)


def _read(spec: str) -> tuple[Fraction, str]:
    """(number, lower-case unit) of a budget string; malformed text or an unknown unit raise."""
    match = _PATTERN.match(spec.strip())
    if match is None:
        raise BudgetError(f"cannot read budget {spec!r}; {_FORMS}")
    unit = (match.group(2) or "").lower()
    if unit not in IPC_UNITS and unit not in BYTE_UNITS:
        raise BudgetError(f"unknown budget unit {match.group(2)!r} in {spec!r}; {_FORMS}")
    return Fraction(match.group(1)), unit


def check_budget(spec: Union[str, int]) -> None:
    """Refuse a budget that no dataset can make sense of (bad text, unknown unit, zero), before
    any data is read; `parse_budget` gives the bytes once the dataset's shape is known."""
    if isinstance(spec, str):
        number, _ = _read(spec)
        if number <= 0:
            raise BudgetError(f"budget {spec!r} is not positive; give a positive budget ({_FORMS})")
    else:
        parse_budget(spec, 0, (0, 0, 0))


def parse_budget(spec: Union[str, int], num_classes: int, image_shape: tuple[int, int, int]) -> Budget:
    """Parse a budget given as an int (bytes) or a string; bad input raises `BudgetError`."""
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise BudgetError(f"budget must be a string or an integer, got {type(spec).__name__}; {_FORMS}")
    if isinstance(spec, int):
        if spec <= 0:
            raise BudgetError(f"budget must be a positive number of bytes, got {spec}; {_FORMS}")
        return Budget(bytes=spec, unit="bytes", ipc=None, spec=str(spec))
    text = spec.strip()
    number, unit = _read(spec)
    if unit in IPC_UNITS:
        if num_classes <= 0 or len(image_shape) != 3 or min(image_shape) <= 0:
            raise BudgetError(
                f"budget {spec!r} counts images per class, but the dataset shape is unknown "
                f"({num_classes} classes, image shape {tuple(image_shape)}); give a byte size instead"
            )
        nbytes = ipc_bytes(number, num_classes, tuple(image_shape), IPC_UNITS[unit])
        kind, ipc = unit, float(number)
    else:
        nbytes = math.floor(number * BYTE_UNITS[unit])
        kind, ipc = "bytes", None
    if nbytes <= 0:
        raise BudgetError(f"budget {spec!r} is {nbytes} bytes; give a positive budget ({_FORMS})")
    return Budget(bytes=nbytes, unit=kind, ipc=ipc, spec=text)
