"""`ImageDataset`: one split of a cached dataset (or a class subset of it), read from the memmap.

Images stay uint8 on disk (N x H x W x C); `batch(indices, device)` gathers rows, moves the
uint8 bytes to the device and normalises there: `(pixel01 - mean) / std` per channel, with the
train split's mean and std (also for the test split and for subsets, so every view shares one
pixel space). `subset(classes)` is a view of the same cache; its labels are remapped to
0..len(classes)-1 in the given order (`remap=False` keeps the global labels).
"""
from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from d3codec.data.cache import CacheEntry
from d3codec.errors import DatasetError
from d3codec.format.types import Metadata


class ImageDataset:
    """Images and labels of one split (`train` or `test`), possibly restricted to some classes."""

    def __init__(self, entry: CacheEntry, split: str, classes: Optional[Sequence[int]] = None,
                 remap: bool = True) -> None:
        if split not in ("train", "test"):
            raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
        meta = entry.meta
        self.entry, self.split = entry, split
        c, h, w = meta["image_shape"]
        total = meta["num_train"] + meta["num_test"]
        expected = total * c * h * w
        if os.path.getsize(entry.images_path) != expected:
            raise DatasetError(f"cache entry {entry.path} is damaged (size mismatch); delete it to rebuild")
        images = np.memmap(entry.images_path, dtype=np.uint8, mode="r", shape=(total, h, w, c)) if total else \
            np.zeros((0, h, w, c), dtype=np.uint8)
        labels = np.load(entry.labels_path, mmap_mode="r")
        lo, hi = (0, meta["num_train"]) if split == "train" else (meta["num_train"], total)
        all_names: list[str] = list(meta["class_names"])
        global_labels = np.asarray(labels[lo:hi], dtype=np.int64)
        if classes is None:
            self.classes: tuple[int, ...] = tuple(range(len(all_names)))
            self._rows = np.arange(lo, hi, dtype=np.int64)
            self.labels = global_labels
        else:
            self.classes = tuple(int(k) for k in classes)
            bad = [k for k in self.classes if not 0 <= k < len(all_names)]
            if bad or len(set(self.classes)) != len(self.classes) or not self.classes:
                raise DatasetError(f"class subset {list(classes)[:8]} must be distinct ids in 0..{len(all_names) - 1}")
            lookup = np.full(len(all_names), -1, dtype=np.int64)
            lookup[list(self.classes)] = np.arange(len(self.classes))
            local = lookup[global_labels]
            keep = local >= 0
            self._rows = np.flatnonzero(keep).astype(np.int64) + lo
            self.labels = local[keep] if remap else global_labels[keep]
        self.remapped = classes is not None and remap
        self.class_names = [all_names[k] for k in self.classes] if self.remapped else all_names
        self.num_classes = len(self.class_names)
        self._images = images
        self._per_class: dict[int, np.ndarray] = {}

    # ---- description ----
    @property
    def name(self) -> str:
        return str(self.entry.meta["name"])

    @property
    def fingerprint(self) -> str:
        """Digest of the decoded images, labels, class names and split sizes (same for both splits):
        the same data from another copy of its source (other paths, other mtimes) has the same one."""
        return str(self.entry.meta["fingerprint"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        c, h, w = self.entry.meta["image_shape"]
        return (int(c), int(h), int(w))

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean of the train split, in [0, 1] pixel units."""
        return tuple(self.entry.meta["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel standard deviation of the train split, in [0, 1] pixel units."""
        return tuple(self.entry.meta["std"])

    @property
    def skipped_images(self) -> list[str]:
        """Unreadable files left out when the cache was built with skip_bad_images."""
        return list(self.entry.meta.get("skipped_images", []))

    @property
    def conversion_note(self) -> Optional[str]:
        """One line on images made uniform while the cache was built (an ImageFolder of mixed sizes,
        or of grey and colour images), or None when every image already matched."""
        meta = self.entry.meta
        resized, converted = int(meta.get("resized_images", 0)), int(meta.get("converted_images", 0))
        if not (resized or converted):
            return None
        c, h, w = meta["image_shape"]
        total = meta["num_train"] + meta["num_test"]
        parts = []
        if resized:
            parts.append(f"{resized:,} of {total:,} images resized to {w}x{h} (the first images' size; "
                         "pass --resolution N to choose)")
        if converted:
            parts.append(f"{converted:,} {'grey' if c == 3 else 'colour'} images converted to "
                         f"{'RGB' if c == 3 else 'grey'}")
        return f"{meta['name']}: " + "; ".join(parts)

    @property
    def test_held_out(self) -> bool:
        """True when the test split was held out of a source that has none (see `split.py`)."""
        return bool(self.entry.meta["test_held_out"])

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return (f"ImageDataset({self.name!r}, split={self.split!r}, images={len(self)}, "
                f"classes={self.num_classes}, shape={self.image_shape})")

    def metadata(self) -> Metadata:
        """The `.d3` metadata describing these images (name, classes, shape, normalisation)."""
        return Metadata(name=self.name, num_classes=self.num_classes, class_names=list(self.class_names),
                        image_shape=self.image_shape, mean=self.mean, std=self.std,
                        fingerprint=self.fingerprint)

    # ---- views ----
    def subset(self, classes: Sequence[int], remap: bool = True) -> "ImageDataset":
        """The images of `classes` (global class ids), a view of the same cache."""
        if self.classes != tuple(range(len(self.entry.meta["class_names"]))):
            allowed = set(self.classes)
            if any(int(k) not in allowed for k in classes):
                raise DatasetError(f"classes {list(classes)[:8]} are not all in this subset {list(self.classes)[:8]}")
        return ImageDataset(self.entry, self.split, classes, remap)

    def other_split(self) -> "ImageDataset":
        """The same view of the other split (train <-> test)."""
        full = self.classes == tuple(range(len(self.entry.meta["class_names"])))
        return ImageDataset(self.entry, "test" if self.split == "train" else "train",
                            None if full else self.classes, self.remapped or full)

    def indices_of_class(self, c: int) -> np.ndarray:
        """Positions (in this view) of the images labelled `c`."""
        if c not in self._per_class:
            self._per_class[c] = np.flatnonzero(self.labels == c)
        return self._per_class[c]

    def class_counts(self) -> np.ndarray:
        """Images per class of this view, indexed by label as `labels` gives it (remapped or global)."""
        size = len(self.classes) if self.remapped else len(self.entry.meta["class_names"])
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=size)

    # ---- data ----
    def uint8(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Raw images (n, H, W, C) uint8 at `indices` of this view."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} images")
        return np.asarray(self._images[self._rows[idx]])

    def batch(self, indices: Sequence[int] | np.ndarray, device: "torch.device | str" = "cpu") -> "torch.Tensor":
        """Float32 images [n, C, H, W], normalised `(pixel01 - mean) / std`, on `device`."""
        return normalize_uint8(self.uint8(indices), self.mean, self.std, device)

    def label_tensor(self, indices: Sequence[int] | np.ndarray, device: "torch.device | str" = "cpu") -> "torch.Tensor":
        """int64 labels [n] at `indices`, on `device`."""
        return torch.from_numpy(self.labels[np.asarray(indices, dtype=np.int64)]).to(device)

    def batches(self, batch_size: int, *, generator: "torch.Generator", device: "torch.device | str" = "cpu",
                shuffle: bool = True) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
        """One epoch of (images, labels) batches; the order is drawn from `generator`."""
        n = len(self)
        order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            yield self.batch(idx, device), self.label_tensor(idx, device)


def normalize_uint8(images: np.ndarray, mean: Sequence[float], std: Sequence[float],
                    device: "torch.device | str" = "cpu") -> "torch.Tensor":
    """uint8 (n, H, W, C) -> float32 [n, C, H, W] `(p/255 - mean) / std` on `device`."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous()
