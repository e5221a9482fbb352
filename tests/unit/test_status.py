"""Every transition of the pure state machine rvc_operator.status.decide (no cluster)."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from rvc_operator import ownership
from rvc_operator.api import ExperimentStatus
from rvc_operator.observe import JobSummary, summarize_job, termination_line
from rvc_operator.status import (
    Decision,
    Policy,
    admit,
    backoff_delay,
    decide,
    plan_deletion,
    rerun_point,
    status_patch,
)
from rvc_pipeline.core.spec import STEP_ORDER, SpecError, parse_manifest, step_hashes

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


def manifest(gen: int = 1, **spec_over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"dataset": {"source": "s3://voices/alice/"}, "storage": {"uri": "s3://models/rvc"},
                            "train": {"epochs": 10}}
    spec.update(spec_over)
    return {"apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment",
            "metadata": {"name": "alice", "namespace": "voice", "uid": "u-1", "generation": gen,
                         "creationTimestamp": "2025-03-01T11:00:00Z"},
            "spec": spec}


def job(step: str, attempt: int, state: str = "Running", **kw: Any) -> JobSummary:
    return JobSummary(name=f"alice-{step}-{attempt}", step=step, attempt=attempt, state=state, **kw)


def check(d: Decision) -> Decision:
    """Every status the state machine writes must fit the CRD's status schema."""
    ExperimentStatus.model_validate(d.status)
    return d


def run(m: dict[str, Any], status: dict[str, Any] | None, jobs: list[JobSummary] = (),
        markers: set[str] | None = None, now: datetime = T0, **kw: Any) -> Decision:
    marks = set() if markers is None else markers
    return check(decide(m, copy.deepcopy(status), list(jobs), marks, now, **kw))


def phases(d: Decision) -> dict[str, str]:
    return {s: d.status["steps"][s]["phase"] for s in STEP_ORDER}


def reasons(d: Decision) -> list[str]:
    return [e.reason for e in d.events]


def cond(d: Decision, ctype: str) -> dict[str, Any]:
    return next(c for c in d.status["conditions"] if c["type"] == ctype)


def complete(m: dict[str, Any], upto: str) -> tuple[dict[str, Any], list[JobSummary]]:
    """Drive the machine through successful Jobs until `upto` has succeeded; returns (status, jobs)."""
    st: dict[str, Any] | None = None
    jobs: list[JobSummary] = []
    d = run(m, st)
    for s in STEP_ORDER:
        st = d.status
        jobs = [j for j in jobs if j.step != s] + [job(s, st["steps"][s]["attempts"], "Succeeded")]
        d = run(m, st, jobs)
        if s == upto:
            break
    return d.status, jobs


# ---------------------------------------------------------------------------------------------------
def test_fresh_experiment_creates_first_job() -> None:
    d = run(manifest(), None)
    assert [(c.step, c.attempt, c.force, c.name) for c in d.create] == [
        ("preprocess", 1, False, "alice-preprocess-1")]
    assert d.status["phase"] == "Running" and d.status["currentStep"] == "preprocess"
    assert phases(d) == {"preprocess": "Running", "f0": "Pending", "features": "Pending", "train": "Pending",
                         "index": "Pending", "convert": "Skipped"}  # not in spec.steps
    pre = d.status["steps"]["preprocess"]
    assert pre["job"] == "alice-preprocess-1" and pre["attempts"] == 1
    assert pre["startTime"] == "2025-03-01T12:00:00Z"
    assert pre["inputsHash"] == step_hashes(parse_manifest(manifest()))["preprocess"]
    assert d.status["observedGeneration"] == 1
    assert reasons(d) == ["Started", "JobCreated"]
    assert cond(d, "Progressing")["status"] == "True" and cond(d, "Ready")["status"] == "False"
    assert d.status["artifacts"] == {"logs": "s3://models/rvc/logs/alice/"}
    assert not d.finished


def test_running_job_waits_and_reports_pod_problems() -> None:
    st = run(manifest(), None).status
    d = run(manifest(), st, [job("preprocess", 1, "Running")], now=T0 + timedelta(minutes=5))
    assert d.create == [] and d.delete == [] and d.events == []
    assert d.status["steps"]["preprocess"]["message"] == "attempt 1 running"
    assert status_patch(st, d.status).keys() <= {"steps", "message", "conditions"}
    waiting = job("preprocess", 1, "Pending",
                  waiting="Unschedulable: 0/3 nodes are available: 3 Insufficient cpu.",
                  waiting_reason="Unschedulable")
    d2 = run(manifest(), st, [waiting])
    assert "Insufficient cpu" in d2.status["message"]
    assert d2.status["steps"]["preprocess"]["reason"] == "Waiting"
    assert d2.status["phase"] == "Running"


def test_job_succeeded_starts_next_step_in_same_reconcile() -> None:
    st = run(manifest(), None).status
    done = job("preprocess", 1, "Succeeded", completion_time="2025-03-01T12:03:20Z")
    d = run(manifest(), st, [done], now=T0 + timedelta(minutes=4))
    assert phases(d)["preprocess"] == "Succeeded"
    assert d.status["steps"]["preprocess"]["endTime"] == "2025-03-01T12:03:20Z"
    assert [(c.step, c.attempt) for c in d.create] == [("f0", 1)]
    assert d.step_durations == [("preprocess", 200.0)]
    assert reasons(d) == ["StepSucceeded", "JobCreated"]
    assert d.status["currentStep"] == "f0"


