"""Seed derivation: one 63-bit seed per purpose, so every random stream is independent and reproducible.

`derive_seed(seed, epoch, "perm")` hashes its parts (joined by "/", blake2b, 8 bytes little-endian,
top bit cleared to fit `torch.Generator.manual_seed`); the decoder's stream, the exports, the
experts, evaluation and federated subtasks all seed their generators through it, so a change here
changes every file and stream (it is part of what a seed means).
"""
from __future__ import annotations

import hashlib
from typing import Any


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from parts (seed, epoch, run, purpose, index): independent, reproducible streams."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
