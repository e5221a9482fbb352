"""The optional convert step in the state machine: Skipped unless spec.steps lists it; listed, it runs after
index (sharded like the data steps) and the experiment's artifacts name logs/<name>/converted/."""

from __future__ import annotations

from typing import Any

import pytest
from rvc_operator import progress_reader
from rvc_operator.status import Policy, _validate_for_cluster
from rvc_pipeline.core.spec import DEFAULT_STEPS, SpecError, parse_manifest, step_hashes

from tests.support.decide_cases import job, run

CONVERT = {"source": "s3://voices/to-convert/", "format": "flac"}


def manifest(**spec_over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"dataset": {"source": "s3://voices/alice/"}, "storage": {"uri": "s3://models/rvc"},
                            "train": {"epochs": 10}, **spec_over}
    return {"apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment",
            "metadata": {"name": "alice", "namespace": "voice", "uid": "u-1", "generation": 1,
                         "creationTimestamp": "2025-03-01T11:00:00Z"}, "spec": spec}


def through(m: dict[str, Any], steps: tuple[str, ...]) -> tuple[dict[str, Any], list[Any]]:
    """Drive the machine through successful one-Job runs of `steps`; (status, jobs)."""
    d = run(m, None)
    jobs: list[Any] = []
    for s in steps:
        assert d.status["currentStep"] == s and [c.step for c in d.create] == [s], d.status
        jobs.append(job(s, d.status["steps"][s]["attempts"], "Succeeded"))
        d = run(m, d.status, jobs)
    return d.status, jobs


def test_convert_listed_runs_last_and_reports_its_folder() -> None:
    m = manifest(steps=[*DEFAULT_STEPS, "convert"], convert=CONVERT)
    st, jobs = through(m, DEFAULT_STEPS)
    assert st["phase"] == "Running" and st["currentStep"] == "convert"
    assert st["steps"]["convert"]["phase"] == "Running" and st["steps"]["index"]["phase"] == "Succeeded"
    d = run(m, st, [*jobs, job("convert", 1, "Succeeded")])
    assert d.status["phase"] == "Succeeded" and d.finished
    assert d.status["steps"]["convert"]["phase"] == "Succeeded"
    assert d.status["artifacts"]["converted"] == "s3://models/rvc/logs/alice/converted/"
    assert d.status["artifacts"]["model"] == "s3://models/rvc/logs/alice/weights/alice.pth"


def test_convert_not_listed_is_skipped_and_has_no_artifact() -> None:
    m = manifest(convert=CONVERT)  # spec.convert alone does not run the step
    st, jobs = through(m, DEFAULT_STEPS)
    assert st["phase"] == "Succeeded" and st["steps"]["convert"]["phase"] == "Skipped"
    assert st["steps"]["convert"]["reason"] == "NotInSpec" and "converted" not in st["artifacts"]


def test_convert_runs_as_shards_and_a_convert_change_reruns_only_it() -> None:
    m = manifest(steps=["train", "convert"], convert=CONVERT, resources={"shards": 2})
    d = run(m, None)
    d = run(m, d.status, [job("train", 1, "Succeeded")])
    assert sorted(c.name for c in d.create) == ["alice-convert-s0-1", "alice-convert-s1-1"]
    assert "convert" in progress_reader.FILE_STEPS  # its files-done events give the shards' ETAs
    assert [sh["phase"] for sh in d.status["steps"]["convert"]["shards"]] == ["Running", "Running"]
    before = step_hashes(parse_manifest(m))
    after = step_hashes(parse_manifest(manifest(steps=["train", "convert"], resources={"shards": 2},
                                                convert={**CONVERT, "transpose": 12})))
    assert [s for s in before if before[s] != after[s]] == ["convert"]


def test_cluster_policy_wants_an_s3_convert_source() -> None:
    exp = parse_manifest(manifest(steps=["convert"], convert={"source": "/data/to-convert"}))
    with pytest.raises(SpecError, match=r"spec\.convert\.source: '/data/to-convert' is not an s3:// URI"):
        _validate_for_cluster(exp, Policy())


def test_adding_convert_after_training_runs_convert_alone() -> None:
    st, jobs = through(manifest(), DEFAULT_STEPS)
    assert st["phase"] == "Succeeded"
    later = manifest(steps=[*DEFAULT_STEPS, "convert"], convert=CONVERT)
    later["metadata"]["generation"] = 2
    marks = {*DEFAULT_STEPS, "convert"}  # convert's old marker does not skip it: its Job compares the source
    d = run(later, st, jobs, markers=marks)
    assert [c.name for c in d.create] == ["alice-convert-1"] and d.status["currentStep"] == "convert"
    assert all(d.status["steps"][s]["phase"] == "Succeeded" for s in DEFAULT_STEPS)
