"""kopf handlers: the glue between the cluster, storage and the pure state machine (status.decide).

Every trigger (create, resume, update, and a sweep of all unfinished experiments every
RVC_RECONCILE_INTERVAL seconds) runs `reconcile`:
read the RVCExperiment, its Jobs and pods, and the storage markers; `decide`; create the ConfigMap/Jobs,
delete superseded Jobs, patch the status (with the resourceVersion it was computed from, so a stale view
never overwrites a newer one), then post events. Nothing is kept in memory between reconciles except
metrics, so the operator can be restarted at any moment.

Deletion: no finalizer is added (deleting an experiment never hangs on the operator). Jobs and the
ConfigMap carry owner references, so the garbage collector removes them; when the operator sees the
DELETED event it also deletes the Jobs itself (propagationPolicy Background) and, if the annotation
rvc-operator.dev/delete-artifacts is "true", the experiment's folder in storage.

Storage is touched only as the experiment may (rvc_operator/ownership.py): within the storage prefixes the
administrator allows its namespace, and only a folder whose ownership record (logs/<name>/.rvc/owner.json)
names this resource's uid; that record is written when the experiment starts.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Protocol

import kopf
from rvc_pipeline.spec import API_GROUP, API_VERSION, PLURAL, STEP_ORDER, Experiment
from rvc_pipeline.stepio import MARKER_DIR
from rvc_pipeline.storage import Storage, open_storage

from . import ownership, progress_reader
from .config import OperatorConfig
from .jobs import build_job_spec, build_spec_configmap, experiment_selector
from .metrics import METRICS, OperatorMetrics
from .ownership import Owner, Refusal, folder_key, owner_key
from .status import (
    Decision,
    Event,
    JobSummary,
    Policy,
    admit,
    decide,
    plan_deletion,
    status_patch,
    summarize_job,
    termination_line,
)

log = logging.getLogger("rvc_operator")

CFG = OperatorConfig.from_env()


class Conflict(Exception):
    """The object changed since it was read (HTTP 409 on a resourceVersion precondition)."""


class ClusterAPI(Protocol):
    """The cluster operations the operator uses (KubeCluster below; tests use an in-memory fake)."""

    def get_experiment(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def list_experiments(self, namespace: str | None) -> list[dict[str, Any]]: ...
    def list_jobs(self, namespace: str, selector: str) -> list[dict[str, Any]]: ...
    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]: ...
    def pod_log_tail(self, namespace: str, pod: str, container: str, lines: int) -> str | None: ...
    def create_job(self, job: dict[str, Any]) -> bool: ...  # False: it already existed
    def delete_job(self, namespace: str, name: str) -> None: ...
    def ensure_configmap(self, cm: dict[str, Any]) -> None: ...
    def delete_configmap(self, namespace: str, name: str) -> None: ...
    def patch_status(self, namespace: str, name: str, patch: dict[str, Any], resource_version: str | None
                     ) -> None: ...


EventPoster = Callable[[dict[str, Any], Event], None]
StorageOpener = Callable[[dict[str, Any], OperatorConfig], Storage]


# ---------------------------------------------------------------------------------------------------
# storage
# ---------------------------------------------------------------------------------------------------
_storage_cache: dict[tuple[str, str | None, str | None], Storage] = {}
_storage_lock = threading.Lock()


def open_experiment_storage(manifest: dict[str, Any], cfg: OperatorConfig) -> Storage:
    """The experiment's storage, opened with the operator's own credentials (its environment)."""
    st = (manifest.get("spec") or {}).get("storage") or {}
    key = (str(st.get("uri", "")), st.get("endpoint") or cfg.s3_endpoint, st.get("region"))
    with _storage_lock:
        if key not in _storage_cache:
            storage = open_storage(key[0], endpoint=key[1], region=key[2])
            client = getattr(storage, "client", None)
            if client is not None:
                # The operator only peeks at small objects: fail fast instead of the pipeline's patient
                # retries, so an unreachable store never stalls a reconcile for minutes.
                import boto3
                from botocore.config import Config

                storage.client = boto3.client(  # type: ignore[attr-defined]
                    "s3", endpoint_url=getattr(storage, "endpoint", None) or None,
                    region_name=client.meta.region_name,
                    config=Config(connect_timeout=3, read_timeout=15,
                                  retries={"max_attempts": 2, "mode": "standard"}))
            _storage_cache[key] = storage
        return _storage_cache[key]


@dataclasses.dataclass
class StorageAccess:
    """What this reconcile may do with the experiment's storage. `storage` is set only when the folder is
    this resource's (ownership record checked or just written); `refusal` when the operator must not
    touch it; neither when storage could not be read this time (the state machine goes on without it)."""

    storage: Storage | None = None
    name: str = ""
    markers: set[str] | None = None
    refusal: Refusal | None = None


@dataclasses.dataclass(frozen=True)
class FolderState:
    markers: set[str]
    record_present: bool
    record: Owner | None


def read_folder_state(storage: Storage, name: str) -> FolderState:
    """One listing of logs/<name>/.rvc/: the step markers and the ownership record (read when small)."""
    objs = storage.list(f"logs/{name}/{MARKER_DIR}/")
    markers = progress_reader.markers_in([o.key for o in objs], STEP_ORDER)
    rec = next((o for o in objs if o.key == owner_key(name)), None)
    if rec is None:
        return FolderState(markers, False, None)
    data = storage.read_bytes(rec.key) if rec.size <= ownership.MAX_RECORD_BYTES else None
    return FolderState(markers, True, ownership.parse_record(data))


def has_older_rival(api: ClusterAPI, body: dict[str, Any], exp: Experiment, cfg: OperatorConfig) -> bool:
    """Whether an older live RVCExperiment, allowed there itself, names the same endpoint and folder."""
    mine = ownership.location(exp, cfg.s3_endpoint)
    for other in api.list_experiments(cfg.watch_namespace):
        o_exp, _ = ownership.admit_storage(other, cfg.storage_allowed_prefixes, cfg.s3_endpoint)
        place = ownership.location(o_exp, cfg.s3_endpoint) if o_exp is not None else None
        if ownership.is_older_rival(body, mine, other, place):
            return True
    return False


def settle_owner(api: ClusterAPI, body: dict[str, Any], exp: Experiment, storage: Storage,
                 cfg: OperatorConfig, now: datetime, *, takeover: bool = True) -> tuple[str, set[str]]:
    """(verdict, markers): OWNED once the record names this resource (writing it when the folder is
    unowned, or `takeover` from a deleted namesake), else FOREIGN."""
    me, name = Owner.of(body, now), exp.name
    state = read_folder_state(storage, name)
    rival = not state.record_present and bool(state.markers) and has_older_rival(api, body, exp, cfg)
    verdict = ownership.verdict(state.record, state.record_present, me, bool(state.markers), rival)
    if verdict == ownership.CLAIM:
        if not storage.create_exclusive(owner_key(name), me.to_json()):
            state = read_folder_state(storage, name)  # lost a race: the winner's record decides
            won = state.record is not None and state.record.uid == me.uid
            return (ownership.OWNED if won else ownership.FOREIGN), state.markers
        log.info("%s/%s: wrote ownership record %s", me.namespace, me.name, owner_key(name))
        return ownership.OWNED, state.markers
    if verdict == ownership.TAKEOVER and takeover:
        storage.write_bytes(owner_key(name), me.to_json())
        log.info("%s/%s: took over %s from a deleted namesake", me.namespace, me.name, owner_key(name))
        return ownership.OWNED, state.markers
    return (verdict if verdict == ownership.OWNED else ownership.FOREIGN), state.markers


def storage_access(api: ClusterAPI, body: dict[str, Any], cfg: OperatorConfig, opener: StorageOpener,
                   now: datetime) -> StorageAccess:
    """Allow-list first (storage is not even opened when refused), then the ownership record."""
    exp, refusal = ownership.admit_storage(body, cfg.storage_allowed_prefixes, cfg.s3_endpoint)
    if exp is None:
        return StorageAccess(refusal=refusal)
    try:
        storage = opener(body, cfg)
        verdict, markers = settle_owner(api, body, exp, storage, cfg, now)
    except Exception as e:  # noqa: BLE001 - storage trouble must not stop the state machine
        meta = body.get("metadata") or {}
        log.warning("%s/%s: cannot read storage (%s); continuing from the cluster state only",
                    meta.get("namespace"), meta.get("name"), e)
        return StorageAccess(name=exp.name)
    if verdict != ownership.OWNED:
        return StorageAccess(name=exp.name, refusal=Refusal(
            "StorageOwnedElsewhere", ownership.OWNED_ELSEWHERE.format(name=exp.name)))
    return StorageAccess(storage=storage, name=exp.name, markers=markers)


@dataclasses.dataclass
class StorageView:
    markers: set[str] | None = None
    progress: dict[str, Any] | None = None
    index_file: str | None = None


def read_storage_view(manifest: dict[str, Any], status: dict[str, Any], access: StorageAccess) -> StorageView:
    """Markers (always), training progress (while train runs or until its final epoch is shown) and the
    index file (once the index step may have finished), of an owned folder only. Storage errors leave the
    fields None."""
    view = StorageView(markers=access.markers)
    storage, name = access.storage, access.name
    if storage is None or view.markers is None:
        return view
    steps = status.get("steps") or {}
    try:
        train = (steps.get("train") or {}).get("phase")
        shown = status.get("progress") or {}
        if train == "Running" or (train == "Succeeded" and shown.get("percent") != 100.0):
            epochs = ((manifest.get("spec") or {}).get("train") or {}).get("epochs")
            view.progress = progress_reader.read_progress(storage, name, epochs)
        index = (steps.get("index") or {}).get("phase")
        if index == "Running" or "index" in view.markers:
            view.index_file = progress_reader.find_index(storage, name)
    except Exception as e:  # noqa: BLE001 - storage trouble must not stop the state machine
        log.warning("%s/%s: cannot read storage (%s); continuing from the cluster state only",
                    (manifest.get("metadata") or {}).get("namespace"), name, e)
    return view


# ---------------------------------------------------------------------------------------------------
# reconcile
# ---------------------------------------------------------------------------------------------------
def _owned(obj: dict[str, Any], uid: str) -> bool:
    return any(o.get("uid") == uid for o in (obj.get("metadata") or {}).get("ownerReferences") or [])


def observe_jobs(api: ClusterAPI, manifest: dict[str, Any]) -> list[JobSummary]:
    """Summaries of the experiment's Jobs (label + owner uid, so Jobs of a deleted namesake are ignored)."""
    meta = manifest["metadata"]
    ns, uid = meta.get("namespace", "default"), meta.get("uid", "")
    sel = experiment_selector(meta["name"])
    jobs = [j for j in api.list_jobs(ns, sel) if _owned(j, uid)]
    if not jobs:
        return []
    pods_by_job: dict[str, list[dict[str, Any]]] = {}
    for p in api.list_pods(ns, sel):
        jn = ((p.get("metadata") or {}).get("labels") or {}).get("job-name")
        if jn:
            pods_by_job.setdefault(jn, []).append(p)
    out = []
    for j in jobs:
        jname = j["metadata"]["name"]
        s = summarize_job(j, pods_by_job.get(jname, []))
        if s.state == "Failed" and s.exit_code is not None and not s.message:
            s = dataclasses.replace(s, message=_log_error(api, ns, pods_by_job.get(jname, [])))
        out.append(s)
    return out


