"""Seconds from SIGTERM to the resumable checkpoint uploaded, for the real v2 40k pitch models on CPU.

The train step runs as in a pod (rvc_pipeline.steps.runner.run_step, core.termination's SIGTERM handler
as the CLI installs it) on S3 storage: a moto server on loopback (tests/s3server.py). The full-size
generator and RVC's real discriminator (the largest checkpoint: about 0.9 GB with its AdamW state) train
batch 1 from scratch; after `--steps` whole steps SIGTERM reaches the process in the middle of the next
step (right after its D loss). The trainer finishes that step, writes the G/D pair and uploads it; its
`preempted` progress event carries the seconds from the SIGTERM to the checkpoint written and uploaded.
The step's own seconds (the part of the figure that depends on where in a step the SIGTERM falls) are
printed beside them.

    .venv/bin/python bench/bench_preempt.py [--steps 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests package (helpers, moto)

from rvc_pipeline.core import termination  # noqa: E402
from rvc_pipeline.core.spec import parse_manifest  # noqa: E402
from rvc_pipeline.progress import read_events  # noqa: E402
from rvc_pipeline.steps.runner import run_step  # noqa: E402
from rvc_pipeline.steps.train.trainer import TrainHooks  # noqa: E402

from tests.integration.test_train import make_experiment, manifest, train_step  # noqa: E402
from tests.s3server import TEST_CREDENTIALS, S3Endpoint, start_moto  # noqa: E402

STEP_TIMES: dict[int, float] = {}


def hook_at(step: int):  # noqa: ANN201 - a TrainHooks.loss_hook
    def hook(global_step: int, which: str, loss: torch.Tensor) -> torch.Tensor:
        if which == "d":
            STEP_TIMES[global_step] = time.monotonic()
            if global_step == step:
                os.kill(os.getpid(), signal.SIGTERM)
        return loss

    return hook


def voices(n: int, seconds: float) -> list[np.ndarray]:
    """Speech-like 22.05 kHz clips (harmonics with a moving pitch): content does not change these times."""
    t = np.arange(int(seconds * 22050)) / 22050
    out = []
    for i in range(n):
        f0 = 120 + 20 * i + 15 * np.sin(2 * np.pi * 2 * t)
        phase = 2 * np.pi * np.cumsum(f0) / 22050
        out.append((0.1 * sum(np.sin(k * phase) / k for k in range(1, 8))).astype(np.float32))
    return out


def upload_tree(ep: S3Endpoint, root: Path) -> None:
    cli = ep.client()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            cli.upload_file(str(p), ep.bucket, f"store/{p.relative_to(root).as_posix()}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1, help="whole steps before the one SIGTERM interrupts")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.update({**TEST_CREDENTIALS, "RVC_NO_PROGRESS": "1", "RVC_OFFLINE": "1"})
    url, stop = start_moto()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            os.environ["RVC_WEIGHTS_DIR"] = str(root / "no-weights")
            ep = S3Endpoint(url, "bench")
            ep.client().create_bucket(Bucket=ep.bucket)
            make_experiment(root / "src", "spot", voices(3, 3.0), config=False)  # RVC's v2 40k config
            upload_tree(ep, root / "src")
            m = manifest(root, "spot", batchSize=1, epochs=1, maxStepsPerEpoch=args.steps + 5)
            m["spec"]["storage"] = {"uri": ep.uri("store"), "endpoint": url}
            m["spec"]["resources"]["parallelism"] = args.threads
            assert termination.install()
            t0 = time.monotonic()
            try:
                hooks = TrainHooks(loss_hook=hook_at(args.steps + 1))
                run_step(parse_manifest(m), "train", train_step(hooks), force=True, workdir=root / "scratch")
                raise SystemExit("training was not preempted")
            except termination.Preempted:
                ended = time.monotonic()
            exp = root / "scratch" / "logs" / "spot"
            (ev,) = [e for e in read_events(exp / "progress.jsonl", "train") if e["event"] == "preempted"]
            sizes = {f: (exp / f).stat().st_size for f in ev["files"]}
            step_s = STEP_TIMES[args.steps + 1] - STEP_TIMES[args.steps] if args.steps else None
            print(json.dumps({
                "seconds_to_step_end": ev["seconds_to_step_end"],
                "seconds_to_checkpoint": ev["seconds_to_checkpoint"],
                "seconds_to_upload": ev["seconds_to_upload"],
                "seconds_sigterm_to_exit": round(ended - STEP_TIMES[args.steps + 1], 3),
                "seconds_per_step": round(step_s, 3) if step_s else None,
                "checkpoint_mb": {f: round(n / 1e6, 1) for f, n in sizes.items()},
                "threads": args.threads, "run_seconds": round(ended - t0, 1),
            }, indent=1))
    finally:
        stop()


if __name__ == "__main__":
    main()
