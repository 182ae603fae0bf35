"""Image decoding for the cache builder; runs in worker processes (numpy + Pillow only, no torch).

Each task decodes a contiguous run of images and writes it into the cache file with one
`os.pwrite`, so no process maps the whole cache: memory per worker is one chunk, whatever
the number of images. A task returns the rows it could not decode and pixel sums of its
train rows (for the per-channel mean and std).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
from PIL import Image

from d3codec.data import tar

#: PIL modes without colour.
GRAY_MODES = ("L", "1", "I", "I;16", "I;16B", "I;16L", "F", "LA")
#: Exceptions that mean "this file is not a readable image".
BAD_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

_STATE: dict = {}


def to_array(img: Image.Image, size: tuple[int, int], channels: int) -> np.ndarray:
    """A PIL image as uint8 (H, W, C): converted to L or RGB, resized to `size` = (W, H)."""
    mode = "L" if channels == 1 else "RGB"
    if img.mode != mode:
        if img.mode in ("I;16", "I;16B", "I;16L", "I") and mode == "L":
            arr = np.asarray(img, dtype=np.float64)
            img = Image.fromarray(np.clip(arr / max(arr.max(), 1) * 255, 0, 255).astype(np.uint8), "L")
        else:
            img = img.convert("RGBA").convert(mode) if img.mode in ("P", "LA", "PA") else img.convert(mode)
    if img.size != size:
        img = img.resize(size, Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def decode_file(path: tar.ImageRef, size: tuple[int, int], channels: int) -> tuple[np.ndarray, bool, bool]:
    """Decode one image file or tar member fully (truncated files raise): the array, and whether it
    was resized and whether it changed between grey and colour."""
    with Image.open(tar.openable(path)) as img:
        img.load()
        resized = img.size != size
        converted = (img.mode in GRAY_MODES) != (channels == 1)
        return to_array(img, size, channels), resized, converted


def init_worker(out_path: str, size: tuple[int, int], channels: int, num_train: int) -> None:
    """Pool initializer: open the cache file for positional writes."""
    _STATE["fd"] = os.open(out_path, os.O_WRONLY)
    _STATE["size"], _STATE["channels"], _STATE["num_train"] = size, channels, num_train


def write_rows(fd: int, start: int, rows: np.ndarray) -> None:
    """Write `rows` (n, H, W, C) uint8 at row `start` of the cache file."""
    data = memoryview(np.ascontiguousarray(rows)).cast("B")
    offset = start * (rows[0].nbytes if len(rows) else 0)
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def pixel_sums(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel sum and sum of squares of uint8 rows (n, H, W, C), in float64."""
    flat = rows.reshape(-1, rows.shape[-1]).astype(np.float64)
    return flat.sum(axis=0), np.square(flat).sum(axis=0)


def decode_chunk(task: tuple[int, list[tar.ImageRef]]
                 ) -> tuple[int, int, list[int], np.ndarray, np.ndarray, int, int]:
    """Decode `paths` into rows `start...`; returns (start, count, bad rows, sums, sums of squares,
    images resized, images converted between grey and colour)."""
    start, paths = task
    return decode_into(_STATE["fd"], start, paths, _STATE["size"], _STATE["channels"], _STATE["num_train"])



def decode_into(fd: int, start: int, paths: list[tar.ImageRef], size: tuple[int, int], channels: int,
                num_train: int) -> tuple[int, int, list[int], np.ndarray, np.ndarray, int, int]:
    """Decode and write one chunk (shared by workers and the in-process path)."""
    w, h = size
    rows = np.zeros((len(paths), h, w, channels), dtype=np.uint8)
    good = np.ones(len(paths), dtype=bool)
    bad: list[int] = []
    resized = converted = 0
    for j, p in enumerate(paths):
        try:
            rows[j], r, c = decode_file(p, size, channels)
            resized, converted = resized + r, converted + c
        except BAD_IMAGE_ERRORS:
            good[j] = False
            bad.append(start + j)
    write_rows(fd, start, rows)
    train = good & (np.arange(start, start + len(paths)) < num_train)
    s, sq = pixel_sums(rows[train]) if train.any() else (np.zeros(channels), np.zeros(channels))
    return start, len(paths), bad, s, sq, resized, converted


def probe(paths: list[tar.ImageRef], limit: int = 64) -> Optional[tuple[tuple[int, int], int]]:
    """Size (W, H) of the first readable image and channels (3 if any probed image has colour)."""
    size: Optional[tuple[int, int]] = None
    channels = 1
    for p in paths[:limit]:
        try:
            with Image.open(tar.openable(p)) as img:
                img.load()
                if size is None:
                    size = img.size
                if img.mode not in ("L", "1", "I", "I;16", "I;16B", "I;16L", "F", "LA"):
                    channels = 3
        except BAD_IMAGE_ERRORS:
            continue
    return None if size is None else (size, channels)
