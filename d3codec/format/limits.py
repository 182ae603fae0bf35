"""Limits a reader enforces before it allocates memory for anything a file declares.

The defaults (spec/d3-format.md, "Reader limits") admit every file the paper's settings produce
with a wide margin; pass a tighter `ReaderLimits` to `load` for untrusted input on small machines.
"""
from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class ReaderLimits:
    """Caps on declared sizes; a file over any of them is rejected before allocation."""

    max_header_bytes: int = 16 * MiB  #: header JSON, raw and stored
    max_tensors: int = 65_536  #: tensors in the whole file
    max_rank: int = 8  #: dimensions of one tensor
    max_dim: int = 2**31 - 1  #: size of one dimension
    max_total_raw_bytes: int = 16 * GiB  #: sum of all sections' decompressed sizes
    max_sections: int = 4_096  #: entries in the section table
    max_classes: int = 1_000_000  #: metadata.num_classes
    max_window_bytes: int = 1 << 27  #: zstd window a section frame may ask for (128 MiB)


DEFAULT_LIMITS = ReaderLimits()