def test_all_done_succeeds_with_artifacts() -> None:
    m = manifest()
    st, jobs = complete(m, "train")
    assert st["steps"]["index"]["phase"] == "Running"
    d = run(m, st, jobs + [job("index", 1, "Succeeded")],
            index_file="logs/alice/added_IVF101_Flat_nprobe_1_alice_v2.index")
    assert d.status["phase"] == "Succeeded" and d.finished and d.create == []
    assert d.status["currentStep"] is None
    assert d.status["artifacts"] == {
        "logs": "s3://models/rvc/logs/alice/",
        "model": "s3://models/rvc/logs/alice/weights/alice.pth",
        "index": "s3://models/rvc/logs/alice/added_IVF101_Flat_nprobe_1_alice_v2.index",
    }
    assert cond(d, "Ready")["status"] == "True" and cond(d, "Ready")["reason"] == "Succeeded"
    assert cond(d, "Progressing")["status"] == "False" and cond(d, "Progressing")["reason"] == "Completed"
    assert cond(d, "Failed")["status"] == "False"
    assert reasons(d)[-1] == "Succeeded" and "alice.pth" in d.status["message"]
    # a further reconcile of the finished experiment changes nothing
    again = run(m, d.status, jobs, index_file="logs/alice/added_IVF101_Flat_nprobe_1_alice_v2.index",
                now=T0 + timedelta(hours=1))
    assert again.create == [] and again.events == [] and status_patch(d.status, again.status) == {}


def test_permanent_failure_fails_the_experiment_with_the_pipeline_message() -> None:
    st = run(manifest(), None).status
    bad = job("preprocess", 1, "Failed", exit_code=2, reason="BackoffLimitExceeded",
              message="no audio found in s3://voices/alice/: notes.txt, cover.jpg are not audio")
    d = run(manifest(), st, [bad], now=T0 + timedelta(minutes=1))
    assert d.status["phase"] == "Failed" and d.finished and d.create == []
    pre = d.status["steps"]["preprocess"]
    assert pre["phase"] == "Failed" and pre["exitCode"] == 2 and pre["reason"] == "BadInput"
    assert "notes.txt, cover.jpg" in d.status["message"]
    assert d.status["message"].startswith("preprocess failed")
    assert cond(d, "Failed")["status"] == "True" and cond(d, "Failed")["reason"] == "BadInput"
    assert reasons(d) == ["StepFailed", "Failed"]
    assert d.failures == [("preprocess", "BadInput")] and d.retries == []
    # missing weights (exit 3) while the Job would still retry its pod: stop it now
    st2 = run(manifest(), None).status
    active = job("preprocess", 1, "Running", exit_code=3, message="hubert_base.pt not found; put it in ...")
    d2 = run(manifest(), st2, [active])
    assert [x.name for x in d2.delete] == ["alice-preprocess-1"]
    assert d2.status["steps"]["preprocess"]["reason"] == "MissingWeights" and d2.status["phase"] == "Failed"


def test_oom_under_a_memory_limit_is_permanent_with_a_hint() -> None:
    m = manifest(resources={"memory": "8Gi"})
    st = run(m, None).status
    d = run(m, st, [job("preprocess", 1, "Failed", exit_code=137, reason="OOMKilled")])
    assert d.status["phase"] == "Failed"
    assert "8Gi" in d.status["message"] and "spec.resources.memory" in d.status["message"]
    # without a limit it is treated as node pressure: retried
    st2 = run(manifest(), None).status
    d2 = run(manifest(), st2, [job("preprocess", 1, "Failed", exit_code=137, reason="OOMKilled")])
    assert d2.status["phase"] == "Running" and d2.status["steps"]["preprocess"]["phase"] == "Pending"


def test_transient_failure_retries_with_backoff_then_fails() -> None:
    m = manifest()
    pol = Policy(max_retries=2, backoff_seconds=30, backoff_max_seconds=900)
    st = run(m, None, policy=pol).status
    now = T0 + timedelta(minutes=2)
    d = run(m, st, [job("preprocess", 1, "Failed", exit_code=1, message="connection reset by peer")], now=now,
            policy=pol)
    pre = d.status["steps"]["preprocess"]
    assert pre["phase"] == "Pending" and pre["failures"] == 1 and pre["reason"] == "Retrying"
    assert pre["retryAfter"] == "2025-03-01T12:02:30Z" and d.requeue_after == 30
    assert d.create == [] and d.status["phase"] == "Running" and d.retries == ["preprocess"]
    assert "connection reset" in pre["message"] and "retry 1/2" in pre["message"]
    assert reasons(d) == ["Retrying"]
    jobs = [job("preprocess", 1, "Failed", exit_code=1)]
    # before the backoff has passed: nothing
    d_wait = run(m, d.status, jobs, now=now + timedelta(seconds=10), policy=pol)
    assert d_wait.create == [] and 19 <= d_wait.requeue_after <= 20
    # after it: attempt 2
    d2 = run(m, d.status, jobs, now=now + timedelta(seconds=31), policy=pol)
    assert [(c.step, c.attempt) for c in d2.create] == [("preprocess", 2)]
    assert "retryAfter" not in d2.status["steps"]["preprocess"]
    jobs.append(job("preprocess", 2, "Failed", exit_code=1))
    t3 = now + timedelta(seconds=40)
    d3 = run(m, d2.status, jobs, now=t3, policy=pol)
    assert d3.status["steps"]["preprocess"]["failures"] == 2 and d3.requeue_after == 60  # doubled
    d4 = run(m, d3.status, jobs, now=t3 + timedelta(seconds=61), policy=pol)
    assert [c.attempt for c in d4.create] == [3]
    jobs.append(job("preprocess", 3, "Failed", exit_code=1, reason="DeadlineExceeded"))
    d5 = run(m, d4.status, jobs, now=t3 + timedelta(seconds=70), policy=pol)
    assert d5.status["phase"] == "Failed" and d5.create == []
    assert d5.status["steps"]["preprocess"]["reason"] == "RetriesExhausted"
    assert "gave up after 3 attempt(s)" in d5.status["message"]
    assert backoff_delay(1, pol) == 30 and backoff_delay(3, pol) == 120 and backoff_delay(10, pol) == 900


