"""The operator's state machine, as one pure function.

    decide(manifest, status, jobs, markers, now) -> Decision

Inputs are what the operator can observe at any moment: the RVCExperiment as stored (spec, metadata,
status), the Jobs that carry the experiment's label and owner uid (summarised by observe.summarize_job),
and the step completion markers found in storage (None when storage cannot be read). The Decision lists
the Jobs to create or delete, the new status (typed: api.ExperimentStatus), and the events to post.
Nothing is remembered between calls, so an operator restart at any moment resumes from the same inputs,
and a Job is never created twice: Job names are deterministic (`<name>-<step>-<attempt>`), a Job found in
the cluster with a higher attempt than the status knows is adopted, and the caller treats AlreadyExists
as success.

Experiment phases: Pending -> Queued (RVC_MAX_CONCURRENT_EXPERIMENTS) -> Running -> Succeeded | Failed;
Suspended while spec.suspend is true (from Pending, Queued or Running; back to Pending on resume).
Step phases: Pending, Running, Succeeded, Failed, Skipped (not in spec.steps, or already complete in
storage). See docs/operator.md for the spec-change rules (`rerun_point`).

`decide` is a short sequence of small pure functions, one per concern: validate, spec change, steps
added/removed, finished experiments, adoption, the recipe walk (pending, running, failed steps), the
experiment's phase, artifacts, stale Jobs, conditions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from pydantic import TypeAdapter, ValidationError
from rvc_pipeline.core import errors, layout
from rvc_pipeline.core.spec import STEP_ORDER, Experiment, SpecError, step_hashes

from .api import (
    ArtifactsStatus,
    Condition,
    DatasetStatus,
    ExperimentStatus,
    ProgressStatus,
    RunStatus,
    ShardStatus,
    StepStatus,
    TrainingStatus,
    all_steps,
    dump_status,
    load_status,
    parse_experiment,
    progress_of,
)
from .jobs import ANN_DELETE_ARTIFACTS, PERMANENT_EXIT_CODES, SHARDED_STEPS, configmap_name, job_name
from .observe import IMAGE_PULL_REASONS, JobSummary
from .ownership import Refusal
from .progress_reader import shard_eta_key

DONE = ("Succeeded", "Skipped")
FINISHED = ("Succeeded", "Failed")
# Steps never skipped because of an old completion marker: their Job is how a changed input is noticed.
# preprocess compares the dataset's manifest (names, sizes, digests) with the one it recorded and returns
# in seconds when nothing changed; a changed dataset reruns it and invalidates the later markers. convert
# compares its source listing and model with its marker's: only files added since are converted.
CHECKED_BY_JOB = ("preprocess", "convert")


# ---------------------------------------------------------------------------------------------------
# the decision
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
    retries_source: str = "RVC_STEP_MAX_RETRIES"  # where max_retries came from (named in messages)


@dataclass(frozen=True)
class CreateJob:
    step: str
    attempt: int
    force: bool
    inputs_hash: str
    name: str
    shard: int | None = None  # shard index of a sharded step's Job (None: the step runs as one Job)
    shards: int = 1  # N of the sharded step run

    @property
    def shard_arg(self) -> tuple[int, int] | None:
        """(I, N) for build_job_spec's `shard` (None: one Job)."""
        return None if self.shard is None else (self.shard, self.shards)


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
    state: ExperimentStatus
    create: list[CreateJob] = field(default_factory=list)
    delete: list[DeleteJob] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    finished: bool = False
    delete_resource: bool = False  # spec.lifecycle.ttlSecondsAfterFinished ran out: delete the RVCExperiment
    # for metrics
    step_durations: list[tuple[str, float]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    retries: list[str] = field(default_factory=list)

    @property
    def status(self) -> dict[str, Any]:
        """The new status as the API stores it (see api.dump_status)."""
        return dump_status(self.state)

    def event(self, type_: str, reason: str, message: str) -> None:
        self.events.append(Event(type_, reason, message))

    def delete_job(self, name: str, reason: str) -> None:
        if all(d.name != name for d in self.delete):
            self.delete.append(DeleteJob(name, reason))

    def wake(self, seconds: float) -> None:
        seconds = max(1.0, seconds)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


@dataclass
class _Ctx:
    """What one reconcile step reads (fixed), plus the decision it writes."""

    d: Decision
    exp: Experiment
    resource: str  # metadata.name: Job names derive from it
    hashes: dict[str, str]
    enabled: set[str]
    by_step: dict[str, list[JobSummary]]
    markers: set[str] | None
    now: datetime
    gen: int
    policy: Policy

    @property
    def now_s(self) -> str:
        return iso(self.now)


@dataclass
class _Walk:
    """The experiment-level outcome as the recipe walk finds it."""

    phase: str
    reason: str = "Progressing"
    current: str | None = None
    failed_msg: str | None = None
    resumed: bool = False  # spec.suspend went false in this reconcile (Resumed posted, not Started)


# ---------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------
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


def _hash_of(ss: StepStatus | Mapping[str, Any] | None) -> str | None:
    if isinstance(ss, StepStatus):
        return ss.inputs_hash
    return (ss or {}).get("inputsHash")


def rerun_point(steps_status: Mapping[str, Any], hashes: dict[str, str]) -> str | None:
    """The first step whose recorded inputs differ from the current spec's (None: nothing to rerun).
    `steps_status`: step -> StepStatus (or its stored dict)."""
    for s in STEP_ORDER:
        h = _hash_of(steps_status.get(s))
        if h and h != hashes[s]:
            return s
    return None


def backoff_delay(failures: int, policy: Policy) -> float:
    return float(min(policy.backoff_max_seconds, policy.backoff_seconds * (2 ** max(0, failures - 1))))


def _queue_key(o: dict[str, Any]) -> tuple[str, str, str]:
    m = o.get("metadata") or {}
    return (str(m.get("creationTimestamp") or ""), str(m.get("namespace") or ""), str(m.get("name") or ""))


_BOOL = TypeAdapter(bool)


def suspended(manifest: Mapping[str, Any]) -> bool:
    """spec.suspend of a manifest as stored, read as the typed spec reads it (False: unset or invalid)."""
    spec = manifest.get("spec")
    raw = spec.get("suspend") if isinstance(spec, Mapping) else None
    try:
        return raw is not None and _BOOL.validate_python(raw)
    except ValidationError:
        return False


def admit(me: dict[str, Any], others: list[dict[str, Any]], limit: int) -> tuple[bool, str]:
    """Whether experiment `me` may start under RVC_MAX_CONCURRENT_EXPERIMENTS=`limit` (0 = no limit).
    Running experiments hold a slot; waiting ones are served oldest first (creationTimestamp, then name).
    A suspended experiment (spec.suspend) neither holds a slot nor waits for one; a resumed one (still
    phase Suspended) waits like a Pending one."""
    if limit <= 0:
        return True, ""
    my_uid = (me.get("metadata") or {}).get("uid")
    rest = [o for o in others if (o.get("metadata") or {}).get("uid") != my_uid and not suspended(o)]
    running = sum(1 for o in rest if (o.get("status") or {}).get("phase") == "Running")
    ahead = sum(
        1 for o in rest
        if (o.get("status") or {}).get("phase") in (None, "Pending", "Queued", "Suspended")
        and not (o.get("metadata") or {}).get("deletionTimestamp")
        and _queue_key(o) < _queue_key(me)
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
    uri, source = str(exp.spec.storage.uri), str(exp.spec.dataset.source)
    if not uri.startswith("s3://"):
        raise SpecError(f"spec.storage.uri: {uri!r} is not an s3:// URI; step pods share "
                        "no filesystem, so the operator needs S3 (or an S3-compatible store)")
    if not source.startswith("s3://"):
        raise SpecError(f"spec.dataset.source: {source!r} is not an s3:// URI; step pods "
                        "cannot read a local folder")
    conv = exp.spec.convert.source if exp.spec.convert is not None else None
    if conv is not None and not conv.startswith("s3://"):
        raise SpecError(f"spec.convert.source: {conv!r} is not an s3:// URI; step pods cannot read a local "
                        "folder")


def _experiment(manifest: dict[str, Any], given: Experiment | SpecError | None, policy: Policy
                ) -> Experiment:
    """The parsed experiment (the caller's, when it parsed the manifest already), checked for the cluster."""
    if isinstance(given, SpecError):
        raise given
    exp = given if given is not None else parse_experiment(manifest)
    _validate_for_cluster(exp, policy)
    return exp


def _overwrite(ss: StepStatus, fresh: StepStatus) -> None:
    for name in StepStatus.model_fields:
        setattr(ss, name, getattr(fresh, name))


def _reset_step(ss: StepStatus, message: str, reason: str) -> None:
    """Pending again: the attempt count and the last Job name stay (Job names never repeat)."""
    _overwrite(ss, StepStatus(phase="Pending", attempts=ss.attempts, job=ss.job, message=message,
                              reason=reason))


def _stop_jobs(c: _Ctx, step: str, reason: str) -> None:
    for j in c.by_step[step]:
        if j.active:
            c.d.delete_job(j.name, reason)


def _by_step(jobs: list[JobSummary]) -> dict[str, list[JobSummary]]:
    by_step: dict[str, list[JobSummary]] = {s: [] for s in STEP_ORDER}
    for j in jobs:
        if j.step in by_step:
            by_step[j.step].append(j)
    return by_step


# ---------------------------------------------------------------------------------------------------
# decide
# ---------------------------------------------------------------------------------------------------
def decide(
    manifest: dict[str, Any],
    status: Mapping[str, Any] | ExperimentStatus | None,
    jobs: list[JobSummary],
    markers: set[str] | None,
    now: datetime,
    *,
    policy: Policy = Policy(),
    progress: Mapping[str, Any] | ProgressStatus | None = None,
    training: TrainingStatus | None = None,
    index_file: str | None = None,
    refusal: Refusal | None = None,
    experiment: Experiment | SpecError | None = None,
    step_etas: Mapping[str, float] | None = None,
    dataset: DatasetStatus | None = None,
) -> Decision:
    """One reconcile step. See the module docstring; `markers` = steps whose completion marker exists in
    storage (None = storage unreadable), `progress` = training progress for status.progress, `training` =
    the checkpoint evaluation for status.training (checkpoints relative to the experiment), `index_file` =
    key of the added_*.index file (relative to spec.storage.uri) found in storage, `refusal` = why the
    operator will not touch the experiment's storage (allow-list, ownership record): phase Failed.
    `experiment`: the manifest as parsed by the caller (or its SpecError; None: parsed here); `step_etas`:
    seconds left of running per-file steps, `dataset`: preprocess's marker summary (None: unread)."""
    meta = manifest.get("metadata") or {}
    gen = int(meta.get("generation") or 1)
    old = load_status(status)
    d = Decision(state=old.model_copy(deep=True))
    if meta.get("deletionTimestamp"):
        d.finished = True
        return d
    try:
        exp = _experiment(manifest, experiment, policy)
    except SpecError as e:
        return _ttl(_refuse(d, old, jobs, gen, now, "InvalidSpec", f"invalid spec: {e}"), manifest, now)
    if refusal is not None:
        _forget_storage_view(d.state)
        return _ttl(_refuse(d, old, jobs, gen, now, refusal.reason, refusal.message), manifest, now)
    c = _Ctx(d=d, exp=exp, resource=str(meta.get("name") or ""), hashes=step_hashes(exp),
             enabled=set(exp.spec.steps), by_step=_by_step(jobs), markers=markers, now=now, gen=gen,
             policy=lifecycle_policy(policy, exp))
    st = d.state
    steps = all_steps(st)
    w = _Walk(phase=old.phase or "Pending")
    if old.observed_generation is not None and old.observed_generation != gen:
        _spec_changed(c, st, steps, w, old.phase)
    else:
        _sync_enabled_steps(c, steps)
    st.observed_generation = gen
    _set_training(st, exp, training)
    if w.phase in FINISHED:
        return _ttl(_refresh_finished(c, st, steps, progress, index_file, step_etas, dataset), manifest, now)
    over = _active_clock(c, st, steps, w, old)
    if over is not None:
        return _ttl(_refuse(d, old, jobs, gen, now, "DeadlineExceeded", over), manifest, now)
    _advance(c, st, steps, w, old, progress, index_file)
    _set_estimates(st, steps, step_etas, dataset)
    _finish_artifacts(st, exp, index_file)
    _cleanup_stale_jobs(c, steps)
    _conditions(st, w.reason, c.now_s, gen)
    return _ttl(d, manifest, now)


def _advance(c: _Ctx, st: ExperimentStatus, steps: dict[str, StepStatus], w: _Walk, old: ExperimentStatus,
             progress: Mapping[str, Any] | ProgressStatus | None, index_file: str | None) -> None:
    """An unfinished experiment: adopt Jobs, walk the recipe (or stop it: spec.suspend), settle the phase,
    copy the progress."""
    _adopt_jobs(c, steps)
    if c.exp.spec.suspend:
        _suspend(c, st, steps, w, old)
    else:
        if not _resume_held(c, st, steps, w):
            _walk_recipe(c, st, steps, w)
        _settle_phase(c, st, steps, w, old, index_file)
    if progress is not None:
        st.progress = progress_of(progress) or st.progress


# -- spec.lifecycle: retries, deadline, TTL after finishing ----------------------------------------------
def lifecycle_policy(policy: Policy, exp: Experiment) -> Policy:
    """The operator's policy with the experiment's spec.lifecycle overrides."""
    retries = exp.spec.lifecycle.retries_per_step
    if retries is None:
        return policy
    return replace(policy, max_retries=retries, retries_source="spec.lifecycle.retriesPerStep")


def seconds_left(since: str | None, seconds: int | None, now: datetime) -> float | None:
    """Seconds until `since` + `seconds` (<= 0: past it); None when either is unset."""
    start = parse_time(since)
    if start is None or seconds is None:
        return None
    return (start + timedelta(seconds=seconds) - now).total_seconds()


def _over_deadline(c: _Ctx, st: ExperimentStatus, steps: dict[str, StepStatus]) -> str | None:
    """The failure message once spec.lifecycle.activeDeadlineSeconds has passed since status.startTime,
    time spent suspended (status.suspendedSeconds) not counted (its unfinished steps fail with reason
    DeadlineExceeded); before, wake up when it will have. The clock stops while suspended."""
    limit = c.exp.spec.lifecycle.active_deadline_seconds
    paused = st.suspended_seconds or 0
    left = seconds_left(st.start_time, None if limit is None else limit + paused, c.now)
    if left is None or c.exp.spec.suspend:
        return None
    if left > 0:
        c.d.wake(left)
        return None
    msg = f"spec.lifecycle.activeDeadlineSeconds={limit} exceeded (started {st.start_time}" + (
        f"; {paused}s suspended not counted)" if paused else ")")
    for s in STEP_ORDER:
        if s in c.enabled and steps[s].phase in ("Running", "Pending"):
            _fail_step(c, steps[s], s, "DeadlineExceeded", msg)
    return msg


# -- spec.suspend ---------------------------------------------------------------------------------------
RESUME_HINT = "kubectl patch rvcx {name} --type merge -p '{{\"spec\":{{\"suspend\":false}}}}'"


def _active_clock(c: _Ctx, st: ExperimentStatus, steps: dict[str, StepStatus], w: _Walk,
                  old: ExperimentStatus) -> str | None:
    """The experiment's clock: entering or leaving spec.suspend, then the deadline (see _over_deadline)."""
    _track_suspension(c, st, steps, w, old)
    return _over_deadline(c, st, steps)


def _track_suspension(c: _Ctx, st: ExperimentStatus, steps: dict[str, StepStatus], w: _Walk,
                      old: ExperimentStatus) -> None:
    """status.suspendTime is set while suspended; on resume the time suspended after status.startTime is
    added to status.suspendedSeconds (activeDeadlineSeconds does not count it, as a resumed Kubernetes Job
    restarts its timer), the Suspended condition turns False (Resumed) and the experiment is Pending
    again: it waits for a slot (RVC_MAX_CONCURRENT_EXPERIMENTS) like a new one."""
    if c.exp.spec.suspend:
        st.suspend_time = st.suspend_time or c.now_s
        return
    if old.phase != "Suspended":
        st.suspend_time = None
        return
    since, started = parse_time(st.suspend_time), parse_time(st.start_time)
    if since is not None and started is not None:
        st.suspended_seconds = (st.suspended_seconds or 0) + max(0, round((c.now - max(since, started))
                                                                          .total_seconds()))
    st.suspend_time = None
    w.phase, w.resumed = "Pending", True
    where = next((s for s in STEP_ORDER if steps[s].phase not in DONE), None)
    msg = f"resumed in generation {c.gen}" + (f"; continuing with {where}" if where else "")
    _set_condition(st, "Suspended", False, "Resumed", msg, c.now_s, c.gen)
    c.d.event("Normal", "Resumed", msg)


def _suspend(c: _Ctx, st: ExperimentStatus, steps: dict[str, StepStatus], w: _Walk,
             old: ExperimentStatus) -> None:
    """spec.suspend on an unfinished experiment: every active Job is deleted (propagation Foreground: its
    pods get SIGTERM and save their work, and the Job stays listed, `deleting`, until they are gone); the
    steps they ran are Pending again without a failure counted (attempts kept: Job names never repeat);
    no Job is created and no slot is held."""
    stopping = []
    for s in STEP_ORDER:
        for j in c.by_step[s]:
            if j.active:
                c.d.delete_job(j.name, "suspended (spec.suspend)")
            if j.active or j.deleting:
                stopping.append(j.name)
        _pause_step(c, s, steps[s])
    w.phase = w.reason = "Suspended"
    w.current = next((s for s in STEP_ORDER if steps[s].phase not in DONE), None)
    st.phase, st.current_step = "Suspended", w.current
    wait = f"; stopping Job {', '.join(stopping)} (its pod saves its work)" if stopping else ""
    st.message = (f"suspended{f' at {w.current}' if w.current else ''}{wait}; to resume: "
                  + RESUME_HINT.format(name=c.resource))
    _set_condition(st, "Suspended", True, "Suspended", st.message, c.now_s, c.gen)
    if old.phase != "Suspended":
        c.d.event("Normal", "Suspended", st.message)
    if stopping:
        c.d.wake(10)


def _pause_step(c: _Ctx, s: str, ss: StepStatus) -> None:
    """Put the step's stopped attempt (or each stopped shard of a sharded step) back to Pending."""
    runs: list[RunStatus] = [ss] if ss.shards is None else list(ss.shards)
    paused = False
    for run in runs:
        if run.phase == "Running" and _stopped_by_suspend(c, s, run):
            _pause_run(run, c.now_s)
            paused = True
    if paused and ss.shards is not None:
        ss.phase, ss.reason = "Pending", "Suspended"
        ss.message = "stopped by spec.suspend: " + ", ".join(
            f"shard {sh.index} attempt {sh.attempts}" for sh in ss.shards if sh.reason == "Suspended")


def _stopped_by_suspend(c: _Ctx, s: str, run: RunStatus) -> bool:
    """Whether a Running attempt (a step's, or one shard's) is stopped by the suspension: its Job runs,
    is being deleted or is gone, or ended with exit 143 (the pod saved its work on SIGTERM). A Job that
    finished on its own is followed on resume, as it would have been."""
    job = next((j for j in c.by_step[s] if j.name == run.job), None)
    if job is None:
        return True
    if job.state == "Succeeded":
        return False
    return job.state != "Failed" or job.deleting or job.exit_code == errors.EXIT_PREEMPTED


def _pause_run(run: RunStatus, now: str) -> None:
    """A stopped attempt: Pending again, its attempts, failures and --force kept, no backoff (reason
    Suspended; endTime = when it was stopped)."""
    run.phase, run.reason, run.end_time, run.retry_after = "Pending", "Suspended", now, None
    run.message = f"attempt {run.attempts} stopped by spec.suspend; resumes with attempt {run.attempts + 1}"


def _resume_held(c: _Ctx, st: ExperimentStatus, steps: dict[str, StepStatus], w: _Walk) -> bool:
    """A sharded step met again by a resumed experiment (Pending or Queued, not Running): take a slot
    and wait for its stopped shard Jobs to be gone before its shards run (the one-Job path does both in
    _pending_step). True: hold the walk for now."""
    cur = next((s for s in STEP_ORDER if steps[s].phase not in DONE), None)
    if cur is None or steps[cur].shards is None or w.phase == "Running" or steps[cur].phase == "Failed":
        return False
    w.current = cur
    return not _start_experiment(c, st, w) or _stopping_jobs(c, cur, steps[cur])


def _stopping_jobs(c: _Ctx, s: str, ss: StepStatus) -> bool:
    """True while a Job of step `s` is still being deleted (a suspended or superseded attempt whose pod
    may be saving its work within terminationGracePeriodSeconds): the next attempt waits for it, so two
    Jobs of one step never run at once."""
    stopping = [j.name for j in c.by_step[s] if j.deleting]
    if not stopping:
        return False
    ss.message = (f"waiting for Job {', '.join(stopping)} to stop (its pod saves its work; a pod stuck "
                  "terminating on a lost node needs `kubectl delete pod --force`)")
    c.d.wake(10)
    return True


def ttl_of(manifest: Mapping[str, Any]) -> int | None:
    """spec.lifecycle.ttlSecondsAfterFinished of a manifest as stored (None: unset or not a number)."""
    lifecycle = (manifest.get("spec") or {}).get("lifecycle") or {}
    ttl = lifecycle.get("ttlSecondsAfterFinished") if isinstance(lifecycle, Mapping) else None
    return ttl if isinstance(ttl, int) and not isinstance(ttl, bool) and ttl >= 0 else None


def ttl_left(manifest: Mapping[str, Any], phase: str | None, completion_time: str | None,
             now: datetime) -> float | None:
    """Seconds until a finished experiment is to be deleted (<= 0: now); None: no TTL or not finished."""
    if phase not in FINISHED:
        return None
    return seconds_left(completion_time, ttl_of(manifest), now)


def _ttl(d: Decision, manifest: Mapping[str, Any], now: datetime) -> Decision:
    """Decide the deletion of a finished experiment once its TTL ran out; until then, wake up then."""
    left = ttl_left(manifest, d.state.phase, d.state.completion_time, now)
    if left is not None and left <= 0:
        d.delete_resource = True
    elif left is not None:
        d.wake(left)
    return d


# -- refused: invalid spec, storage not allowed or owned elsewhere --------------------------------------
def _refuse(d: Decision, old: ExperimentStatus, jobs: list[JobSummary], gen: int, now: datetime, reason: str,
            msg: str) -> Decision:
    """Phase Failed without running anything (invalid spec, storage refused); active Jobs are deleted.
    The Warning event is posted once per message and generation."""
    st, now_s = d.state, iso(now)
    same = old.phase == "Failed" and old.message == msg
    if not (same and old.observed_generation == gen):
        d.event("Warning", reason, msg)
    for j in jobs:
        if j.active:
            d.delete_job(j.name, reason)
    st.phase, st.message, st.observed_generation, st.current_step = "Failed", msg, gen, None
    if st.completion_time is None:
        st.completion_time = now_s
    _conditions(st, reason, now_s, gen)
    d.finished = True
    return d


def _forget_storage_view(st: ExperimentStatus) -> None:
    """Drop what the status shows from storage (progress, artifacts, steps skipped because of markers):
    a refused experiment must show nothing of a folder the operator may not read for it."""
    st.progress = None
    st.training = None
    st.artifacts = None
    st.dataset = None
    for s in STEP_ORDER:
        ss = getattr(st.steps, s) if st.steps is not None else None
        if ss is not None and ss.reason == "AlreadyComplete":
            _overwrite(ss, StepStatus(phase="Pending"))


# -- spec changed (metadata.generation) -----------------------------------------------------------------
def _spec_changed(c: _Ctx, st: ExperimentStatus, steps: dict[str, StepStatus], w: _Walk,
                  old_phase: str | None) -> None:
    """Rerun from the first step whose inputs changed (that one with --force); retry a failed step. A
    finished experiment whose spec changed runs again what is now left to do; a Failed one is retried
    whatever changed (the user may have fixed the data, the weights or the resources)."""
    if w.phase in FINISHED and c.exp.spec.suspend:
        return  # suspending a finished experiment changes nothing; the change is applied on resume
    rerun = rerun_point(steps, c.hashes)
    reopened = _reopen_changed_steps(c, steps, rerun)
    reopened += _sync_enabled_steps(c, steps)
    if w.phase in FINISHED and any(steps[s].phase == "Pending" for s in STEP_ORDER if s in c.enabled):
        w.phase = "Pending"
        st.completion_time = None
    if reopened or (w.phase == "Pending" and old_phase in FINISHED):
        what = f"rerunning from {rerun}" if rerun else "running"
        c.d.event("Normal", "SpecChanged",
                  f"generation {c.gen}: {what} ({', '.join(reopened) or 'no step'})")


def _reopen_changed_steps(c: _Ctx, steps: dict[str, StepStatus], rerun: str | None) -> list[str]:
    """Reset the steps from `rerun` on (and Failed ones before it); stop their Jobs. Returns the steps
    reopened (for the SpecChanged event)."""
    start = STEP_ORDER.index(rerun) if rerun is not None else len(STEP_ORDER)
    reopened: list[str] = []
    forced = False
    for i, s in enumerate(STEP_ORDER):
        ss = steps[s]
        if i >= start or s not in c.enabled:
            _stop_jobs(c, s, f"spec changed (generation {c.gen})")
            ss.attempts = max([ss.attempts] + [j.attempt for j in c.by_step[s]])
        if s not in c.enabled:
            continue
        if i >= start:
            if ss.phase != "Pending" or ss.inputs_hash:
                reopened.append(s)
            _reset_step(ss, f"inputs changed in generation {c.gen}", "SpecChanged")
            ss.force = True if not forced else None
            forced = True
        elif ss.phase == "Failed":
            reopened.append(s)
            _reset_step(ss, f"retrying after the spec changed (generation {c.gen})", "SpecChanged")
    return reopened


def _sync_enabled_steps(c: _Ctx, steps: dict[str, StepStatus]) -> list[str]:
    """Steps left out of spec.steps are Skipped (their Jobs stopped); steps added to it are Pending again.
    Returns the steps added."""
    added: list[str] = []
    for s in STEP_ORDER:
        ss = steps[s]
        if s not in c.enabled:
            _stop_jobs(c, s, "step not in spec.steps")
            if ss.phase != "Skipped" or ss.reason != "NotInSpec":
                ss.phase, ss.reason, ss.message, ss.force = "Skipped", "NotInSpec", "not in spec.steps", None
        elif ss.phase == "Skipped" and ss.reason == "NotInSpec":
            _reset_step(ss, "added to spec.steps", "Added")
            added.append(s)
    return added


def _refresh_finished(c: _Ctx, st: ExperimentStatus, steps: dict[str, StepStatus],
                      progress: Mapping[str, Any] | ProgressStatus | None, index_file: str | None,
                      step_etas: Mapping[str, float] | None, dataset: DatasetStatus | None) -> Decision:
    """Terminal and nothing changed: keep the status, only refresh what storage says (and add the
    conditions a status written by an older version lacks)."""
    _finish_artifacts(st, c.exp, index_file)
    if progress is not None:
        st.progress = progress_of(progress) or st.progress
    _set_estimates(st, steps, step_etas, dataset)
    if not {"Reconciling", "Stalled"} <= {x.type for x in st.conditions or []}:
        failed = next((x for x in st.conditions or [] if x.type == "Failed"), None)
        _conditions(st, failed.reason if failed is not None and st.phase == "Failed" else "StepFailed",
                    c.now_s, c.gen)
    _cleanup_stale_jobs(c, steps)
    c.d.finished = True
    return c.d


# -- adopt Jobs created just before a restart (status not written yet) --------------------------------
def _adopt_jobs(c: _Ctx, steps: dict[str, StepStatus]) -> None:
    """A Job with a higher attempt than the status knows (created just before a restart, status not
    written) becomes its step's current Job, or its shard's; otherwise its attempt number is counted, so
    that no Job name is used twice."""
    for s in STEP_ORDER:
        ss = steps[s]
        sharded = [j for j in c.by_step[s] if j.shard is not None]
        newest = max((j for j in c.by_step[s] if j.shard is None), key=lambda j: j.attempt, default=None)
        if newest is not None and newest.attempt > ss.attempts:
            if _adoptable(c, s, ss) and ss.shards is None:
                _adopt_plain(c, s, ss, newest)
            ss.attempts = max(ss.attempts, newest.attempt)
        if sharded:
            _adopt_shard_jobs(c, s, ss, sharded)


def _adoptable(c: _Ctx, s: str, ss: StepStatus) -> bool:
    return s in c.enabled and ss.phase in ("Pending", "Running")


def _adopt_plain(c: _Ctx, s: str, ss: StepStatus, newest: JobSummary) -> None:
    ss.phase, ss.attempts, ss.job = "Running", newest.attempt, newest.name
    ss.start_time = newest.start_time or c.now_s
    ss.reason, ss.message = "Adopted", f"adopted Job {newest.name}"
    ss.inputs_hash = newest.inputs_hash or c.hashes[s]
    ss.retry_after = None
    if newest.force:
        ss.force = True


def _adopt_shard_jobs(c: _Ctx, s: str, ss: StepStatus, jobs: list[JobSummary]) -> None:
    """Shard Jobs: a sharded run the status does not know yet is taken up with the N its Jobs were made
    for; then each shard adopts its newest Job of that N."""
    newest = max(jobs, key=lambda j: j.attempt)
    n = newest.shards or step_shards(c.exp, s)
    if ss.shards is None and newest.attempt > ss.attempts and _adoptable(c, s, ss) and s in SHARDED_STEPS \
            and 2 <= n <= 64 and newest.shard is not None and newest.shard < n:
        ss.shards = [ShardStatus(phase="Pending", index=i, attempts=ss.attempts) for i in range(n)]
        ss.phase, ss.job, ss.start_time, ss.failures = "Running", None, newest.start_time or c.now_s, 0
        ss.reason, ss.message, ss.retry_after = "Adopted", f"adopted the Jobs of {n} shards", None
        ss.inputs_hash = newest.inputs_hash or c.hashes[s]
        if newest.force:
            ss.force = True
    for sh in ss.shards or []:
        _adopt_shard(c, ss, sh, [j for j in jobs if j.shard == sh.index])
    ss.attempts = max(ss.attempts, newest.attempt)


def _adopt_shard(c: _Ctx, ss: StepStatus, sh: ShardStatus, jobs: list[JobSummary]) -> None:
    n = len(ss.shards or [])
    top = max((j for j in jobs if j.shards in (None, n)), key=lambda j: j.attempt, default=None)
    if (top is not None and top.attempt > sh.attempts and ss.phase in ("Pending", "Running")
            and sh.phase in ("Pending", "Running") and sh.reason != "Stopped"):
        sh.phase, sh.attempts, sh.job = "Running", top.attempt, top.name
        sh.start_time = top.start_time or c.now_s
        sh.reason, sh.message, sh.retry_after = "Adopted", f"adopted Job {top.name}", None
    sh.attempts = max([sh.attempts] + [j.attempt for j in jobs])


# -- walk the recipe ------------------------------------------------------------------------------------
def _walk_recipe(c: _Ctx, st: ExperimentStatus, steps: dict[str, StepStatus], w: _Walk) -> None:
    """Steps in order: done ones are passed, the first other one decides what happens now."""
    for s in STEP_ORDER:
        ss = steps[s]
        if ss.phase in DONE:
            continue
        w.current = s
        if ss.phase == "Failed":
            w.failed_msg = f"{s} failed: {ss.message or 'unknown error'}"
            w.reason = ss.reason or "StepFailed"
            return
        if ss.shards is not None:
            go_on = _sharded_step(c, s, ss, w)
        elif ss.phase == "Pending":
            go_on = _pending_step(c, st, s, ss, w)
        else:
            go_on = _running_step(c, s, ss, w)
        if not go_on:
            return


def _pending_step(c: _Ctx, st: ExperimentStatus, s: str, ss: StepStatus, w: _Walk) -> bool:
    """Skip by marker, wait for a retry's backoff, wait for a slot, or create the Job. True: go on."""
    if _skip_by_marker(c, s, ss):
        return True
    retry_at = parse_time(ss.retry_after)
    if retry_at is not None and c.now < retry_at:
        c.d.wake((retry_at - c.now).total_seconds())
        return False
    if w.phase != "Running" and not _start_experiment(c, st, w):
        return False
    if not _stopping_jobs(c, s, ss):
        _start_step(c, s, ss)
    return False


def _skip_by_marker(c: _Ctx, s: str, ss: StepStatus) -> bool:
    if ss.force or c.markers is None or s not in c.markers or s in CHECKED_BY_JOB:
        return False
    ss.phase, ss.reason, ss.inputs_hash, ss.end_time = "Skipped", "AlreadyComplete", c.hashes[s], c.now_s
    ss.message = f"already complete in storage ({layout.marker_key(c.exp.name, s)})"
    c.d.event("Normal", "StepSkipped", f"{s}: already complete in storage")
    return True


def _start_experiment(c: _Ctx, st: ExperimentStatus, w: _Walk) -> bool:
    """Pending/Queued -> Running when a concurrency slot is free (False: Queued)."""
    if not c.policy.admitted:
        if w.phase != "Queued":
            c.d.event("Normal", "Queued", c.policy.queue_message or "waiting for a free slot")
        w.phase = w.reason = "Queued"
        return False
    w.phase = "Running"
    if st.start_time is None:
        st.start_time = c.now_s
    todo = ", ".join(s for s in STEP_ORDER if s in c.enabled)
    if not w.resumed:
        c.d.event("Normal", "Started", f"running steps {todo}")
    return True


def _label(s: str, run: RunStatus) -> str:
    """How events and messages name a step, or one shard of it."""
    return f"{s} shard {run.index}" if isinstance(run, ShardStatus) else s


def _create_job(c: _Ctx, s: str, ss: StepStatus, shard: ShardStatus | None = None) -> None:
    """Create the next attempt's Job of the step, or of one of its shards (`shard`)."""
    run: RunStatus = ss if shard is None else shard
    attempt = run.attempts + 1
    force = bool(ss.force)
    index = None if shard is None else shard.index
    jname = job_name(c.resource, s, attempt, index)
    count = len(ss.shards) if shard is not None and ss.shards else 1
    c.d.create.append(CreateJob(s, attempt, force, c.hashes[s], jname, index, count))
    run.phase, run.attempts, run.job, run.start_time = "Running", attempt, jname, c.now_s
    run.reason = "JobCreated"
    run.message = f"attempt {attempt} started" + (" (--force)" if force else "")
    ss.inputs_hash = c.hashes[s]
    ss.attempts = max(ss.attempts, attempt)  # Job names never repeat: shards count on from the step's
    run.end_time = run.retry_after = run.exit_code = None
    c.d.event("Normal", "JobCreated", f"{_label(s, run)}: created Job {jname}" + (" with --force" if force
                                                                                  else ""))


def _running_step(c: _Ctx, s: str, ss: RunStatus, w: _Walk) -> bool:
    """Follow the Job of a step (or of one shard): succeeded (True: go on), failed (retry or fail), or
    still running."""
    job = next((j for j in c.by_step[s] if j.name == ss.job), None)
    if job is None or job.deleting:
        return _job_gone(c, s, ss, w)
    if job.state == "Succeeded":
        _run_succeeded(c, ss, s, job, "completed")
        return True
    permanent, why = _classify(job, c.exp, ss, c.now, c.policy)
    if job.state == "Failed" or permanent:
        if job.active:
            c.d.delete_job(job.name, "permanent failure")
        w.failed_msg = _step_failed(c, ss, s, job, permanent=permanent, reason=why,
                                    message=_job_error(job, c.exp))
        return False
    ss.message = job.waiting or f"attempt {ss.attempts} running"
    ss.reason = "Waiting" if job.waiting else "Running"
    return False


def _job_gone(c: _Ctx, s: str, ss: RunStatus, w: _Walk) -> bool:
    """The Job is not listed: trust the step's completion marker, wait out the grace period, else retry."""
    if c.markers is not None and s in c.markers:
        _run_succeeded(c, ss, s, None, "Job gone; completion marker present")
        return True
    waited = (c.now - (parse_time(ss.start_time) or c.now)).total_seconds()
    if waited < c.policy.missing_job_grace_seconds:
        c.d.wake(c.policy.missing_job_grace_seconds - waited)
        return False
    w.failed_msg = _step_failed(c, ss, s, None, permanent=False, reason="JobMissing",
                                message=f"Job {ss.job} disappeared")
    return False

# -- sharded steps (spec.resources.shards > 1) ----------------------------------------------------------
def step_shards(exp: Experiment, s: str) -> int:
    """How many shard Jobs a start of step `s` runs now (1: one Job, as before sharding existed)."""
    return exp.spec.resources.shards if s in SHARDED_STEPS else 1


def _start_step(c: _Ctx, s: str, ss: StepStatus) -> None:
    """Create the step's Job, or, sharded, one Job per shard. N is read here, when the step starts, and
    kept in status.steps.<step>.shards until the step ends (a retry of a one-Job run stays one Job). A
    forced run (the first step a spec change reruns) is one Job: the pipeline refuses --force with --shard,
    since a forced shard would delete the outputs of the shards beside it."""
    n = step_shards(c.exp, s) if ss.failures == 0 and not ss.force else 1
    if n <= 1:
        _create_job(c, s, ss)
        return
    ss.shards = [ShardStatus(phase="Pending", index=i, attempts=ss.attempts) for i in range(n)]
    ss.phase, ss.job, ss.start_time, ss.failures = "Running", None, c.now_s, 0
    ss.end_time = ss.retry_after = ss.exit_code = None
    for sh in ss.shards:
        _create_job(c, s, ss, sh)
    _summarize_shards(ss)


def _sharded_step(c: _Ctx, s: str, ss: StepStatus, w: _Walk) -> bool:
    """Follow every shard's Job; a failed shard is retried alone (after its backoff). The step succeeds
    once every shard has (True: go on); one shard failing for good fails the step and stops the others."""
    shards = ss.shards or []
    for sh in shards:
        if sh.phase == "Running":
            _running_step(c, s, sh, _Walk(phase=w.phase))
    failed = next((sh for sh in shards if sh.phase == "Failed"), None)
    if failed is not None:
        w.failed_msg = _fail_sharded_step(c, s, ss, failed)
        return False
    if all(sh.phase == "Succeeded" for sh in shards):
        ends = [sh.end_time for sh in shards if sh.end_time]
        _step_succeeded(c, ss, s, None, f"{len(shards)}/{len(shards)} shards done",
                        end_time=max(ends, key=lambda t: parse_time(t) or c.now) if ends else None)
        return True
    for sh in shards:
        if sh.phase == "Pending":
            _pending_shard(c, s, ss, sh)
    _summarize_shards(ss)
    return False


def _fail_sharded_step(c: _Ctx, s: str, ss: StepStatus, failed: ShardStatus) -> str:
    """One shard failed for good: the step fails and the other shards' Jobs are stopped."""
    shards = ss.shards or []
    _stop_jobs(c, s, f"shard {failed.index} failed")
    for sh in shards:
        if sh.phase in ("Running", "Pending"):
            sh.phase, sh.reason, sh.retry_after = "Pending", "Stopped", None
            sh.message = f"stopped: shard {failed.index} failed"
    _summarize_shards(ss, keep_phase=True)
    ss.exit_code = failed.exit_code
    return _fail_step(c, ss, s, failed.reason or "StepFailed",
                      f"shard {failed.index}/{len(shards)}: {failed.message or 'failed'}")


def _pending_shard(c: _Ctx, s: str, ss: StepStatus, sh: ShardStatus) -> None:
    """A shard waiting for its retry: create its next Job once the backoff has passed."""
    retry_at = parse_time(sh.retry_after)
    if retry_at is not None and c.now < retry_at:
        c.d.wake((retry_at - c.now).total_seconds())
        return
    _create_job(c, s, ss, sh)


def _summarize_shards(ss: StepStatus, keep_phase: bool = False) -> None:
    """The step's own fields from its shards: Running while any shard runs, else Pending (a shard waits
    for its retry); attempts = the highest attempt number used; failures summed; "k/N shards done"."""
    shards = ss.shards or []
    ss.attempts = max([ss.attempts] + [sh.attempts for sh in shards])
    ss.failures = sum(sh.failures for sh in shards)
    if keep_phase:
        return
    done = sum(sh.phase == "Succeeded" for sh in shards)
    running = [sh for sh in shards if sh.phase == "Running"]
    waiting = [sh for sh in shards if sh.phase == "Pending"]
    ss.phase = "Running" if running or not waiting else "Pending"
    ss.reason = "Retrying" if waiting else ("Waiting" if any(sh.reason == "Waiting" for sh in running)
                                            else "Running")
    note = next((sh for sh in waiting + running if sh.reason in ("Retrying", "Waiting")), None)
    ss.message = f"{done}/{len(shards)} shards done" + (f"; shard {note.index}: {note.message}" if note
                                                         else "")


# -- failures -------------------------------------------------------------------------------------------
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


def _classify(job: JobSummary, exp: Experiment, ss: RunStatus, now: datetime,
              policy: Policy) -> tuple[bool, str]:
    """(permanent, reason). Exit codes 2/3 of rvc-pipeline are permanent (bad spec/data, missing
    weights), as are an OOM kill under a memory limit and an image that cannot be pulled for long."""
    if job.exit_code == errors.EXIT_PREEMPTED:  # SIGTERM'd after saving its work: never permanent
        return False, "Preempted"
    if job.exit_code in PERMANENT_EXIT_CODES:
        return True, "BadInput" if job.exit_code == errors.EXIT_BAD_INPUT else "MissingWeights"
    if job.reason == "OOMKilled" and exp.spec.resources.memory:
        return True, "OOMKilled"
    if job.waiting_reason == "InvalidImageName":
        return True, "InvalidImage"
    if job.waiting_reason in IMAGE_PULL_REASONS:
        started = parse_time(ss.start_time) or now
        if (now - started).total_seconds() >= policy.image_pull_timeout_seconds:
            return True, "ImagePullFailed"
    return False, job.reason or "JobFailed"


def _run_succeeded(c: _Ctx, run: RunStatus, s: str, job: JobSummary | None, message: str) -> None:
    """A step's Job (or one shard's) succeeded."""
    if isinstance(run, StepStatus):
        _step_succeeded(c, run, s, job, message)
        return
    run.phase, run.reason, run.message, run.failures = "Succeeded", "Completed", message, 0
    run.end_time = (job.completion_time if job else None) or c.now_s
    run.retry_after = run.exit_code = None
    c.d.event("Normal", "ShardSucceeded", f"{_label(s, run)}: {message} (Job {run.job})")


def _step_succeeded(c: _Ctx, ss: StepStatus, s: str, job: JobSummary | None, message: str,
                    end_time: str | None = None) -> None:
    end = end_time or (job.completion_time if job else None) or c.now_s
    ss.phase, ss.end_time, ss.reason, ss.message, ss.failures = "Succeeded", end, "Completed", message, 0
    ss.force = ss.retry_after = ss.exit_code = None
    start, t_end = parse_time(ss.start_time), parse_time(end)
    if start and t_end:
        c.d.step_durations.append((s, max(0.0, (t_end - start).total_seconds())))
    c.d.event("Normal", "StepSucceeded", f"{s}: {message}" + (f" (Job {ss.job})" if ss.job else ""))


def _step_failed(c: _Ctx, ss: RunStatus, s: str, job: JobSummary | None, *, permanent: bool, reason: str,
                 message: str) -> str | None:
    """Record a failed attempt of a step (or shard). Returns the failure message, or None when a retry is
    planned."""
    if job is not None and job.exit_code is not None:
        ss.exit_code = job.exit_code
    c.d.failures.append((s, reason))
    label = _label(s, ss)
    if permanent:
        c.d.event("Warning", "StepFailed", f"{label}: attempt {ss.attempts} failed permanently: {message}")
        return _fail_step(c, ss, s, reason, message)
    ss.failures += 1
    if ss.failures > c.policy.max_retries:
        msg = (f"{message}; gave up after {ss.failures} attempt(s) "
               f"({c.policy.retries_source}={c.policy.max_retries})")
        c.d.event("Warning", "StepFailed", f"{label}: {msg}")
        return _fail_step(c, ss, s, "RetriesExhausted", msg)
    _schedule_retry(c, ss, s, message)
    return None


def _fail_step(c: _Ctx, ss: RunStatus, s: str, reason: str, message: str) -> str:
    ss.phase, ss.reason, ss.message, ss.end_time, ss.retry_after = "Failed", reason, message, c.now_s, None
    return f"{_label(s, ss)} failed: {message}"


def _schedule_retry(c: _Ctx, ss: RunStatus, s: str, message: str) -> None:
    pol = c.policy
    delay = backoff_delay(ss.failures, pol)
    ss.phase, ss.reason, ss.retry_after = "Pending", "Retrying", iso(c.now + timedelta(seconds=delay))
    ss.message = (f"attempt {ss.attempts} failed: {message}; retry {ss.failures}/{pol.max_retries} "
                  f"in {delay:.0f}s")
    c.d.retries.append(s)
    c.d.wake(delay)
    c.d.event("Warning", "Retrying", f"{_label(s, ss)}: attempt {ss.attempts} failed ({message}); retry "
                                     f"{ss.failures}/{pol.max_retries} in {delay:.0f}s")


# -- the experiment's phase, artifacts, stale Jobs, conditions -----------------------------------------
def _settle_phase(c: _Ctx, st: ExperimentStatus, steps: dict[str, StepStatus], w: _Walk,
                  old: ExperimentStatus, index_file: str | None) -> None:
    if w.failed_msg is not None:
        w.phase = "Failed"
        w.reason = (steps[w.current].reason if w.current else None) or "StepFailed"
        st.message = w.failed_msg
        if st.completion_time is None:
            st.completion_time = c.now_s
        if old.phase != "Failed":
            c.d.event("Warning", "Failed", w.failed_msg)
        c.d.finished = True
    elif all(steps[s].phase in DONE for s in STEP_ORDER):
        _succeed(c, st, w, old, index_file)
    elif w.phase == "Queued":
        st.message = c.policy.queue_message or "waiting for a free slot"
    else:
        ss = steps[w.current] if w.current else None
        st.message = f"{w.current}: {ss.message or ss.phase}" if ss else "starting"
        w.reason = "StepRunning"
    st.phase = w.phase  # type: ignore[assignment]  # one of ExperimentPhase by construction
    st.current_step = w.current


def _succeed(c: _Ctx, st: ExperimentStatus, w: _Walk, old: ExperimentStatus, index_file: str | None) -> None:
    w.phase, w.reason, w.current = "Succeeded", "Succeeded", None
    st.completion_time = c.now_s if old.phase != "Succeeded" else (old.completion_time or c.now_s)
    _finish_artifacts(st, c.exp, index_file)
    model = st.artifacts.model if st.artifacts else None
    st.message = "all steps complete" + (f"; model: {model}" if model else "")
    if old.phase != "Succeeded":
        c.d.event("Normal", "Succeeded", st.message)
    c.d.finished = True


def _produced(st: ExperimentStatus, s: str) -> bool:
    ss: StepStatus | None = getattr(st.steps, s) if st.steps is not None else None
    return ss is not None and (ss.phase == "Succeeded"
                               or (ss.phase == "Skipped" and ss.reason == "AlreadyComplete"))


def train_eta(progress: ProgressStatus | None) -> float | None:
    """Seconds of training left as of progress.updated: seconds per epoch times the epochs left."""
    if progress is None or progress.epochs is None or progress.epoch is None:
        return None
    left = max(0, progress.epochs - progress.epoch)
    if left == 0:
        return 0.0
    spe = progress.seconds_per_epoch
    return round(spe * left, 1) if spe is not None and spe >= 0 else None


def _set_estimates(st: ExperimentStatus, steps: dict[str, StepStatus], step_etas: Mapping[str, float] | None,
                   dataset: DatasetStatus | None) -> None:
    """status.training.etaSeconds, the running steps' etaSeconds (kept when not read, dropped once a step
    stops running) and status.dataset (dropped while preprocess runs again)."""
    eta = train_eta(st.progress) if steps["train"].phase in ("Running", "Succeeded") else None
    if eta is not None or st.training is not None:
        st.training = st.training or TrainingStatus()
        st.training.eta_seconds = eta
    for s, ss in steps.items():
        if ss.shards is not None:
            _sharded_eta(s, ss, step_etas)
        elif ss.phase != "Running":
            ss.eta_seconds = None
        elif step_etas is not None:
            ss.eta_seconds = step_etas.get(s)
    if steps["preprocess"].phase in ("Pending", "Running"):
        st.dataset = None
    if dataset is not None:
        st.dataset = dataset


def _sharded_eta(s: str, ss: StepStatus, step_etas: Mapping[str, float] | None) -> None:
    """Each running shard's ETA (from its own progress events: progress_reader.shard_eta_key) and the
    step's: the slowest unfinished shard, left out while any unfinished shard has none."""
    shards = ss.shards or []
    live = ss.phase in ("Running", "Pending")
    for sh in shards:
        if not live or sh.phase != "Running":
            sh.eta_seconds = None
        elif step_etas is not None:
            sh.eta_seconds = step_etas.get(shard_eta_key(s, sh.index, len(shards)))
    etas = [sh.eta_seconds for sh in shards if sh.phase != "Succeeded"]
    known = [e for e in etas if e is not None]
    ss.eta_seconds = max(known) if ss.phase == "Running" and known and len(known) == len(etas) else None


def _set_training(st: ExperimentStatus, exp: Experiment, training: TrainingStatus | None) -> None:
    """status.training from storage, its checkpoint names made URIs (kept as they were when unread)."""
    if training is None:
        return
    logs = _join(exp.spec.storage.uri, f"{layout.exp_key(exp.name)}/")
    for ev in (training.best, training.latest):
        if ev is not None and ev.checkpoint and "://" not in ev.checkpoint:
            ev.checkpoint = _join(logs, ev.checkpoint)
    st.training = training


def _finish_artifacts(st: ExperimentStatus, exp: Experiment, index_file: str | None) -> None:
    uri, name = exp.spec.storage.uri, exp.name
    art = st.artifacts.model_copy() if st.artifacts is not None else ArtifactsStatus()
    art.logs = _join(uri, f"{layout.exp_key(name)}/")
    if _produced(st, "train"):
        art.model = _join(uri, f"{layout.exp_key(name)}/{layout.exported_model(name)}")
    if _produced(st, "index") and index_file:
        art.index = index_file if "://" in index_file else _join(uri, index_file)
    if _produced(st, "convert"):
        art.converted = _join(uri, f"{layout.exp_key(name)}/{layout.CONVERTED_DIR}/")
    st.artifacts = art


def _cleanup_stale_jobs(c: _Ctx, steps: dict[str, StepStatus]) -> None:
    """An active Job that is not its step's current Job (an older attempt, or left over from before a
    spec change) must not keep running: it would write outputs and markers for stale inputs."""
    for s, js in c.by_step.items():
        current = _current_jobs(steps[s])
        for j in js:
            if j.active and j.name not in current:
                c.d.delete_job(j.name, "superseded")


def _current_jobs(ss: StepStatus) -> set[str]:
    """Names of the Jobs the step runs now: its Job while Running, or its running shards' Jobs."""
    if ss.shards is not None:
        live = ss.phase in ("Running", "Pending")
        return {sh.job for sh in ss.shards if live and sh.phase == "Running" and sh.job}
    return {ss.job} if ss.phase == "Running" and ss.job else set()


def _set_condition(st: ExperimentStatus, ctype: str, value: bool, reason: str, message: str, now: str,
                   gen: int) -> None:
    conds = st.conditions if st.conditions is not None else []
    st.conditions = conds
    sval = "True" if value else "False"
    have = next((x for x in conds if x.type == ctype), None)
    if have is None:
        conds.append(Condition(type=ctype, status=sval, reason=reason,
                               message=message[:1000], last_transition_time=now, observed_generation=gen))
        return
    if have.status != sval:
        have.last_transition_time = now
    have.status, have.reason, have.message = sval, reason, message[:1000]  # type: ignore[assignment]
    have.observed_generation = gen


_CONDITION_ORDER = {"Ready": 0, "Progressing": 1, "Failed": 2, "Reconciling": 3, "Stalled": 4, "Suspended": 5}
# a Failed experiment is out of retries (or refused): only a change of its spec or storage moves it on
_STALLED_HINT = "cannot make progress until the spec or the storage changes"


def _kstatus_conditions(st: ExperimentStatus, reason: str, now: str, gen: int) -> None:
    """Reconciling and Stalled, as kstatus (Argo CD, Flux) reads them: Reconciling while steps are left to
    run (queued included), Stalled once the experiment failed (a step out of retries, an invalid spec,
    refused storage): it stays so until the spec or the storage changes."""
    phase, msg = st.phase or "Pending", st.message or ""
    reconciling = phase in ("Pending", "Queued", "Running")
    suspended = phase == "Suspended"  # neither reconciling nor stalled: waiting for spec.suspend false
    rec_reason = {"Succeeded": "Succeeded", "Failed": "Failed"}.get(phase, phase if phase in (
        "Queued", "Suspended") else "StepsPending")
    _set_condition(st, "Reconciling", reconciling, rec_reason,
                   msg if reconciling or suspended else f"finished: {phase}", now, gen)
    stalled = phase == "Failed"
    _set_condition(st, "Stalled", stalled, reason if stalled else "NotStalled",
                   f"{msg} ({_STALLED_HINT})" if stalled else
                   "suspended (spec.suspend)" if suspended else "making progress or finished", now, gen)


def _conditions(st: ExperimentStatus, reason: str, now: str, gen: int) -> None:
    phase = st.phase
    msg = st.message or ""
    ready_reason = "Succeeded" if phase == "Succeeded" else (phase or "Pending")
    _set_condition(st, "Ready", phase == "Succeeded", ready_reason, msg, now, gen)
    progressing = phase in ("Running", "Pending")
    prog_reason = {"Queued": "Queued", "Succeeded": "Completed", "Failed": "Failed"}.get(phase or "", reason)
    _set_condition(st, "Progressing", progressing, prog_reason, msg, now, gen)
    _set_condition(st, "Failed", phase == "Failed", reason if phase == "Failed" else "NoFailure",
                   msg if phase == "Failed" else "no failure", now, gen)
    _kstatus_conditions(st, reason, now, gen)
    if st.conditions is not None:
        st.conditions.sort(key=lambda x: _CONDITION_ORDER.get(x.type, 9))


# ---------------------------------------------------------------------------------------------------
# deletion
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeletionPlan:
    jobs: list[str]
    configmap: str
    artifacts_prefix: str | None  # key prefix in spec.storage.uri to delete, None = keep artifacts
    storage_uri: str | None


def artifacts_deleted(manifest: Mapping[str, Any], delete_artifacts_default: bool = False) -> bool:
    """Whether deleting the experiment deletes logs/<exp>/: the annotation rvc-operator.dev/delete-artifacts
    "true" or spec.lifecycle.artifactsOnDeletion Delete; else an explicit annotation or Keep keeps them;
    else the operator's default (RVC_DELETE_ARTIFACTS_DEFAULT)."""
    ann = ((manifest.get("metadata") or {}).get("annotations") or {}).get(ANN_DELETE_ARTIFACTS)
    lifecycle = (manifest.get("spec") or {}).get("lifecycle") or {}
    policy = lifecycle.get("artifactsOnDeletion") if isinstance(lifecycle, Mapping) else None
    if (ann is not None and str(ann).strip().lower() == "true") or policy == "Delete":
        return True
    if ann is not None or policy == "Keep":
        return False
    return delete_artifacts_default


def plan_deletion(manifest: dict[str, Any], jobs: list[JobSummary], delete_artifacts_default: bool = False
                  ) -> DeletionPlan:
    """What to clean up when an RVCExperiment is deleted. Jobs and the ConfigMap also go through their
    owner references (garbage collector); artifacts stay unless the annotation
    rvc-operator.dev/delete-artifacts is "true" (or RVC_DELETE_ARTIFACTS_DEFAULT and no annotation)."""
    meta = manifest.get("metadata") or {}
    wanted = artifacts_deleted(manifest, delete_artifacts_default)
    prefix = uri = None
    if wanted:
        try:
            exp = parse_experiment(manifest)
            prefix, uri = f"{layout.exp_key(exp.name)}/", exp.spec.storage.uri
        except SpecError:
            prefix = uri = None
    return DeletionPlan(jobs=sorted(j.name for j in jobs if not j.deleting),
                        configmap=configmap_name(meta.get("name", "")), artifacts_prefix=prefix,
                        storage_uri=uri)


def status_patch(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
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
