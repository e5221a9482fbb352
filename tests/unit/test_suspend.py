"""spec.suspend and preemption (issue 11, items 1 and 2): the pure state machine (rvc_operator.status) and the
pod/Job fields that make a stop graceful (rvc_operator.jobs). The reconcile glue is in
tests/integration/test_operator_kopf.py (test_suspend_and_resume_through_reconcile)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import kubernetes_validate
import pytest
from kubernetes_validate.utils import all_versions
from prometheus_client import CollectorRegistry
from rvc_operator import jobs
from rvc_operator.config import OperatorConfig
from rvc_operator.metrics import OperatorMetrics
from rvc_operator.observe import JobSummary
from rvc_operator.status import Decision, Policy, admit, suspended
from rvc_pipeline.core.spec import STEP_ORDER, SpecError, parse_manifest, step_hashes

from tests.support.decide_cases import T0, job, run

RESUME = "kubectl patch rvcx alice --type merge -p '{\"spec\":{\"suspend\":false}}'"
KSTATUS = ("Ready", "Progressing", "Failed", "Reconciling", "Stalled")


def manifest(gen: int = 1, suspend: bool | None = None, **spec_over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"dataset": {"source": "s3://voices/alice/"}, "storage": {"uri": "s3://models/rvc"},
                            "train": {"epochs": 10}, **spec_over}
    if suspend is not None:
        spec["suspend"] = suspend
    return {"apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment",
            "metadata": {"name": "alice", "namespace": "voice", "uid": "u-1", "generation": gen,
                         "creationTimestamp": "2025-03-01T11:00:00Z"},
            "spec": spec}




def cond(d: Decision, ctype: str) -> dict[str, Any] | None:
    return next((c for c in d.status.get("conditions") or [] if c["type"] == ctype), None)


def reasons(d: Decision) -> list[str]:
    return [e.reason for e in d.events]


def at_train(m: dict[str, Any]) -> tuple[dict[str, Any], list[JobSummary]]:
    """Drive the machine until train's first Job runs; returns (status, jobs)."""
    d = run(m, None)
    done: list[JobSummary] = []
    for s in STEP_ORDER[:3]:
        done.append(job(s, 1, "Succeeded"))
        d = run(m, d.status, done)
    assert [c.name for c in d.create] == ["alice-train-1"]
    return d.status, done + [job("train", 1)]


def suspended_at_train() -> tuple[Decision, list[JobSummary]]:
    st, js = at_train(manifest(1))
    return run(manifest(2, suspend=True), st, js, now=T0 + timedelta(minutes=10)), js


# -- suspend while a step runs ---------------------------------------------------------------------------
def test_suspend_deletes_the_running_job_and_keeps_the_attempt() -> None:
    d, _ = suspended_at_train()
    st = d.status
    assert [(x.name, x.reason) for x in d.delete] == [("alice-train-1", "suspended (spec.suspend)")]
    assert d.create == [] and not d.finished
    tr = st["steps"]["train"]
    assert (tr["phase"], tr["reason"], tr["attempts"], tr["failures"]) == ("Pending", "Suspended", 1, 0)
    assert tr["job"] == "alice-train-1" and "resumes with attempt 2" in tr["message"]
    assert all(st["steps"][s]["phase"] == "Succeeded" for s in STEP_ORDER[:3])
    assert st["phase"] == "Suspended" and st["currentStep"] == "train"
    assert RESUME in st["message"] and "stopping Job alice-train-1" in st["message"]
    assert st["suspendTime"] == "2025-03-01T12:10:00Z" and "suspendedSeconds" not in st
    assert reasons(d) == ["Suspended"] and d.failures == [] and d.retries == []
    sus = cond(d, "Suspended")
    assert sus is not None and (sus["status"], sus["reason"]) == ("True", "Suspended")
    for ctype in KSTATUS:
        c = cond(d, ctype)
        assert c is not None and c["status"] == "False", (ctype, c)
    assert cond(d, "Reconciling")["reason"] == "Suspended"  # type: ignore[index]
    assert cond(d, "Stalled")["message"] == "suspended (spec.suspend)"  # type: ignore[index]
    assert [c["type"] for c in st["conditions"]] == [*KSTATUS, "Suspended"]