def test_markers_in_storage_skip_steps_and_may_finish_without_jobs() -> None:
    m = manifest()
    # preprocess always runs as a Job (it notices a changed dataset; unchanged, it returns in seconds)
    d0 = run(m, None, markers={"preprocess", "f0"})
    assert phases(d0)["preprocess"] == "Running" and [c.step for c in d0.create] == ["preprocess"]
    jobs = [job("preprocess", 1, "Succeeded")]
    d = run(m, d0.status, jobs, markers={"preprocess", "f0"})
    assert phases(d)["preprocess"] == "Succeeded" and phases(d)["f0"] == "Skipped"
    assert d.status["steps"]["f0"]["reason"] == "AlreadyComplete"
    assert [(c.step, c.attempt) for c in d.create] == [("features", 1)]
    assert reasons(d).count("StepSkipped") == 1
    # the dataset changed: the preprocess Job reran and removed the later markers, so f0 runs again
    d_changed = run(m, d0.status, jobs, markers={"preprocess"})
    assert [c.step for c in d_changed.create] == ["f0"]
    # everything already there: Succeeded after the preprocess check, even when no slot is free
    d_all0 = run(m, None, markers=set(STEP_ORDER))
    d_all = run(m, d_all0.status, jobs, markers=set(STEP_ORDER), policy=Policy(admitted=False))
    assert d_all.status["phase"] == "Succeeded" and d_all.create == []
    assert d_all.status["artifacts"]["model"] == "s3://models/rvc/logs/alice/weights/alice.pth"
    # storage unreadable (None): nothing is skipped, the pipeline itself skips finished work
    d_none = check(decide(m, None, [], None, T0))
    assert [c.step for c in d_none.create] == ["preprocess"]


def test_restart_safety_adopts_existing_jobs_never_duplicates() -> None:
    m = manifest()
    # the operator created the Job, then died before writing the status
    for state in ("Pending", "Running", "Failed", "Succeeded"):
        d = run(m, None, [job("preprocess", 1, state, exit_code=1 if state == "Failed" else None)])
        assert all(c.name != "alice-preprocess-1" for c in d.create), state
        assert d.status["steps"]["preprocess"]["attempts"] >= 1
    d_run = run(m, None, [job("preprocess", 1, "Running")])
    assert d_run.create == [] and d_run.status["steps"]["preprocess"]["job"] == "alice-preprocess-1"
    d_ok = run(m, None, [job("preprocess", 1, "Succeeded")])
    assert [c.name for c in d_ok.create] == ["alice-f0-1"]
    # the same inputs give the same decision: a replayed reconcile asks for the same (deterministic) name
    st = run(m, None).status
    first, second = run(m, None), run(m, None)
    assert [c.name for c in first.create] == [c.name for c in second.create] == ["alice-preprocess-1"]
    # an older status plus a newer Job in the cluster: adopt the newer attempt
    st_retry = copy.deepcopy(st)
    st_retry["steps"]["preprocess"].update(phase="Pending", failures=1, retryAfter="2025-03-01T11:00:00Z")
    d_adopt = run(m, st_retry, [job("preprocess", 1, "Failed", exit_code=1), job("preprocess", 2, "Running")])
    assert d_adopt.create == [] and d_adopt.status["steps"]["preprocess"]["job"] == "alice-preprocess-2"
    assert d_adopt.delete == []


def test_missing_job_within_grace_waits_then_retries_or_trusts_marker() -> None:
    m = manifest()
    st = run(m, None).status
    d = run(m, st, [], now=T0 + timedelta(seconds=30))
    assert d.create == [] and d.status["steps"]["preprocess"]["phase"] == "Running" and d.requeue_after == 90
    d_marker = run(m, st, [], markers={"preprocess"}, now=T0 + timedelta(minutes=30))
    assert phases(d_marker)["preprocess"] == "Succeeded" and [c.step for c in d_marker.create] == ["f0"]
    d_gone = run(m, st, [], now=T0 + timedelta(minutes=30))
    pre = d_gone.status["steps"]["preprocess"]
    assert pre["phase"] == "Pending" and pre["failures"] == 1 and "disappeared" in pre["message"]
    assert d_gone.failures == [("preprocess", "JobMissing")]


def test_queued_until_a_slot_is_free() -> None:
    m = manifest()
    d = run(m, None, policy=Policy(admitted=False, queue_message="waiting for a free slot: 2 running"))
    assert d.status["phase"] == "Queued" and d.create == [] and reasons(d) == ["Queued"]
    assert cond(d, "Progressing")["reason"] == "Queued" and cond(d, "Progressing")["status"] == "False"
    again = run(m, d.status, policy=Policy(admitted=False))
    assert again.events == [] and again.status["phase"] == "Queued"
    go = run(m, d.status)
    assert go.status["phase"] == "Running" and [c.step for c in go.create] == ["preprocess"]
    assert cond(go, "Progressing")["lastTransitionTime"] == "2025-03-01T12:00:00Z"


