"""The decoded-image cache: one uint8 memory-mapped array per dataset, keyed by fingerprint.

Layout of `<cache_dir>/datasets/<source key>-<fingerprint>/`:
`images.u8` (raw uint8, N x H x W x C, train rows then test rows), `labels.npy` (int64, N),
`meta.json` (class names, shape, split sizes, train per-channel mean/std in [0, 1] pixel units,
skipped files). The fingerprint hashes the source identity (file contents, or a folder's listing
with sizes and mtimes) and the decoding settings, so a changed source gets a new entry; the
stale entry of the same source is removed. Entries are built in a temporary folder and renamed
into place, so a cache entry is either complete or absent.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from d3codec.data import _decode
from d3codec.data.sources import ArrayItems, FileItems, Items, Source
from d3codec.errors import DatasetError

#: Bumped whenever the cache layout or decoding changes (it is part of every fingerprint).
CACHE_VERSION = 1
#: Images per worker task (one pwrite each).
CHUNK = 64
_MAX_WORKERS = 8


def default_cache_dir() -> str:
    """`$D3CODEC_CACHE`, else `~/.cache/d3codec`."""
    return os.environ.get("D3CODEC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "d3codec")


@dataclass
class CacheEntry:
    """A complete cache entry: its folder and parsed `meta.json`."""

    path: str
    meta: dict[str, Any]

    @property
    def images_path(self) -> str:
        return os.path.join(self.path, "images.u8")

    @property
    def labels_path(self) -> str:
        return os.path.join(self.path, "labels.npy")


def _settings(resolution: Optional[int], skip_bad_images: bool) -> dict[str, Any]:
    return {"cache_version": CACHE_VERSION, "resolution": resolution, "skip_bad_images": bool(skip_bad_images)}


def fingerprint(source: Source, resolution: Optional[int], skip_bad_images: bool) -> str:
    """Hash of the source identity and the decoding settings (32 hex digits)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(source.kind.encode() + b"\0" + source.identity + b"\0")
    h.update(json.dumps(_settings(resolution, skip_bad_images), sort_keys=True).encode())
    return h.hexdigest()


