"""What training writes: G_/D_ checkpoint pairs (D first, so a G always has its D beside it), the
exported small model (RVC's format, `weights/<exp>.pth` inside the experiment folder so that storage
holds one self-contained tree), per-save exports with saveEveryWeights, and train_summary.json.
Checkpoints are written atomically and uploaded right after they are written. A preemption (SIGTERM)
writes one more pair between two steps, `save_resumable`, with where the epoch stood (state.EpochPosition)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from rvc_pipeline import checkpoints as ck
from rvc_pipeline.core import layout
from rvc_pipeline.core.errors import StorageError
from rvc_pipeline.lease import check_current
from rvc_pipeline.steps.runner import StepContext
from rvc_pipeline.steps.train.state import POSITION_KEY, RNG_KEY, EpochPosition, Nets, TrainJob

log = logging.getLogger("rvc_pipeline")

DEMO_INFO = "DEMO random init - not a real voice; {info}"


def model_info(job: TrainJob, epoch: int) -> str:
    """The small model's `info` field: RVC's '<E>epoch', flagged when the weights descend from DEMO."""
    info = f"{epoch}epoch"
    return DEMO_INFO.format(info=info) if job.init.random_weights else info


def export(job: TrainJob, net_g: torch.nn.Module, cfg: Any, path: Path, info: str, epoch: int,
           step: int) -> None:
    from rvc_pipeline.export import export_small_model

    spec = job.experiment.spec
    sd = ck.legacy_state_dict(net_g)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_small_model(sd, cfg, spec.model.version, spec.model.pitch_guidance, path, info,
                       extra={"epoch": epoch, "step": step, "model_name": job.experiment.name})


def _write_pair(job: TrainJob, nets: Nets, epoch: int, global_step: int, hist: dict[str, list[float]],
                extra: dict[str, Any]) -> tuple[Path, Path]:
    """Write D_, then G_ (RVC's keys + ours + `extra`); returns (G path, D path)."""
    spec = job.experiment.spec
    num = ck.LATEST_ONLY_STEP if spec.train.save_latest_only else global_step
    scaler = nets.scaler
    common = {"global_step": global_step, "scaler": scaler.state_dict() if scaler.is_enabled() else None,
              "version": spec.model.version, "sr": spec.model.sample_rate,
              "f0": int(spec.model.pitch_guidance), "random_weights": bool(job.init.random_weights), **extra}
    g_name, d_name = layout.checkpoint_names(num)
    d_path, g_path = job.exp_dir / d_name, job.exp_dir / g_name
    ck.save_checkpoint(d_path, nets.net_d, nets.optim_d, spec.train.learning_rate, epoch, common)
    ck.save_checkpoint(g_path, nets.net_g, nets.optim_g, spec.train.learning_rate, epoch,
                       {**common, "history": {k: list(v) for k, v in hist.items()}})
    return g_path, d_path


def save(job: TrainJob, ctx: StepContext | None, nets: Nets, epoch: int, global_step: int,
         hist: dict[str, list[float]]) -> list[str]:
    """Write (and upload) the checkpoint pair of a completed epoch; returns the names written."""
    spec = job.experiment.spec
    exp_dir = job.exp_dir
    g_path, d_path = _write_pair(job, nets, epoch, global_step, hist, {})
    if ctx is not None:
        ctx.push_file(d_path)
        ctx.push_file(g_path)
    out = [g_path.name, d_path.name]
    if spec.train.save_every_weights:
        from rvc_pipeline.nn.config import RVCConfig

        w_name = layout.epoch_model(job.experiment.name, epoch, global_step)
        w = exp_dir / w_name
        cfg = RVCConfig.from_json(job.config)
        export(job, nets.net_g, cfg, w, model_info(job, epoch), epoch, global_step)
        if ctx is not None:
            ctx.push_file(w)
        out.append(w_name)
    if ctx is not None:
        ctx.reporter.event("checkpoint", epoch=epoch, global_step=global_step, files=out)
    return out


@dataclasses.dataclass(frozen=True)
class ResumableSave:
    """What `save_resumable` wrote, and when (time.monotonic()) the pair was written and uploaded."""

    files: list[str]
    written_at: float
    uploaded_at: float


def save_resumable(job: TrainJob, ctx: StepContext | None, nets: Nets, global_step: int,
                   hist: dict[str, list[float]], done_epochs: int, position: EpochPosition | None,
                   rng: dict[str, Any]) -> ResumableSave:
    """The preemption save: the pair at `global_step` (the newest number, so a resume picks it) with
    `iteration` = the completed epochs, the position inside the next one (None at an epoch end) and the
    RNG state; uploaded at once. No per-save export and no evaluation: it is not an epoch's save."""
    extra: dict[str, Any] = {RNG_KEY: rng}
    if position is not None:
        extra[POSITION_KEY] = position.to_dict()
    g_path, d_path = _write_pair(job, nets, done_epochs, global_step, hist, extra)
    written = time.monotonic()
    if ctx is not None:
        ctx.push_file(d_path)
        ctx.push_file(g_path)
    return ResumableSave([g_path.name, d_path.name], written, time.monotonic())


def remove_superseded(job: TrainJob, ctx: StepContext | None, names: tuple[str, ...]) -> None:
    """Delete a preemption pair (G first: never a lone G), local and stored, once a newer pair is
    uploaded; best effort."""
    for name in names:
        (job.exp_dir / name).unlink(missing_ok=True)
        if ctx is not None and ctx.remote:
            try:
                check_current()
                ctx.storage.delete(f"{ctx.exp_key}/{name}")
            except StorageError as e:
                log.warning("could not delete the superseded preemption checkpoint %s: %s", name, e)


def export_final(job: TrainJob, ctx: StepContext | None, net_g: torch.nn.Module, cfg: Any, epoch: int,
                 global_step: int) -> tuple[Path, str]:
    """The experiment's model, weights/<exp>.pth; returns (path, info)."""
    final = job.exp_dir / layout.exported_model(job.experiment.name)
    info = model_info(job, epoch)
    export(job, net_g, cfg, final, info, epoch, global_step)
    if ctx is not None:
        ctx.push_file(final)
    return final, info


def write_summary(job: TrainJob, ctx: StepContext | None, summary: dict[str, Any]) -> None:
    out = job.exp_dir / layout.TRAIN_SUMMARY_FILE
    out.write_text(json.dumps(summary, indent=1, default=str))
    if ctx is not None:
        ctx.push_file(out)
        for name in (layout.TRAIN_LOG_FILE, layout.CONFIG_FILE, layout.FILELIST_FILE):
            ctx.push(name)
