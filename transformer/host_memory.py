"""CPU training without a page fault per fresh tensor: glibc's malloc told to keep freed memory.

By default glibc serves an allocation above a (self-adjusting) threshold with its own ``mmap``
and gives it back to the kernel when it is freed, and trims the top of its heap when more than
128 KiB there is free. A training step allocates and frees activations of many megabytes over
and over, so each step touches fresh pages, and every 4 KiB page costs a page fault that the
kernel fills with zeros. On the 2-core machine this project is developed on, a training step
of the default Transformer took 44,000 minor page faults with glibc's defaults and none with
the settings below; HF Marian's (whose 8k-vocabulary logits are 130 MB) 217,000 and 2,900
(``bench/train_speed.py --malloc reuse|default``, ``results/bench/train_speed_cpu*.md``).

The cost is that the process keeps its peak heap until it exits, as a GPU caching allocator
does. Only glibc (Linux) has ``mallopt``; elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # allocations below 1 GiB come from the heap (and are reused)
TRIM_THRESHOLD = 2**31 - 1  # free memory at the top of the heap is (practically) never returned


def reuse_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse; True if it took the settings."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
