"""One reconcile of one RVCExperiment: the glue between the cluster, storage and the pure state machine.

`reconcile` reads the RVCExperiment, its Jobs and pods, and the storage markers; parses the manifest once;
`decide`s; creates the ConfigMap/Jobs, deletes superseded Jobs, patches the status (with the
resourceVersion it was computed from, so a stale view never overwrites a newer one), then posts events.
Nothing is kept in memory between reconciles except metrics, so the operator can be restarted at any
moment. `cleanup` runs after an experiment is deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from rvc_pipeline.core.spec import Experiment, SpecError

from .access import (
    StorageOpener,
    delete_owned_artifacts,
    open_experiment_storage,
    read_storage_view,
    storage_access,
)
from .api import load_status, parse_experiment
from .cluster import ClusterAPI, Conflict, EventPoster
from .config import OperatorConfig
from .jobs import build_job_spec, build_spec_configmap, experiment_selector
from .metrics import METRICS, OperatorMetrics
from .observe import observe_jobs, owned_by, summarize_job
from .status import Decision, Policy, admit, decide, plan_deletion, status_patch, suspended, ttl_left

log = logging.getLogger("rvc_operator")


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def make_policy(manifest: dict[str, Any], api: ClusterAPI, cfg: OperatorConfig) -> Policy:
    admitted, why = True, ""
    phase = (manifest.get("status") or {}).get("phase")
    waiting = phase in (None, "Pending", "Queued", "Suspended")  # Suspended: a resumed one waits for a slot
    if cfg.max_concurrent_experiments > 0 and waiting and not suspended(manifest):  # suspended: no slot
        others = api.list_experiments(cfg.watch_namespace)
        admitted, why = admit(manifest, others, cfg.max_concurrent_experiments)
    return Policy(max_retries=cfg.step_max_retries, backoff_seconds=cfg.retry_backoff_seconds,
                  backoff_max_seconds=cfg.retry_backoff_max_seconds, admitted=admitted, queue_message=why)


def parse_once(manifest: dict[str, Any]) -> Experiment | SpecError:
    """The manifest, parsed once per reconcile for the storage check, decide and the Job builders."""
    try:
        return parse_experiment(manifest)
    except SpecError as e:
        return e


def apply_decision(api: ClusterAPI, manifest: dict[str, Any], decision: Decision, cfg: OperatorConfig,
                   metrics: OperatorMetrics, parsed: Experiment | SpecError | None = None) -> None:
    """Create/delete what the decision says. Jobs first, status after: a crash in between leaves a Job
    that the next reconcile adopts (its name is deterministic), never a status pointing at nothing."""
    ns = manifest["metadata"].get("namespace", "default")
    exp = parsed if isinstance(parsed, Experiment) else None
    if decision.create:
        api.ensure_configmap(build_spec_configmap(manifest, cfg, exp))
    for c in decision.create:
        job = build_job_spec(manifest, c.step, c.attempt, cfg, force=c.force, inputs_hash=c.inputs_hash,
                             parsed=exp, shard=c.shard_arg)
        if api.create_job(job):
            metrics.jobs_created.labels(c.step).inc()
        else:
            log.info("%s/%s: Job %s already exists; adopting it", ns, manifest["metadata"]["name"], c.name)
    for dl in decision.delete:
        log.info("%s/%s: deleting Job %s (%s)", ns, manifest["metadata"]["name"], dl.name, dl.reason)
        api.delete_job(ns, dl.name)


def record_metrics(metrics: OperatorMetrics, body: dict[str, Any], decision: Decision) -> None:
    meta = body["metadata"]
    for step, seconds in decision.step_durations:
        metrics.step_duration.labels(step).observe(seconds)
    for step, why in decision.failures:
        metrics.job_failures.labels(step, why).inc()
    for step in decision.retries:
        metrics.job_retries.labels(step).inc()
    metrics.set_phase(meta.get("uid", meta["name"]), decision.state.phase, meta.get("namespace", "default"),
                      meta["name"])


def _finished(body: dict[str, Any]) -> bool:
    status = body.get("status") or {}
    return status.get("phase") in ("Succeeded", "Failed") and status.get("observedGeneration") == (
        body["metadata"].get("generation"))


def _decide(api: ClusterAPI, body: dict[str, Any], cfg: OperatorConfig, opener: StorageOpener,
            now: Callable[[], datetime], parsed: Experiment | SpecError) -> Decision:
    status = body.get("status") or {}
    jobs = observe_jobs(api, body)
    access = storage_access(api, body, cfg, opener, now(), parsed)  # after the Jobs: markers are as new
    exp = parsed if isinstance(parsed, Experiment) else None
    where = f"{body['metadata'].get('namespace')}/{body['metadata'].get('name')}"
    view = read_storage_view(load_status(status), exp.spec.train.epochs if exp else None, access, where)
    return decide(body, status, jobs, view.markers, now(), policy=make_policy(body, api, cfg),
                  progress=view.progress, training=view.training, index_file=view.index_file,
                  refusal=access.refusal, experiment=parsed,
                  step_etas=view.step_etas, dataset=view.dataset)


def reconcile(
    api: ClusterAPI,
    namespace: str,
    name: str,
    cfg: OperatorConfig,
    *,
    post: EventPoster,
    opener: StorageOpener = open_experiment_storage,
    metrics: OperatorMetrics = METRICS,
    now: Callable[[], datetime] = _utcnow,
    attempts: int = 3,
) -> Decision | None:
    """Bring one experiment one step closer to done. Returns the applied decision (None: nothing to do)."""
    for _ in range(attempts):
        body = api.get_experiment(namespace, name)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            return None
        meta = body["metadata"]
        if _finished(body):
            metrics.set_phase(meta.get("uid", name), body["status"].get("phase"), namespace, name)
            _expire(api, body, now())
            return None
        parsed = parse_once(body)
        decision = _decide(api, body, cfg, opener, now, parsed)
        apply_decision(api, body, decision, cfg, metrics, parsed)
        patch = status_patch(body.get("status") or {}, decision.status)
        if patch:
            try:
                api.patch_status(namespace, name, patch, meta.get("resourceVersion"))
            except Conflict:
                log.info("%s/%s: changed while reconciling; retrying", namespace, name)
                continue
        for ev in decision.events:
            post(body, ev)
        record_metrics(metrics, body, decision)
        if decision.delete_resource:
            delete_experiment(api, body)
        return decision
    return None


def delete_experiment(api: ClusterAPI, body: dict[str, Any]) -> None:
    """Delete a finished experiment whose spec.lifecycle.ttlSecondsAfterFinished ran out; its Jobs and
    ConfigMap go by their owner references, its artifacts as `cleanup` decides on the DELETED event."""
    meta = body["metadata"]
    log.info("%s/%s: ttlSecondsAfterFinished ran out; deleting the experiment", meta.get("namespace"),
             meta["name"])
    api.delete_experiment(meta.get("namespace", "default"), meta["name"])


def _expire(api: ClusterAPI, body: dict[str, Any], now: datetime) -> None:
    status = body.get("status") or {}
    left = ttl_left(body, status.get("phase"), status.get("completionTime"), now)
    if left is not None and left <= 0:
        delete_experiment(api, body)


def cleanup(api: ClusterAPI, body: dict[str, Any], cfg: OperatorConfig, *,
            opener: StorageOpener = open_experiment_storage, metrics: OperatorMetrics = METRICS) -> list[str]:
    """After the experiment is deleted: delete its Jobs and ConfigMap (the GC does too) and, when asked
    for, its artifacts. Returns the storage keys deleted."""
    meta = body.get("metadata") or {}
    ns = meta.get("namespace", "default")
    jobs = [summarize_job(j) for j in api.list_jobs(ns, experiment_selector(meta.get("name", "")))
            if owned_by(j, meta.get("uid", ""))]
    plan = plan_deletion(body, jobs, cfg.delete_artifacts_default)
    for jn in plan.jobs:
        api.delete_job(ns, jn)
    api.delete_configmap(ns, plan.configmap)
    deleted: list[str] = []
    if plan.artifacts_prefix:
        deleted = delete_owned_artifacts(api, body, cfg, opener)
    metrics.forget(meta.get("uid", ""))
    return deleted
