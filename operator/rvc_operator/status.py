"""The operator's state machine, as one pure function.

    decide(manifest, status, jobs, markers, now) -> Decision

Inputs are what the operator can observe at any moment: the RVCExperiment as stored (spec, metadata,
status), the Jobs that carry the experiment's label and owner uid (summarised by `summarize_job`), and
the step completion markers found in storage (None when storage cannot be read). The Decision lists the
Jobs to create or delete, the new status, and the events to post. Nothing is remembered between calls,
so an operator restart at any moment resumes from the same inputs, and a Job is never created twice:
Job names are deterministic (`<name>-<step>-<attempt>`), a Job found in the cluster with a higher
attempt than the status knows is adopted, and the caller treats AlreadyExists as success.

Experiment phases: Pending -> Queued (RVC_MAX_CONCURRENT_EXPERIMENTS) -> Running -> Succeeded | Failed.
Step phases: Pending, Running, Succeeded, Failed, Skipped (not in spec.steps, or already complete in
storage). See docs/operator.md for the spec-change rules (`rerun_point`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from rvc_pipeline import errors
from rvc_pipeline.spec import STEP_ORDER, Experiment, SpecError, parse_manifest, step_hashes

from .jobs import (
    ANN_DELETE_ARTIFACTS,
    ANN_FORCE,
    ANN_INPUTS,
    CONTAINER,
    LABEL_ATTEMPT,
    LABEL_STEP,
    PERMANENT_EXIT_CODES,
    configmap_name,
    job_name,
)
from .ownership import Refusal

ACTIVE = ("Pending", "Running")
DONE = ("Succeeded", "Skipped")
# Steps never skipped because of an old completion marker: their Job is how a changed input is noticed.
# preprocess compares the dataset's manifest (names, sizes, digests) with the one it recorded and returns
# in seconds when nothing changed; a changed dataset reruns it and invalidates the later markers.
CHECKED_BY_JOB = ("preprocess",)
IMAGE_PULL_REASONS = ("ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull")

# ---------------------------------------------------------------------------------------------------
# observed Jobs
# ---------------------------------------------------------------------------------------------------
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

    @property
    def active(self) -> bool:
        return self.state in ACTIVE and not self.deleting


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


def summarize_job(job: dict[str, Any], pods: list[dict[str, Any]] | None = None) -> JobSummary:
    """Summarise a batch/v1 Job and its pods (camelCase dicts, as the API returns them)."""
    meta = job.get("metadata") or {}
    labels = meta.get("labels") or {}
    ann = meta.get("annotations") or {}
    st = job.get("status") or {}
    conds = {c.get("type"): c for c in st.get("conditions") or [] if c.get("status") == "True"}
    reason = None
    if "Complete" in conds or "SuccessCriteriaMet" in conds:
        state = "Succeeded"
    elif "Failed" in conds:
        state = "Failed"
        reason = conds["Failed"].get("reason")
    elif (st.get("active") or 0) > 0:
        state = "Running"
    else:
        state = "Pending"
    exit_code = message = None
    term_reason = None
    waiting = waiting_reason = None
    latest = ""
    for pod in pods or []:
        for t in _container_terminations(pod):
            code = t.get("exitCode")
            if code in (None, 0):
                continue
            when = str(t.get("finishedAt") or "")
            if exit_code is None or when >= latest:
                latest, exit_code = when, int(code)
                term_reason = t.get("reason")
                message = termination_line(t.get("message"))
        pst = pod.get("status") or {}
        if pst.get("phase") == "Failed" and pst.get("reason") and exit_code is None:
            term_reason = pst.get("reason")  # Evicted, DeadlineExceeded: no container exit
            message = message or pst.get("message")
        if pst.get("phase") == "Pending" and state in ACTIVE:
            for cs in pst.get("containerStatuses") or []:
                w = (cs.get("state") or {}).get("waiting")
                if w and w.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
                    waiting_reason = w.get("reason")
                    waiting = f"{w.get('reason')}: {w.get('message') or ''}".strip().rstrip(":")
            for c in pst.get("conditions") or []:
                if c.get("type") == "PodScheduled" and c.get("status") == "False" and not waiting:
                    waiting_reason = c.get("reason") or "Unschedulable"
                    waiting = f"{waiting_reason}: {c.get('message') or ''}".strip().rstrip(":")
    if state == "Failed" and term_reason:
        reason = term_reason if term_reason in ("OOMKilled", "Evicted") else (reason or term_reason)
    elif term_reason and state != "Succeeded":
        reason = term_reason
    try:
        attempt = int(labels.get(LABEL_ATTEMPT, "0"))
    except ValueError:
        attempt = 0
    return JobSummary(
        name=meta.get("name", ""),
        step=labels.get(LABEL_STEP, ""),
        attempt=attempt,
        state=state,
        exit_code=exit_code,
        reason=reason,
        message=message,
        waiting=waiting[:500] if waiting else None,
        waiting_reason=waiting_reason,
        start_time=st.get("startTime") or meta.get("creationTimestamp"),
        completion_time=st.get("completionTime"),
        deleting=bool(meta.get("deletionTimestamp")),
        inputs_hash=ann.get(ANN_INPUTS),
        force=ann.get(ANN_FORCE) == "true",
    )


# ---------------------------------------------------------------------------------------------------
# decision
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Policy:
    max_retries: int = 2  # RVC_STEP_MAX_RETRIES
    backoff_seconds: float = 30.0  # first retry delay, doubled per failure
    backoff_max_seconds: float = 900.0
    admitted: bool = True  # a concurrency slot is free (see `admit`)
    queue_message: str = ""
    missing_job_grace_seconds: float = 120.0  # a just-created Job may not be listed yet
    image_pull_timeout_seconds: float = 900.0  # ErrImagePull/ImagePullBackOff this long -> Failed
    require_s3: bool = True  # step pods share no filesystem: storage and dataset must be s3://


@dataclass(frozen=True)
class CreateJob:
    step: str
    attempt: int
    force: bool
    inputs_hash: str
    name: str


@dataclass(frozen=True)
class DeleteJob:
    name: str
    reason: str


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Decision:
    status: dict[str, Any]
    create: list[CreateJob] = field(default_factory=list)
    delete: list[DeleteJob] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    finished: bool = False
    # for metrics
    step_durations: list[tuple[str, float]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    retries: list[str] = field(default_factory=list)

    def event(self, type_: str, reason: str, message: str) -> None:
        self.events.append(Event(type_, reason, message))

    def delete_job(self, name: str, reason: str) -> None:
        if all(d.name != name for d in self.delete):
            self.delete.append(DeleteJob(name, reason))

    def wake(self, seconds: float) -> None:
        seconds = max(1.0, seconds)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


def iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str | None) -> datetime | None:
    if not s:
        return None
    try:
        t = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def rerun_point(steps_status: dict[str, Any], hashes: dict[str, str]) -> str | None:
    """The first step whose recorded inputs differ from the current spec's (None: nothing to rerun)."""
    for s in STEP_ORDER:
        h = (steps_status.get(s) or {}).get("inputsHash")
        if h and h != hashes[s]:
            return s
    return None