def test_admit_counts_running_and_older_waiting() -> None:
    def exp(name: str, created: str, phase: str | None) -> dict[str, Any]:
        return {"metadata": {"name": name, "namespace": "v", "uid": name, "creationTimestamp": created},
                "status": {"phase": phase} if phase else {}}

    me = exp("me", "2025-01-01T00:00:05Z", "Queued")
    others = [exp("r1", "2025-01-01T00:00:00Z", "Running"), exp("done", "2025-01-01T00:00:00Z", "Succeeded"),
              exp("old", "2025-01-01T00:00:01Z", "Queued"), exp("young", "2025-01-01T00:00:09Z", None), me]
    assert admit(me, others, 0) == (True, "")
    assert admit(me, others, 3)[0] is True  # 1 running + 1 older waiting < 3
    ok, why = admit(me, others, 2)
    assert ok is False and "1 running, 1 queued ahead" in why and "RVC_MAX_CONCURRENT_EXPERIMENTS=2" in why
    assert admit(exp("old", "2025-01-01T00:00:01Z", "Queued"), others, 2)[0] is True


def test_spec_change_reruns_from_first_changed_step_with_force() -> None:
    m1 = manifest(1)
    st, jobs = complete(m1, "index")
    d_done = run(m1, st, jobs)
    assert d_done.status["phase"] == "Succeeded"
    m2 = manifest(2, f0={"method": "harvest"})
    assert rerun_point(d_done.status["steps"], step_hashes(parse_manifest(m2))) == "f0"
    d = run(m2, d_done.status, jobs, markers=set(STEP_ORDER), now=T0 + timedelta(hours=1))
    assert phases(d) == {"preprocess": "Succeeded", "f0": "Running", "features": "Pending",
                         "train": "Pending", "index": "Pending", "convert": "Skipped"}
    assert [(c.step, c.attempt, c.force) for c in d.create] == [("f0", 2, True)]  # markers ignored: forced
    assert d.status["phase"] == "Running" and d.status["observedGeneration"] == 2
    assert "completionTime" not in d.status
    assert reasons(d)[:2] == ["SpecChanged", "Started"]
    # the later steps are not skipped by their old markers while f0 reruns
    jobs2 = jobs + [job("f0", 2, "Succeeded", force=True)]
    d2 = run(m2, d.status, jobs2, markers={"preprocess", "f0"})
    assert [(c.step, c.attempt, c.force) for c in d2.create] == [("features", 2, False)]
    assert "force" not in d2.status["steps"]["f0"]


@pytest.mark.parametrize(("change", "first"), [
    ({"dataset": {"source": "s3://voices/alice-v2/"}}, "preprocess"),
    ({"preprocess": {"segmentSeconds": 3.0}}, "preprocess"),
    ({"model": {"sampleRate": "48k"}}, "preprocess"),
    ({"model": {"pitchGuidance": False}}, "f0"),
    ({"features": {"embedder": "s3://w/contentvec.pt"}}, "features"),
    ({"model": {"version": "v1"}}, "features"),
    ({"train": {"epochs": 40}}, "train"),
    ({"train": {"epochs": 10, "batchSize": 8}}, "train"),
    ({"index": {"kmeansThreshold": 5000}}, "index"),
    ({"resources": {"memory": "32Gi", "device": "cpu"}}, None),
    ({"metrics": {"pushgateway": "http://p:9091"}}, None),
    ({"weightsCache": "s3://w/"}, None),
])
def test_rerun_point_per_field(change: dict[str, Any], first: str | None) -> None:
    m1 = manifest(1)
    st, jobs = complete(m1, "index")
    m2 = manifest(2, **change)
    d = run(m2, st, jobs, markers=set(STEP_ORDER))
    if first is None:
        assert d.status["phase"] == "Succeeded" and d.create == [] and d.status["observedGeneration"] == 2
        assert reasons(d) == []
    else:
        assert [(c.step, c.force) for c in d.create] == [(first, True)]
        i = STEP_ORDER.index(first)
        assert all(phases(d)[s] == "Succeeded" for s in STEP_ORDER[:i])


def test_spec_change_while_running_replaces_the_stale_job() -> None:
    m1 = manifest(1)
    st, jobs = complete(m1, "features")
    assert st["steps"]["train"]["phase"] == "Running"
    jobs = jobs + [job("train", 1, "Running")]
    m2 = manifest(2, train={"epochs": 40})
    d = run(m2, st, jobs)
    assert [x.name for x in d.delete] == ["alice-train-1"]
    assert [(c.name, c.force) for c in d.create] == [("alice-train-2", True)]
    # while the deleted Job is still terminating it is neither adopted nor re-deleted
    terminating = [j for j in jobs if j.step != "train"] + [job("train", 1, "Running", deleting=True),
                                                            job("train", 2, "Running", force=True)]
    d2 = run(m2, d.status, terminating)
    assert d2.create == [] and d2.delete == []
    # resources-only change while running: the Job keeps running
    d3 = run(manifest(3, train={"epochs": 40}, resources={"cpu": "8"}), d2.status, terminating)
    assert d3.create == [] and d3.delete == [] and d3.status["observedGeneration"] == 3