def _log_error(api: ClusterAPI, ns: str, pods: list[dict[str, Any]]) -> str | None:
    """The error line from the newest failed pod's log (when the termination message was empty)."""
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    failed.sort(key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp") or ""))
    for p in reversed(failed):
        try:
            text = api.pod_log_tail(ns, p["metadata"]["name"], "step", 40)
        except Exception:  # noqa: BLE001 - best effort
            text = None
        line = termination_line(text)
        if line:
            return line
    return None


def make_policy(manifest: dict[str, Any], api: ClusterAPI, cfg: OperatorConfig) -> Policy:
    admitted, why = True, ""
    phase = (manifest.get("status") or {}).get("phase")
    if cfg.max_concurrent_experiments > 0 and phase in (None, "Pending", "Queued"):
        others = api.list_experiments(cfg.watch_namespace)
        admitted, why = admit(manifest, others, cfg.max_concurrent_experiments)
    return Policy(max_retries=cfg.step_max_retries, backoff_seconds=cfg.retry_backoff_seconds,
                  backoff_max_seconds=cfg.retry_backoff_max_seconds, admitted=admitted, queue_message=why)


def apply_decision(api: ClusterAPI, manifest: dict[str, Any], decision: Decision, cfg: OperatorConfig,
                   metrics: OperatorMetrics) -> None:
    """Create/delete what the decision says. Jobs first, status after: a crash in between leaves a Job
    that the next reconcile adopts (its name is deterministic), never a status pointing at nothing."""
    ns = manifest["metadata"].get("namespace", "default")
    if decision.create:
        api.ensure_configmap(build_spec_configmap(manifest, cfg))
    for c in decision.create:
        job = build_job_spec(manifest, c.step, c.attempt, cfg, force=c.force, inputs_hash=c.inputs_hash)
        if api.create_job(job):
            metrics.jobs_created.labels(c.step).inc()
        else:
            log.info("%s/%s: Job %s already exists; adopting it", ns, manifest["metadata"]["name"], c.name)
    for dl in decision.delete:
        log.info("%s/%s: deleting Job %s (%s)", ns, manifest["metadata"]["name"], dl.name, dl.reason)
        api.delete_job(ns, dl.name)


def reconcile(
    api: ClusterAPI,
    namespace: str,
    name: str,
    cfg: OperatorConfig,
    *,
    post: EventPoster,
    opener: StorageOpener = open_experiment_storage,
    metrics: OperatorMetrics = METRICS,
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    attempts: int = 3,
) -> Decision | None:
    """Bring one experiment one step closer to done. Returns the applied decision (None: nothing to do)."""
    for _ in range(attempts):
        body = api.get_experiment(namespace, name)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            return None
        meta = body["metadata"]
        status = body.get("status") or {}
        if status.get("phase") in ("Succeeded", "Failed") and status.get("observedGeneration") == meta.get(
                "generation"):
            metrics.set_phase(meta.get("uid", name), status.get("phase"), namespace, name)
            return None
        jobs = observe_jobs(api, body)
        access = storage_access(api, body, cfg, opener, now())  # after the Jobs: markers are as new
        view = read_storage_view(body, status, access)
        decision = decide(body, status, jobs, view.markers, now(), policy=make_policy(body, api, cfg),
                          progress=view.progress, index_file=view.index_file, refusal=access.refusal)
        apply_decision(api, body, decision, cfg, metrics)
        patch = status_patch(status, decision.status)
        if patch:
            try:
                api.patch_status(namespace, name, patch, meta.get("resourceVersion"))
            except Conflict:
                log.info("%s/%s: changed while reconciling; retrying", namespace, name)
                continue
        for ev in decision.events:
            post(body, ev)
        for step, seconds in decision.step_durations:
            metrics.step_duration.labels(step).observe(seconds)
        for step, why in decision.failures:
            metrics.job_failures.labels(step, why).inc()
        for step in decision.retries:
            metrics.job_retries.labels(step).inc()
        metrics.set_phase(meta.get("uid", name), decision.status.get("phase"), namespace, name)
        return decision
    return None


def cleanup(api: ClusterAPI, body: dict[str, Any], cfg: OperatorConfig, *,
            opener: StorageOpener = open_experiment_storage, metrics: OperatorMetrics = METRICS) -> list[str]:
    """After the experiment is deleted: delete its Jobs and ConfigMap (the GC does too) and, when asked
    for, its artifacts. Returns the storage keys deleted."""
    meta = body.get("metadata") or {}
    ns = meta.get("namespace", "default")
    jobs = [summarize_job(j) for j in api.list_jobs(ns, experiment_selector(meta.get("name", "")))
            if _owned(j, meta.get("uid", ""))]
    plan = plan_deletion(body, jobs, cfg.delete_artifacts_default)
    for jn in plan.jobs:
        api.delete_job(ns, jn)
    api.delete_configmap(ns, plan.configmap)
    deleted: list[str] = []
    if plan.artifacts_prefix:
        deleted = delete_owned_artifacts(api, body, cfg, opener)
    metrics.forget(meta.get("uid", ""))
    return deleted


def delete_owned_artifacts(api: ClusterAPI, body: dict[str, Any], cfg: OperatorConfig,
                           opener: StorageOpener) -> list[str]:
    """Delete logs/<name>/ of a deleted experiment, only when allowed and owned by its uid: keys under that
    folder only, the ownership record last (not in the returned list of artifacts deleted)."""
    meta = body.get("metadata") or {}
    who = f"{meta.get('namespace', 'default')}/{meta.get('name')}"
    exp, refusal = ownership.admit_storage(body, cfg.storage_allowed_prefixes, cfg.s3_endpoint)
    if exp is None:
        log.warning("%s: artifacts kept: %s", who, refusal.message if refusal else "no usable s3:// storage")
        return []
    deleted: list[str] = []
    try:
        storage = opener(body, cfg)
        verdict, _ = settle_owner(api, body, exp, storage, cfg, datetime.now(timezone.utc), takeover=False)
        if verdict != ownership.OWNED:
            log.warning("%s: artifacts kept: %s", who, ownership.OWNED_ELSEWHERE.format(name=exp.name))
            return []
        for key in ownership.deletable_keys([o.key for o in storage.list(folder_key(exp.name))], exp.name):
            storage.delete(key)
            deleted.append(key)
        log.info("%s: deleted %d object(s) under %s/%s", who, len(deleted), exp.spec.storage.uri,
                 folder_key(exp.name))
    except Exception as e:  # noqa: BLE001
        log.error("%s: could not delete artifacts under %s: %s", who, folder_key(exp.name), e)
    return [k for k in deleted if k != owner_key(exp.name)]


# ---------------------------------------------------------------------------------------------------
# the real cluster
# ---------------------------------------------------------------------------------------------------
class KubeCluster:
    """ClusterAPI over the official kubernetes client (dicts in, dicts out)."""

    def __init__(self) -> None:
        from kubernetes import client

        self._client = client
        self.api_client = client.ApiClient()
        self.custom = client.CustomObjectsApi(self.api_client)
        self.batch = client.BatchV1Api(self.api_client)
        self.core = client.CoreV1Api(self.api_client)

    def _dict(self, obj: Any) -> Any:
        return self.api_client.sanitize_for_serialization(obj)

    @staticmethod
    def _status(e: Exception) -> int | None:
        return getattr(e, "status", None)

    def get_experiment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
        except self._client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def list_experiments(self, namespace: str | None) -> list[dict[str, Any]]:
        if namespace:
            res = self.custom.list_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL)
        else:
            res = self.custom.list_cluster_custom_object(API_GROUP, API_VERSION, PLURAL)
        return list(res.get("items") or [])

    def list_jobs(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        res = self.batch.list_namespaced_job(namespace, label_selector=selector)
        return [self._dict(j) for j in res.items]

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        res = self.core.list_namespaced_pod(namespace, label_selector=selector)
        return [self._dict(p) for p in res.items]

    def pod_log_tail(self, namespace: str, pod: str, container: str, lines: int) -> str | None:
        try:
            return self.core.read_namespaced_pod_log(pod, namespace, container=container, tail_lines=lines)
        except self._client.ApiException:
            return None

    def create_job(self, job: dict[str, Any]) -> bool:
        try:
            self.batch.create_namespaced_job(job["metadata"]["namespace"], job)
            return True
        except self._client.ApiException as e:
            if e.status == 409:
                return False
            raise

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        except self._client.ApiException as e:
            if e.status != 404:
                raise

    def ensure_configmap(self, cm: dict[str, Any]) -> None:
        ns, name = cm["metadata"]["namespace"], cm["metadata"]["name"]
        try:
            self.core.create_namespaced_config_map(ns, cm)
            return
        except self._client.ApiException as e:
            if e.status != 409:
                raise
        have = self._dict(self.core.read_namespaced_config_map(name, ns))
        if have.get("data") != cm["data"] or (have.get("metadata") or {}).get("ownerReferences") != cm[
                "metadata"]["ownerReferences"]:
            self.core.patch_namespaced_config_map(name, ns, {"metadata": {
                "labels": cm["metadata"]["labels"], "annotations": cm["metadata"]["annotations"],
                "ownerReferences": cm["metadata"]["ownerReferences"]}, "data": cm["data"]})

    def delete_configmap(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_config_map(name, namespace)
        except self._client.ApiException as e:
            if e.status != 404:
                raise

    def patch_status(self, namespace: str, name: str, patch: dict[str, Any], resource_version: str | None
                     ) -> None:
        body: dict[str, Any] = {"status": patch}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            self.custom.patch_namespaced_custom_object_status(
                API_GROUP, API_VERSION, namespace, PLURAL, name, body,
                _content_type="application/merge-patch+json")
        except self._client.ApiException as e:
            if e.status == 409:
                raise Conflict(str(e)) from None
            raise


    def post_event(self, body: dict[str, Any], ev: Event) -> None:
        """A core/v1 Event on the experiment. Posted directly (not through kopf.event, which works only
        inside kopf's per-object tasks, not from the sweep thread); failures are logged, never raised."""
        meta = body.get("metadata") or {}
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name')}.",
                         "namespace": meta.get("namespace", "default")},
            "involvedObject": {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                               "name": meta.get("name"), "namespace": meta.get("namespace"),
                               "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")},
            "type": ev.type,
            "reason": ev.reason,
            "message": ev.message[:1024],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "source": {"component": "rvc-operator"},
            "reportingComponent": "rvc-operator",
            "reportingInstance": socket.gethostname(),
        }
        try:
            self.core.create_namespaced_event(meta.get("namespace", "default"), event)
        except Exception as e:  # noqa: BLE001 - events are informational
            log.warning("%s/%s: could not post event %s: %s", meta.get("namespace"), meta.get("name"),
                        ev.reason, e)


