"""The decoded-image cache: one uint8 memory-mapped array per dataset, keyed by source fingerprint.

Layout of `<cache_dir>/datasets/<source key>-<source fingerprint>/`:
`images.u8` (raw uint8, N x H x W x C, train rows then test rows), `labels.npy` (int64, N),
`meta.json` (class names, shape, split sizes, train per-channel mean/std in [0, 1] pixel units,
skipped files). The entry is keyed by the source fingerprint: the source identity (file contents,
or a folder's or tar's listing with sizes and mtimes) and the decoding settings, so a changed source
gets a new entry; the stale entry of the same source is removed. The dataset's `fingerprint` is the
content digest of what was decoded (images, labels, class names, split sizes), so a copied or
re-downloaded source (new mtimes, same images) keeps it, and with it its cached experts and its
files' provenance. Entries are built in a temporary folder and renamed
into place (`d3codec.format.atomic.atomic_folder`), so a cache entry is either complete or absent.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
from PIL import Image

from d3codec.data import _decode
from d3codec.data.sources import ArrayItems, FileItems, Items, Source
from d3codec.data.tar import ImageRef
from d3codec.errors import DatasetError
from d3codec.format.atomic import atomic_folder
from d3codec.models.registry import image_size_range
from d3codec.progress import Progress

#: Bumped whenever the cache layout or decoding changes (it is part of every source fingerprint).
CACHE_VERSION = 3
#: Images per worker task (one pwrite each).
CHUNK = 64
_MAX_WORKERS = 8
#: Marks a cache entry being built: `.<entry>.tmp-<host>-<pid>`.
_TMP_MARK = ".tmp-"


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
    lo, hi = image_size_range()
    if resolution is not None and not lo <= resolution <= hi:
        raise DatasetError(f"--resolution {resolution} is outside what d3codec's decoders draw ({lo} to {hi} "
                           f"pixels); choose a resolution in {lo}..{hi}")
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
    _remove_stale_builds(root)
    stage = os.path.join(root, f".{key}-{fp}{_TMP_MARK}{_host()}-{os.getpid()}")
    with atomic_folder(final, stage=stage, done_file="meta.json") as tmp:  # or a concurrent builder's entry
        meta = _build(source, tmp, fp, resolution, progress, workers, skip_bad_images)
    for entry in os.listdir(root):  # drop entries of the same source with other contents
        if entry.startswith(f"{key}-") and entry != f"{key}-{fp}":
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
    if meta["skipped_images"]:
        names = meta["skipped_images"]
        warnings.warn(f"skipped {len(names)} unreadable images: {', '.join(names[:5])}"
                      + (" ..." if len(names) > 5 else ""), stacklevel=3)
    return CacheEntry(final, meta)


def _host() -> str:
    return "".join(ch for ch in socket.gethostname() if ch.isalnum() or ch in "-_") or "host"


def _remove_stale_builds(root: str) -> None:
    """Remove the temporary folders of builds on this host whose process is gone (killed, e.g. out of
    memory, where no cleanup could run); builds of live processes and of other hosts are left alone."""
    prefix = _TMP_MARK + _host() + "-"
    for entry in os.listdir(root):
        at = entry.rfind(prefix)
        if not entry.startswith(".") or at < 0 or not entry[at + len(prefix):].isdigit():
            continue
        pid = int(entry[at + len(prefix):])
        try:
            os.kill(pid, 0)
            continue  # alive (possibly a concurrent build)
        except ProcessLookupError:
            pass
        except OSError:
            continue  # exists but is not ours to signal
        shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def _target_shape(train: Items, test: Items, resolution: Optional[int]) -> tuple[tuple[int, int], int]:
    """(W, H) and channels of the cached images."""
    if isinstance(train, ArrayItems):
        _, h, w, c = train.x.shape
        return ((resolution, resolution) if resolution else (w, h)), c
    assert isinstance(train, FileItems)
    probes: list[ImageRef] = []
    for c in range(min(len(train.counts), 64)):  # the first images of up to 64 classes
        probes += [p for p, _ in train.files_of(c)[:2]]
    found = _decode.probe(probes)
    if found is None:
        where = os.path.dirname(os.path.dirname(probes[0])) if isinstance(probes[0], str) else probes[0][0]
        raise DatasetError(f"none of the first images of {where} can be read; check the files")
    size, channels = found
    return ((resolution, resolution) if resolution else size), channels


def _count(items: Items) -> int:
    return len(items) if isinstance(items, FileItems) else len(items.y)


def _build(source: Source, tmp: str, fp: str, resolution: Optional[int], progress: bool,
           workers: Optional[int], skip_bad: bool) -> dict[str, Any]:
    class_names, train, test = source.load()
    size, channels = _target_shape(train, test, resolution)
    w, h = size
    lo, hi = image_size_range()
    if not (lo <= min(w, h) and max(w, h) <= hi):
        raise DatasetError(f"{source.name} has {w}x{h} images, outside what d3codec's decoders draw ({lo} to {hi} "
                           f"pixels a side); pass --resolution N with N in {lo}..{hi}")
    n_train, n_test = _count(train), _count(test)
    total = n_train + n_test
    if n_train == 0:
        raise DatasetError(f"{source.name} has no training images; check the dataset")
    images_path = os.path.join(tmp, "images.u8")
    row_bytes = h * w * channels
    with open(images_path, "wb") as f:
        f.truncate(total * row_bytes)
    with Progress(total, f"decoding {source.name}", unit="img", enabled=progress) as bar:
        if isinstance(train, ArrayItems) and isinstance(test, ArrayItems):
            bad_rows: list[int] = []
            bad_names: list[str] = []
            changed = [0, 0]  # arrays are resized only by an explicit --resolution
            sums, sqs = _write_arrays(images_path, [train.x, test.x], size, channels, n_train, bar)
            labels = np.concatenate([train.y, test.y]).astype(np.int64)
        else:
            assert isinstance(train, FileItems) and isinstance(test, FileItems)
            # written through a memmap, class by class: no array of N labels in memory
            labels = np.lib.format.open_memmap(os.path.join(tmp, "labels.npy"), mode="w+", dtype=np.int64,
                                               shape=(total,))
            row = 0
            for items in (train, test):
                for c, n in enumerate(items.counts):
                    labels[row:row + n] = c
                    row += n
            labels.flush()
            bad, sums, sqs, changed = _decode_files(images_path, [train, test], size, channels, n_train, bar,
                                                    workers)
            bad.sort()
            bad_rows, bad_names = [r for r, _ in bad], [n for _, n in bad]
    skipped: list[str] = []
    if bad_rows:
        if not skip_bad:
            shown = ", ".join(bad_names[:5]) + (" ..." if len(bad_names) > 5 else "")
            raise DatasetError(f"{len(bad_names)} unreadable image(s) in {source.name}: {shown}; "
                               "fix or delete them, or pass --skip-bad-images to continue without them")
        keep = np.ones(total, dtype=bool)
        keep[bad_rows] = False
        _compact(images_path, keep, row_bytes)
        n_train, n_test = int(keep[:n_train].sum()), int(keep[n_train:].sum())
        labels = np.asarray(labels)[keep]
        skipped = bad_names
        if n_train == 0:
            raise DatasetError(f"every training image of {source.name} is unreadable; check the files")
    count = max(n_train, 1) * h * w
    mean = sums / count
    std = np.sqrt(np.maximum(sqs / count - mean**2, 0.0))
    mean, std = mean / 255.0, np.maximum(std / 255.0, 1e-6)
    content = content_digest(images_path, np.asarray(labels), list(class_names), [channels, h, w],
                             int(n_train), int(n_test), progress)
    if not isinstance(labels, np.memmap):
        np.save(os.path.join(tmp, "labels.npy"), labels)
    else:
        del labels
    meta = {
        "cache_version": CACHE_VERSION,
        "name": source.name,
        "kind": source.kind,
        "fingerprint": content,
        "source_fingerprint": fp,
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
        "resized_images": int(changed[0]) if resolution is None else 0,  # --resolution resizes on purpose
        "converted_images": int(changed[1]),
    }
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def content_digest(images_path: str, labels: np.ndarray, class_names: list[str], shape: list[int],
                   n_train: int, n_test: int, progress: bool = False) -> str:
    """Hash of the decoded dataset (32 hex digits): the raw uint8 rows, the labels, the class names,
    the image shape and the split sizes; independent of where the source lies and of its mtimes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"classes": class_names, "shape": shape, "train": n_train, "test": n_test}).encode() + b"\0")
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    block = 1 << 22
    with open(images_path, "rb") as f, Progress(os.fstat(f.fileno()).st_size >> 20, "hashing the decoded images",
                                                unit="MB", enabled=progress) as bar:
        while chunk := f.read(block):
            h.update(chunk)
            bar.update(len(chunk) >> 20)
    return h.hexdigest()