def test_failed_experiment_retries_after_any_spec_change() -> None:
    m1 = manifest(1)
    st = run(m1, None).status
    failed = run(m1, st, [job("preprocess", 1, "Failed", exit_code=2, message="bad")]).status
    assert failed["phase"] == "Failed"
    m2 = manifest(2, resources={"memory": "64Gi"})  # inputs unchanged, but the user wants another go
    d = run(m2, failed, [job("preprocess", 1, "Failed", exit_code=2)])
    assert [(c.step, c.attempt) for c in d.create] == [("preprocess", 2)]
    assert d.status["phase"] == "Running" and cond(d, "Failed")["status"] == "False"
    assert "SpecChanged" in reasons(d)


def test_steps_added_and_removed() -> None:
    m1 = manifest(1, steps=["preprocess"])
    d = run(m1, None)
    assert phases(d)["f0"] == "Skipped" and d.status["steps"]["f0"]["reason"] == "NotInSpec"
    d_ok = run(m1, d.status, [job("preprocess", 1, "Succeeded")])
    assert d_ok.status["phase"] == "Succeeded" and "model" not in d_ok.status["artifacts"]
    m2 = manifest(2, steps=["preprocess", "f0", "features"])
    d2 = run(m2, d_ok.status, [job("preprocess", 1, "Succeeded")])
    assert [c.step for c in d2.create] == ["f0"] and phases(d2)["preprocess"] == "Succeeded"
    assert phases(d2)["train"] == "Skipped"
    # removing the running step stops its Job
    m3 = manifest(3, steps=["preprocess"])
    d3 = run(m3, d2.status, [job("preprocess", 1, "Succeeded"), job("f0", 1, "Running")])
    assert [x.name for x in d3.delete] == ["alice-f0-1"] and d3.status["phase"] == "Succeeded"


def test_invalid_spec_fails_then_recovers() -> None:
    bad = manifest(1, train={"epochs": 0})
    d = run(bad, None)
    assert d.status["phase"] == "Failed" and d.create == [] and "spec.train.epochs" in d.status["message"]
    assert cond(d, "Failed")["reason"] == "InvalidSpec" and reasons(d) == ["InvalidSpec"]
    assert run(bad, d.status).events == []  # no event storm
    local = manifest(1, storage={"uri": "/data/out"})
    d_local = run(local, None)
    assert d_local.status["phase"] == "Failed" and "spec.storage.uri" in d_local.status["message"]
    fixed = manifest(2)
    d2 = run(fixed, d.status)
    assert d2.status["phase"] == "Running" and [c.step for c in d2.create] == ["preprocess"]


def test_stale_active_jobs_are_deleted() -> None:
    m = manifest()
    st = run(m, None).status  # preprocess attempt 1 running
    st["steps"]["preprocess"].update(attempts=2, job="alice-preprocess-2")
    d = run(m, st, [job("preprocess", 1, "Running"), job("preprocess", 2, "Running")])
    assert [x.name for x in d.delete] == ["alice-preprocess-1"] and d.create == []


def test_deleting_experiment_does_nothing_and_deletion_plan() -> None:
    m = manifest()
    m["metadata"]["deletionTimestamp"] = "2025-03-01T12:00:00Z"
    d = decide(m, {}, [], set(), T0)
    assert d.create == [] and d.finished
    jobs = [job("train", 1, "Running"), job("preprocess", 1, "Succeeded"),
            job("f0", 1, "Running", deleting=True)]
    keep = plan_deletion(manifest(), jobs)
    assert keep.jobs == ["alice-preprocess-1", "alice-train-1"] and keep.configmap == "alice-spec"
    assert keep.artifacts_prefix is None
    wipe = manifest()
    wipe["metadata"]["annotations"] = {"rvc-operator.dev/delete-artifacts": "true"}
    p = plan_deletion(wipe, jobs)
    assert (p.artifacts_prefix, p.storage_uri) == ("logs/alice/", "s3://models/rvc")
    assert plan_deletion(manifest(), jobs, delete_artifacts_default=True).artifacts_prefix == "logs/alice/"
    wipe["metadata"]["annotations"]["rvc-operator.dev/delete-artifacts"] = "false"
    assert plan_deletion(wipe, jobs, delete_artifacts_default=True).artifacts_prefix is None
    named = manifest(experimentName="shared-folder")
    named["metadata"]["annotations"] = {"rvc-operator.dev/delete-artifacts": "true"}
    assert plan_deletion(named, []).artifacts_prefix == "logs/shared-folder/"


def test_progress_is_copied_into_status() -> None:
    m = manifest()
    st, jobs = complete(m, "features")
    prog = {"step": "train", "epoch": 3, "epochs": 10, "epochText": "3/10", "percent": 30.0, "lossG": 31.2,
            "lossD": 4.1, "lossMel": 21.0, "secondsPerEpoch": 12.5}
    d = run(m, st, jobs + [job("train", 1, "Running")], progress=prog)
    assert d.status["progress"] == prog and d.status["phase"] == "Running"


