"""Atomic writes: a file (or folder) appears whole at its path, or not at all, and the old one stays.

`.d3` files, checkpoints, expert files, sample pictures, federated markers, the dataset cache and
exported folders are written here. The new content goes under a temporary name in the target's
folder (so the rename never crosses file systems), is flushed and fsynced, then renamed onto the
target with `os.replace`; on any failure, an interrupt included, the temporary file is removed
and the target is left as it was.

    with atomic_file(path) as f:        # a binary file object
        f.write(data)
    with atomic_path(path) as tmp:      # a path, for writers that open the file themselves
        save_file(tensors, tmp)
    write_atomic(path, data)            # bytes, or an iterable of byte strings
    with atomic_folder(path) as stage:  # a whole folder, renamed into place when complete
        ...
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import BinaryIO, Iterable, Iterator, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

#: Permissions of a finished file (what `open` gives under the usual umask 022; temporary files are
#: created 0600).
FILE_MODE = 0o644


class TempFileError(OSError):
    """The temporary file (or folder) beside the target could not be created: its folder is
    missing or not writable. Callers that tell this apart from a failed write catch it first."""


def _folder(path: PathLike) -> str:
    return os.path.dirname(os.fspath(path)) or "."


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@contextmanager
def atomic_path(path: PathLike, *, suffix: str = "", mode: int = FILE_MODE) -> Iterator[str]:
    """Yield a temporary path beside `path`; when the block ends normally, the file written there is
    fsynced, given `mode` and renamed onto `path`. On any exception the temporary file is removed and
    `path` is untouched. `suffix` ends the temporary name (for writers that read the extension)."""
    name = os.path.basename(os.fspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=_folder(path), prefix=f".{name}.tmp-", suffix=suffix)
    except OSError as exc:
        raise TempFileError(exc.errno, exc.strerror, _folder(path)) from None
    os.close(fd)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_file(path: PathLike, *, suffix: str = "", mode: int = FILE_MODE) -> Iterator[BinaryIO]:
    """Yield a binary file open for writing; its content replaces `path` atomically when the block
    ends normally (flushed and fsynced first). On any exception nothing changes at `path`."""
    with atomic_path(path, suffix=suffix, mode=mode) as tmp:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_atomic(path: PathLike, data: Union[bytes, bytearray, memoryview, Iterable[bytes]], *,
                 mode: int = FILE_MODE) -> int:
    """Write `data` (bytes, or byte strings in order) to `path` atomically; returns the bytes written."""
    parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    size = 0
    with atomic_file(path, mode=mode) as f:
        for part in parts:
            size += f.write(part)
    return size


@contextmanager
def atomic_folder(path: PathLike, *, stage: Optional[str] = None, done_file: Optional[str] = None,
                  replace: bool = False) -> Iterator[str]:
    """Yield a staging folder beside `path`; when the block ends normally, every file in it is
    fsynced and the folder is renamed to `path` (which must be absent or an empty folder). On any
    exception the staging folder is removed and `path` is as it was.

    `stage` names the staging folder (created fresh, a leftover of that name removed first;
    default: a unique hidden name). With `done_file`, a `path` that already holds that file when
    the rename fails (a concurrent writer finished first) is kept and the staged copy dropped.
    With `replace`, a non-empty folder at `path` is replaced: moved aside, the stage renamed in,
    then removed (moved back if the rename fails); the caller decides it may go.
    """
    path = os.fspath(path)
    try:
        if stage is None:
            stage = tempfile.mkdtemp(dir=_folder(path), prefix=f".{os.path.basename(path)}.tmp-")
        else:
            shutil.rmtree(stage, ignore_errors=True)
            os.makedirs(stage)
    except OSError as exc:
        raise TempFileError(exc.errno, exc.strerror, _folder(path)) from None
    try:
        yield stage
        for root, _, files in os.walk(stage):
            for name in files:
                _fsync(os.path.join(root, name))
        if replace and os.path.isdir(path) and os.listdir(path):
            _swap_in(stage, path)
            return
        try:
            os.rename(stage, path)
        except OSError:
            if done_file is None or not os.path.isfile(os.path.join(path, done_file)):
                raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _swap_in(stage: str, path: str) -> None:
    """Rename `stage` onto the non-empty folder `path`: the old folder is moved aside first and
    removed once the new one is in place (and moved back if that rename fails)."""
    old = tempfile.mkdtemp(dir=_folder(path), prefix=f".{os.path.basename(path)}.old-")
    os.rmdir(old)
    os.rename(path, old)
    try:
        os.rename(stage, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