def test_while_suspended_the_stopping_job_exiting_143_counts_nothing() -> None:
    d, js = suspended_at_train()
    # the pod saved its checkpoint and exited 143; the Job is still listed while it is deleted (Foreground)
    stopping = js[:3] + [job("train", 1, "Failed", exit_code=143, reason="Error", deleting=True,
                             message="preempted (SIGTERM); what was done is saved, rerun to continue")]
    again = run(manifest(2, suspend=True), d.status, stopping, now=T0 + timedelta(minutes=11))
    assert again.create == [] and again.delete == [] and again.events == []
    assert again.failures == [] and again.status["steps"]["train"]["failures"] == 0
    assert again.status["phase"] == "Suspended" and again.requeue_after == 10  # watches the Job go
    gone = run(manifest(2, suspend=True), again.status, js[:3], now=T0 + timedelta(minutes=12))
    assert gone.requeue_after is None and "stopping" not in gone.status["message"]
    assert gone.status["steps"]["train"]["phase"] == "Pending" and gone.events == []


def test_lost_status_write_then_143_is_a_suspension_not_a_failure() -> None:
    """The status write of the suspending reconcile was lost (a conflict): the next one still sees train
    Running with its Job deleting and failed with 143; it is paused, not counted as a failure."""
    st, js = at_train(manifest(1))
    stopping = js[:3] + [job("train", 1, "Failed", exit_code=143, deleting=True)]
    d = run(manifest(2, suspend=True), st, stopping, now=T0 + timedelta(minutes=10))
    tr = d.status["steps"]["train"]
    assert (tr["phase"], tr["reason"], tr["failures"]) == ("Pending", "Suspended", 0)
    assert d.failures == [] and d.delete == [] and reasons(d) == ["Suspended"]


def test_a_job_that_finished_on_its_own_before_the_suspension_is_followed_on_resume() -> None:
    st, js = at_train(manifest(1))
    finished = js[:3] + [job("train", 1, "Succeeded")]
    d = run(manifest(2, suspend=True), st, finished, now=T0 + timedelta(minutes=10))
    assert d.delete == [] and d.status["steps"]["train"]["phase"] == "Running"
    r = run(manifest(3, suspend=False), d.status, finished, now=T0 + timedelta(minutes=20))
    assert r.status["steps"]["train"]["phase"] == "Succeeded"
    assert [c.name for c in r.create] == ["alice-index-1"] and r.status["phase"] == "Running"


# -- resume ----------------------------------------------------------------------------------------------
def test_resume_waits_for_the_stopping_job_then_creates_the_next_attempt() -> None:
    d, js = suspended_at_train()
    stopping = js[:3] + [job("train", 1, "Running", deleting=True)]
    r1 = run(manifest(3, suspend=False), d.status, stopping, now=T0 + timedelta(minutes=30))
    assert r1.create == [] and r1.delete == []  # never two Jobs of one step at once
    assert r1.status["phase"] == "Running" and "waiting for Job alice-train-1 to stop" in r1.status["message"]
    assert reasons(r1) == ["Resumed"]  # not "Started" again
    sus = cond(r1, "Suspended")
    assert sus is not None and (sus["status"], sus["reason"]) == ("False", "Resumed")
    assert "continuing with train" in sus["message"]
    assert "suspendTime" not in r1.status and r1.status["suspendedSeconds"] == 20 * 60
    assert r1.requeue_after == 10
    r2 = run(manifest(3, suspend=False), r1.status, js[:3], now=T0 + timedelta(minutes=31))
    assert [(c.name, c.attempt) for c in r2.create] == [("alice-train-2", 2)]
    assert reasons(r2) == ["JobCreated"] and r2.status["phase"] == "Running"
    tr = r2.status["steps"]["train"]
    assert (tr["attempts"], tr["failures"], tr["job"]) == (2, 0, "alice-train-2")
    assert cond(r2, "Ready")["status"] == "False"  # type: ignore[index]
    assert cond(r2, "Reconciling")["status"] == "True"  # type: ignore[index]
    assert cond(r2, "Progressing")["status"] == "True"  # type: ignore[index]
    assert cond(r2, "Suspended")["status"] == "False"  # type: ignore[index]