def backoff_delay(failures: int, policy: Policy) -> float:
    return float(min(policy.backoff_max_seconds, policy.backoff_seconds * (2 ** max(0, failures - 1))))


def admit(me: dict[str, Any], others: list[dict[str, Any]], limit: int) -> tuple[bool, str]:
    """Whether experiment `me` may start under RVC_MAX_CONCURRENT_EXPERIMENTS=`limit` (0 = no limit).
    Running experiments hold a slot; waiting ones are served oldest first (creationTimestamp, then name)."""
    if limit <= 0:
        return True, ""

    def key(o: dict[str, Any]) -> tuple[str, str, str]:
        m = o.get("metadata") or {}
        return (str(m.get("creationTimestamp") or ""), str(m.get("namespace") or ""),
                str(m.get("name") or ""))

    my_uid = (me.get("metadata") or {}).get("uid")
    rest = [o for o in others if (o.get("metadata") or {}).get("uid") != my_uid]
    running = sum(1 for o in rest if (o.get("status") or {}).get("phase") == "Running")
    ahead = sum(
        1 for o in rest
        if (o.get("status") or {}).get("phase") in (None, "Pending", "Queued")
        and not (o.get("metadata") or {}).get("deletionTimestamp")
        and key(o) < key(me)
    )
    if running + ahead < limit:
        return True, ""
    return False, (f"waiting for a free slot: {running} running, {ahead} queued ahead "
                   f"(RVC_MAX_CONCURRENT_EXPERIMENTS={limit})")


