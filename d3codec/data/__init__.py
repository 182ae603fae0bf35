"""Real datasets: resolve a dataset argument, decode it once into a uint8 memmap cache, read batches.

`open_dataset(spec, split="train"|"test", ...) -> ImageDataset`. `spec` is a builtin name
(`digits`, embedded; `mnist`, `cifar10`, `cifar100`, `tinyimagenet`, `imagenet` from
`data_dir`), an ImageFolder directory (class order = sorted folder names) or an uncompressed
`.tar` of one (read in place, see `tar.py`), or an `.npz` file
(`x` (N,H,W[,C]) uint8, `y` (N,) ints). Every source has a test split: the official one where
the source has it (MNIST t10k, CIFAR test batches, TinyImageNet val, `test/` or `val/` class
folders beside `train/`), else a held-out 10% of each class that train excludes (`split.py`).
"""
from __future__ import annotations

from typing import Optional

from d3codec.data.cache import default_cache_dir, open_or_build
from d3codec.data.dataset import ImageDataset, normalize_uint8
from d3codec.data.sources import BUILTINS, IMAGE_EXTENSIONS, resolve_source
from d3codec.data.split import HOLDOUT_FRACTION
from d3codec.errors import DatasetError

__all__ = ["open_dataset", "ImageDataset", "normalize_uint8", "default_cache_dir", "BUILTINS",
           "IMAGE_EXTENSIONS", "HOLDOUT_FRACTION"]


def open_dataset(spec: str, *, data_dir: Optional[str] = None, split: str = "train",
                 resolution: Optional[int] = None, skip_bad_images: bool = False,
                 cache_dir: Optional[str] = None, progress: bool = True,
                 workers: Optional[int] = None) -> ImageDataset:
    """One split of a dataset, decoding it into the cache on first use (see module docstring).

    `resolution` resizes every image to resolution x resolution (default: native size, that of
    the first image for folders). Unreadable images raise `DatasetError` naming them, unless
    `skip_bad_images`. `cache_dir` defaults to `$D3CODEC_CACHE` or `~/.cache/d3codec`;
    `workers` is the number of decoding processes (default: CPU count, at most 8).
    """
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    source = resolve_source(spec, data_dir)
    entry = open_or_build(source, spec, data_dir=data_dir, resolution=resolution,
                          skip_bad_images=skip_bad_images, cache_dir=cache_dir, progress=progress,
                          workers=workers)
    return ImageDataset(entry, split)
