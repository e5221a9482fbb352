"""What the operator observes of a step's Job: `summarize_job` turns a batch/v1 Job and its pods (camelCase
dicts, as the API returns them) into the few facts the state machine (status.decide) needs; `observe_jobs`
lists an experiment's Jobs and pods through the ClusterAPI and summarises them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .jobs import (
    ANN_FORCE,
    ANN_INPUTS,
    ANN_SHARDS,
    CONTAINER,
    LABEL_ATTEMPT,
    LABEL_SHARD,
    LABEL_STEP,
    experiment_selector,
)

if TYPE_CHECKING:
    from .cluster import ClusterAPI

ACTIVE = ("Pending", "Running")
IMAGE_PULL_REASONS = ("ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull")
_STARTING = (None, "ContainerCreating", "PodInitializing")  # waiting reasons that are no problem


@dataclass(frozen=True)
class JobSummary:
    """What the state machine needs to know about one Job (built from the API objects by summarize_job)."""

    name: str
    step: str
    attempt: int
    state: str  # Pending | Running | Succeeded | Failed
    exit_code: int | None = None  # of the last failed pod's step container
    reason: str | None = None  # OOMKilled, Error, DeadlineExceeded, BackoffLimitExceeded, Evicted, ...
    message: str | None = None  # the error line from the termination message
    waiting: str | None = None  # why a pod is not running yet (ImagePullBackOff: ..., Unschedulable: ...)
    waiting_reason: str | None = None
    start_time: str | None = None
    completion_time: str | None = None
    deleting: bool = False
    inputs_hash: str | None = None
    force: bool = False
    shard: int | None = None  # the shard index of a sharded step's Job (label rvc-operator.dev/shard)
    shards: int | None = None  # N of that step run (annotation rvc-operator.dev/shards)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE and not self.deleting


@dataclass(frozen=True)
class _PodFailure:
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = None


def termination_line(message: str | None, limit: int = 1000) -> str | None:
    """The pipeline's error line from a termination message (or the tail of the log that Kubernetes put
    there with FallbackToLogsOnError): the last line starting with 'error:', else the last non-empty one."""
    if not message:
        return None
    lines = [ln.strip() for ln in message.replace("\r", "\n").splitlines() if ln.strip()]
    if not lines:
        return None
    for ln in reversed(lines):
        if ln.lower().startswith("error:"):
            return ln[len("error:"):].strip()[:limit]
    return lines[-1][:limit]


def _container_terminations(pod: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") != CONTAINER:
            continue
        for key in ("state", "lastState"):
            t = (cs.get(key) or {}).get("terminated")
            if t:
                out.append(t)
    return out


def _job_state(job: dict[str, Any]) -> tuple[str, str | None]:
    """(state, reason) from the Job's own conditions and active count."""
    st = job.get("status") or {}
    conds = {c.get("type"): c for c in st.get("conditions") or [] if c.get("status") == "True"}
    if "Complete" in conds or "SuccessCriteriaMet" in conds:
        return "Succeeded", None
    if "Failed" in conds:
        return "Failed", conds["Failed"].get("reason")
    return ("Running", None) if (st.get("active") or 0) > 0 else ("Pending", None)


def _newest_exit(pods: list[dict[str, Any]]) -> _PodFailure | None:
    """The newest non-zero exit of a step container (by finishedAt; on a tie the later one listed)."""
    best: _PodFailure | None = None
    latest = ""
    for pod in pods:
        for t in _container_terminations(pod):
            code = t.get("exitCode")
            when = str(t.get("finishedAt") or "")
            if code not in (None, 0) and (best is None or when >= latest):
                latest = when
                best = _PodFailure(int(code), t.get("reason"), termination_line(t.get("message")))
    return best


def _pod_failure(pods: list[dict[str, Any]]) -> _PodFailure:
    """Why the Job's pods failed: the newest container exit, else a pod-level failure (Evicted,
    DeadlineExceeded: no container exit; the last pod's reason, the first message given)."""
    exit_ = _newest_exit(pods)
    if exit_ is not None:
        return exit_
    reason = message = None
    for pod in pods:
        pst = pod.get("status") or {}
        if pst.get("phase") == "Failed" and pst.get("reason"):
            reason = pst.get("reason")
            message = message or pst.get("message")
    return _PodFailure(None, reason, message)