def _join(uri: str, key: str) -> str:
    return uri.rstrip("/") + "/" + key.lstrip("/")


def _validate_for_cluster(exp: Experiment, policy: Policy) -> None:
    if not policy.require_s3:
        return
    if not exp.spec.storage.uri.startswith("s3://"):
        raise SpecError(f"spec.storage.uri: {exp.spec.storage.uri!r} is not an s3:// URI; step pods share "
                        "no filesystem, so the operator needs S3 (or an S3-compatible store)")
    if not exp.spec.dataset.source.startswith("s3://"):
        raise SpecError(f"spec.dataset.source: {exp.spec.dataset.source!r} is not an s3:// URI; step pods "
                        "cannot read a local folder")


def _new_step() -> dict[str, Any]:
    return {"phase": "Pending", "attempts": 0, "failures": 0}


def _reset_step(ss: dict[str, Any], message: str, reason: str) -> None:
    keep = {"attempts": ss.get("attempts", 0), "job": ss.get("job")}
    ss.clear()
    ss.update(_new_step())
    ss.update({k: v for k, v in keep.items() if v is not None})
    ss["message"] = message
    ss["reason"] = reason


def _set_condition(st: dict[str, Any], ctype: str, value: bool, reason: str, message: str, now: str,
                   gen: int) -> None:
    conds: list[dict[str, Any]] = st.setdefault("conditions", [])
    sval = "True" if value else "False"
    for c in conds:
        if c.get("type") == ctype:
            if c.get("status") != sval:
                c["lastTransitionTime"] = now
            c.update({"status": sval, "reason": reason, "message": message[:1000], "observedGeneration": gen})
            return
    conds.append({"type": ctype, "status": sval, "reason": reason, "message": message[:1000],
                  "lastTransitionTime": now, "observedGeneration": gen})


def _conditions(st: dict[str, Any], reason: str, now: str, gen: int) -> None:
    phase = st.get("phase")
    msg = st.get("message") or ""
    ready_reason = "Succeeded" if phase == "Succeeded" else (phase or "Pending")
    _set_condition(st, "Ready", phase == "Succeeded", ready_reason, msg, now, gen)
    progressing = phase in ("Running", "Pending")
    prog_reason = {"Queued": "Queued", "Succeeded": "Completed", "Failed": "Failed"}.get(phase or "", reason)
    _set_condition(st, "Progressing", progressing, prog_reason, msg, now, gen)
    _set_condition(st, "Failed", phase == "Failed", reason if phase == "Failed" else "NoFailure",
                   msg if phase == "Failed" else "no failure", now, gen)
    order = {"Ready": 0, "Progressing": 1, "Failed": 2}
    st["conditions"].sort(key=lambda c: order.get(c.get("type"), 9))


def _spec_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    meta = manifest.get("metadata") or {}
    return {"metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
            "spec": manifest.get("spec") or {}}


