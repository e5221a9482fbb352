"""Which process is primary, and how worker processes start. Standard library only.

One rule each, here and nowhere else (`steps.runner` re-exports them; this module imports nothing of the
project, so that `lease` and the worker processes of preprocess and f0 can import it cheaply and
without an import cycle through the step shell):

* `is_primary()`: the process that owns markers, events, uploads and the writer lease. Under torchrun
  every process has RANK; in multi-node training without torchrun each node's pod has NODE_RANK (and
  each spawned worker gets RANK). Primary = neither variable names a rank other than 0.
* `start_method()`: 'fork' starts workers in milliseconds (spawn/forkserver re-import numpy and scipy in
  every worker, about a second), but a fork is only safe while this process has no torch loaded (its
  thread pools do not survive a fork) and the workers do not use torch; otherwise 'forkserver' (a clean
  server process forks the workers), or 'spawn' where forkserver is missing. `parallel_map` starts the
  pool's workers before it draws its first item, so an item source that starts threads (downloads)
  never runs beside a fork.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

RANK_VARIABLES = ("RANK", "NODE_RANK")


def _rank_is_zero(value: str) -> bool:
    value = value.strip()
    return value == "" or (value.isdigit() and int(value) == 0)  # garbage: not primary (writes nothing)


def is_primary() -> bool:
    """False in every process of rank > 0 (torchrun's RANK, or NODE_RANK of multi-node training)."""
    return all(_rank_is_zero(os.environ.get(v, "")) for v in RANK_VARIABLES)


def cpu_count() -> int:
    """CPUs this process may run on (its affinity set, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


def default_workers(requested: int = 0) -> int:
    """`requested` worker processes when > 0, else one per CPU."""
    return requested if requested > 0 else cpu_count()


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


def _noop() -> None:
    return None


def parallel_map(fn: Callable[[T], R], items: Iterable[T], workers: int, *, torch_workers: bool = False,
                 in_flight: int | None = None) -> Generator[tuple[T, R], None, None]:
    """(item, fn(item)) for every item, as each finishes.

    `workers` <= 1: inline, in order, no pool. Otherwise on `process_pool(workers)` (fn and the items
    must pickle), drawing `items` lazily with at most `in_flight` of them submitted at a time (None: all
    at once). A consumer that stops early (an exception, a break) cancels what has not started and
    waits for the rest. An exception of fn is raised here, in the consumer."""
    if workers <= 1:
        for item in items:
            yield item, fn(item)
        return
    pool = process_pool(workers, torch_workers=torch_workers)
    try:
        pool.submit(_noop).result()  # start the workers now, before `items` can start any thread
        yield from _as_completed(pool, fn, iter(items), in_flight or sys.maxsize)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _as_completed(pool: ProcessPoolExecutor, fn: Callable[[T], R], items: Iterator[T],
                  limit: int) -> Iterator[tuple[T, R]]:
    running: dict[Future[R], T] = {}
    more = True
    while True:
        while more and len(running) < limit:
            try:
                item = next(items)
            except StopIteration:
                more = False
                break
            running[pool.submit(fn, item)] = item
        if not running:
            return
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for fut in done:
            yield running.pop(fut), fut.result()
