"""Sharded data steps in the pure state machine (spec.resources.shards = N > 1): N Jobs per step, each shard
retried alone, adoption after a restart, N kept for the whole step run, and the ETA of the slowest shard."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from rvc_operator import jobs, progress_reader
from rvc_operator.config import OperatorConfig
from rvc_operator.observe import JobSummary, summarize_job
from rvc_operator.status import Decision
from rvc_pipeline.core.spec import STEP_ORDER

from tests.support.decide_cases import T0, run


def manifest(shards: int = 2, gen: int = 1, **spec_over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"dataset": {"source": "s3://voices/alice/"}, "storage": {"uri": "s3://models/rvc"},
                            "train": {"epochs": 10}, "resources": {"shards": shards}}
    spec.update(spec_over)
    return {"apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment",
            "metadata": {"name": "alice", "namespace": "voice", "uid": "u-1", "generation": gen,
                         "creationTimestamp": "2025-03-01T11:00:00Z"},
            "spec": spec}


def sjob(step: str, shard: int, attempt: int, state: str = "Running", n: int | None = 2, **kw: Any
         ) -> JobSummary:
    return JobSummary(name=f"alice-{step}-s{shard}-{attempt}", step=step, attempt=attempt, state=state,
                      shard=shard, shards=n, **kw)



def created(d: Decision) -> list[str]:
    return [c.name for c in d.create]


def step(d: Decision, s: str = "preprocess") -> dict[str, Any]:
    return d.status["steps"][s]


def started(m: dict[str, Any] | None = None) -> Decision:
    return run(m or manifest(), None)


# ---------------------------------------------------------------------------------------------------
def test_two_shards_create_two_jobs_with_their_own_names_and_commands() -> None:
    d = started()
    assert created(d) == ["alice-preprocess-s0-1", "alice-preprocess-s1-1"]
    assert [c.shard_arg for c in d.create] == [(0, 2), (1, 2)]
    pre = step(d)
    assert pre["phase"] == "Running" and pre["message"] == "0/2 shards done" and "job" not in pre
    assert [(x["index"], x["phase"], x["job"], x["attempts"]) for x in pre["shards"]] == [
        (0, "Running", "alice-preprocess-s0-1", 1), (1, "Running", "alice-preprocess-s1-1", 1)]
    for c in d.create:
        job = jobs.build_job_spec(manifest(), c.step, c.attempt, OperatorConfig(), shard=c.shard_arg,
                                  inputs_hash=c.inputs_hash)
        assert job["metadata"]["name"] == c.name
        assert job["metadata"]["labels"]["rvc-operator.dev/shard"] == str(c.shard)
        assert job["spec"]["template"]["metadata"]["labels"]["rvc-operator.dev/shard"] == str(c.shard)
        assert job["spec"]["template"]["spec"]["containers"][0]["command"] == [
            "rvc-pipeline", "preprocess", "--spec", "/etc/rvc/experiment.yaml", "--shard", f"{c.shard}/2"]
        back = summarize_job(job)  # what the operator reads back from the cluster
        assert (back.shard, back.shards, back.attempt) == (c.shard, 2, 1)


def test_one_shard_is_the_job_of_today() -> None:
    d = started(manifest(shards=1))
    assert created(d) == ["alice-preprocess-1"] and d.create[0].shard_arg is None
    assert "shards" not in step(d) and step(d)["job"] == "alice-preprocess-1"
    job = jobs.build_job_spec(manifest(shards=1), "preprocess", 1, OperatorConfig())
    assert "--shard" not in job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "rvc-operator.dev/shard" not in job["metadata"]["labels"]


def test_a_failed_shard_is_retried_alone_after_its_backoff() -> None:
    m = manifest()
    st = started(m).status
    js = [sjob("preprocess", 0, 1, "Succeeded", completion_time="2025-03-01T12:02:00Z"),
          sjob("preprocess", 1, 1, "Failed", exit_code=1, message="s3 read timed out")]
    d = run(m, st, js, now=T0 + timedelta(minutes=3))
    assert created(d) == [] and d.requeue_after == 30.0 and d.retries == ["preprocess"]
    pre = step(d)
    assert pre["phase"] == "Pending" and pre["reason"] == "Retrying" and pre["failures"] == 1
    assert pre["message"].startswith("1/2 shards done; shard 1: attempt 1 failed: s3 read timed out")
    assert [x["phase"] for x in pre["shards"]] == ["Succeeded", "Pending"]
    assert d.status["phase"] == "Running" and d.status["currentStep"] == "preprocess"
    # within the backoff nothing is created; after it, only shard 1's second attempt
    assert created(run(m, d.status, js, now=T0 + timedelta(minutes=3, seconds=20))) == []
    d2 = run(m, d.status, js, now=T0 + timedelta(minutes=4))
    assert created(d2) == ["alice-preprocess-s1-2"] and d2.delete == []
    assert [x["attempts"] for x in step(d2)["shards"]] == [1, 2] and step(d2)["phase"] == "Running"
    # the retry succeeds: the step succeeds once, and f0 starts sharded
    js2 = js + [sjob("preprocess", 1, 2, "Succeeded", completion_time="2025-03-01T12:06:00Z")]
    d3 = run(m, d2.status, js2, now=T0 + timedelta(minutes=7))
    assert step(d3)["phase"] == "Succeeded" and step(d3)["message"] == "2/2 shards done"
    assert step(d3)["endTime"] == "2025-03-01T12:06:00Z" and d3.step_durations == [("preprocess", 360.0)]
    assert created(d3) == ["alice-f0-s0-1", "alice-f0-s1-1"]


@pytest.mark.parametrize(("failure", "reason"), [
    ({"exit_code": 2, "message": "no audio in s3://voices/alice/"}, "BadInput"),
    ({"exit_code": 3, "message": "rmvpe.pt not found"}, "MissingWeights"),
])
def test_a_permanent_shard_failure_fails_the_step_and_stops_the_other_shards(failure: dict[str, Any],
                                                                             reason: str) -> None:
    m = manifest()
    st = started(m).status
    d = run(m, st, [sjob("preprocess", 0, 1), sjob("preprocess", 1, 1, "Failed", **failure)])
    assert [x.name for x in d.delete] == ["alice-preprocess-s0-1"] and created(d) == []
    pre = step(d)
    assert pre["phase"] == "Failed" and pre["reason"] == reason and pre["exitCode"] == failure["exit_code"]
    assert pre["message"].startswith("shard 1/2: " + failure["message"])
    assert [(x["phase"], x["reason"]) for x in pre["shards"]] == [("Pending", "Stopped"), ("Failed", reason)]
    assert d.status["phase"] == "Failed" and d.finished
    assert "preprocess failed: shard 1/2" in d.status["message"]


def test_a_shard_out_of_retries_fails_the_step() -> None:
    m = manifest(lifecycle={"retriesPerStep": 1})
    st = started(m).status
    js = [sjob("preprocess", 0, 1), sjob("preprocess", 1, 1, "Failed", exit_code=1)]
    d = run(m, st, js, now=T0 + timedelta(minutes=1))
    d = run(m, d.status, js, now=T0 + timedelta(minutes=2))
    assert created(d) == ["alice-preprocess-s1-2"]
    js = [sjob("preprocess", 0, 1), sjob("preprocess", 1, 2, "Failed", exit_code=1)]
    d = run(m, d.status, js, now=T0 + timedelta(minutes=3))
    assert step(d)["phase"] == "Failed" and step(d)["reason"] == "RetriesExhausted"
    assert "spec.lifecycle.retriesPerStep=1" in step(d)["message"]
    assert [x.name for x in d.delete] == ["alice-preprocess-s0-1"] and created(d) == []


def test_restart_adopts_shard_jobs_and_never_creates_one_twice() -> None:
    m = manifest()
    # Jobs created, then the operator died before writing the status: both are adopted, none created
    d = run(m, None, [sjob("preprocess", 0, 1), sjob("preprocess", 1, 1)])
    assert created(d) == [] and d.delete == []
    assert [(x["phase"], x["job"], x["attempts"]) for x in step(d)["shards"]] == [
        ("Running", "alice-preprocess-s0-1", 1), ("Running", "alice-preprocess-s1-1", 1)]
    assert step(d)["attempts"] == 1 and step(d)["inputsHash"]
    # only shard 0's Job was made before the crash: shard 1's is created now, with the same N
    d = run(manifest(shards=5), None, [sjob("preprocess", 0, 1)])
    assert created(d) == ["alice-preprocess-s1-1"] and len(step(d)["shards"]) == 2
    # shard 1 waited for its retry, whose Job was created just before a restart: adopted, not made again
    st = started(m).status
    js = [sjob("preprocess", 0, 1), sjob("preprocess", 1, 1, "Failed", exit_code=1)]
    backoff = run(m, st, js, now=T0 + timedelta(minutes=1)).status
    d = run(m, backoff, js + [sjob("preprocess", 1, 2)], now=T0 + timedelta(minutes=1, seconds=5))
    assert created(d) == [] and d.delete == []
    assert [(x["attempts"], x["phase"]) for x in step(d)["shards"]] == [(1, "Running"), (2, "Running")]
    assert step(d)["phase"] == "Running" and step(d)["attempts"] == 2


def test_a_changed_shard_count_keeps_the_count_the_step_started_with() -> None:
    st = started(manifest(shards=2)).status
    js = [sjob("preprocess", 0, 1), sjob("preprocess", 1, 1)]
    d = run(manifest(shards=3, gen=2), st, js, now=T0 + timedelta(minutes=1))
    assert created(d) == [] and d.delete == [] and len(step(d)["shards"]) == 2
    done = [sjob("preprocess", i, 1, "Succeeded") for i in range(2)]
    d = run(manifest(shards=3, gen=2), d.status, done, now=T0 + timedelta(minutes=2))
    assert step(d)["phase"] == "Succeeded" and step(d)["message"] == "2/2 shards done"
    # the next step reads the count now in the spec; the finished one is not rerun
    assert created(d) == ["alice-f0-s0-1", "alice-f0-s1-1", "alice-f0-s2-1"]
    d = run(manifest(shards=1, gen=3), d.status, done + [sjob("f0", i, 1, n=3) for i in range(3)],
            now=T0 + timedelta(minutes=3))
    assert created(d) == [] and d.delete == [] and step(d)["phase"] == "Succeeded"
    assert len(step(d, "f0")["shards"]) == 3


def test_a_rerun_after_a_spec_change_is_one_forced_job_then_sharded_with_the_new_count() -> None:
    m = manifest(shards=3, gen=2, preprocess={"segmentSeconds": 3.0})
    st = started(manifest(shards=2)).status
    js = [sjob("preprocess", 0, 1), sjob("preprocess", 1, 1)]
    d = run(m, st, js)
    assert sorted(x.name for x in d.delete) == ["alice-preprocess-s0-1", "alice-preprocess-s1-1"]
    # the pipeline refuses --force with --shard: the forced rerun of preprocess is one Job, named on
    assert created(d) == ["alice-preprocess-2"] and d.create[0].force and d.create[0].shard_arg is None
    assert "shards" not in step(d) and step(d)["attempts"] == 2
    done = [JobSummary(name="alice-preprocess-2", step="preprocess", attempt=2, state="Succeeded",
                       force=True)]
    d = run(m, d.status, done)
    assert created(d) == ["alice-f0-s0-1", "alice-f0-s1-1", "alice-f0-s2-1"]
    assert not any(c.force for c in d.create)


def test_a_retry_of_a_one_job_run_stays_one_job() -> None:
    st = started(manifest(shards=1)).status
    failed = [JobSummary(name="alice-preprocess-1", step="preprocess", attempt=1, state="Failed",
                         exit_code=1)]
    d = run(manifest(shards=4, gen=2), st, failed)
    d = run(manifest(shards=4, gen=2), d.status, failed, now=T0 + timedelta(minutes=1))
    assert created(d) == ["alice-preprocess-2"]


def test_markers_skip_a_sharded_step_or_stand_in_for_a_vanished_shard_job() -> None:
    m = manifest()
    st = started(m).status
    d = run(m, st, [sjob("preprocess", i, 1, "Succeeded") for i in range(2)], markers={"f0"})
    assert step(d, "f0")["phase"] == "Skipped" and "shards" not in step(d, "f0")
    assert created(d) == ["alice-features-s0-1", "alice-features-s1-1"]
    # shard 1's Job is gone (deleted by a TTL) and the step's marker exists: the step is complete
    d = run(m, st, [sjob("preprocess", 0, 1, "Succeeded")], markers={"preprocess"})
    assert step(d)["phase"] == "Succeeded" and step(d)["shards"][1]["message"].startswith("Job gone")
    # gone without a marker: retried after the grace period, alone
    d = run(m, st, [sjob("preprocess", 0, 1, "Succeeded")], now=T0 + timedelta(minutes=5))
    assert step(d)["shards"][1]["reason"] == "Retrying" and created(d) == []


def test_train_and_index_stay_one_job_and_stale_shard_jobs_are_deleted() -> None:
    m = manifest(shards=3)
    st = started(m).status
    done = [sjob("preprocess", i, 1, "Succeeded", n=3) for i in range(3)]
    d = run(m, st, done, markers={"f0", "features"})
    assert created(d) == ["alice-train-1"]
    # an old shard Job (another attempt) still active is stopped; the current ones are kept
    current = [sjob("preprocess", i, 1, n=3) for i in range(3)]
    d = run(m, st, current + [JobSummary(name="alice-preprocess-s1-0", step="preprocess", attempt=0,
                                         state="Running", shard=1, shards=3)])
    assert [x.name for x in d.delete] == ["alice-preprocess-s1-0"] and created(d) == []


def _progress(step: str, shard: str | None, t0: float, rate: float, total: int) -> list[dict[str, Any]]:
    extra = {"shard": shard} if shard is not None else {}
    return [{"time": t0, "experiment": "alice", "step": step, "event": "start", **extra},
            {"time": t0 + 10, "experiment": "alice", "step": step, "event": "progress",
             "files_done": int(10 * rate), "files_total": total, **extra}]


def test_eta_of_a_sharded_step_is_the_slowest_shard_once_every_shard_has_one() -> None:
    lines = _progress("preprocess", "0/2", 100.0, 1.0, 50) + _progress("preprocess", "1/2", 100.0, 0.5, 50)
    events = progress_reader.parse_events(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
    etas = progress_reader.file_step_etas(events)
    key = progress_reader.shard_eta_key
    assert etas == {key("preprocess", 0, 2): 40.0, key("preprocess", 1, 2): 90.0}  # untagged: no step ETA
    m = manifest()
    st = started(m).status
    js = [sjob("preprocess", 0, 1), sjob("preprocess", 1, 1)]
    d = run(m, st, js, step_etas=etas)
    assert step(d)["etaSeconds"] == 90.0 and [x["etaSeconds"] for x in step(d)["shards"]] == [40.0, 90.0]
    # shard 1 has not reported yet: its ETA is unknown, so the step's is left out
    d = run(m, st, js, step_etas={key("preprocess", 0, 2): 40.0})
    assert "etaSeconds" not in step(d) and step(d)["shards"][0]["etaSeconds"] == 40.0
    # events of a run with another N do not count for this one
    d = run(m, st, js, step_etas={key("preprocess", 0, 3): 5.0, key("preprocess", 1, 3): 5.0})
    assert "etaSeconds" not in step(d)


@pytest.mark.parametrize("value", ["2/2", "-1/2", "a/b", "1/2/3", "1", "", "0/65", True, 1.5])
def test_a_shard_tag_that_does_not_fit_is_not_a_shard(value: Any) -> None:
    lines = [{"time": 1.0, "experiment": "alice", "step": "f0", "event": "start", "shard": value}]
    (ev,) = progress_reader.parse_events(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
    assert progress_reader.event_shard(ev) is None


@pytest.mark.parametrize(("label", "ann"), [("x", "2"), ("-1", "2"), ("1000", "2"), ("\uff11", "2"),
                                           ("0", "two")])
def test_garbage_shard_labels_read_as_unknown(label: str, ann: str) -> None:
    job = {"metadata": {"name": "alice-f0-s0-1", "labels": {"rvc-operator.dev/step": "f0",
                                                           "rvc-operator.dev/attempt": "1",
                                                           "rvc-operator.dev/shard": label},
                        "annotations": {"rvc-operator.dev/shards": ann}}, "status": {"active": 1}}
    s = summarize_job(job)
    assert s.shard is None or s.shards is None


@pytest.mark.parametrize(("step_name", "shard", "force"), [
    ("train", (0, 2), False), ("index", (1, 2), False), ("f0", (2, 2), False), ("f0", (-1, 2), False),
    ("f0", (0, 1), False), ("f0", (0, 65), False), ("f0", (0, 2), True)])
def test_the_job_builder_refuses_a_shard_that_does_not_fit(step_name: str, shard: tuple[int, int],
                                                           force: bool) -> None:
    with pytest.raises(ValueError, match="shard"):
        jobs.build_job_spec(manifest(), step_name, 1, OperatorConfig(), shard=shard, force=force)


def test_long_names_keep_the_shard_and_attempt_suffix_within_63_characters() -> None:
    names = {jobs.job_name("a" * 80, s, 7, i) for s in STEP_ORDER[:3] for i in range(64)}
    assert len(names) == 3 * 64 and all(len(n) <= 63 for n in names)
    assert all(n.endswith(f"-s{i}-7") for n in names for i in [int(n.rsplit("-s", 1)[1].split("-")[0])])


def test_a_failed_sharded_step_retried_after_a_spec_change_uses_fresh_names() -> None:
    m = manifest()
    st = started(m).status
    js = [sjob("preprocess", 0, 1, "Succeeded"), sjob("preprocess", 1, 1, "Failed", exit_code=2)]
    failed = run(m, st, js).status
    assert failed["phase"] == "Failed" and failed["steps"]["preprocess"]["attempts"] == 1
    d = run(manifest(shards=3, gen=2, resources={"shards": 3, "memory": "8Gi"}), failed, js)
    assert created(d) == ["alice-preprocess-s0-2", "alice-preprocess-s1-2", "alice-preprocess-s2-2"]
    assert d.status["phase"] == "Running" and len(step(d)["shards"]) == 3


@pytest.mark.parametrize("indexes", [[], [0], [0, 0], [1, 0], [0, 2]])
def test_a_stored_shard_list_that_does_not_fit_is_rebuilt_from_the_jobs(indexes: list[int]) -> None:
    m = manifest()
    st = started(m).status
    st["steps"]["preprocess"]["shards"] = [
        {"phase": "Succeeded", "index": i, "attempts": 1, "job": f"alice-preprocess-s{i}-1"} for i in indexes]
    d = run(m, st, [sjob("preprocess", 0, 1), sjob("preprocess", 1, 1)])
    # the hand-written list is dropped: the step is not taken as done, the running Jobs are adopted
    assert step(d)["phase"] == "Running" and created(d) == [] and d.delete == []
    assert [(x["phase"], x["job"]) for x in step(d)["shards"]] == [
        ("Running", "alice-preprocess-s0-1"), ("Running", "alice-preprocess-s1-1")]
