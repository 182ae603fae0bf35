"""Checks on the files a command writes, made before any work: nothing is lost, nothing found late.

`check_output_file` refuses an output that is a folder, whose folder is missing or not writable,
or that would replace one of the command's inputs (the same file, or a file inside an input folder).
"""
from __future__ import annotations

import os
import tempfile
from typing import Iterable, Optional, Union

from d3codec.errors import ConfigError

PathLike = Union[str, "os.PathLike[str]"]


def _inside(path: str, folder: str) -> bool:
    """Whether the resolved `path` lies under the resolved `folder`."""
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # different drives
        return False


def check_not_input(output: PathLike, inputs: Iterable[Optional[PathLike]], option: str = "-o") -> None:
    """Refuse an `output` that is one of `inputs` or an existing file inside an input folder."""
    out = os.path.realpath(os.path.expanduser(os.fspath(output)))
    for given in inputs:
        if given is None:
            continue
        src = os.path.expanduser(os.fspath(given))
        if not os.path.exists(src):
            continue
        real = os.path.realpath(src)
        same = os.path.exists(out) and os.path.samefile(out, real)
        if same or (os.path.isdir(real) and os.path.exists(out) and _inside(out, real)):
            what = "is" if same else "is a file inside"
            raise ConfigError(f"{option} {os.fspath(output)} {what} the input {os.fspath(given)}; writing it would "
                              f"destroy the input: choose another {option} path")


def check_writable_folder(folder: str, option: str = "-o") -> None:
    """Refuse a folder that is missing, not a folder, or where no file can be created (probed)."""
    if not os.path.isdir(folder):
        raise ConfigError(f"output folder {folder} does not exist; create it or choose another {option} path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".d3codec-write-test-", dir=folder)
    except OSError as exc:
        raise ConfigError(f"cannot write to folder {folder} ({exc.strerror or exc}); "
                          f"choose a writable {option} path") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(output: PathLike, inputs: Iterable[Optional[PathLike]] = (), option: str = "-o",
                      example: str = "out.d3") -> None:
    """`output` can be written as a file, and writing it destroys none of `inputs`."""
    path = os.path.expanduser(os.fspath(output))
    if os.path.isdir(path):
        raise ConfigError(f"{option} {os.fspath(output)} is a folder; give a file path inside it, "
                          f"e.g. {os.path.join(os.fspath(output), example)}")
    check_not_input(path, inputs, option)
    check_writable_folder(os.path.dirname(os.path.abspath(path)), option)