def test_checkpoint_evaluation_becomes_status_training_with_uris() -> None:
    from rvc_operator.progress_reader import parse_events, training_from_events

    lines = [
        {"time": 1.8e9, "experiment": "alice", "step": "train", "event": "eval", "epoch": 5,
         "global_step": 50, "checkpoint": "G_50.pth", "score": 0.7,
         "metrics": {"speaker_sim": 0.7, "mel_l1": float("nan")},
         "best_epoch": 5, "best_score": 0.7, "best_global_step": 50, "best_checkpoint": "G_50.pth",
         "best_metrics": {"speaker_sim": 0.7}},
        {"time": 1.8e9 + 60, "experiment": "alice", "step": "train", "event": "eval", "epoch": 10,
         "global_step": 100, "checkpoint": "G_100.pth", "score": 0.6, "metrics": {"speaker_sim": 0.6},
         "best_epoch": 5, "best_score": 0.7, "best_global_step": 50, "best_checkpoint": "G_50.pth",
         "best_metrics": {"speaker_sim": 0.7}, "stop": True},
    ]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    training = training_from_events(parse_events(data))
    assert training is not None and training.latest is not None and training.latest.epoch == 10
    assert training_from_events(parse_events(data[: len(data) // 2])) is not None  # first line only
    assert training_from_events([]) is None
    m = manifest()
    st, jobs = complete(m, "features")
    d = run(m, st, jobs + [job("train", 1, "Running")], training=training)
    tr = d.status["training"]
    assert tr["best"] == {"epoch": 5, "globalStep": 50, "score": 0.7, "checkpoint":
                          "s3://models/rvc/logs/alice/G_50.pth", "metrics": {"speaker_sim": 0.7}}
    assert tr["latest"]["epoch"] == 10 and tr["stoppedEarly"] is True
    again = run(m, d.status, jobs + [job("train", 1, "Running")])  # storage not read this time: kept
    assert again.status["training"] == tr
    first = training_from_events(parse_events(data.split(b"\n")[0] + b"\n"))
    assert first is not None and first.latest is not None and first.latest.metrics == {"speaker_sim": 0.7}


# --- summaries of API objects ------------------------------------------------------------------------
def api_job(name: str, step: str, attempt: int, conditions: list[dict[str, Any]] | None = None,
            active: int = 0) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"rvc-operator.dev/step": step,
                                                  "rvc-operator.dev/attempt": str(attempt)},
                         "annotations": {"rvc-operator.dev/inputs-hash": "abc",
                                         "rvc-operator.dev/force": "true"},
                         "creationTimestamp": "2025-03-01T12:00:00Z"},
            "status": {"conditions": conditions or [], "active": active, "startTime": "2025-03-01T12:00:01Z"}}


def api_pod(exit_code: int | None = None, reason: str = "Error", message: str = "", finished: str = "",
            phase: str = "Failed", waiting: dict[str, str] | None = None,
            pod_conditions: list[dict[str, str]] | None = None) -> dict[str, Any]:
    cs: dict[str, Any] = {"name": "step", "state": {}}
    if exit_code is not None:
        cs["state"] = {"terminated": {"exitCode": exit_code, "reason": reason, "message": message,
                                      "finishedAt": finished}}
    if waiting:
        cs["state"] = {"waiting": waiting}
    return {"metadata": {"name": "p"}, "status": {"phase": phase, "containerStatuses": [cs],
                                                  "conditions": pod_conditions or []}}


def test_summarize_failed_job_picks_newest_pod_error_line() -> None:
    log_tail = ("12:00:01 INFO preprocess: 12 files\nTraceback...\n"
                "error: preprocess: no usable audio in s3://voices/alice/: a.txt (not audio)\n")
    j = api_job("alice-preprocess-1", "preprocess", 1,
                [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}])
    pods = [api_pod(1, message="error: old", finished="2025-03-01T12:00:05Z"),
            api_pod(2, message=log_tail, finished="2025-03-01T12:01:00Z")]
    s = summarize_job(j, pods)
    assert (s.state, s.exit_code, s.step, s.attempt) == ("Failed", 2, "preprocess", 1)
    assert s.message == "preprocess: no usable audio in s3://voices/alice/: a.txt (not audio)"
    assert s.reason == "BackoffLimitExceeded" and s.inputs_hash == "abc" and s.force is True
    oom = summarize_job(j, [api_pod(137, reason="OOMKilled")])
    assert oom.reason == "OOMKilled" and oom.exit_code == 137


def test_summarize_running_pending_and_succeeded_jobs() -> None:
    ok = summarize_job(api_job("j", "train", 2, [{"type": "Complete", "status": "True"}]))
    assert ok.state == "Succeeded" and ok.attempt == 2
    pull = summarize_job(api_job("j", "train", 1, active=1), [api_pod(phase="Pending", waiting={
        "reason": "ImagePullBackOff", "message": 'Back-off pulling image "reg/x:1"'})])
    assert pull.state == "Running" and pull.waiting_reason == "ImagePullBackOff" and "reg/x:1" in pull.waiting
    sched = summarize_job(api_job("j", "train", 1, active=1), [api_pod(phase="Pending", pod_conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}])])
    assert sched.waiting.startswith("Unschedulable: 0/1 nodes") and sched.active
    fresh = summarize_job(api_job("j", "f0", 1))
    assert fresh.state == "Pending" and fresh.exit_code is None


def test_image_pull_failure_fails_after_timeout() -> None:
    m = manifest()
    st = run(m, None).status
    pulling = job("preprocess", 1, "Running", waiting="ImagePullBackOff: not found",
                  waiting_reason="ImagePullBackOff")
    early = run(m, st, [pulling], now=T0 + timedelta(minutes=2))
    assert early.status["phase"] == "Running" and "ImagePullBackOff" in early.status["message"]
    late = run(m, st, [pulling], now=T0 + timedelta(minutes=20))
    assert late.status["phase"] == "Failed" and "image cannot be pulled" in late.status["message"]
    assert [x.name for x in late.delete] == ["alice-preprocess-1"]


