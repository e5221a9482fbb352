"""The periodic sweep: every RVC_RECONCILE_INTERVAL seconds, reconcile each experiment that is not finished.

kopf's own timers would put a finalizer on every RVCExperiment (kopf needs one to stop per-object timers),
so that deleting an experiment would hang whenever the operator is down; this sweep needs none.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .cluster import ClusterAPI
from .config import OperatorConfig
from .metrics import METRICS
from .status import ttl_of

log = logging.getLogger("rvc_operator")


def due_for_sweep(items: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(namespace, name, uid) of the experiments a periodic sweep must reconcile: all but the finished
    ones whose spec has not changed since (unless a TTL after finishing will delete them), and those
    being deleted."""
    out = []
    for it in items:
        meta = it.get("metadata") or {}
        st = it.get("status") or {}
        if meta.get("deletionTimestamp"):
            continue
        finished = st.get("phase") in ("Succeeded", "Failed")
        if finished and st.get("observedGeneration") == meta.get("generation") and ttl_of(it) is None:
            continue
        out.append((meta.get("namespace", "default"), meta.get("name", ""), meta.get("uid", "")))
    return out


class Sweeper:
    """Reconciles every unfinished experiment every cfg.reconcile_interval seconds, from one background
    thread, `workers` at a time."""

    def __init__(self, api: ClusterAPI, cfg: OperatorConfig, run: Callable[[str, str, str], None],
                 workers: int = 4) -> None:
        self.api, self.cfg, self.run, self.workers = api, cfg, run, workers
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep_once(self) -> int:
        due = due_for_sweep(self.api.list_experiments(self.cfg.watch_namespace))
        if not due:
            return 0
        with ThreadPoolExecutor(max_workers=min(self.workers, len(due))) as ex:
            list(ex.map(lambda t: self.run(*t), due))
        return len(due)

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.reconcile_interval):
            try:
                self.sweep_once()
            except Exception:  # noqa: BLE001 - keep sweeping
                METRICS.reconcile_errors.inc()
                log.exception("periodic reconcile sweep failed; retrying in %ss", self.cfg.reconcile_interval)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="rvc-sweeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