def decide(
    manifest: dict[str, Any],
    status: dict[str, Any] | None,
    jobs: list[JobSummary],
    markers: set[str] | None,
    now: datetime,
    *,
    policy: Policy = Policy(),
    progress: dict[str, Any] | None = None,
    index_file: str | None = None,
    refusal: Refusal | None = None,
) -> Decision:
    """One reconcile step. See the module docstring; `markers` = steps whose completion marker exists in
    storage (None = storage unreadable), `progress` = training progress for status.progress, `index_file` =
    key of the added_*.index file (relative to spec.storage.uri) found in storage, `refusal` = why the
    operator will not touch the experiment's storage (allow-list, ownership record): phase Failed."""
    now_s = iso(now)
    meta = manifest.get("metadata") or {}
    gen = int(meta.get("generation") or 1)
    old = status or {}
    st: dict[str, Any] = copy.deepcopy(old)
    d = Decision(status=st)
    old_phase = old.get("phase")
    if meta.get("deletionTimestamp"):
        d.finished = True
        return d

    # -- validate -------------------------------------------------------------------------------------
    try:
        exp = parse_manifest(_spec_manifest(manifest))
        _validate_for_cluster(exp, policy)
    except SpecError as e:
        return _refuse(d, old, jobs, gen, now_s, "InvalidSpec", f"invalid spec: {e}")
    if refusal is not None:
        _forget_storage_view(st)
        return _refuse(d, old, jobs, gen, now_s, refusal.reason, refusal.message)

    name = exp.name
    hashes = step_hashes(exp)
    enabled = set(exp.spec.steps)
    steps: dict[str, dict[str, Any]] = st.setdefault("steps", {})
    for s in STEP_ORDER:
        steps.setdefault(s, _new_step())
    by_step: dict[str, list[JobSummary]] = {s: [] for s in STEP_ORDER}
    for j in jobs:
        if j.step in by_step:
            by_step[j.step].append(j)
    phase = old_phase or "Pending"
    reason = "Progressing"

    # -- spec changed (metadata.generation) -----------------------------------------------------------
    observed = old.get("observedGeneration")
    gen_changed = observed is not None and int(observed) != gen
    reopened: list[str] = []
    rerun = rerun_point(steps, hashes) if gen_changed else None
    if gen_changed:
        first_forced = None
        for s in STEP_ORDER:
            ss = steps[s]
            in_range = rerun is not None and STEP_ORDER.index(s) >= STEP_ORDER.index(rerun)
            if in_range or s not in enabled:
                for j in by_step[s]:
                    if j.active:
                        d.delete_job(j.name, f"spec changed (generation {gen})")
                ss["attempts"] = max([ss.get("attempts", 0)] + [j.attempt for j in by_step[s]])
            if s not in enabled:
                continue
            if in_range:
                if first_forced is None:
                    first_forced = s
                if ss.get("phase") != "Pending" or ss.get("inputsHash"):
                    reopened.append(s)
                _reset_step(ss, f"inputs changed in generation {gen}", "SpecChanged")
                if s == first_forced:
                    ss["force"] = True
            elif ss.get("phase") == "Failed":
                reopened.append(s)
                _reset_step(ss, f"retrying after the spec changed (generation {gen})", "SpecChanged")
    st["observedGeneration"] = gen

    # -- steps left out of spec.steps (or added to it) -------------------------------------------------
    for s in STEP_ORDER:
        ss = steps[s]
        if s not in enabled:
            for j in by_step[s]:
                if j.active:
                    d.delete_job(j.name, "step not in spec.steps")
            if ss.get("phase") != "Skipped" or ss.get("reason") != "NotInSpec":
                ss.update(phase="Skipped", reason="NotInSpec", message="not in spec.steps")
                ss.pop("force", None)
        elif ss.get("phase") == "Skipped" and ss.get("reason") == "NotInSpec":
            _reset_step(ss, "added to spec.steps", "Added")
            reopened.append(s)

    # A finished experiment whose spec changed runs again what is now left to do; a Failed one is retried
    # whatever changed (the user may have fixed the data, the weights or the resources).
    if gen_changed and phase in ("Succeeded", "Failed") and any(
            steps[s].get("phase") == "Pending" for s in STEP_ORDER if s in enabled):
        phase = "Pending"
        st.pop("completionTime", None)
    if gen_changed and (reopened or (phase == "Pending" and old_phase in ("Succeeded", "Failed"))):
        what = f"rerunning from {rerun}" if rerun else "running"
        d.event("Normal", "SpecChanged", f"generation {gen}: {what} ({', '.join(reopened) or 'no step'})")

    if phase in ("Succeeded", "Failed"):
        # Terminal and nothing changed: keep the status, only refresh what storage says.
        _finish_artifacts(st, exp, index_file)
        if progress is not None:
            st["progress"] = progress
        _cleanup_stale_jobs(d, steps, by_step)
        _drop_empty_strings(st)
        d.finished = True
        return d

    # -- adopt Jobs created just before a restart (status not written yet) ----------------------------
    for s in STEP_ORDER:
        ss = steps[s]
        newest = max(by_step[s], key=lambda j: j.attempt, default=None)
        if newest is None or newest.attempt <= ss.get("attempts", 0):
            continue
        if s in enabled and ss.get("phase") in ("Pending", "Running"):
            ss.update(phase="Running", attempts=newest.attempt, job=newest.name,
                      startTime=newest.start_time or now_s, reason="Adopted",
                      message=f"adopted Job {newest.name}", inputsHash=newest.inputs_hash or hashes[s])
            ss.pop("retryAfter", None)
            if newest.force:
                ss["force"] = True
        else:
            ss["attempts"] = newest.attempt

    # -- walk the recipe --------------------------------------------------------------------------------
    current: str | None = None
    failed_msg: str | None = None
    for s in STEP_ORDER:
        ss = steps[s]
        sp = ss.get("phase")
        if sp in DONE:
            continue
        if sp == "Failed":
            failed_msg = f"{s} failed: {ss.get('message') or 'unknown error'}"
            reason = ss.get("reason") or "StepFailed"
            current = s
            break
        if sp == "Pending":
            if not ss.get("force") and markers is not None and s in markers and s not in CHECKED_BY_JOB:
                ss.update(phase="Skipped", reason="AlreadyComplete", inputsHash=hashes[s], endTime=now_s,
                          message=f"already complete in storage (logs/{name}/.rvc/{s}.done.json)")
                d.event("Normal", "StepSkipped", f"{s}: already complete in storage")
                continue
            current = s
            retry_at = parse_time(ss.get("retryAfter"))
            if retry_at is not None and now < retry_at:
                d.wake((retry_at - now).total_seconds())
                break
            if phase != "Running":
                if not policy.admitted:
                    if phase != "Queued":
                        d.event("Normal", "Queued", policy.queue_message or "waiting for a free slot")
                    phase = "Queued"
                    reason = "Queued"
                    break
                phase = "Running"
                st.setdefault("startTime", now_s)
                todo = ", ".join(s2 for s2 in STEP_ORDER if s2 in enabled)
                d.event("Normal", "Started", f"running steps {todo}")
            attempt = int(ss.get("attempts", 0)) + 1
            force = bool(ss.get("force"))
            jname = job_name(meta["name"], s, attempt)
            d.create.append(CreateJob(s, attempt, force, hashes[s], jname))
            ss.update(phase="Running", attempts=attempt, job=jname, startTime=now_s, reason="JobCreated",
                      message=f"attempt {attempt} started" + (" (--force)" if force else ""),
                      inputsHash=hashes[s])
            for k in ("endTime", "retryAfter", "exitCode"):
                ss.pop(k, None)
            d.event("Normal", "JobCreated", f"{s}: created Job {jname}" + (" with --force" if force else ""))
            break
        # Running
        current = s
        job = next((j for j in by_step[s] if j.name == ss.get("job")), None)
        if job is None or job.deleting:
            if markers is not None and s in markers:
                _step_succeeded(d, ss, s, now, None, "Job gone; completion marker present")
                continue
            started = parse_time(ss.get("startTime")) or now
            if (now - started).total_seconds() < policy.missing_job_grace_seconds:
                d.wake(policy.missing_job_grace_seconds - (now - started).total_seconds())
                break
            failed_msg = _step_failed(d, ss, s, exp, policy, now, None, permanent=False,
                                      reason="JobMissing", message=f"Job {ss.get('job')} disappeared")
            break
        if job.state == "Succeeded":
            _step_succeeded(d, ss, s, now, job, "completed")
            continue
        permanent, why = _classify(job, exp, ss, now, policy)
        if job.state == "Failed" or permanent:
            if job.active:
                d.delete_job(job.name, "permanent failure")
            failed_msg = _step_failed(d, ss, s, exp, policy, now, job, permanent=permanent,
                                      reason=why, message=_job_error(job, exp))
            break
        # still running
        detail = job.waiting or f"attempt {ss.get('attempts')} running"
        ss["message"] = detail
        ss["reason"] = "Waiting" if job.waiting else "Running"
        break

    # -- experiment phase ------------------------------------------------------------------------------
    all_done = all(steps[s].get("phase") in DONE for s in STEP_ORDER)
    if failed_msg is not None:
        phase = "Failed"
        reason = (steps[current].get("reason") if current else None) or "StepFailed"
        st["message"] = failed_msg
        st.setdefault("completionTime", now_s)
        if old_phase != "Failed":
            d.event("Warning", "Failed", failed_msg)
        d.finished = True
    elif all_done:
        phase = "Succeeded"
        reason = "Succeeded"
        current = None
        st["completionTime"] = now_s if old_phase != "Succeeded" else old.get("completionTime", now_s)
        _finish_artifacts(st, exp, index_file)
        model = (st.get("artifacts") or {}).get("model")
        st["message"] = "all steps complete" + (f"; model: {model}" if model else "")
        if old_phase != "Succeeded":
            d.event("Normal", "Succeeded", st["message"])
        d.finished = True
    elif phase == "Queued":
        st["message"] = policy.queue_message or "waiting for a free slot"
    else:
        ss = steps[current] if current else {}
        st["message"] = f"{current}: {ss.get('message') or ss.get('phase')}" if current else "starting"
        reason = "StepRunning"
    st["phase"] = phase
    st["currentStep"] = current
    if progress is not None:
        st["progress"] = progress
    _finish_artifacts(st, exp, index_file)
    _cleanup_stale_jobs(d, steps, by_step)
    _conditions(st, reason, now_s, gen)
    _drop_empty_strings(st)
    return d


