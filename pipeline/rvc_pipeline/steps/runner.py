"""What every step shares: which process is primary, and how process pools start. Torch-free.

One rule each, here and nowhere else:

* `is_primary()`: the process that owns markers, events, uploads and the writer lease. Under torchrun
  every process has RANK; in multi-node training without torchrun each node's pod has NODE_RANK (and
  each spawned worker gets RANK). Primary = neither variable names a rank other than 0.
* `start_method()`: 'fork' starts workers in milliseconds (spawn/forkserver re-import numpy and scipy in
  every worker, about a second), but a fork is only safe while this process has no torch loaded (its
  thread pools do not survive a fork) and the workers do not use torch; otherwise 'forkserver' (a clean
  server process forks the workers), or 'spawn' where forkserver is missing. A caller that also starts
  threads starts the pool's workers first (submit a no-op and wait for it).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

RANK_VARIABLES = ("RANK", "NODE_RANK")


def _rank_is_zero(value: str) -> bool:
    value = value.strip()
    return value == "" or (value.isdigit() and int(value) == 0)  # garbage: not primary (writes nothing)


def is_primary() -> bool:
    """False in every process of rank > 0 (torchrun's RANK, or NODE_RANK of multi-node training)."""
    return all(_rank_is_zero(os.environ.get(v, "")) for v in RANK_VARIABLES)


def start_method(torch_workers: bool = False) -> str:
    """The start method for a process pool (the rule in the module docstring)."""
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and not torch_workers and "torch" not in sys.modules:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


def process_pool(workers: int, *, torch_workers: bool = False) -> ProcessPoolExecutor:
    """A pool of `workers` processes started by the one start-method rule; `torch_workers` when the
    jobs import torch (crepe, rmvpe)."""
    ctx = multiprocessing.get_context(start_method(torch_workers))
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