def _pod_waiting(pod: dict[str, Any], waiting: str | None) -> tuple[str, str] | None:
    """(waiting text, reason) of a pending pod: a container stuck waiting, else an unscheduled pod."""
    pst = pod.get("status") or {}
    found: tuple[str, str] | None = None
    for cs in pst.get("containerStatuses") or []:
        w = (cs.get("state") or {}).get("waiting")
        if w and w.get("reason") not in _STARTING:
            found = (f"{w.get('reason')}: {w.get('message') or ''}".strip().rstrip(":"), w.get("reason"))
    if found is not None or waiting:
        return found
    for c in pst.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            reason = c.get("reason") or "Unschedulable"
            return f"{reason}: {c.get('message') or ''}".strip().rstrip(":"), reason
    return None


def _waiting(pods: list[dict[str, Any]]) -> tuple[str | None, str | None]:
    waiting = reason = None
    for pod in pods:
        if (pod.get("status") or {}).get("phase") != "Pending":
            continue
        found = _pod_waiting(pod, waiting)
        if found is not None:
            waiting, reason = found
    return waiting, reason


def _reason(state: str, job_reason: str | None, pod_reason: str | None) -> str | None:
    """An OOM kill or an eviction says more than BackoffLimitExceeded; otherwise the Job's reason wins."""
    if state == "Failed" and pod_reason:
        return pod_reason if pod_reason in ("OOMKilled", "Evicted") else (job_reason or pod_reason)
    if pod_reason and state != "Succeeded":
        return pod_reason
    return job_reason


def _attempt(labels: dict[str, Any]) -> int:
    try:
        return int(labels.get(LABEL_ATTEMPT, "0"))
    except ValueError:
        return 0


def _small_int(value: Any) -> int | None:
    """A shard index or count written by the operator (None: missing or not a small number >= 0)."""
    text = str(value) if value is not None else ""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 3 else None


def summarize_job(job: dict[str, Any], pods: list[dict[str, Any]] | None = None) -> JobSummary:
    """Summarise a batch/v1 Job and its pods (camelCase dicts, as the API returns them)."""
    meta = job.get("metadata") or {}
    labels = meta.get("labels") or {}
    ann = meta.get("annotations") or {}
    st = job.get("status") or {}
    state, job_reason = _job_state(job)
    failure = _pod_failure(pods or [])
    waiting, waiting_reason = _waiting(pods or []) if state in ACTIVE else (None, None)
    return JobSummary(
        name=meta.get("name", ""),
        step=labels.get(LABEL_STEP, ""),
        attempt=_attempt(labels),
        state=state,
        exit_code=failure.exit_code,
        reason=_reason(state, job_reason, failure.reason),
        message=failure.message,
        waiting=waiting[:500] if waiting else None,
        waiting_reason=waiting_reason,
        start_time=st.get("startTime") or meta.get("creationTimestamp"),
        completion_time=st.get("completionTime"),
        deleting=bool(meta.get("deletionTimestamp")),
        inputs_hash=ann.get(ANN_INPUTS),
        force=ann.get(ANN_FORCE) == "true",
        shard=_small_int(labels.get(LABEL_SHARD)),
        shards=_small_int(ann.get(ANN_SHARDS)),
    )


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    """Whether `obj` has an owner reference to `uid` (Jobs of a deleted namesake have another)."""
    return any(o.get("uid") == uid for o in (obj.get("metadata") or {}).get("ownerReferences") or [])


def observe_jobs(api: ClusterAPI, manifest: dict[str, Any]) -> list[JobSummary]:
    """Summaries of the experiment's Jobs (label + owner uid, so Jobs of a deleted namesake are ignored)."""
    meta = manifest["metadata"]
    ns, uid = meta.get("namespace", "default"), meta.get("uid", "")
    sel = experiment_selector(meta["name"])
    jobs = [j for j in api.list_jobs(ns, sel) if owned_by(j, uid)]
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
            text = api.pod_log_tail(ns, p["metadata"]["name"], CONTAINER, 40)
        except Exception:  # noqa: BLE001 - best effort
            text = None
        line = termination_line(text)
        if line:
            return line
    return None