def _refuse(d: Decision, old: dict[str, Any], jobs: list[JobSummary], gen: int, now_s: str, reason: str,
            msg: str) -> Decision:
    """Phase Failed without running anything (invalid spec, storage refused); active Jobs are deleted.
    The Warning event is posted once per message and generation."""
    st = d.status
    same = old.get("phase") == "Failed" and old.get("message") == msg
    if not (same and old.get("observedGeneration") == gen):
        d.event("Warning", reason, msg)
    for j in jobs:
        if j.active:
            d.delete_job(j.name, reason)
    st.update(phase="Failed", message=msg, observedGeneration=gen, currentStep=None)
    st.setdefault("completionTime", now_s)
    _conditions(st, reason, now_s, gen)
    _drop_empty_strings(st)
    d.finished = True
    return d


def _forget_storage_view(st: dict[str, Any]) -> None:
    """Drop what the status shows from storage (progress, artifacts, steps skipped because of markers):
    a refused experiment must show nothing of a folder the operator may not read for it."""
    st.pop("progress", None)
    st.pop("artifacts", None)
    for ss in (st.get("steps") or {}).values():
        if ss.get("reason") == "AlreadyComplete":
            ss.clear()
            ss.update(_new_step())


def _drop_empty_strings(obj: Any) -> None:
    """Leave out "" values: the status is validated as JSON where some API servers (seen on 1.20) read an
    empty string as null and refuse it for a string field."""
    if isinstance(obj, dict):
        for k in [k for k, v in obj.items() if v == ""]:
            del obj[k]
        for v in obj.values():
            _drop_empty_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            _drop_empty_strings(v)


