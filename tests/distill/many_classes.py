"""A generated many-class image set for encode tests that must run in seconds."""
from __future__ import annotations

import numpy as np


def many_classes_npz(path, classes: int = 50, per_class: int = 6, size: int = 16) -> str:
    """Write an npz where class c's images share a colour and a stripe, plus noise; returns its path."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(classes), per_class)
    base = rng.integers(0, 256, size=(classes, 1, 1, 3))
    x = np.clip(base[y] + rng.normal(0, 20, size=(len(y), size, size, 3)), 0, 255).astype(np.uint8)
    for c in range(classes):
        x[y == c, c % size, :, :] = 255
    np.savez(path, x=x, y=y)
    return str(path)