def test_suspend_keeps_force_and_the_failures_of_the_current_run() -> None:
    st, js = at_train(manifest(1))
    # train was rerun with --force after a spec change and failed once before the suspension
    st["steps"]["train"].update(force=True, failures=1)
    d = run(manifest(2, suspend=True), st, js, now=T0 + timedelta(minutes=10))
    r = run(manifest(3, suspend=False), d.status, js[:3], now=T0 + timedelta(minutes=20))
    assert [(c.name, c.force) for c in r.create] == [("alice-train-2", True)]
    assert r.status["steps"]["train"]["failures"] == 1


def test_resume_goes_through_the_queue() -> None:
    d, js = suspended_at_train()
    full = Policy(admitted=False, queue_message="waiting for a free slot: 2 running")
    q = run(manifest(3, suspend=False), d.status, js[:3], now=T0 + timedelta(minutes=30), policy=full)
    assert q.create == [] and q.status["phase"] == "Queued" and reasons(q) == ["Resumed", "Queued"]
    go = run(manifest(3, suspend=False), q.status, js[:3], now=T0 + timedelta(minutes=40))
    assert [c.name for c in go.create] == ["alice-train-2"] and go.status["phase"] == "Running"


def test_admit_suspended_experiments_hold_no_slot_and_resumed_ones_wait_in_order() -> None:
    def exp(name: str, created: str, phase: str | None, suspend: bool = False) -> dict[str, Any]:
        return {"metadata": {"name": name, "namespace": "v", "uid": name, "creationTimestamp": created},
                "spec": {"suspend": suspend}, "status": {"phase": phase} if phase else {}}

    me = exp("me", "2025-01-01T00:00:05Z", "Queued")
    others = [exp("paused", "2025-01-01T00:00:00Z", "Suspended", suspend=True),
              exp("stopping", "2025-01-01T00:00:00Z", "Running", suspend=True),  # not reconciled yet
              exp("waiting", "2025-01-01T00:00:01Z", "Pending", suspend=True), me]
    assert admit(me, others, 1) == (True, "")
    resumed = exp("resumed", "2025-01-01T00:00:02Z", "Suspended")  # spec.suspend false again
    ok, why = admit(me, [*others, resumed], 1)
    assert ok is False and "0 running, 1 queued ahead" in why


# -- suspend before the start, and after the end -----------------------------------------------------------
def test_suspended_from_the_start_creates_nothing() -> None:
    d = run(manifest(1, suspend=True), None)
    assert d.create == [] and d.status["phase"] == "Suspended" and reasons(d) == ["Suspended"]
    assert "startTime" not in d.status and d.status["currentStep"] == "preprocess"
    assert d.status["message"] == f"suspended at preprocess; to resume: {RESUME}"
    r = run(manifest(2, suspend=False), d.status, now=T0 + timedelta(hours=3))
    assert [c.name for c in r.create] == ["alice-preprocess-1"] and reasons(r) == ["Resumed", "JobCreated"]
    assert r.status["startTime"] == "2025-03-01T15:00:00Z" and "suspendedSeconds" not in r.status


