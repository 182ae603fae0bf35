"""Readers of the standard array files: IDX (MNIST), CIFAR python batches, `.npz`.

They return uint8 images `(N, H, W, C)` and int64 labels, and raise `DatasetError` with a
one-line fix for files that are not what they claim to be. CIFAR batches are pickles: they are
read with an unpickler that only builds plain containers and numpy arrays, never other code.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
from typing import Any

import numpy as np

from d3codec.errors import DatasetError

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_bytes(path: str) -> bytes:
    """Whole file, transparently gunzipped when it ends in `.gz`."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}; check that the file is complete") from None


def read_idx(path: str) -> np.ndarray:
    """An IDX array (the MNIST file format), `.gz` or not."""
    data = read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic number); use the official MNIST files")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(shape)) if shape else 1
    if len(data) != header + count * dtype.itemsize:
        raise DatasetError(f"{path} is truncated or padded (shape {shape}); re-download the file")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


class _SafeUnpickler(pickle.Unpickler):
    """Builds dicts, lists, bytes and numpy arrays only (enough for CIFAR batches)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path: str) -> dict[str, Any]:
    """One CIFAR python batch (a pickled dict) with keys decoded to str."""
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
        raise DatasetError(f"cannot read CIFAR batch {path}: {exc}; use the official python version") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path} is not a CIFAR python batch (no dict inside); use the official python version")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def cifar_images(batch: dict[str, Any], path: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Images `(N, 32, 32, 3)` and labels of one CIFAR batch."""
    if "data" not in batch or label_key not in batch:
        raise DatasetError(f"{path} has no 'data'/'{label_key}' entries; use the official CIFAR python batches")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DatasetError(f"{path}: data shape {data.shape} / {len(labels)} labels is not CIFAR (N x 3072)")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    """`x` (N,H,W) or (N,H,W,C) uint8 and `y` (N,) integer labels from an `.npz` file."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}; check the path and its permissions") from None
    if not magic.startswith(b"PK"):  # numpy.savez writes a zip archive
        what = "a single .npy array" if magic == b"\x93NUMPY" else "not an .npz (zip) archive"
        raise DatasetError(f"{path} is {what}; write the dataset with numpy.savez(path, x=images, y=labels)")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files or "y" not in z.files:
                raise DatasetError(
                    f"{path} holds {sorted(z.files)}, not 'x' and 'y'; save images as x (N,H,W[,C]) uint8 and labels as y (N,)"
                )
            x, y = z["x"], z["y"]
    except (OSError, ValueError) as exc:
        if "pickle" in str(exc):
            raise DatasetError(f"{path} holds Python objects (pickled), which d3codec does not load; save x as a "
                               "uint8 array and y as an integer array with numpy.savez(path, x=..., y=...)") from None
        raise DatasetError(f"cannot read {path} as .npz: {exc}; write it with numpy.savez(path, x=..., y=...)"
                           ) from None
    if x.dtype != np.uint8:
        raise DatasetError(f"{path}: x is {x.dtype}, not uint8; store pixels as uint8 0..255")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DatasetError(f"{path}: x has shape {x.shape}; expected (N,H,W) or (N,H,W,C) with C = 1 or 3")
    if y.ndim != 1 or len(y) != len(x):
        raise DatasetError(f"{path}: y has shape {y.shape} but x has {len(x)} images; y must be (N,) with one label per image")
    if not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{path}: y is {y.dtype}; labels must be integers 0..classes-1")
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        raise DatasetError(f"{path}: y has negative label {int(y.min())}; labels must be 0..classes-1")
    num_classes = int(y.max()) + 1 if len(y) else 0
    present = np.bincount(y, minlength=num_classes) if len(y) else np.zeros(0)
    if num_classes and (present == 0).any():
        missing = np.flatnonzero(present == 0)[:5].tolist()
        raise DatasetError(
            f"{path}: labels must be 0..{num_classes - 1} with every class present, but classes {missing} have no image; renumber y"
        )
    return x, y


def file_digest(path: str) -> bytes:
    """blake2b of a file's bytes (for fingerprints of array sources)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(str(os.path.getsize(path)).encode())
    return h.digest()
