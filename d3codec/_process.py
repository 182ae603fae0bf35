"""Child processes that end with their parent: a killed `encode --nproc N` (SIGTERM from a
scheduler, or SIGKILL) must not leave its ranks training on and writing into the cache."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

#: prctl option (linux/prctl.h): the signal this process gets when its parent exits.
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Have the kernel send this process SIGKILL when its parent exits (Linux; elsewhere nothing),
    and exit now if `parent` (the pid it was started from) is already gone."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)