def test_suspend_while_queued_leaves_the_queue() -> None:
    full = Policy(admitted=False, queue_message="waiting for a free slot: 1 running")
    q = run(manifest(1), None, policy=full)
    assert q.status["phase"] == "Queued"
    d = run(manifest(2, suspend=True), q.status, policy=full)
    assert d.create == [] and d.status["phase"] == "Suspended" and reasons(d) == ["Suspended"]
    assert cond(d, "Progressing")["status"] == "False"  # type: ignore[index]


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_suspending_a_finished_experiment_changes_nothing(phase: str) -> None:
    if phase == "Succeeded":
        d0 = run(manifest(1), None, markers=set(STEP_ORDER))
        d0 = run(manifest(1), d0.status, [job("preprocess", 1, "Succeeded")], markers=set(STEP_ORDER))
        js: list[JobSummary] = [job("preprocess", 1, "Succeeded")]
    else:
        d0 = run(manifest(1), None)
        js = [job("preprocess", 1, "Failed", exit_code=2, message="no audio")]
        d0 = run(manifest(1), d0.status, js)
    assert d0.status["phase"] == phase
    d = run(manifest(2, suspend=True), d0.status, js, now=T0 + timedelta(hours=1))
    assert d.status["phase"] == phase and d.create == [] and d.delete == [] and d.events == []
    assert cond(d, "Suspended") is None and "suspendTime" not in d.status
    assert d.status["observedGeneration"] == 2


def test_a_run_never_suspended_has_exactly_the_five_conditions() -> None:
    st, js = at_train(manifest(1))
    assert [c["type"] for c in st["conditions"]] == list(KSTATUS)
    assert "suspendTime" not in st and "suspendedSeconds" not in st


# -- the deadline does not count time suspended --------------------------------------------------------------
def test_deadline_excludes_the_time_suspended() -> None:
    lc = {"lifecycle": {"activeDeadlineSeconds": 3600}}
    d0 = run(manifest(1, **lc), None)
    running = [job("preprocess", 1)]
    # 10 min in: suspended for 5 hours (far past the deadline): nothing fails meanwhile
    s = run(manifest(2, suspend=True, **lc), d0.status, running, now=T0 + timedelta(minutes=10))
    later = run(manifest(2, suspend=True, **lc), s.status, now=T0 + timedelta(hours=5))
    assert later.status["phase"] == "Suspended" and later.requeue_after is None
    r = run(manifest(3, suspend=False, **lc), later.status, now=T0 + timedelta(hours=5, minutes=10))
    assert r.status["phase"] == "Running" and r.status["suspendedSeconds"] == 5 * 3600
    assert r.requeue_after == 50 * 60  # 10 of the 60 minutes used (before the suspension)
    nxt = [job("preprocess", 2)]
    ok = run(manifest(3, suspend=False, **lc), r.status, nxt, now=T0 + timedelta(hours=5, minutes=59))
    assert ok.status["phase"] == "Running"
    over = run(manifest(3, suspend=False, **lc), r.status, nxt, now=T0 + timedelta(hours=6, minutes=0))
    assert over.status["phase"] == "Failed" and "18000s suspended not counted" in over.status["message"]
    assert [x.name for x in over.delete] == ["alice-preprocess-2"]


# -- exit 143 and preemption -----------------------------------------------------------------------------
def test_exit_143_without_a_suspension_is_a_transient_failure_never_permanent() -> None:
    st, js = at_train(manifest(1))
    preempted = js[:3] + [job("train", 1, "Failed", exit_code=143, reason="Error",
                              message="preempted (SIGTERM); what was done is saved, rerun to continue")]
    d = run(manifest(1), st, preempted, now=T0 + timedelta(minutes=10))
    tr = d.status["steps"]["train"]
    assert d.status["phase"] == "Running" and (tr["phase"], tr["reason"]) == ("Pending", "Retrying")
    assert d.failures == [("train", "Preempted")] and tr["exitCode"] == 143
    # retries 0: exhausted, but the reason is the retry budget, never a permanent classification
    zero = run(manifest(1, lifecycle={"retriesPerStep": 0}), st, preempted, now=T0 + timedelta(minutes=10))
    assert zero.status["steps"]["train"]["reason"] == "RetriesExhausted"


