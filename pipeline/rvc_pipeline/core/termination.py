"""SIGTERM as a request to stop at the next safe point (preemption, node drain, eviction, suspend).

Kubernetes sends SIGTERM to the container's main process and SIGKILL `terminationGracePeriodSeconds`
later (spec.lifecycle.terminationGracePeriodSeconds). Code that can stop cleanly runs inside
`graceful()`: there SIGTERM only records the request, and the code checks `requested()` at its safe
points (training: after each step; per-file steps: after each file), saves and uploads what it has, and
raises `Preempted`. Outside `graceful()` SIGTERM unwinds at once as `SystemExit(143)`, so the writer lease
is released and scratch cleaned up, as before.

Standard library only: the operator image and process-pool workers may import it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator

log = logging.getLogger("rvc_pipeline")

EXIT_PREEMPTED = 128 + signal.SIGTERM  # 143, what a shell reports for a process ended by SIGTERM


class Preempted(Exception):  # noqa: N818 - a request, not an error
    """Raised after a graceful stop saved its state; ends the command with EXIT_PREEMPTED (transient)."""


class _State:
    requested_at: float | None = None
    depth = 0
    lock = threading.Lock()


def _on_sigterm(signum: int, _frame: object) -> None:
    if _State.requested_at is None:
        _State.requested_at = time.monotonic()
    if _State.depth > 0:
        log.warning("SIGTERM: stopping at the next safe point (saving what is done)")
        return
    raise SystemExit(128 + signum)


def install() -> bool:
    """Handle SIGTERM as described above (main thread only; returns False elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True


@contextlib.contextmanager
def graceful() -> Iterator[None]:
    """Within this block SIGTERM sets `requested()` instead of exiting."""
    with _State.lock:
        _State.depth += 1
    try:
        yield
    finally:
        with _State.lock:
            _State.depth -= 1


def requested() -> bool:
    """True once SIGTERM arrived (or `request()` was called)."""
    return _State.requested_at is not None


def seconds_since_request() -> float | None:
    at = _State.requested_at
    return None if at is None else time.monotonic() - at


def request() -> None:
    """Ask for a graceful stop from code (tests, a parent that forwards SIGTERM)."""
    if _State.requested_at is None:
        _State.requested_at = time.monotonic()


def reset() -> None:
    """Forget a request (tests; a process that handled one and goes on)."""
    _State.requested_at = None
