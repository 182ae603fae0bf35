"""Keep freed memory in the process (glibc), opt-in: training loops free and reallocate tens-of-MB
activation buffers every step, and glibc's default hands each one back to the kernel (mmap above
32 MB, heap trimming), so every step pays again in page faults. With `D3CODEC_MALLOC_TUNING=1` the
CLI turns this off: CPU training steps run 1.5-1.8x faster, at a higher peak memory (the
Tiny-ImageNet-100 1ipc encode: 5.2 GB instead of 3.9 GB; RESULTS.md, "Malloc tuning"). Library
users may call `keep_freed_memory(force=True)`. Changes speed and memory only, never results."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
#: Free memory at the top of the heap beyond this is still returned to the kernel.
TRIM_THRESHOLD = 1 << 30
#: Set to 1 to turn the tuning on in the CLI.
ENV = "D3CODEC_MALLOC_TUNING"


def keep_freed_memory(force: bool = False) -> bool:
    """Serve large allocations from the heap and trim it only past `TRIM_THRESHOLD`, when `force`
    or `D3CODEC_MALLOC_TUNING=1`; True when set (Linux with glibc), else False and nothing changes."""
    if not (force or os.environ.get(ENV, "0") == "1") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
