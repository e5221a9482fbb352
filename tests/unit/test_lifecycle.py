"""spec.lifecycle (issue 11, item 3): deadline, retries per step, TTL after finishing, artifacts on deletion.
Pure logic only (rvc_operator.status); the reconcile glue is in tests/integration/test_operator_kopf.py."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from rvc_operator.status import (
    Decision,
    Policy,
    artifacts_deleted,
    lifecycle_policy,
    plan_deletion,
    ttl_left,
    ttl_of,
)
from rvc_operator.sweeper import due_for_sweep
from rvc_pipeline.core.spec import STEP_ORDER, SpecError, parse_manifest, step_hashes

from tests.support.decide_cases import T0, job, run

ANN = "rvc-operator.dev/delete-artifacts"


def manifest(lifecycle: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"dataset": {"source": "s3://voices/alice/"}, "storage": {"uri": "s3://models/rvc"},
                            "train": {"epochs": 10}}
    if lifecycle is not None:
        spec["lifecycle"] = lifecycle
    return {"apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment",
            "metadata": {"name": "alice", "namespace": "voice", "uid": "u-1", "generation": 1, **meta},
            "spec": spec}




def succeeded(m: dict[str, Any], now: datetime = T0) -> Decision:
    """Finished without Jobs: every step's marker is in storage (preprocess still runs once)."""
    d0 = run(m, None, markers=set(STEP_ORDER), now=now)
    d = run(m, d0.status, [job("preprocess", 1, "Succeeded")], markers=set(STEP_ORDER), now=now)
    assert d.status["phase"] == "Succeeded"
    return d


# -- the spec ------------------------------------------------------------------------------------------
def test_lifecycle_is_typed_and_never_changes_a_step_hash() -> None:
    plain = parse_manifest(manifest())
    lc = plain.spec.lifecycle
    assert (lc.active_deadline_seconds, lc.retries_per_step, lc.ttl_seconds_after_finished,
            lc.artifacts_on_deletion) == (None, None, None, "Keep")
    full = parse_manifest(manifest({"activeDeadlineSeconds": 7200, "retriesPerStep": 5,
                                    "ttlSecondsAfterFinished": 0, "artifactsOnDeletion": "Delete"}))
    assert full.spec.lifecycle.ttl_seconds_after_finished == 0
    assert step_hashes(full) == step_hashes(plain)


@pytest.mark.parametrize("bad", [
    {"activeDeadlineSeconds": 0}, {"activeDeadlineSeconds": -5}, {"activeDeadlineSeconds": "1h"},
    {"retriesPerStep": -1}, {"retriesPerStep": True}, {"retriesPerStep": 1000},
    {"ttlSecondsAfterFinished": -1}, {"ttlSecondsAfterFinished": 1.5},
    {"artifactsOnDeletion": "delete"}, {"artifactsOnDeletion": "Purge"}, {"artifactsOnDeletion": True},
    {"ttlAfter": 10},
])
def test_bad_lifecycle_values_are_a_spec_error_naming_the_field(bad: dict[str, Any]) -> None:
    with pytest.raises(SpecError, match="lifecycle"):
        parse_manifest(manifest(bad))


# -- activeDeadlineSeconds ---------------------------------------------------------------------------
def test_deadline_fails_the_experiment_and_stops_its_active_jobs() -> None:
    m = manifest({"activeDeadlineSeconds": 3600})
    d0 = run(m, None)
    assert d0.status["startTime"] == "2025-03-01T12:00:00Z"
    running = [job("preprocess", 1, "Succeeded"), job("f0", 1, "Running")]
    d1 = run(m, d0.status, running[:1], now=T0 + timedelta(minutes=50))
    assert d1.status["phase"] == "Running" and d1.requeue_after == 600  # wakes up at the deadline
    d2 = run(m, d1.status, running, now=T0 + timedelta(seconds=3600))
    st = d2.status
    assert st["phase"] == "Failed" and d2.finished and d2.create == []
    assert "activeDeadlineSeconds=3600" in st["message"]
    assert [x.name for x in d2.delete] == ["alice-f0-1"]
    assert [x.reason for x in d2.delete] == ["DeadlineExceeded"]
    assert st["steps"]["f0"]["phase"] == "Failed" and st["steps"]["f0"]["reason"] == "DeadlineExceeded"
    assert st["steps"]["preprocess"]["phase"] == "Succeeded"
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "DeadlineExceeded"
    assert [e.reason for e in d2.events] == ["DeadlineExceeded"]
    assert st["completionTime"] == "2025-03-01T13:00:00Z"


