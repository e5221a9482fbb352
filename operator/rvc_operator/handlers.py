"""kopf handlers: wiring only. The work is in reconcile.py (one reconcile), status.py (the pure state
machine), cluster.py (the Kubernetes client), access.py (storage) and sweeper.py (the periodic sweep).

Every trigger (create, resume, update, and a sweep of all unfinished experiments every
RVC_RECONCILE_INTERVAL seconds) runs `reconcile.reconcile`, one experiment at a time per uid. The
configuration (config.OperatorConfig, RVC_* environment variables) is read by the startup handler, not at
import, so importing this module has no side effects beyond registering the handlers.

Deletion: no finalizer is added (deleting an experiment never hangs on the operator). Jobs and the
ConfigMap carry owner references, so the garbage collector removes them; when the operator sees the
DELETED event it also deletes the Jobs itself (propagationPolicy Foreground) and, if the annotation
rvc-operator.dev/delete-artifacts is "true", the experiment's folder in storage (only as ownership.py
allows).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

import kopf
from rvc_pipeline.core.spec import API_GROUP, API_VERSION, PLURAL

from .cluster import KubeCluster, load_kube_config
from .config import ConfigError, OperatorConfig
from .metrics import METRICS
from .reconcile import cleanup, reconcile
from .sweeper import Sweeper

log = logging.getLogger("rvc_operator")


@dataclasses.dataclass
class Runtime:
    """What the startup handler sets up: the configuration, the cluster client, the sweep."""

    cfg: OperatorConfig
    cluster: KubeCluster
    sweeper: Sweeper | None = None
    locks: dict[str, threading.Lock] = dataclasses.field(default_factory=dict)
    guard: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def lock_for(self, key: str) -> threading.Lock:
        with self.guard:
            return self.locks.setdefault(key, threading.Lock())

    def forget(self, key: str) -> None:
        with self.guard:
            self.locks.pop(key, None)


_runtime: Runtime | None = None


def configure_settings(settings: kopf.OperatorSettings) -> None:
    """kopf settings: no peering CRD (standalone), handler state in annotations (not status.kopf, which the
    structural schema would prune), only warnings posted as events by kopf itself."""
    settings.peering.standalone = True
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration")
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330


def log_storage_policy(cfg: OperatorConfig) -> None:
    if cfg.storage_allowed_prefixes is None:
        log.warning("RVC_STORAGE_ALLOWED_PREFIXES is not set: experiments in any namespace may name any "
                    "s3:// storage, which the operator then reads (and with delete-artifacts deletes) with "
                    "its own credentials, within ownership records; set the chart value "
                    "storage.allowedPrefixes to confine each namespace (docs/operator.md)")
    else:
        log.info("storage allow-list: %s", cfg.storage_allowed_prefixes)


def start(cfg: OperatorConfig, cluster: KubeCluster, *, serve_metrics: bool = True) -> Runtime:
    """Set up the runtime the handlers use (the startup handler calls this; so may a test)."""
    global _runtime
    rt = Runtime(cfg, cluster)
    if serve_metrics:
        METRICS.serve(cfg.metrics_port)
    rt.sweeper = Sweeper(cluster, cfg, _run)
    rt.sweeper.start()
    _runtime = rt
    log.info("rvc-operator: images gpu=%s cpu=%s, default device %s, max concurrent %s, namespace %s",
             cfg.pipeline_image, cfg.cpu_image, cfg.default_device,
             cfg.max_concurrent_experiments or "unlimited", cfg.watch_namespace or "all")
    log_storage_policy(cfg)
    return rt


@kopf.on.startup()
def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    configure_settings(settings)
    try:
        cfg = OperatorConfig.from_env()
        load_kube_config()
    except (ConfigError, RuntimeError) as e:
        raise kopf.PermanentError(str(e)) from None
    start(cfg, KubeCluster())


@kopf.on.cleanup()
def _cleanup_operator(**_: Any) -> None:
    global _runtime
    if _runtime is not None and _runtime.sweeper is not None:
        _runtime.sweeper.stop()
    _runtime = None


def _run(namespace: str, name: str, uid: str) -> None:
    rt = _runtime
    if rt is None:  # pragma: no cover - startup not run
        return
    with rt.lock_for(uid or f"{namespace}/{name}"):
        try:
            reconcile(rt.cluster, namespace, name, rt.cfg, post=rt.cluster.post_event)
        except Exception:  # noqa: BLE001 - the next sweep retries; count and log
            METRICS.reconcile_errors.inc()
            log.exception("%s/%s: reconcile failed; retrying in %ss", namespace, name,
                          rt.cfg.reconcile_interval)


@kopf.on.create(API_GROUP, API_VERSION, PLURAL)
@kopf.on.resume(API_GROUP, API_VERSION, PLURAL)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL)
def _on_change(name: str, namespace: str | None, uid: str, **_: Any) -> None:
    _run(namespace or "default", name, uid)


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
def _on_event(event: kopf.RawEvent, **_: Any) -> None:
    rt = _runtime
    if event.get("type") != "DELETED" or rt is None:
        return
    body: dict[str, Any] = dict(event.get("object") or {})
    meta = body.get("metadata") or {}
    try:
        cleanup(rt.cluster, body, rt.cfg)
    except Exception:  # noqa: BLE001 - the garbage collector still removes Jobs and the ConfigMap
        METRICS.reconcile_errors.inc()
        log.exception("%s/%s: cleanup after deletion failed", meta.get("namespace"), meta.get("name"))
    rt.forget(meta.get("uid", ""))
