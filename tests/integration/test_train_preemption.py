"""Preemption with S3 storage (moto server): SIGTERM in a training step uploads the resumable pair and the
progress log before the step ends with Preempted; a new pod (fresh scratch) resumes mid-epoch from S3.
And DDP (slow): a SIGTERM that reaches one rank stops every rank after the same step."""

from __future__ import annotations

import json
import os
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
from rvc_pipeline.core import termination
from rvc_pipeline.core.errors import EXIT_PREEMPTED
from rvc_pipeline.core.spec import parse_manifest
from rvc_pipeline.progress import read_events
from rvc_pipeline.steps.runner import run_step
from rvc_pipeline.steps.train.trainer import TrainHooks

from tests.integration.test_train import DRIVER, TinyD, make_experiment, manifest, speech, train_step
from tests.s3server import free_port
from tests.unit.test_preemption import sigterm_at

__all__ = ["speech"]


@pytest.fixture(autouse=True)
def _setup(offline_weights: Path, one_torch_thread: None) -> Iterator[None]:
    previous = signal.getsignal(signal.SIGTERM)
    termination.reset()
    termination.install()
    yield
    signal.signal(signal.SIGTERM, previous)
    termination.reset()


def test_preempted_on_s3_resumes_mid_epoch_on_a_fresh_node(tmp_path: Path, speech: list[np.ndarray],
                                                           s3: Any) -> None:
    src = make_experiment(tmp_path / "src", "spot", speech[:3])
    cli = s3.client()
    for p in sorted(src.rglob("*")):
        if p.is_file():
            cli.upload_file(str(p), s3.bucket, f"store/{p.relative_to(tmp_path / 'src').as_posix()}")

    def run(hooks: TrainHooks) -> dict[str, Any]:
        m = manifest(tmp_path, "spot", epochs=2, maxStepsPerEpoch=3, batchSize=1)
        m["spec"]["storage"] = {"uri": s3.uri("store"), "endpoint": s3.url}
        return run_step(parse_manifest(m), "train", train_step(hooks), force=True)

    with pytest.raises(termination.Preempted):
        run(sigterm_at(5))  # step 2 of epoch 2
    pre = "store/logs/spot/"
    keys = {o["Key"] for o in cli.list_objects_v2(Bucket=s3.bucket, Prefix=pre)["Contents"]}
    assert {pre + k for k in ("G_3.pth", "D_3.pth", "G_5.pth", "D_5.pth")} <= keys
    body = cli.get_object(Bucket=s3.bucket, Key=pre + "progress.jsonl")["Body"].read().decode()
    (ev,) = [json.loads(ln) for ln in body.splitlines() if '"preempted"' in ln]
    assert (ev["epoch"], ev["epoch_step"], ev["global_step"]) == (2, 2, 5)
    assert 0 < ev["seconds_to_checkpoint"] <= ev["seconds_to_upload"]
    train_log = cli.get_object(Bucket=s3.bucket, Key=pre + "train.log")["Body"].read().decode()
    assert "preempted (SIGTERM)" in train_log

    termination.reset()
    s = run(TrainHooks(TinyD))  # run_step gives it a new scratch folder: everything comes from S3
    assert s["init"] == "resume" and s["start_epoch"] == 2 and s["global_step"] == 6
    body = cli.get_object(Bucket=s3.bucket, Key=pre + "progress.jsonl")["Body"].read().decode()
    recs = [json.loads(ln) for ln in body.splitlines()]
    starts = [r for r in recs if r["event"] == "train_start"]
    assert (starts[-1]["start_epoch"], starts[-1]["start_epoch_step"], starts[-1]["global_step"]) == (2, 2, 5)
    assert [r["global_step"] for r in recs if r["event"] == "train_step"] == [1, 2, 3, 4, 5, 6]
    assert [r["steps"] for r in recs if r["event"] == "epoch"] == [3, 3]
    keys = {o["Key"] for o in cli.list_objects_v2(Bucket=s3.bucket, Prefix=pre)["Contents"]}
    assert {pre + "G_3.pth", pre + "G_6.pth", pre + "D_6.pth"} <= keys
    assert not {pre + "G_5.pth", pre + "D_5.pth"} & keys  # the preemption pair, superseded by G_6


@pytest.mark.slow
def test_ddp_sigterm_to_one_rank_stops_both_after_the_same_step(tmp_path: Path,
                                                                speech: list[np.ndarray]) -> None:
    """Two ranks as torchrun starts them; SIGTERM reaches rank 1 only (a node drained under a multi-node
    job): both agree to stop after the same step, rank 0 saves, both exit 143."""
    exp = make_experiment(tmp_path, "ddp", speech[:3])
    mpath = tmp_path / "m.yaml"
    mpath.write_text(yaml.safe_dump(manifest(tmp_path, "ddp", epochs=100, maxStepsPerEpoch=2)))
    code = DRIVER.format(test=str(Path(__file__).with_name("test_train.py")), manifest=str(mpath))
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(e["event"] == "train_step" for e in
                                                 read_events(exp / "progress.jsonl", "train")):
            assert all(p.poll() is None for p in procs)
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [EXIT_PREEMPTED] * 2, outs[0][-2000:] + outs[1][-2000:]
    (ev,) = [e for e in read_events(exp / "progress.jsonl", "train") if e["event"] == "preempted"]
    assert (exp / ev["files"][0]).is_file() and ev["global_step"] < 200