def test_termination_line_and_status_patch() -> None:
    assert termination_line("a\nerror: bad file x.wav\nTraceback tail") == "bad file x.wav"
    assert termination_line("only line\n\n") == "only line"
    assert termination_line("") is None and termination_line(None) is None
    old = {"phase": "Running", "steps": {"f0": {"phase": "Running", "retryAfter": "t"}}, "message": "m"}
    new = {"phase": "Running", "steps": {"f0": {"phase": "Succeeded"}}, "currentStep": "features"}
    assert status_patch(old, new) == {"message": None, "currentStep": "features",
                                      "steps": {"f0": {"phase": "Succeeded", "retryAfter": None}}}


def test_status_never_holds_empty_strings() -> None:
    """Some API servers (seen on 1.20) read "" as null and refuse the status patch."""

    def strings(o: Any) -> list[str]:
        if isinstance(o, dict):
            return [x for v in o.values() for x in strings(v)]
        if isinstance(o, list):
            return [x for v in o for x in strings(v)]
        return [o] if isinstance(o, str) else []

    m = manifest()
    st, jobs = complete(m, "index")
    for d in (run(m, None), run(m, st, jobs), run(manifest(1, train={"epochs": 0}), None)):
        assert "" not in strings(d.status)
    assert cond(run(m, None), "Failed")["message"] == "no failure"


# --- storage access: allow-list, ownership record, refusal (rvc_operator.ownership) -----------------
OWNER = ownership.Owner("voice", "alice", "u-1", "2025-03-01T12:00:00Z")


@pytest.mark.parametrize("uri", [
    "s3://", "s3:///x", "/abs/path", "file:///etc", "http://b/x", "s3://b/a//c", "s3://b/a/../c",
    "s3://b/./x", "s3://b/x\n", "s3://b/x\x00y", "s3://b\\x/y", "S3://b/x", "", 42,
])
def test_canonical_prefix_refuses_what_cannot_be_compared(uri: Any) -> None:
    with pytest.raises(ownership.PrefixError):
        ownership.canonical_prefix(uri)


def test_canonical_prefix_adds_the_slash_that_separates_folders() -> None:
    assert ownership.canonical_prefix("s3://b") == "s3://b/"
    assert ownership.canonical_prefix("s3://b/team-a") == "s3://b/team-a/"
    assert ownership.canonical_prefix("s3://b/team-a/") == "s3://b/team-a/"


def _exp(ns: str = "voice", **spec_over: Any):  # noqa: ANN202
    m = manifest(**spec_over)
    m["metadata"]["namespace"] = ns
    return parse_manifest(m)


TABLE = {"voice": ("s3://models/rvc/",), "team-b": ("s3://bucket-b/", "s3://shared/team-b/"), "*": ()}


@pytest.mark.parametrize(("ns", "storage", "field"), [
    ("voice", {"uri": "s3://other/rvc"}, "spec.storage.uri"),  # another bucket
    ("voice", {"uri": "s3://models/rvc-evil"}, "spec.storage.uri"),  # shares the prefix string only
    ("voice", {"uri": "s3://models"}, "spec.storage.uri"),  # the bucket root above the prefix
    ("voice", {"uri": "s3://models/rvc/../../other"}, "spec.storage.uri"),  # climbing out
    ("voice", {"uri": "s3://models//rvc"}, "spec.storage.uri"),  # empty segment
    ("voice", {"uri": "s3://models/rvc", "endpoint": "http://evil:9000"}, "spec.storage.endpoint"),
    ("team-b", {"uri": "s3://shared/team-a"}, "spec.storage.uri"),  # a neighbour's shared folder
    ("team-c", {"uri": "s3://models/rvc"}, "spec.storage.uri"),  # "*": nothing
])
def test_allow_list_refuses_storage_outside_the_namespace_prefixes(ns: str, storage: dict[str, Any],
                                                                    field: str) -> None:
    m = manifest(storage=storage)
    m["metadata"]["namespace"] = ns
    exp, r = ownership.admit_storage(m, TABLE, "http://s3:9000")
    assert exp is None  # storage is never opened
    if r is None:  # the spec parser refuses it first: an InvalidSpec failure naming the field
        with pytest.raises(SpecError, match=field.replace(".", r"\.")):
            parse_manifest(m)
        return
    assert r.reason == "StorageNotAllowed"
    assert r.message.startswith(field) and ns in r.message
    shown = ", ".join(TABLE.get(ns, ())) or "none"
    assert shown in r.message


def test_allow_list_admits_the_namespace_own_prefixes() -> None:
    assert ownership.check_allowed(_exp(), TABLE, "http://s3:9000") is None
    assert ownership.check_allowed(_exp(storage={"uri": "s3://models/rvc/"}), TABLE, None) is None
    ok = _exp("team-b", storage={"uri": "s3://shared/team-b/x", "endpoint": "http://s3:9000/"})
    assert ownership.check_allowed(ok, TABLE, "http://s3:9000") is None
    assert ownership.check_allowed(_exp(storage={"uri": "s3://anything"}), None, None) is None  # no list
    # an experimentName is part of the folder: a prefix may confine one team to its own experiments
    narrow = {"voice": ("s3://models/rvc/logs/alice/",)}
    assert ownership.check_allowed(_exp(), narrow, None) is None
    assert ownership.check_allowed(_exp(experimentName="bob"), narrow, None) is not None


def test_admit_storage_never_opens_invalid_or_local_storage() -> None:
    m = manifest(storage={"uri": "/var/lib/operator"})
    assert ownership.admit_storage(m, None, None) == (None, None)
    bad = manifest(train={"epochs": 0})
    assert ownership.admit_storage(bad, None, None) == (None, None)
    exp, refusal = ownership.admit_storage(manifest(storage={"uri": "s3://x/y"}), TABLE, None)
    assert exp is None and refusal is not None and "spec.storage.uri" in refusal.message
    exp, refusal = ownership.admit_storage(manifest(), TABLE, None)
    assert exp is not None and exp.name == "alice" and refusal is None