# -- Job and pod fields --------------------------------------------------------------------------------------
VERSIONS = sorted({v for v in all_versions() if tuple(map(int, v.split(".")[:2])) >= (1, 33)},
                  key=lambda v: tuple(map(int, v.split("."))))


@pytest.mark.parametrize("lifecycle,grace", [(None, 120), ({"terminationGracePeriodSeconds": 900}, 900)])
def test_pod_grace_period_and_disruption_rule_validate_on_current_releases(
        lifecycle: dict[str, Any] | None, grace: int) -> None:
    m = manifest(1, **({"lifecycle": lifecycle} if lifecycle else {}))
    for step in STEP_ORDER:
        j = jobs.build_job_spec(m, step, 3, OperatorConfig())
        assert j["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == grace
        rules = j["spec"]["podFailurePolicy"]["rules"]
        assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [2, 3]
        assert 143 not in rules[0]["onExitCodes"]["values"]
        assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget",
                                                                     "status": "True"}]}
        for version in VERSIONS:
            kubernetes_validate.validate(j, version, strict=True)
    assert VERSIONS[0].startswith("1.33.") and VERSIONS[-1] >= "1.37"


@pytest.mark.parametrize("bad", [0, 9, 3601, -1, "2m", True, 12.5])
def test_bad_grace_period_is_a_spec_error_naming_the_field(bad: Any) -> None:
    with pytest.raises(SpecError, match="terminationGracePeriodSeconds|termination_grace_period_seconds"):
        parse_manifest(manifest(1, lifecycle={"terminationGracePeriodSeconds": bad}))


@pytest.mark.parametrize("value", [True, False, "yes", "off", 1, 0, "maybe", 2, None, [], {}])
def test_the_queue_reads_suspend_as_the_spec_does(value: Any) -> None:
    """The API server only stores booleans (the CRD), but a hand-made manifest may hold anything: the
    queue (`suspended`, read from the raw manifest) agrees with the typed spec, and an invalid value is a
    SpecError naming spec.suspend (that experiment fails; it never counts as suspended)."""
    m = manifest(1)
    m["spec"]["suspend"] = value
    try:
        typed = parse_manifest(m).spec.suspend
    except SpecError as e:
        assert "spec.suspend" in str(e)
        typed = False
    assert suspended(m) is typed
    assert suspended({"spec": "not a mapping"}) is False and suspended({}) is False


def test_suspend_and_grace_period_change_no_step_hash() -> None:
    plain = parse_manifest(manifest(1))
    other = parse_manifest(manifest(1, suspend=True, lifecycle={"terminationGracePeriodSeconds": 600}))
    assert step_hashes(plain) == step_hashes(other)


def test_metrics_count_suspended_experiments() -> None:
    m = OperatorMetrics(CollectorRegistry())
    m.set_phase("u1", "Running", "voice", "alice")
    m.set_phase("u1", "Suspended", "voice", "alice")
    get = m.registry.get_sample_value
    assert get("rvc_experiments", {"phase": "Suspended"}) == 1
    assert get("rvc_experiments", {"phase": "Running"}) == 0
    who = {"namespace": "voice", "experiment": "alice"}
    assert get("rvc_experiment_phase", {**who, "phase": "Suspended"}) == 1
    assert get("rvc_experiment_phase", {**who, "phase": "Running"}) is None


# -- sharded steps ---------------------------------------------------------------------------------------
def shard_job(i: int, attempt: int, state: str = "Running", **kw: Any) -> JobSummary:
    return JobSummary(name=f"alice-preprocess-s{i}-{attempt}", step="preprocess", attempt=attempt,
                      state=state, shard=i, shards=2, **kw)


