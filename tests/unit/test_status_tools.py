"""Status for tools: kstatus conditions (Reconciling, Stalled), ETAs, status.dataset."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from rvc_operator import ownership, progress_reader
from rvc_operator.access import StorageAccess, read_storage_view
from rvc_operator.api import DatasetStatus, ExperimentStatus, ProgressStatus, load_status
from rvc_operator.status import Policy, train_eta
from rvc_pipeline.core import layout
from rvc_pipeline.core.events import FilesProgress, StepStart, TrainStep
from rvc_pipeline.core.spec import STEP_ORDER
from rvc_pipeline.core.storage import open_storage

from tests.unit.test_status import T0, complete, cond, job, manifest, run

KSTATUS = ("Ready", "Progressing", "Failed", "Reconciling", "Stalled")


def conds(d: Any) -> dict[str, str]:
    return {c["type"]: c["status"] for c in d.status["conditions"]}


# -- conditions ---------------------------------------------------------------------------------------
def test_running_experiment_is_reconciling_not_stalled() -> None:
    d = run(manifest(), None)
    assert conds(d) == {"Ready": "False", "Progressing": "True", "Failed": "False", "Reconciling": "True",
                        "Stalled": "False"}
    assert [c["type"] for c in d.status["conditions"]] == list(KSTATUS)
    rec, stalled = cond(d, "Reconciling"), cond(d, "Stalled")
    assert rec["reason"] == "StepsPending" and rec["message"].startswith("preprocess")
    assert stalled["reason"] == "NotStalled" and stalled["observedGeneration"] == 1


def test_succeeded_experiment_is_neither_reconciling_nor_stalled() -> None:
    st, _ = complete(manifest(), "index")
    d = run(manifest(), st, markers=set(STEP_ORDER))
    assert conds(d) == {"Ready": "True", "Progressing": "False", "Failed": "False", "Reconciling": "False",
                        "Stalled": "False"}
    assert cond(d, "Reconciling")["reason"] == "Succeeded"


def test_failed_step_stalls_with_its_reason() -> None:
    st = run(manifest(), None, policy=Policy(max_retries=0)).status
    d = run(manifest(), st, [job("preprocess", 1, "Failed", exit_code=2, message="bad wav")],
            policy=Policy(max_retries=0), now=T0 + timedelta(minutes=1))
    assert d.status["phase"] == "Failed"
    assert conds(d)["Stalled"] == "True" and conds(d)["Reconciling"] == "False"
    stalled = cond(d, "Stalled")
    assert stalled["reason"] == cond(d, "Failed")["reason"] and "spec or the storage" in stalled["message"]
    assert stalled["lastTransitionTime"] == "2025-03-01T12:01:00Z"


@pytest.mark.parametrize("bad", [{"storage": {"uri": "/local/folder"}}, {"train": {"epochs": -3}},
                                 {"steps": ["nonsense"]}])
def test_invalid_spec_stalls(bad: dict[str, Any]) -> None:
    d = run(manifest(**bad), None)
    assert conds(d)["Stalled"] == "True" and cond(d, "Stalled")["reason"] == "InvalidSpec"
    assert conds(d)["Reconciling"] == "False"


def test_refused_storage_stalls() -> None:
    refusal = ownership.Refusal("StorageNotAllowed", "storage s3://x is not allowed")
    d = run(manifest(), None, refusal=refusal)
    assert cond(d, "Stalled")["status"] == "True" and cond(d, "Stalled")["reason"] == "StorageNotAllowed"


def test_old_finished_status_gains_the_new_conditions_once() -> None:
    st, _ = complete(manifest(), "index")
    st["conditions"] = [c for c in st["conditions"] if c["type"] in ("Ready", "Progressing", "Failed")]
    d = run(manifest(), st, markers=set(STEP_ORDER), now=T0 + timedelta(hours=1))
    assert conds(d)["Reconciling"] == "False" and conds(d)["Stalled"] == "False"
    again = run(manifest(), d.status, markers=set(STEP_ORDER), now=T0 + timedelta(hours=2))
    assert again.status["conditions"] == d.status["conditions"]  # no new transition times


# -- ETAs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "eta"), [
    ({"epoch": 4, "epochs": 10, "seconds_per_epoch": 30.0}, 180.0),
    ({"epoch": 10, "epochs": 10}, 0.0),
    ({"epoch": 12, "epochs": 10, "seconds_per_epoch": 3.0}, 0.0),
    ({"epoch": 4, "epochs": 10}, None),  # no epoch timed yet
    ({"epoch": 4}, None),
    ({"epoch": 4, "epochs": 10, "seconds_per_epoch": -1.0}, None),
])
def test_train_eta(fields: dict[str, Any], eta: float | None) -> None:
    assert train_eta(ProgressStatus(**fields)) == eta
    assert train_eta(None) is None


def test_training_eta_reaches_status_training() -> None:
    st, jobs = complete(manifest(), "features")
    d = run(manifest(), st, jobs)
    assert d.status["steps"]["train"]["phase"] == "Running"
    prog = ProgressStatus(step="train", epoch=2, epochs=10, seconds_per_epoch=12.5)
    d2 = run(manifest(), d.status, jobs + [job("train", 1)], progress=prog)
    assert d2.status["training"]["etaSeconds"] == 100.0
    assert "etaSeconds" not in d2.status["steps"]["train"]


def ev(kind: type, t: float, step: str = "f0", **kw: Any) -> Any:
    return kind(time=t, step=step, experiment="alice", **kw)


def test_files_eta_from_rate_between_start_and_latest() -> None:
    events = [ev(StepStart, 100.0), ev(FilesProgress, 110.0, files_done=10, files_total=100),
              ev(FilesProgress, 120.0, files_done=20, files_total=100)]
    assert progress_reader.files_eta(events, "f0") == 80 * 20 / 20  # 1 file/s over 100..120
    assert progress_reader.files_eta(events, "features") is None


@pytest.mark.parametrize("events", [
    [],
    [ev(StepStart, 100.0)],  # nothing done yet
    [ev(FilesProgress, 110.0, files_done=10, files_total=100)],  # one point and no start
    [ev(StepStart, 100.0), ev(FilesProgress, 100.0, files_done=3, files_total=9)],  # no time passed
    [ev(StepStart, 100.0), ev(FilesProgress, 90.0, files_done=3, files_total=9)],  # clock went back
    [ev(StepStart, 100.0), ev(FilesProgress, 110.0, files_done=0, files_total=9)],  # no file done
    [ev(FilesProgress, 10.0, files_done=5, files_total=9), ev(StepStart, 100.0)],  # a new run began
])
def test_files_eta_refuses_what_gives_no_rate(events: list[Any]) -> None:
    assert progress_reader.files_eta(events, "f0") is None


def test_files_eta_uses_the_latest_run_only_and_never_goes_negative() -> None:
    events = [ev(StepStart, 0.0), ev(FilesProgress, 1000.0, files_done=1, files_total=50),
              ev(StepStart, 2000.0), ev(FilesProgress, 2010.0, files_done=5, files_total=5),
              ev(TrainStep, 2011.0, step="train", global_step=1)]
    assert progress_reader.files_eta(events, "f0") == 0.0
    assert progress_reader.file_step_etas(events) == {"f0": 0.0}


def test_step_eta_is_set_while_running_and_dropped_after() -> None:
    st = run(manifest(), None).status
    running = [job("preprocess", 1)]
    d = run(manifest(), st, running, step_etas={"preprocess": 42.0, "f0": 7.0})
    assert d.status["steps"]["preprocess"]["etaSeconds"] == 42.0
    assert "etaSeconds" not in d.status["steps"]["f0"]  # f0 is not running
    kept = run(manifest(), d.status, running)  # not read this time: kept
    assert kept.status["steps"]["preprocess"]["etaSeconds"] == 42.0
    done = run(manifest(), d.status, [job("preprocess", 1, "Succeeded")])
    assert "etaSeconds" not in done.status["steps"]["preprocess"]


# -- dataset ------------------------------------------------------------------------------------------
SUMMARY = {"step": "preprocess", "files_total": 5, "files_used": 4, "files_skipped": 1,
           "input_seconds": 150.0, "pieces": 30, "piece_seconds": 111.0, "peak_filtered_pieces": 2,
           "short_pieces_dropped": 1, "silent_pieces_dropped": 3}


def test_dataset_from_summary() -> None:
    ds = progress_reader.dataset_from_summary(SUMMARY)
    assert ds == DatasetStatus(minutes=2.5, piece_minutes=1.85, files_used=4, files_skipped=1, pieces=30,
                               pieces_skipped=6)


@pytest.mark.parametrize("summary", [None, {}, {"step": "preprocess"}, {"pieces": "many"},
                                     {"pieces": -1, "files_used": True, "input_seconds": float("nan")}])
def test_dataset_from_summary_of_nothing_useful(summary: dict[str, Any] | None) -> None:
    assert progress_reader.dataset_from_summary(summary) is None


def test_dataset_partly_readable_keeps_what_fits() -> None:
    ds = progress_reader.dataset_from_summary({**SUMMARY, "files_used": "4", "silent_pieces_dropped": None})
    assert ds is not None and ds.files_used is None and ds.pieces_skipped is None and ds.pieces == 30


def test_dataset_in_status_and_cleared_when_preprocess_reruns() -> None:
    ds = DatasetStatus(minutes=2.5, pieces=30)
    st, jobs = complete(manifest(), "preprocess")
    d = run(manifest(), st, jobs, dataset=ds)
    assert d.status["dataset"] == {"minutes": 2.5, "pieces": 30}
    changed = manifest(gen=2, preprocess={"segmentSeconds": 3.0})
    d2 = run(changed, d.status, jobs)
    assert d2.status["steps"]["preprocess"]["phase"] in ("Pending", "Running") and "dataset" not in d2.status


def test_storage_view_reads_dataset_and_etas(tmp_path: Any) -> None:
    storage = open_storage(str(tmp_path))
    storage.write_bytes(layout.marker_key("alice", "preprocess"), json.dumps(SUMMARY).encode())
    lines = [ev(StepStart, 100.0), ev(FilesProgress, 104.0, files_done=4, files_total=10)]
    storage.write_bytes(layout.progress_key("alice"),
                        "\n".join(json.dumps(e.model_dump()) for e in lines).encode() + b"\n")
    status = load_status({"steps": {"preprocess": {"phase": "Succeeded"}, "f0": {"phase": "Running"}}})
    access = StorageAccess(storage=storage, name="alice", markers={"preprocess"})
    view = read_storage_view(status, 10, access)
    assert view.step_etas == {"f0": 6.0}
    assert view.dataset is not None and view.dataset.pieces == 30
    shown = ExperimentStatus(dataset=view.dataset, steps=status.steps)
    assert read_storage_view(shown, 10, access).dataset is None  # read once
    storage.write_bytes(layout.marker_key("alice", "preprocess"), b"{torn")
    assert read_storage_view(status, 10, access).dataset is None