def test_deadline_counts_from_the_start_not_while_queued_and_never_without_one() -> None:
    m = manifest({"activeDeadlineSeconds": 60})
    queued = run(m, None, policy=Policy(admitted=False))
    assert queued.status["phase"] == "Queued" and "startTime" not in queued.status
    later = run(m, queued.status, now=T0 + timedelta(hours=5), policy=Policy(admitted=False))
    assert later.status["phase"] == "Queued"
    started = run(m, later.status, now=T0 + timedelta(hours=6))
    assert started.status["phase"] == "Running" and started.create
    plain = manifest()
    d_plain = run(plain, run(plain, None).status, [job("preprocess", 1)], now=T0 + timedelta(days=30))
    assert d_plain.status["phase"] == "Running" and d_plain.requeue_after is None


# -- retriesPerStep -----------------------------------------------------------------------------------
def test_retries_per_step_overrides_the_operator_default() -> None:
    pol = Policy(max_retries=2, backoff_seconds=30)
    assert lifecycle_policy(pol, parse_manifest(manifest())) is pol
    over = lifecycle_policy(pol, parse_manifest(manifest({"retriesPerStep": 5})))
    assert over.max_retries == 5 and over.backoff_seconds == 30
    failed = [job("preprocess", 1, "Failed", exit_code=1, message="connection reset by peer")]
    m0 = manifest({"retriesPerStep": 0})
    d = run(m0, run(m0, None, policy=pol).status, failed, now=T0 + timedelta(minutes=1), policy=pol)
    assert d.status["phase"] == "Failed" and d.status["steps"]["preprocess"]["reason"] == "RetriesExhausted"
    assert "spec.lifecycle.retriesPerStep=0" in d.status["message"]
    m5 = manifest({"retriesPerStep": 5})
    d5 = run(m5, run(m5, None, policy=pol).status, failed, now=T0 + timedelta(minutes=1), policy=pol)
    assert d5.status["steps"]["preprocess"]["reason"] == "Retrying" and "retry 1/5" in d5.status["message"]
    d_default = run(manifest(), run(manifest(), None, policy=pol).status, failed, policy=pol)
    assert "retry 1/2" in d_default.status["message"]


# -- ttlSecondsAfterFinished -------------------------------------------------------------------------
def test_ttl_deletes_the_experiment_only_once_it_ran_out() -> None:
    m = manifest({"ttlSecondsAfterFinished": 600})
    d = succeeded(m)
    assert not d.delete_resource and d.requeue_after == 600
    st = d.status
    assert ttl_left(m, st["phase"], st["completionTime"], T0 + timedelta(seconds=599)) == 1
    assert not run(m, st, now=T0 + timedelta(seconds=599)).delete_resource
    assert run(m, st, now=T0 + timedelta(seconds=600)).delete_resource
    assert succeeded(manifest({"ttlSecondsAfterFinished": 0})).delete_resource  # at once
    no_ttl = succeeded(manifest())
    assert not no_ttl.delete_resource and no_ttl.requeue_after is None
    # a running experiment is never deleted, whatever its TTL
    m0 = manifest({"ttlSecondsAfterFinished": 0})
    running = run(m0, None, now=T0)
    assert running.status["phase"] == "Running" and not running.delete_resource
    assert ttl_left(m0, "Running", "2025-03-01T12:00:00Z", T0 + timedelta(days=1)) is None


