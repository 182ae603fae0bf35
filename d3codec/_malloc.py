"""Allocator settings for CPU training loops, which free and reallocate tens-of-MB activation
buffers every step; glibc hands each one back to the kernel (mmap above 32 MB), so every step
page-faults them in again, 4 KB at a time. Both settings change speed and memory, never results.

- `use_huge_pages` (the CLI's default): torch's tensors of 2 MB and more on transparent huge pages
  (`THP_MEM_ALLOC_ENABLE=1`), 2 MB a fault: the decoder's fit steps run 1.7x faster at less peak
  memory. Off with `THP_MEM_ALLOC_ENABLE=0`.
- `keep_freed_memory`, opt-in (`D3CODEC_MALLOC_TUNING=1`): freed memory stays in the process, so
  the ConvNet's steps run faster too (1.25-1.5x), at a higher peak (the Tiny-ImageNet-100 1ipc
  encode: 5.2 GB instead of 3.9 GB). Library users may call `keep_freed_memory(force=True)`.

RESULTS.md, "Malloc tuning"."""
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
#: torch's switch for transparent huge pages in its CPU allocator, read once, at its first allocation.
THP_ENV = "THP_MEM_ALLOC_ENABLE"


def use_huge_pages() -> bool:
    """Ask torch to put its large CPU tensors on transparent huge pages (Linux), unless `THP_ENV` is
    already set (the user's choice) or torch is already imported (too late: it reads the switch
    once); True when this call set it. Where the kernel's THP is `never` it does nothing."""
    if not sys.platform.startswith("linux") or THP_ENV in os.environ or "torch" in sys.modules:
        return False
    os.environ[THP_ENV] = "1"
    return True


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
