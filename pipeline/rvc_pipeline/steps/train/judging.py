"""The trainer's side of checkpoint evaluation (rvc_pipeline.evaluation): after each save on the primary
process, judge the generator, export the best as `weights/<exp>.pth`, push the history, previews and report,
and tell the loop whether to stop early (every rank learns it)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from rvc_pipeline.core import layout
from rvc_pipeline.evaluation.history import EvalRecord
from rvc_pipeline.evaluation.judge import Judge, make_converter, make_judge
from rvc_pipeline.steps.train import saving
from rvc_pipeline.steps.train.state import TrainJob

log = logging.getLogger(__name__)


def setup(job: TrainJob, net_g: torch.nn.Module, device: torch.device) -> Judge | None:
    spec = job.experiment.spec
    convert = make_converter(spec, net_g, str(device))
    return make_judge(spec, job.experiment.name, job.exp_dir, convert)


def _export(job: TrainJob, ctx: Any, net_g: torch.nn.Module, cfg: Any, name: str, epoch: int,
            step: int) -> None:
    path = job.exp_dir / name
    saving.export(job, net_g, cfg, path, saving.model_info(job, epoch), epoch, step)
    if ctx is not None:
        ctx.push_file(path)


def after_save(judge: Judge, job: TrainJob, ctx: Any, net_g: torch.nn.Module, cfg: Any, epoch: int,
               step: int, checkpoint: str) -> bool:
    """Judge the saved generator; returns whether training should stop early."""
    rec, new_best = judge.judge(net_g, epoch, step, checkpoint)
    name = job.experiment.name
    if new_best:
        _export(job, ctx, net_g, cfg, layout.exported_model(name), epoch, step)
    if job.experiment.spec.eval.save_every_evaluated:
        _export(job, ctx, net_g, cfg, layout.evaluated_model(name, epoch), epoch, step)
    judge.write_report()
    best = judge.best
    stop = judge.should_stop()
    if ctx is not None:
        for f in [layout.EVAL_FILE, layout.REPORT_FILE, *rec.previews]:
            ctx.push_file(job.exp_dir / f)
        publish(ctx.reporter, rec, best, stop)
    log.info("evaluation of epoch %d: score %s (%s); best epoch %s", epoch, rec.score, rec.metrics,
             best.epoch if best else None)
    return stop


def publish(reporter: Any, rec: EvalRecord, best: EvalRecord | None, stop: bool) -> None:
    """The `eval` progress event (the operator's status.training) and the rvc_eval_<metric> gauges (the
    event's own numbers become rvc_score, rvc_best_epoch, ...)."""
    reporter.event("eval", epoch=rec.epoch, global_step=rec.step, checkpoint=rec.checkpoint,
                   metrics=rec.metrics, score=rec.score, seconds=rec.seconds,
                   best_epoch=best.epoch if best else None, best_score=best.score if best else None,
                   best_global_step=best.step if best else None,
                   best_checkpoint=best.checkpoint if best else "", best_metrics=best.metrics if best else {},
                   stop=stop)
    reporter.push({f"eval_{k}": v for k, v in rec.metrics.items()})


def agree(stop: bool, world: int, device: torch.device) -> bool:
    """The primary's stop decision on every rank."""
    if world <= 1:
        return stop
    import torch.distributed as dist

    flag = torch.tensor([1 if stop else 0], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def summary(judge: Judge | None) -> dict[str, Any]:
    best = judge.best if judge is not None else None
    if best is None:
        return {}
    return {"best": {"epoch": best.epoch, "step": best.step, "checkpoint": best.checkpoint,
                     "score": best.score, "metrics": best.metrics},
            "evaluations": len(judge.records) if judge else 0}