def kopf_post(body: dict[str, Any], ev: Event) -> None:
    if _cluster is not None:
        _cluster.post_event(body, ev)


# ---------------------------------------------------------------------------------------------------
# kopf wiring
# ---------------------------------------------------------------------------------------------------
_cluster: KubeCluster | None = None
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


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


def load_kube_config() -> None:
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except config.ConfigException as e:
            raise kopf.PermanentError(f"no Kubernetes credentials (in-cluster or kubeconfig): {e}") from None


def due_for_sweep(items: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(namespace, name, uid) of the experiments a periodic sweep must reconcile: all but the finished
    ones whose spec has not changed since, and those being deleted."""
    out = []
    for it in items:
        meta = it.get("metadata") or {}
        st = it.get("status") or {}
        if meta.get("deletionTimestamp"):
            continue
        finished = st.get("phase") in ("Succeeded", "Failed")
        if finished and st.get("observedGeneration") == meta.get("generation"):
            continue
        out.append((meta.get("namespace", "default"), meta.get("name", ""), meta.get("uid", "")))
    return out


class Sweeper:
    """Reconciles every unfinished experiment every `interval` seconds, from one background thread.

    kopf's own timers would put a finalizer on every RVCExperiment (kopf needs one to stop per-object
    timers), so that deleting an experiment would hang whenever the operator is down; this sweep needs none.
    """

    def __init__(self, api: ClusterAPI, cfg: OperatorConfig, run: Callable[[str, str, str], None],
                 workers: int = 4) -> None:
        self.api, self.cfg, self.run, self.workers = api, cfg, run, workers
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep_once(self) -> int:
        due = due_for_sweep(self.api.list_experiments(self.cfg.watch_namespace))
        if not due:
            return 0
        from concurrent.futures import ThreadPoolExecutor

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


_sweeper: Sweeper | None = None


@kopf.on.startup()
def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _cluster, _sweeper
    configure_settings(settings)
    load_kube_config()
    _cluster = KubeCluster()
    METRICS.serve(CFG.metrics_port)
    _sweeper = Sweeper(_cluster, CFG, _run)
    _sweeper.start()
    log.info("rvc-operator: images gpu=%s cpu=%s, default device %s, max concurrent %s, namespace %s",
             CFG.pipeline_image, CFG.cpu_image, CFG.default_device,
             CFG.max_concurrent_experiments or "unlimited", CFG.watch_namespace or "all")
    log_storage_policy(CFG)


def log_storage_policy(cfg: OperatorConfig) -> None:
    if cfg.storage_allowed_prefixes is None:
        log.warning("RVC_STORAGE_ALLOWED_PREFIXES is not set: experiments in any namespace may name any "
                    "s3:// storage, which the operator then reads (and with delete-artifacts deletes) with "
                    "its own credentials, within ownership records; set the chart value "
                    "storage.allowedPrefixes to confine each namespace (docs/operator.md)")
    else:
        log.info("storage allow-list: %s", cfg.storage_allowed_prefixes)


@kopf.on.cleanup()
def _cleanup_operator(**_: Any) -> None:
    if _sweeper is not None:
        _sweeper.stop()


def _run(namespace: str, name: str, uid: str) -> None:
    if _cluster is None:  # pragma: no cover - startup not run
        return
    with _lock_for(uid or f"{namespace}/{name}"):
        try:
            reconcile(_cluster, namespace, name, CFG, post=kopf_post)
        except Exception:  # noqa: BLE001 - the next sweep retries; count and log
            METRICS.reconcile_errors.inc()
            log.exception("%s/%s: reconcile failed; retrying in %ss", namespace, name, CFG.reconcile_interval)


@kopf.on.create(API_GROUP, API_VERSION, PLURAL)
@kopf.on.resume(API_GROUP, API_VERSION, PLURAL)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL)
def _on_change(name: str, namespace: str, uid: str, **_: Any) -> None:
    _run(namespace, name, uid)


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
def _on_event(event: dict[str, Any], **_: Any) -> None:
    if event.get("type") != "DELETED" or _cluster is None:
        return
    body = event.get("object") or {}
    meta = body.get("metadata") or {}
    try:
        cleanup(_cluster, body, CFG)
    except Exception:  # noqa: BLE001 - the garbage collector still removes Jobs and the ConfigMap
        METRICS.reconcile_errors.inc()
        log.exception("%s/%s: cleanup after deletion failed", meta.get("namespace"), meta.get("name"))
    with _locks_guard:
        _locks.pop(meta.get("uid", ""), None)
