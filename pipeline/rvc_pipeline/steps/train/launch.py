"""How the training processes start: one process (CPU, one GPU), spawned workers (one per GPU, also
across nodes), or processes a launcher started (torchrun). torch DDP; rank 0 does all I/O.

* `spec.train.gpus > 1` and more than one CUDA device: this process spawns one worker per GPU
  (torch.multiprocessing), NCCL backend, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT unless set.
* Several nodes without torchrun: set NNODES and NODE_RANK (and MASTER_ADDR/MASTER_PORT of node 0) on
  each node's pod; each spawns its GPUs' workers with global rank NODE_RANK*gpus + local rank (each
  worker gets RANK, so `steps.runner.is_primary` holds in exactly one process of the whole job).
* Under torchrun (or any launcher that sets RANK, WORLD_SIZE and LOCAL_RANK): every process already is a
  rank; nothing is spawned. Each process runs the step (pull, checks, filelist) and then joins the group.
* On CPU (tests, fallback) everything runs in one process, torch.set_num_threads(ctx.workers).

SIGTERM (preemption): every training process handles it (core.termination; spawned workers install the
handler themselves) and the spawning process forwards it to its workers, since Kubernetes signals only
the container's main process. The ranks agree to stop after the same step, rank 0 saves and uploads, and
the step ends with termination.Preempted (exit 143) in the process that started it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from rvc_pipeline.core import termination
from rvc_pipeline.core.errors import StepFailed
from rvc_pipeline.core.fileio import visible_gpus
from rvc_pipeline.progress import Reporter
from rvc_pipeline.stepio import open_artifacts
from rvc_pipeline.steps.runner import StepContext
from rvc_pipeline.steps.train.state import TrainJob
from rvc_pipeline.steps.train.trainer import Trainer, TrainHooks

log = logging.getLogger("rvc_pipeline")


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)) or default)


def world_size(spec: Any) -> tuple[int, str]:
    """(world size, mode) where mode is 'torchrun', 'spawn' or 'single'."""
    env_world = _env_int("WORLD_SIZE", 1)
    if env_world > 1 and "RANK" in os.environ and "LOCAL_RANK" in os.environ:
        return env_world, "torchrun"
    n_dev = visible_gpus()
    if spec.gpu and spec.train.gpus > 1 and n_dev > 1:
        nproc = min(spec.train.gpus, n_dev)
        return nproc * _env_int("NNODES", 1), "spawn"
    return 1, "single"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(job: TrainJob, ctx: StepContext, hooks: TrainHooks | None = None) -> dict[str, Any]:
    """Train in this process or in the processes this one spawns; returns rank 0's summary."""
    world, mode = world_size(job.experiment.spec)
    if mode == "single":
        return Trainer(job, 0, 1, 0, ctx, hooks).fit()
    if mode == "torchrun":
        rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        return Trainer(job, rank, world, local, ctx if rank == 0 else None, hooks).fit()
    return _spawn(job, world, hooks)


def _spawn(job: TrainJob, world: int, hooks: TrainHooks | None) -> dict[str, Any]:
    import torch.multiprocessing as mp

    nnodes = _env_int("NNODES", 1)
    node_rank = _env_int("NODE_RANK", 0)
    nproc = world // nnodes
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    log.info("train: DDP on %d GPU(s) x %d node(s), master %s:%s", nproc, nnodes, os.environ["MASTER_ADDR"],
             os.environ["MASTER_PORT"])
    try:
        _join_forwarding_sigterm(mp.spawn(_spawn_entry, args=(job, nproc, node_rank, world, hooks),
                                          nprocs=nproc, join=False))
    except Exception as e:  # ProcessRaisedException carries the child's traceback as text
        text = str(e)
        if "Preempted" in text:
            raise termination.Preempted(text.strip().splitlines()[-1].split(": ", 1)[-1]) from None
        if "StepFailed" in text:
            raise StepFailed(text.strip().splitlines()[-1]) from None
        raise
    summary_path = job.exp_dir / "train_summary.json"
    return json.loads(summary_path.read_text()) if summary_path.exists() else {}


def _join_forwarding_sigterm(context: Any) -> None:
    """Wait for the spawned workers (torch.multiprocessing.ProcessContext); a SIGTERM to this process is
    passed on to them (they save and stop, see the module docstring)."""
    def forward(signum: int, _frame: object) -> None:
        termination.request()
        for p in context.processes:
            if p.is_alive() and p.pid:
                os.kill(p.pid, signum)

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, forward) if main else None
    try:
        while not context.join():
            pass
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _spawn_entry(local_rank: int, job: TrainJob, nproc: int, node_rank: int, world: int,
                 hooks: TrainHooks | None) -> None:
    termination.install()  # a spawned interpreter starts with the default SIGTERM action (die at once)
    rank = node_rank * nproc + local_rank
    os.environ["RANK"] = str(rank)  # the one primary rule (steps.runner.is_primary) holds in workers too
    ctx = None
    if rank == 0:
        exp = job.experiment
        ctx = StepContext(exp, "train", open_artifacts(exp), Path(job.workdir),
                          Reporter(job.exp_dir, exp.name, "train", exp.spec.metrics.pushgateway), job.threads)
    Trainer(job, rank, world, local_rank, ctx, hooks).fit()
