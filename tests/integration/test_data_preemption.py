"""Data steps on SIGTERM (preemption, node drain, suspend): they stop after the current file(s), push what
is done to storage (moto S3 server), exit 143 (`Preempted`), and a rerun does only the rest. Preprocess
also uploads its progress log while it runs (the operator's ETA)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from rvc_pipeline.core import layout, termination
from rvc_pipeline.core.errors import EXIT_PREEMPTED
from rvc_pipeline.core.spec import load_manifest
from rvc_pipeline.stepio import Shard
from rvc_pipeline.steps import preprocess as pp
from rvc_pipeline.steps import runner
from rvc_pipeline.steps.runner import run_shard, run_steps

from tests.s3server import S3Endpoint

pytestmark = [
    pytest.mark.skipif(not shutil.which("ffmpeg"), reason="needs ffmpeg"),
    pytest.mark.usefixtures("offline_weights"),
]

ROOT = Path(__file__).resolve().parents[2]


def manifest(tmp_path: Path, s3: S3Endpoint, data: Path, name: str, **spec: Any) -> Path:
    doc = {"apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment", "metadata": {"name": name},
           "spec": {"dataset": {"source": str(data)}, "storage": {"uri": s3.uri("runs"), "endpoint": s3.url},
                    "resources": {"device": "cpu", "parallelism": 1}, **spec}}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def keys(s3: S3Endpoint, exp: str, sub: str = "") -> set[str]:
    prefix = f"runs/logs/{exp}/{sub}"
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return {o["Key"][len(f"runs/logs/{exp}/"):] for p in pages for o in p.get("Contents", [])}


def read(s3: S3Endpoint, exp: str, key: str) -> bytes:
    return s3.client().get_object(Bucket=s3.bucket, Key=f"runs/logs/{exp}/{key}")["Body"].read()


@pytest.fixture
def sigterm_handler() -> Iterator[None]:
    """termination.install() in this (pytest) process for the test; the old handler restored after."""
    old = signal.getsignal(signal.SIGTERM)
    termination.reset()
    assert termination.install()
    yield
    signal.signal(signal.SIGTERM, old)
    termination.reset()


def test_f0_shard_sigterm_exits_143_with_the_finished_files_in_s3_and_its_rerun_completes_the_step(
    tmp_path: Path, s3: S3Endpoint, voice_dir: Path
) -> None:
    spec = manifest(tmp_path, s3, voice_dir, "f", f0={"method": "harvest"})
    exp = load_manifest(spec)
    run_steps(exp, ["preprocess"])
    pieces = sorted(k.split("/", 1)[1] for k in keys(s3, "f", layout.WAVS_16K_DIR) if k.endswith(".wav"))
    inputs = pieces[1::2]  # shard 1 of 2's
    assert len(inputs) >= 3
    first = run_shard(exp, "f0", Shard(0, 2))
    assert first["complete"] is False and first["files"] == len(pieces) - len(inputs)
    scratch = tmp_path / "scratch"  # RVC_SCRATCH: where the pod's local work folder goes (to watch it)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "pipeline"), "RVC_NO_PROGRESS": "1",
           "RVC_SCRATCH": str(scratch)}
    proc = subprocess.Popen([sys.executable, "-m", "rvc_pipeline.cli", "f0", "--spec", str(spec), "--shard",
                             "1/2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(scratch.glob(f"*/logs/f/{layout.F0_NSF_DIR}/*.npy")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "stopped by SIGTERM" in err.strip().splitlines()[-1]
    shard0 = {p + ".npy" for p in pieces[0::2]}
    stored = {k.split("/", 1)[1] for k in keys(s3, "f", layout.F0_NSF_DIR)} - shard0
    coarse = {k.split("/", 1)[1] for k in keys(s3, "f", layout.F0_COARSE_DIR)} - shard0
    assert stored == coarse and 1 <= len(stored) < len(inputs)  # pushed on the way out, not all done
    assert stored <= {p + ".npy" for p in inputs}
    assert not [k for k in keys(s3, "f") if k.endswith(".partial")]
    for name in stored:  # whole files
        assert np.load(io.BytesIO(read(s3, "f", f"{layout.F0_NSF_DIR}/{name}"))).ndim == 1
    assert layout.marker_key("f", "f0").removeprefix("logs/f/") not in keys(s3, "f")
    assert layout.shard_marker_key("f", "f0", 1, 2).removeprefix("logs/f/") not in keys(s3, "f")
    assert not list(scratch.iterdir())  # the scratch folder went with the process
    events = [json.loads(line) for line in read(s3, "f", layout.PROGRESS_FILE).splitlines()]
    assert any(e["step"] == "f0" and e["event"] == "warning" and "SIGTERM" in e["message"] for e in events)

    again = run_shard(exp, "f0", Shard(1, 2))  # the preempted shard alone: the rest only, and the step
    mine = json.loads(read(s3, "f", layout.shard_marker_key("f", "f0", 1, 2).removeprefix("logs/f/")))
    assert mine["resumed"] == len(stored) and mine["computed"] == len(inputs) - len(stored)
    assert again["files"] == len(pieces) and again["computed"] == first["computed"] + mine["computed"]
    assert again["complete"] is True and len(keys(s3, "f", layout.F0_NSF_DIR)) == len(pieces)
    assert layout.marker_key("f", "f0").removeprefix("logs/f/") in keys(s3, "f")


def test_preprocess_sigterm_pushes_finished_files_and_progress_and_resumes(
    tmp_path: Path, s3: S3Endpoint, voice_dir: Path, monkeypatch: pytest.MonkeyPatch, sigterm_handler: None
) -> None:
    exp = load_manifest(manifest(tmp_path, s3, voice_dir, "p"))
    monkeypatch.setattr(runner, "PROGRESS_PUSH_SECONDS", 0.0)  # the progress log after every file
    real, seen = pp.process_file, []

    def process_file(job: pp.FileJob) -> pp.FileReport:
        seen.append(job.idx0)
        if len(seen) == 2:  # the operator sees the first file's progress while the step runs
            progress = [json.loads(line) for line in read(s3, "p", layout.PROGRESS_FILE).splitlines()]
            assert [e["files_done"] for e in progress if e["event"] == "progress"] == [1]
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, during the second file
        return real(job)

    monkeypatch.setattr(pp, "process_file", process_file)
    with pytest.raises(termination.Preempted, match="after 2 of 4 files"):
        run_steps(exp, ["preprocess"])
    assert seen == [0, 1]  # stopped after the current file
    records = keys(s3, "p", layout.PREPROCESS_RECORDS_DIR)
    assert {r.rsplit("/", 1)[1] for r in records} == {"0.json", "1.json"}
    pieces = {k.split("/", 1)[1] for k in keys(s3, "p", layout.GT_WAVS_DIR)}
    named = {n for r in records for n in json.loads(read(s3, "p", r))["report"]["piece_names"]}
    assert named == pieces and pieces and {p.split("_")[0] for p in pieces} == {"0", "1"}
    assert not [k for k in keys(s3, "p") if k.endswith(".partial")]
    assert "preprocess.done.json" not in {k.rsplit("/", 1)[-1] for k in keys(s3, "p", ".rvc/")}

    termination.reset()
    again: list[int] = []
    monkeypatch.setattr(pp, "process_file", lambda job: again.append(job.idx0) or real(job))
    summary = run_steps(exp, ["preprocess"])[0]  # the rest only
    assert again == [2, 3]
    assert summary["files_total"] == 4 and summary["files_used"] == 4
    pieces_now = len(keys(s3, "p", layout.GT_WAVS_DIR))
    assert summary["pieces"] == pieces_now == len(keys(s3, "p", layout.WAVS_16K_DIR))
    progress = [json.loads(line) for line in read(s3, "p", layout.PROGRESS_FILE).splitlines()]
    done = [e["files_done"] for e in progress if e["event"] == "progress"]
    assert done == [1, 2, 3, 4] and progress[-1]["event"] == "done"