def _job_error(job: JobSummary, exp: Experiment) -> str:
    if job.reason == "OOMKilled":
        mem = exp.spec.resources.memory
        hint = f"more than its memory limit ({mem})" if mem else "more memory than the node had"
        return (f"OOMKilled: the step used {hint}; raise spec.resources.memory or lower "
                "spec.train.batchSize / spec.resources.parallelism")
    if job.waiting_reason in IMAGE_PULL_REASONS or job.waiting_reason == "InvalidImageName":
        return f"image cannot be pulled: {job.waiting}"
    parts = []
    if job.exit_code is not None:
        parts.append(f"exit code {job.exit_code}")
    if job.reason and job.reason not in ("Error",):
        parts.append(job.reason)
    head = ", ".join(parts)
    if job.message:
        return f"{job.message} ({head})" if head else job.message
    return head or "Job failed"


def _classify(job: JobSummary, exp: Experiment, ss: dict[str, Any], now: datetime,
              policy: Policy) -> tuple[bool, str]:
    """(permanent, reason). Exit codes 2/3 of rvc-pipeline are permanent (bad spec/data, missing
    weights), as are an OOM kill under a memory limit and an image that cannot be pulled for long."""
    if job.exit_code in PERMANENT_EXIT_CODES:
        return True, "BadInput" if job.exit_code == errors.EXIT_BAD_INPUT else "MissingWeights"
    if job.reason == "OOMKilled" and exp.spec.resources.memory:
        return True, "OOMKilled"
    if job.waiting_reason == "InvalidImageName":
        return True, "InvalidImage"
    if job.waiting_reason in IMAGE_PULL_REASONS:
        started = parse_time(ss.get("startTime")) or now
        if (now - started).total_seconds() >= policy.image_pull_timeout_seconds:
            return True, "ImagePullFailed"
    return False, job.reason or "JobFailed"


