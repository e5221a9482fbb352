"""Recorded RVCExperiment objects (metadata, spec, status as the operator writes them) at the moments the
client shows: Pending, Running data steps, Running train with losses and a best checkpoint, Succeeded,
Failed (a permanent exit code), Suspended. NOW is the clock the views are rendered at."""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from typing import Any

NOW = datetime(2026, 3, 1, 12, 30, 0, tzinfo=timezone.utc)
LOGS = "s3://voices/models/logs/alice/"


def _obj(status: dict[str, Any] | None, generation: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment",
        "metadata": {"name": "alice", "namespace": "voice", "generation": generation, "resourceVersion": "7",
                     "creationTimestamp": "2026-03-01T11:00:00Z"},
        "spec": {"dataset": {"source": "s3://voices/models/datasets/alice/"},
                 "storage": {"uri": "s3://voices/models"}, "train": {"epochs": 200}},
        **({"status": status} if status is not None else {}),
    }


def _done(job: str, start: str, end: str) -> dict[str, Any]:
    return {"phase": "Succeeded", "job": job, "attempts": 1, "failures": 0, "startTime": start,
            "endTime": end, "message": "completed", "reason": "Completed"}


DATA_DONE = {
    "preprocess": _done("alice-preprocess-1", "2026-03-01T11:01:00Z", "2026-03-01T11:03:10Z"),
    "f0": _done("alice-f0-1", "2026-03-01T11:03:15Z", "2026-03-01T11:06:00Z"),
    "features": _done("alice-features-1", "2026-03-01T11:06:05Z", "2026-03-01T11:09:40Z"),
}


def pending() -> dict[str, Any]:
    return _obj(None)


def running_features() -> dict[str, Any]:
    steps = {**{k: DATA_DONE[k] for k in ("preprocess", "f0")},
             "features": {"phase": "Running", "job": "alice-features-1", "attempts": 1,
                          "startTime": "2026-03-01T11:06:05Z", "message": "attempt 1 running",
                          "etaSeconds": 95.0},
             "train": {"phase": "Pending"}, "index": {"phase": "Pending"}}
    return _obj({"phase": "Running", "currentStep": "features", "observedGeneration": 1,
                 "startTime": "2026-03-01T11:01:00Z", "message": "features: attempt 1 running",
                 "steps": steps})


def running_train() -> dict[str, Any]:
    steps = {**copy.deepcopy(DATA_DONE),
             "train": {"phase": "Running", "job": "alice-train-2", "attempts": 2, "failures": 1,
                       "startTime": "2026-03-01T11:10:00Z", "message": "attempt 2 running"},
             "index": {"phase": "Pending"}}
    return _obj({
        "phase": "Running", "currentStep": "train", "observedGeneration": 1,
        "startTime": "2026-03-01T11:01:00Z", "message": "train: attempt 2 running", "steps": steps,
        "progress": {"step": "train", "epoch": 37, "epochs": 200, "epochText": "37/200", "percent": 18.5,
                     "globalStep": 4440, "lossG": 31.2, "lossD": 4.1, "lossMel": 19.8,
                     "secondsPerEpoch": 41.3, "updated": "2026-03-01T12:29:00Z"},
        "training": {"etaSeconds": 6732.0,
                     "best": {"epoch": 35, "globalStep": 4200, "score": 0.812,
                              "checkpoint": f"{LOGS}G_4200.pth",
                              "metrics": {"speaker_sim": 0.84, "dnsmos_ovrl": 3.1, "mel_l1": 0.41}},
                     "latest": {"epoch": 35, "score": 0.812}},
        "artifacts": {"logs": LOGS},
        "dataset": {"minutes": 42.5, "pieceMinutes": 38.1, "filesUsed": 57, "filesSkipped": 1, "pieces": 618,
                    "piecesSkipped": 12},
    })


def succeeded() -> dict[str, Any]:
    obj = running_train()
    st = obj["status"]
    st.update(phase="Succeeded", currentStep=None, completionTime="2026-03-01T14:40:00Z",
              message="all steps completed")
    st["steps"]["train"] = _done("alice-train-2", "2026-03-01T11:10:00Z", "2026-03-01T14:35:00Z")
    st["steps"]["index"] = _done("alice-index-1", "2026-03-01T14:35:05Z", "2026-03-01T14:39:50Z")
    st["progress"].update(epoch=200, epochText="200/200", percent=100.0)
    st["training"].update(etaSeconds=0.0, best={"epoch": 180, "score": 0.871})
    st["artifacts"].update(model=f"{LOGS}weights/alice.pth",
                           index=f"{LOGS}added_IVF512_Flat_nprobe_1_alice_v2.index")
    return obj


def failed(exit_code: int = 2) -> dict[str, Any]:
    steps = {**{k: DATA_DONE[k] for k in ("preprocess",)},
             "f0": {"phase": "Failed", "job": "alice-f0-1", "attempts": 1, "failures": 1,
                    "exitCode": exit_code,
                    "startTime": "2026-03-01T11:03:15Z", "endTime": "2026-03-01T11:03:40Z",
                    "reason": "PermanentError",
                    "message": "spec.f0.rmvpeCheckpoint: s3://voices/weights/rmvpe.pt is not an RMVPE "
                               "checkpoint"},
             "features": {"phase": "Pending"}, "train": {"phase": "Pending"}, "index": {"phase": "Pending"}}
    return _obj({"phase": "Failed", "observedGeneration": 1, "startTime": "2026-03-01T11:01:00Z",
                 "completionTime": "2026-03-01T11:03:41Z", "steps": steps,
                 "message": "step f0 failed (exit 2, permanent): spec.f0.rmvpeCheckpoint: "
                            "s3://voices/weights/rmvpe.pt is not an RMVPE checkpoint"})


def suspended() -> dict[str, Any]:
    obj = running_train()
    obj["spec"]["suspend"] = True
    obj["metadata"]["generation"] = 2
    st = obj["status"]
    st.update(phase="Suspended", observedGeneration=2, suspendTime="2026-03-01T12:20:00Z",
              message="suspended: resume with kubectl patch rvcx alice --type merge -p "
                      "'{\"spec\":{\"suspend\":false}}'")
    st["steps"]["train"].update(phase="Pending", message="suspended (checkpoint saved)")
    return obj


EVENTS = [
    {"involvedObject": {"name": "alice"}, "type": "Normal", "reason": "StepStarted",
     "message": "train: attempt 2 started", "lastTimestamp": "2026-03-01T11:10:00Z"},
    {"involvedObject": {"name": "alice"}, "type": "Normal", "reason": "CheckpointEvaluated",
     "message": "epoch 35: score 0.812 (best)", "lastTimestamp": "2026-03-01T12:27:30Z"},
]


def watch_sequence() -> list[dict[str, Any]]:
    """What a watch reads from submission to success (for the terminal check)."""
    out = [pending(), running_features()]
    for epoch in (5, 37, 120):
        obj = running_train()
        obj["status"]["progress"].update(epoch=epoch, epochText=f"{epoch}/200", percent=epoch / 2)
        out.append(obj)
    return [*out, succeeded()]
