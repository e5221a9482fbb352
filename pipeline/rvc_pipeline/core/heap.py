"""glibc's malloc, tuned for a process that allocates and frees the same large tensors over and over.

Its defaults hand freed blocks above the (dynamic, at most 32 MB) mmap threshold, and a heap top above
the trim threshold, back to the kernel, which then page-faults them in again, zero-filled, for the next
clip or training step. Measured (bench/README.md): the HuBERT features step, about 265k minor faults and
0.7 s of kernel time per 40 s of audio on one thread; a CPU training step (v2 40k, batch 4, 2 threads),
about 148k minor faults and 0.29 s of kernel time per step on an idle machine, 1.8 s at load 4 (9 % of
its CPU time). With keep_freed_memory: almost none (7k faults, 0.03 s per training step).
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # the most older glibc accept
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks up to 32 MB in the heap, and up to 1 GB of the heap's top, for reuse
    (this process and the ones it forks later; False without glibc's mallopt)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
