"""Fixtures that write small real datasets (ImageFolder trees, npz, IDX, CIFAR batches) to tmp."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
from PIL import Image


def class_image(c: int, i: int, size: int = 8, channels: int = 3) -> np.ndarray:
    """A deterministic image whose brightness depends on its class (so classes are learnable)."""
    rng = np.random.default_rng(1000 * c + i)
    base = 30 + 50 * c
    img = np.clip(base + rng.integers(-20, 20, (size, size, channels)), 0, 255).astype(np.uint8)
    return img


@pytest.fixture
def make_folder(tmp_path) -> Callable[..., str]:
    """make_folder(classes=3, per_class=10, size=8, ext='png', name='folder') -> root path."""

    def make(classes: int = 3, per_class: int = 10, size: int = 8, ext: str = "png", name: str = "folder",
             channels: int = 3) -> str:
        root = tmp_path / name
        for c in range(classes):
            d = root / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = class_image(c, i, size, channels)
                img = Image.fromarray(arr[..., 0] if channels == 1 else arr, "L" if channels == 1 else "RGB")
                img.save(d / f"{i:04d}.{ext}")
        return str(root)

    return make


@pytest.fixture
def cache_dir(tmp_path) -> str:
    return str(tmp_path / "cache")


def write_idx(path: str, array: np.ndarray) -> None:
    """An IDX file (uint8), gzipped when the path ends in .gz."""
    import gzip

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


@pytest.fixture
def shared_data(shared_data_dir) -> str:
    """The shared real datasets (`../shared/data`); skips where absent."""
    return str(shared_data_dir)