def _source_key(spec: str, data_dir: Optional[str], resolution: Optional[int], skip: bool) -> str:
    """Names the source independently of its contents (to find stale entries)."""
    where = os.path.abspath(os.path.expanduser(spec)) if os.path.exists(os.path.expanduser(spec)) else spec
    text = json.dumps([where, os.path.abspath(data_dir) if data_dir else None, resolution, skip])
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def open_or_build(source: Source, spec: str, *, data_dir: Optional[str], resolution: Optional[int],
                  skip_bad_images: bool, cache_dir: Optional[str], progress: bool,
                  workers: Optional[int] = None) -> CacheEntry:
    """The cache entry of `source`, built (and stale entries of the same source removed) if absent."""
    if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
        raise DatasetError(f"--resolution must be a positive number of pixels, got {resolution!r}")
    root = os.path.join(cache_dir or default_cache_dir(), "datasets")
    fp = fingerprint(source, resolution, skip_bad_images)
    key = _source_key(spec, data_dir, resolution, skip_bad_images)
    final = os.path.join(root, f"{key}-{fp}")
    meta_path = os.path.join(final, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            return CacheEntry(final, json.load(f))
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot create cache folder {root}: {exc.strerror}; set $D3CODEC_CACHE or --cache-dir") from None
    tmp = os.path.join(root, f".{key}-{fp}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        meta = _build(source, tmp, fp, resolution, progress, workers, skip_bad_images)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isfile(meta_path):  # not a concurrent builder winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for entry in os.listdir(root):  # drop entries of the same source with other contents
        if entry.startswith(f"{key}-") and entry != f"{key}-{fp}":
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
    if meta["skipped_images"]:
        names = meta["skipped_images"]
        warnings.warn(f"skipped {len(names)} unreadable images: {', '.join(names[:5])}"
                      + (" ..." if len(names) > 5 else ""), stacklevel=3)
    return CacheEntry(final, meta)


def _target_shape(train: Items, test: Items, resolution: Optional[int]) -> tuple[tuple[int, int], int]:
    """(W, H) and channels of the cached images."""
    if isinstance(train, ArrayItems):
        _, h, w, c = train.x.shape
        return ((resolution, resolution) if resolution else (w, h)), c
    assert isinstance(train, FileItems) and isinstance(test, FileItems)
    firsts = [train.paths[i] for i in np.unique(train.labels, return_index=True)[1]]
    found = _decode.probe(firsts + train.paths[:64] + test.paths[:8])
    if found is None:
        raise DatasetError(f"none of the first images of {os.path.dirname(firsts[0])} can be read; check the files")
    size, channels = found
    return ((resolution, resolution) if resolution else size), channels


def _count(items: Items) -> int:
    return len(items.labels) if isinstance(items, FileItems) else len(items.y)


def _bar(progress: bool, total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False,
                disable=not (progress and sys.stderr.isatty()))


def _build(source: Source, tmp: str, fp: str, resolution: Optional[int], progress: bool,
           workers: Optional[int], skip_bad: bool) -> dict[str, Any]:
    class_names, train, test = source.load()
    size, channels = _target_shape(train, test, resolution)
    w, h = size
    n_train, n_test = _count(train), _count(test)
    total = n_train + n_test
    if n_train == 0:
        raise DatasetError(f"{source.name} has no training images; check the dataset")
    images_path = os.path.join(tmp, "images.u8")
    row_bytes = h * w * channels
    with open(images_path, "wb") as f:
        f.truncate(total * row_bytes)
    with _bar(progress, total, f"decoding {source.name}") as bar:
        if isinstance(train, ArrayItems) and isinstance(test, ArrayItems):
            bad_rows: list[int] = []
            sums, sqs = _write_arrays(images_path, [train.x, test.x], size, channels, n_train, bar)
            names: list[str] = []
            labels = np.concatenate([train.y, test.y]).astype(np.int64)
        else:
            assert isinstance(train, FileItems) and isinstance(test, FileItems)
            paths = train.paths + test.paths
            names = train.names + test.names
            labels = np.concatenate([train.labels, test.labels]).astype(np.int64)
            bad_rows, sums, sqs = _decode_files(images_path, paths, size, channels, n_train, bar, workers)
    skipped: list[str] = []
    if bad_rows:
        bad_names = [names[i] for i in sorted(bad_rows)]
        if not skip_bad:
            shown = ", ".join(bad_names[:5]) + (" ..." if len(bad_names) > 5 else "")
            raise DatasetError(f"{len(bad_names)} unreadable image(s) in {source.name}: {shown}; "
                               "fix or delete them, or pass --skip-bad-images to continue without them")
        keep = np.ones(total, dtype=bool)
        keep[bad_rows] = False
        _compact(images_path, keep, row_bytes)
        n_train, n_test = int(keep[:n_train].sum()), int(keep[n_train:].sum())
        labels = labels[keep]
        skipped = bad_names
        if n_train == 0:
            raise DatasetError(f"every training image of {source.name} is unreadable; check the files")
    count = max(n_train, 1) * h * w
    mean = sums / count
    std = np.sqrt(np.maximum(sqs / count - mean**2, 0.0))
    mean, std = mean / 255.0, np.maximum(std / 255.0, 1e-6)
    np.save(os.path.join(tmp, "labels.npy"), labels)
    meta = {
        "cache_version": CACHE_VERSION,
        "name": source.name,
        "kind": source.kind,
        "fingerprint": fp,
        "class_names": list(class_names),
        "image_shape": [channels, h, w],
        "layout": "NHWC",
        "num_train": int(n_train),
        "num_test": int(n_test),
        "test_held_out": bool(source.held_out),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "resolution": resolution,
        "skipped_images": skipped,
    }
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def _write_arrays(path: str, arrays: list[np.ndarray], size: tuple[int, int], channels: int,
                  n_train: int, bar: tqdm) -> tuple[np.ndarray, np.ndarray]:
    """Copy (and resize) in-memory images into the cache file, chunk by chunk."""
    sums, sqs = np.zeros(channels), np.zeros(channels)
    fd = os.open(path, os.O_WRONLY)
    try:
        row = 0
        for x in arrays:
            for s in range(0, len(x), 1024):
                chunk = x[s:s + 1024]
                if chunk.shape[1:3] != (size[1], size[0]):
                    mode = "L" if chunk.shape[-1] == 1 else "RGB"
                    chunk = np.stack([_decode.to_array(Image.fromarray(im[..., 0] if mode == "L" else im, mode),
                                                       size, channels) for im in chunk])
                _decode.write_rows(fd, row, chunk)
                n = min(len(chunk), max(n_train - row, 0))
                if n:
                    s1, s2 = _decode.pixel_sums(chunk[:n])
                    sums, sqs = sums + s1, sqs + s2
                row += len(chunk)
                bar.update(len(chunk))
    finally:
        os.close(fd)
    return sums, sqs


def _decode_files(path: str, paths: list[str], size: tuple[int, int], channels: int, n_train: int,
                  bar: tqdm, workers: Optional[int]) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Decode image files into the cache file, in worker processes for large sets."""
    workers = min(os.cpu_count() or 1, _MAX_WORKERS) if workers is None else max(1, workers)
    tasks = [(s, paths[s:s + CHUNK]) for s in range(0, len(paths), CHUNK)]
    bad: list[int] = []
    sums, sqs = np.zeros(channels), np.zeros(channels)

    def collect(result: tuple[int, int, list[int], np.ndarray, np.ndarray]) -> None:
        nonlocal sums, sqs
        _, n, b, s1, s2 = result
        bad.extend(b)
        sums, sqs = sums + s1, sqs + s2
        bar.update(n)

    if workers == 1 or len(paths) < 4 * CHUNK:
        fd = os.open(path, os.O_WRONLY)
        try:
            for start, chunk in tasks:
                collect(_decode.decode_into(fd, start, chunk, size, channels, n_train))
        finally:
            os.close(fd)
    else:
        # fork (as torch's DataLoader on Linux): unlike spawn, it does not re-import the user's
        # __main__ script in every worker; workers use only numpy and Pillow, never torch.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        ctx = multiprocessing.get_context(method)
        with ctx.Pool(workers, initializer=_decode.init_worker, initargs=(path, size, channels, n_train)) as pool:
            for result in pool.imap_unordered(_decode.decode_chunk, tasks):
                collect(result)
    return bad, sums, sqs


def _compact(path: str, keep: np.ndarray, row_bytes: int) -> None:
    """Drop the rows where `keep` is False, moving later rows down in place, then truncate."""
    fd = os.open(path, os.O_RDWR)
    try:
        dst = 0
        for src in np.flatnonzero(keep):
            if src != dst:
                os.pwrite(fd, os.pread(fd, row_bytes, int(src) * row_bytes), dst * row_bytes)
            dst += 1
        os.ftruncate(fd, dst * row_bytes)
    finally:
        os.close(fd)