def test_ttl_also_applies_to_failed_experiments() -> None:
    m = manifest({"ttlSecondsAfterFinished": 30, "activeDeadlineSeconds": 60})
    d0 = run(m, None)
    failed = run(m, d0.status, [job("preprocess", 1)], now=T0 + timedelta(seconds=60))
    assert failed.status["phase"] == "Failed" and not failed.delete_resource
    assert run(m, failed.status, now=T0 + timedelta(seconds=90)).delete_resource


@pytest.mark.parametrize("raw", [None, "600", True, -1, 1.5, [600], {"x": 1}])
def test_a_ttl_that_is_not_a_count_of_seconds_is_ignored(raw: Any) -> None:
    m = manifest()
    m["spec"]["lifecycle"] = {"ttlSecondsAfterFinished": raw}
    assert ttl_of(m) is None
    assert ttl_left(m, "Succeeded", "2025-03-01T12:00:00Z", T0 + timedelta(days=1)) is None
    m["spec"]["lifecycle"] = "not a mapping"
    assert ttl_of(m) is None


def test_the_sweep_keeps_visiting_finished_experiments_with_a_ttl() -> None:
    def item(name: str, lifecycle: dict[str, Any] | None, **st: Any) -> dict[str, Any]:
        m = manifest(lifecycle)
        m["metadata"]["name"] = name
        m["status"] = {"observedGeneration": 1, **st}
        return m

    items = [item("done", None, phase="Succeeded"),
             item("ttl", {"ttlSecondsAfterFinished": 60}, phase="Failed"), item("run", None, phase="Running")]
    gone = item("gone", {"ttlSecondsAfterFinished": 0}, phase="Succeeded")
    gone["metadata"]["deletionTimestamp"] = "2025-03-01T12:00:00Z"
    assert [n for _, n, _ in due_for_sweep(items + [gone])] == ["ttl", "run"]


# -- artifactsOnDeletion -------------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "ann", "default", "deleted"), [
    (None, None, False, False), (None, None, True, True),
    ("Keep", None, False, False), ("Keep", None, True, False),  # the spec overrides the operator default
    ("Delete", None, False, True),
    (None, "true", False, True), (None, " TRUE ", False, True), (None, "false", True, False),
    ("Keep", "true", False, True), ("Delete", "false", False, True),  # annotation true OR field Delete
    (None, "yes", True, False), ("Delete", None, True, True),
])
def test_artifacts_on_deletion_field_and_annotation(field: str | None, ann: str | None, default: bool,
                                                    deleted: bool) -> None:
    m = manifest({"artifactsOnDeletion": field} if field else None)
    if ann is not None:
        m["metadata"]["annotations"] = {ANN: ann}
    assert artifacts_deleted(m, default) is deleted
    plan = plan_deletion(m, [job("train", 1)], delete_artifacts_default=default)
    assert plan.artifacts_prefix == ("logs/alice/" if deleted else None)
    assert plan.jobs == ["alice-train-1"]


def test_raising_the_deadline_of_an_expired_experiment_retries_it() -> None:
    m = manifest({"activeDeadlineSeconds": 60})
    d0 = run(m, None)
    failed = run(m, d0.status, [job("preprocess", 1)], now=T0 + timedelta(seconds=60))
    assert failed.status["phase"] == "Failed"
    raised = manifest({"activeDeadlineSeconds": 7200})
    raised["metadata"]["generation"] = 2
    d = run(raised, failed.status, now=T0 + timedelta(seconds=120))
    assert d.status["phase"] == "Running" and [(c.step, c.attempt) for c in d.create] == [("preprocess", 2)]
    assert d.requeue_after == 7200 - 120  # the deadline still counts from the first start