def _write_arrays(path: str, arrays: list[np.ndarray], size: tuple[int, int], channels: int,
                  n_train: int, bar: Progress) -> tuple[np.ndarray, np.ndarray]:
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


def _tasks(splits: list[FileItems]) -> Iterator[tuple[int, list[str], list[str]]]:
    """(first row, paths, names) chunks of every class of every split, in row order, lazily."""
    row = 0
    for items in splits:
        for c in range(len(items.counts)):
            files = items.files_of(c)
            if len(files) != items.counts[c]:
                raise DatasetError(f"the folder of class {c} changed while it was read; run again")
            for s in range(0, len(files), CHUNK):
                part = files[s:s + CHUNK]
                yield row, [p for p, _ in part], [n for _, n in part]
                row += len(part)


def _decode_files(path: str, splits: list[FileItems], size: tuple[int, int], channels: int, n_train: int,
                  bar: Progress, workers: Optional[int]) -> tuple[list[tuple[int, str]], np.ndarray, np.ndarray, list[int]]:
    """Decode image files into the cache file, in worker processes for large sets.

    At most a few chunks per worker are in flight, and paths are listed class by class, so
    memory does not grow with the number of images. Returns the bad (row, name) pairs, pixel sums
    of the good train rows, and the counts of images resized and converted between grey and colour.
    """
    total = sum(len(items) for items in splits)
    workers = min(os.cpu_count() or 1, _MAX_WORKERS) if workers is None else max(1, workers)
    bad: list[tuple[int, str]] = []
    sums, sqs = np.zeros(channels), np.zeros(channels)
    changed = [0, 0]  # images resized, images converted between grey and colour

    def collect(result: tuple[int, int, list[int], np.ndarray, np.ndarray, int, int], names: list[str]) -> None:
        nonlocal sums, sqs
        start, n, rows, s1, s2, resized, converted = result
        bad.extend((r, names[r - start]) for r in rows)
        sums, sqs = sums + s1, sqs + s2
        changed[0] += resized
        changed[1] += converted
        bar.update(n)

    if workers == 1 or total < 4 * CHUNK:
        fd = os.open(path, os.O_WRONLY)
        try:
            for start, paths, names in _tasks(splits):
                collect(_decode.decode_into(fd, start, paths, size, channels, n_train), names)
        finally:
            os.close(fd)
        return bad, sums, sqs, changed
    # fork (as torch's DataLoader on Linux): unlike spawn, it does not re-import the user's
    # __main__ script in every worker; workers use only numpy and Pillow, never torch.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(workers, initializer=_decode.init_worker, initargs=(path, size, channels, n_train)) as pool:
        in_flight: deque = deque()
        for start, paths, names in _tasks(splits):
            in_flight.append((pool.apply_async(_decode.decode_chunk, ((start, paths),)), names))
            if len(in_flight) >= 4 * workers:
                result, done_names = in_flight.popleft()
                collect(result.get(), done_names)
        while in_flight:
            result, done_names = in_flight.popleft()
            collect(result.get(), done_names)
    return bad, sums, sqs, changed


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
