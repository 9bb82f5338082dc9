"""glibc's allocator, left to itself, gives the memory of large freed blocks (a batch's
activation maps) back to the operating system and maps fresh pages for the next ones, so
that every forward pass page-faults its activations in again. On this project's 2-core
machine the small CNN's evaluation at batch 512 took 1.7 times as long, with about 13,000
page faults a pass (`benchmarks/allocator.py`).
`keep_freed_memory` has glibc serve every block from its heap and keep the heap once
grown: a process then holds on to its peak memory until it exits."""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's parameters, from glibc's malloc.h
NEVER_TRIM = 2**31 - 1  # mallopt takes a C int: free memory at the heap's top beyond 2 GiB still goes back


def keep_freed_memory() -> bool:
    """Tells glibc's malloc never to map a block on its own (`M_MMAP_MAX` 0) nor to shrink
    the heap; whether it could (elsewhere than glibc, nothing changes). Numbers are not
    affected: only where memory comes from."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