def _step_succeeded(d: Decision, ss: dict[str, Any], s: str, now: datetime, job: JobSummary | None,
                    message: str) -> None:
    end = (job.completion_time if job else None) or iso(now)
    ss.update(phase="Succeeded", endTime=end, reason="Completed", message=message, failures=0)
    for k in ("force", "retryAfter", "exitCode"):
        ss.pop(k, None)
    start = parse_time(ss.get("startTime"))
    t_end = parse_time(end)
    if start and t_end:
        d.step_durations.append((s, max(0.0, (t_end - start).total_seconds())))
    d.event("Normal", "StepSucceeded", f"{s}: {message} (Job {ss.get('job')})")


def _step_failed(d: Decision, ss: dict[str, Any], s: str, exp: Experiment, policy: Policy, now: datetime,
                 job: JobSummary | None, *, permanent: bool, reason: str, message: str) -> str | None:
    """Record a failed attempt. Returns the experiment's failure message, or None when a retry is planned."""
    attempt = ss.get("attempts", 0)
    if job is not None and job.exit_code is not None:
        ss["exitCode"] = job.exit_code
    d.failures.append((s, reason))
    if permanent:
        ss.update(phase="Failed", reason=reason, message=message, endTime=iso(now))
        ss.pop("retryAfter", None)
        d.event("Warning", "StepFailed", f"{s}: attempt {attempt} failed permanently: {message}")
        return f"{s} failed: {message}"
    failures = int(ss.get("failures", 0)) + 1
    ss["failures"] = failures
    if failures > policy.max_retries:
        msg = f"{message}; gave up after {failures} attempt(s) (RVC_STEP_MAX_RETRIES={policy.max_retries})"
        ss.update(phase="Failed", reason="RetriesExhausted", message=msg, endTime=iso(now))
        ss.pop("retryAfter", None)
        d.event("Warning", "StepFailed", f"{s}: {msg}")
        return f"{s} failed: {msg}"
    delay = backoff_delay(failures, policy)
    retry_at = now + timedelta(seconds=delay)
    ss.update(phase="Pending", reason="Retrying", retryAfter=iso(retry_at),
              message=f"attempt {attempt} failed: {message}; retry {failures}/{policy.max_retries} "
                      f"in {delay:.0f}s")
    d.retries.append(s)
    d.wake(delay)
    d.event("Warning", "Retrying", f"{s}: attempt {attempt} failed ({message}); retry {failures}/"
                                   f"{policy.max_retries} in {delay:.0f}s")
    return None