@pytest.mark.parametrize("data", [
    None, b"", b"not json", b"[]", b'"uid"', b"\xff\xfe", b'{"namespace": "voice", "name": "alice"}',
    b'{"namespace": "voice", "name": "alice", "uid": 7}', b'{"namespace": "", "name": "alice", "uid": "u"}',
    b'{"namespace": "v\\n", "name": "alice", "uid": "u"}', b'{"uid": "u-1", "pad": "' + b"x" * 5000 + b'"}',
])
def test_a_record_that_does_not_parse_is_never_ours(data: bytes | None) -> None:
    rec = ownership.parse_record(data)
    assert rec is None
    assert ownership.verdict(rec, True, OWNER, has_markers=False, older_rival=False) == ownership.FOREIGN


def test_ownership_verdicts() -> None:
    rec = ownership.parse_record(OWNER.to_json())
    assert rec == OWNER
    v = ownership.verdict
    assert v(rec, True, OWNER, True, True) == ownership.OWNED
    other_ns = ownership.Owner("team-b", "alice", "u-9")
    assert v(other_ns, True, OWNER, False, False) == ownership.FOREIGN
    other_name = ownership.Owner("voice", "bob", "u-9")
    assert v(other_name, True, OWNER, False, False) == ownership.FOREIGN
    predecessor = ownership.Owner("voice", "alice", "u-0")  # deleted, then created again
    assert v(predecessor, True, OWNER, True, False) == ownership.TAKEOVER
    assert v(None, False, OWNER, False, False) == ownership.CLAIM  # fresh folder
    assert v(None, False, OWNER, True, False) == ownership.CLAIM  # pre-upgrade folder, nobody older
    assert v(None, False, OWNER, False, True) == ownership.CLAIM  # empty folder: first writer wins
    assert v(None, False, OWNER, True, True) == ownership.FOREIGN  # pre-upgrade folder of an older one


def test_older_rival() -> None:
    me = manifest()
    other = manifest()
    other["metadata"].update(namespace="team-b", uid="u-2", creationTimestamp="2025-03-01T10:00:00Z")
    assert ownership.is_older_rival(me, "p", other, "p")
    assert not ownership.is_older_rival(me, "p", other, "q")
    assert not ownership.is_older_rival(me, None, other, None)
    assert not ownership.is_older_rival(me, "p", me, "p")  # itself
    other["metadata"]["creationTimestamp"] = "2025-03-01T11:30:00Z"
    assert not ownership.is_older_rival(me, "p", other, "p")  # younger
    other["metadata"].update(creationTimestamp="2025-03-01T10:00:00Z", deletionTimestamp="x")
    assert not ownership.is_older_rival(me, "p", other, "p")  # going away


def test_deletable_keys_stay_inside_the_folder() -> None:
    keys = ["logs/alice/.rvc/owner.json", "logs/alice/G_1.pth", "logs/alice/.rvc/f0.done.json",
            "logs/alice", "logs/alice/", "logs/alice-2/x", "logs/alicex/y", "logs/alice/../bob/x",
            "logs/alice/a//b", "logs/alice/./x", "logs/alice/x\n", "logs/bob/x", "other/logs/alice/x"]
    assert ownership.deletable_keys(keys, "alice") == [
        "logs/alice/.rvc/f0.done.json", "logs/alice/G_1.pth", "logs/alice/.rvc/owner.json"]


def test_refused_storage_fails_without_jobs_and_shows_nothing_of_the_folder() -> None:
    m = manifest()
    st, jobs = complete(m, "f0")
    st["progress"] = {"step": "train", "epoch": 3}
    st["steps"]["features"].update(phase="Skipped", reason="AlreadyComplete")
    running = [*jobs, job("train", 1)]
    refusal = ownership.Refusal("StorageOwnedElsewhere", ownership.OWNED_ELSEWHERE.format(name="alice"))
    d = run(m, st, running, markers=None, refusal=refusal)
    assert d.status["phase"] == "Failed" and d.create == []
    assert d.status["message"] == ("storage logs/alice/ belongs to another RVCExperiment; choose another "
                                   "experimentName or storage.uri")
    assert [x.name for x in d.delete] == ["alice-train-1"]
    assert "progress" not in d.status and "artifacts" not in d.status
    assert d.status["steps"]["features"]["phase"] == "Pending"
    assert cond(d, "Failed")["reason"] == "StorageOwnedElsewhere" and cond(d, "Failed")["status"] == "True"
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "StorageOwnedElsewhere")]
    # the same refusal again: no second event
    again = run(m, d.status, [], refusal=refusal)
    assert again.events == [] and again.status["phase"] == "Failed"
    # a fresh experiment refused by the allow-list: nothing but the failure
    deny = ownership.Refusal("StorageNotAllowed", "spec.storage.uri: s3://x/ is outside ...")
    fresh = run(m, None, refusal=deny)
    assert fresh.create == [] and "steps" not in fresh.status and fresh.status["phase"] == "Failed"
    # fixing the spec (a new generation) without a refusal runs again
    m2 = manifest(gen=2, experimentName="alice-2")
    d2 = run(m2, fresh.status)
    assert d2.status["phase"] == "Running" and [c.step for c in d2.create] == ["preprocess"]
