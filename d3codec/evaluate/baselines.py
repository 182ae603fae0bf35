"""Equal-bytes baselines: random real images, class-balanced, that fit in a byte budget.

`random` keeps them as raw uint8 (C*H*W bytes each: B // (C*H*W) images in all). `png`, `jpeg`
and `webp` compress each image on its own with Pillow (PNG lossless at maximum compression;
JPEG and WebP at the given quality, 90 by default) and count the actual encoded bytes; the
network then trains on the decoded (lossy) pixels. Images are taken round-robin over classes, in
an order drawn per class from the seed, until the next image does not fit: per-class counts differ
by at most one. Labels are implied by storing images grouped by class (a few bytes, not counted).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from d3codec._seed import derive_seed
from d3codec.errors import BudgetError, ConfigError

CODECS = ("random", "png", "jpeg", "webp")
DEFAULT_QUALITY = {"jpeg": 90, "webp": 90}


@dataclass
class BaselineSet:
    """The chosen images (decoded, as a user of the codec would see them) and their cost."""

    codec: str
    quality: Optional[int]
    images: np.ndarray  # (n, H, W, C) uint8
    labels: np.ndarray  # (n,) int64
    indices: np.ndarray  # positions in the train split
    bytes_used: int
    budget_bytes: int

    def per_class(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()


def encode_image(image: np.ndarray, codec: str, quality: Optional[int]) -> tuple[int, np.ndarray]:
    """Encoded size in bytes and decoded pixels (H, W, C) of one uint8 image under `codec`."""
    if codec == "random":
        return image.nbytes, image
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image, "L" if channels == 1 else "RGB")
    buf = io.BytesIO()
    if codec == "png":
        pil.save(buf, format="PNG", optimize=True, compress_level=9)
    elif codec == "jpeg":
        pil.save(buf, format="JPEG", quality=quality, optimize=True)
    elif codec == "webp":
        pil.save(buf, format="WEBP", quality=quality, method=6)
    else:
        raise ConfigError(f"unknown --baseline {codec!r}; choose one of {', '.join(CODECS)}")
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as decoded:
        arr = np.asarray(decoded.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return len(data), arr[..., None] if arr.ndim == 2 else arr


def select_baseline(train: Any, budget_bytes: int, codec: str = "random", *, quality: Optional[int] = None,
                    seed: int = 0) -> BaselineSet:
    """Random real images of `train` (an `ImageDataset`), class-balanced, fitting `budget_bytes`."""
    if codec not in CODECS:
        raise ConfigError(f"unknown --baseline {codec!r}; choose one of {', '.join(CODECS)}")
    if quality is None:
        quality = DEFAULT_QUALITY.get(codec)
    elif codec in ("random", "png"):
        raise ConfigError(f"--quality applies to jpeg and webp, not {codec}; leave it out")
    elif not 1 <= quality <= 100:
        raise ConfigError(f"--quality must be 1..100, got {quality}")
    orders = []
    for c in range(train.num_classes):
        members = train.indices_of_class(c)
        perm = torch.randperm(len(members), generator=torch.Generator().manual_seed(derive_seed(seed, c, "baseline")))
        orders.append(members[perm.numpy()])
    chosen: list[tuple[int, int, np.ndarray]] = []
    used, rnd = 0, 0
    full = False
    while not full:
        progressed = False
        for c, order in enumerate(orders):
            if rnd >= len(order):
                continue
            idx = int(order[rnd])
            size, pixels = encode_image(train.uint8([idx])[0], codec, quality)
            if used + size > budget_bytes:
                full = True
                break
            chosen.append((idx, c, pixels))
            used += size
            progressed = True
        rnd += 1
        full = full or not progressed
    if not chosen:
        raise BudgetError(f"budget of {budget_bytes} bytes holds no {codec} image of {train.name}; give a larger --budget")
    return BaselineSet(codec=codec, quality=quality,
                       images=np.stack([p for _, _, p in chosen]),
                       labels=np.asarray([c for _, c, _ in chosen], dtype=np.int64),
                       indices=np.asarray([i for i, _, _ in chosen], dtype=np.int64),
                       bytes_used=used, budget_bytes=budget_bytes)


class TensorBatches:
    """Shuffled batches of an in-memory image set, re-iterable per epoch (order from the seed).

    With `one_batch`, an epoch is a single batch: epoch e is batch e mod B of pass e // B over a
    shuffled order (B batches per pass), so `steps` one-batch epochs train exactly `steps` steps."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                 one_batch: bool = False) -> None:
        self.images, self.labels, self.batch_size, self.seed = images, labels, batch_size, seed
        self.one_batch = one_batch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):  # type: ignore[no-untyped-def]
        per_pass = -(-len(self.labels) // self.batch_size)
        epoch, only = (self.epoch // per_pass, self.epoch % per_pass) if self.one_batch else (self.epoch, None)
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, "order"))
        order = torch.randperm(len(self.labels), generator=g).to(self.labels.device)
        for b, s in enumerate(range(0, len(order), self.batch_size)):
            if only is not None and b != only:
                continue
            idx = order[s:s + self.batch_size]
            yield self.images[idx], self.labels[idx]
