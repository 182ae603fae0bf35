"""Deterministic held-out test split for sources that ship without one.

Per class, the images whose key (relative file path, or array index) hashes lowest form the
test split: ``max(1, round(HOLDOUT_FRACTION * n))`` of them, capped at ``n - 1`` so a class
with one image keeps it for training. Hashing (not shuffling) makes the choice independent of
listing order and stable when other classes change; train always excludes every test image.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

#: Fraction of each class held out as the test split when a source has no test split.
HOLDOUT_FRACTION = 0.1


def holdout_count(n: int, fraction: float = HOLDOUT_FRACTION) -> int:
    """How many of a class's `n` images go to the test split."""
    if n <= 1:
        return 0
    return min(n - 1, max(1, int(round(fraction * n))))


def _rank_key(class_name: str, key: str) -> bytes:
    return hashlib.blake2b(f"{class_name}\x00{key}".encode(), digest_size=8).digest()


def holdout_mask(labels: np.ndarray, keys: Sequence[str], class_names: Sequence[str],
                 fraction: float = HOLDOUT_FRACTION) -> np.ndarray:
    """Boolean mask over items: True for items held out as test. `keys[i]` identifies item i."""
    labels = np.asarray(labels)
    mask = np.zeros(len(labels), dtype=bool)
    for c in range(len(class_names)):
        members = np.flatnonzero(labels == c)
        k = holdout_count(len(members), fraction)
        if k == 0:
            continue
        ranked = sorted(members.tolist(), key=lambda i: _rank_key(class_names[c], keys[i]))
        mask[ranked[:k]] = True
    return mask