def test_suspend_and_resume_a_sharded_step_stops_and_restarts_only_the_unfinished_shards() -> None:
    sharded = {"resources": {"shards": 2}}
    d0 = run(manifest(1, **sharded), None)
    assert sorted(c.name for c in d0.create) == ["alice-preprocess-s0-1", "alice-preprocess-s1-1"]
    js = [shard_job(0, 1, "Succeeded"), shard_job(1, 1)]
    d1 = run(manifest(1, **sharded), d0.status, js)
    s = run(manifest(2, suspend=True, **sharded), d1.status, js, now=T0 + timedelta(minutes=5))
    assert [x.name for x in s.delete] == ["alice-preprocess-s1-1"] and s.create == []
    pre = s.status["steps"]["preprocess"]
    assert (pre["phase"], pre["reason"]) == ("Pending", "Suspended") and s.status["phase"] == "Suspended"
    assert [(sh["phase"], sh.get("reason")) for sh in pre["shards"]] == [("Succeeded", "Completed"),
                                                                         ("Pending", "Suspended")]
    # resumed while shard 1's Job is still being deleted: nothing is created, the experiment holds a slot
    stopping = [js[0], shard_job(1, 1, "Failed", exit_code=143, deleting=True)]
    r1 = run(manifest(3, suspend=False, **sharded), s.status, stopping, now=T0 + timedelta(minutes=9))
    assert r1.create == [] and r1.delete == [] and r1.failures == []
    assert r1.status["phase"] == "Running" and reasons(r1) == ["Resumed"]
    assert "waiting for Job alice-preprocess-s1-1 to stop" in r1.status["message"]
    full = Policy(admitted=False, queue_message="waiting for a free slot: 1 running")
    q = run(manifest(3, suspend=False, **sharded), s.status, js[:1], now=T0 + timedelta(minutes=9),
            policy=full)
    assert q.create == [] and q.status["phase"] == "Queued"
    r2 = run(manifest(3, suspend=False, **sharded), r1.status, js[:1], now=T0 + timedelta(minutes=10))
    assert [(c.name, c.attempt) for c in r2.create] == [("alice-preprocess-s1-2", 2)]
    assert r2.status["phase"] == "Running" and r2.status["steps"]["preprocess"]["failures"] == 0


# -- careless use ----------------------------------------------------------------------------------------
def test_suspend_toggled_back_before_the_operator_looked_changes_nothing() -> None:
    st, js = at_train(manifest(1))
    d = run(manifest(3, suspend=False), st, js, now=T0 + timedelta(minutes=10))  # gen 2 (true) never seen
    assert d.delete == [] and d.create == [] and d.events == [] and d.status["phase"] == "Running"
    assert cond(d, "Suspended") is None and d.status["observedGeneration"] == 3


def test_suspend_together_with_a_spec_change_reruns_with_force_on_resume() -> None:
    st, js = at_train(manifest(1))
    d = run(manifest(2, suspend=True, train={"epochs": 40}), st, js, now=T0 + timedelta(minutes=10))
    assert [x.name for x in d.delete] == ["alice-train-1"] and d.create == []
    assert d.status["phase"] == "Suspended" and d.status["steps"]["train"]["force"] is True
    assert reasons(d) == ["SpecChanged", "Suspended"]
    r = run(manifest(3, suspend=False, train={"epochs": 40}), d.status, js[:3], now=T0 + timedelta(hours=1))
    assert [(c.name, c.force) for c in r.create] == [("alice-train-2", True)]


def test_a_step_completed_in_storage_while_suspended_is_not_rerun() -> None:
    d, js = suspended_at_train()  # the pod finished training within its grace period: marker written
    r = run(manifest(3, suspend=False), d.status, js[:3], markers={"f0", "features", "train"},
            now=T0 + timedelta(minutes=30))
    assert r.status["steps"]["train"]["phase"] == "Skipped"
    assert [c.name for c in r.create] == ["alice-index-1"]