def _finish_artifacts(st: dict[str, Any], exp: Experiment, index_file: str | None) -> None:
    uri = exp.spec.storage.uri
    name = exp.name
    art = dict(st.get("artifacts") or {})
    art["logs"] = _join(uri, f"logs/{name}/")
    steps = st.get("steps") or {}

    def produced(s: str) -> bool:
        ss = steps.get(s) or {}
        return ss.get("phase") == "Succeeded" or (ss.get("phase") == "Skipped"
                                                  and ss.get("reason") == "AlreadyComplete")

    if produced("train"):
        art["model"] = _join(uri, f"logs/{name}/weights/{name}.pth")
    if produced("index") and index_file:
        art["index"] = index_file if "://" in index_file else _join(uri, index_file)
    st["artifacts"] = art


def _cleanup_stale_jobs(d: Decision, steps: dict[str, dict[str, Any]], by_step: dict[str, list[JobSummary]]
                        ) -> None:
    """An active Job that is not its step's current Job (an older attempt, or left over from before a
    spec change) must not keep running: it would write outputs and markers for stale inputs."""
    for s, js in by_step.items():
        ss = steps.get(s) or {}
        for j in js:
            if j.active and not (ss.get("phase") == "Running" and j.name == ss.get("job")):
                d.delete_job(j.name, "superseded")


# ---------------------------------------------------------------------------------------------------
# deletion
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeletionPlan:
    jobs: list[str]
    configmap: str
    artifacts_prefix: str | None  # key prefix in spec.storage.uri to delete, None = keep artifacts
    storage_uri: str | None


def plan_deletion(manifest: dict[str, Any], jobs: list[JobSummary], delete_artifacts_default: bool = False
                  ) -> DeletionPlan:
    """What to clean up when an RVCExperiment is deleted. Jobs and the ConfigMap also go through their
    owner references (garbage collector); artifacts stay unless the annotation
    rvc-operator.dev/delete-artifacts is "true" (or RVC_DELETE_ARTIFACTS_DEFAULT and no annotation)."""
    meta = manifest.get("metadata") or {}
    ann = (meta.get("annotations") or {}).get(ANN_DELETE_ARTIFACTS)
    wanted = delete_artifacts_default if ann is None else str(ann).strip().lower() == "true"
    prefix = uri = None
    if wanted:
        try:
            exp = parse_manifest(_spec_manifest(manifest))
            prefix, uri = f"logs/{exp.name}/", exp.spec.storage.uri
        except SpecError:
            prefix = uri = None
    return DeletionPlan(jobs=sorted(j.name for j in jobs if not j.deleting),
                        configmap=configmap_name(meta.get("name", "")), artifacts_prefix=prefix,
                        storage_uri=uri)


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning `old` into `new` (removed keys become None; lists are replaced)."""
    old = old or {}
    patch: dict[str, Any] = {}
    for k in old:
        if k not in new:
            patch[k] = None
    for k, v in new.items():
        if k not in old:
            patch[k] = v
        elif isinstance(v, dict) and isinstance(old[k], dict):
            sub = status_patch(old[k], v)
            if sub:
                patch[k] = sub
        elif old[k] != v:
            patch[k] = v
    return patch
