"""Step 3, training: filelist, dataset, the GAN training loop (AMP, DDP), checkpoints with resume, export.

Inputs (pulled from storage): `0_gt_wavs/`, `3_feature{256,768}/`, `2a_f0/` + `2b-f0nsf/` (pitch models),
`config.json` (if an earlier run wrote one) and the newest G_/D_ checkpoint pair of this experiment.
Outputs: `config.json` (RVC layout, written only if absent), `filelist.txt`, `G_<step>.pth`/`D_<step>.pth`
(or `G_2333333.pth`/`D_2333333.pth` with saveLatestOnly), the exported small model
`weights/<exp>.pth` (RVC's format; RVC itself writes it to `assets/weights/<exp>.pth`: ours stays inside
the experiment folder so that storage holds one self-contained tree), `weights/<exp>_e<E>_s<S>.pth` with
saveEveryWeights, `train.log` (first line: the hparams dict, as RVC writes it), `train_summary.json`, and
progress events in `progress.jsonl`.

Modules: `prepare` (input checks, config, filelist, mute set), `state` (init plan, resume, LR position),
`launch` (single / spawn / torchrun), `trainer` (the `Trainer`; on SIGTERM it saves a resumable pair after
the current step and raises Preempted, exit 143, and the rerun continues mid-epoch), `saving` (checkpoints,
export). The
sampler gets the per-GPU batch size (RVC passed batch*n_gpus); a dataset smaller than one batch lowers
the batch size instead of repeating items; no usable clip at all is a StepFailed.
"""

from __future__ import annotations

import time
from typing import Any

from rvc_pipeline.core import layout
from rvc_pipeline.core.fileio import temp_glob
from rvc_pipeline.data import read_filelist, training_stems, write_filelist
from rvc_pipeline.evaluation import heldout
from rvc_pipeline.evaluation.heldout import HeldOut
from rvc_pipeline.evaluation.judge import PULLS, write_heldout
from rvc_pipeline.steps.runner import StepContext, is_primary
from rvc_pipeline.steps.train import prepare
from rvc_pipeline.steps.train.launch import launch, world_size
from rvc_pipeline.steps.train.state import TrainJob, choose_init
from rvc_pipeline.steps.train.trainer import TrainHooks

__all__ = ["TrainHooks", "run"]


def _pull_inputs(ctx: StepContext) -> None:
    spec = ctx.spec
    pulls = [layout.GT_WAVS_DIR, layout.feature_dir(spec.model.version), layout.CONFIG_FILE,
             layout.params_file("features")]  # (the features' provenance)
    pulls += list(layout.F0_DIRS) if spec.model.pitch_guidance else []
    ctx.pull(*pulls)
    prepare.pull_append(ctx, layout.TRAIN_LOG_FILE)  # (the step shell already pulled progress.jsonl)
    if spec.eval.enabled:
        ctx.pull(*PULLS)  # the evaluation history a resumed run extends


def _hold_out(ctx: StepContext) -> HeldOut:
    """The held-out split (spec.eval), written to .rvc/heldout.json and pushed."""
    spec, exp_dir = ctx.spec, ctx.exp_dir
    cfg = spec.eval
    stems = training_stems(exp_dir, spec.model.version, spec.model.pitch_guidance)
    split = heldout.split(stems, cfg.held_out_share if cfg.enabled else 0.0, cfg.min_files, cfg.max_pieces,
                          spec.train.seed)
    if is_primary():
        ctx.push_file(write_heldout(exp_dir, split))
        # the evaluation's preview sources: the held-out pieces at 16 kHz (a few small files)
        ctx.pull(*[f"{layout.WAVS_16K_DIR}/{s}.wav" for s in split.eval[: cfg.previews]])
    return split


def run(ctx: StepContext, hooks: TrainHooks | None = None) -> dict[str, Any]:
    """The train step (see the module docstring); `hooks` are test seams (TrainHooks)."""
    spec = ctx.spec
    version, sr_key, f0 = spec.model.version, spec.model.sample_rate, spec.model.pitch_guidance
    _pull_inputs(ctx)
    exp_dir = ctx.exp_dir
    counts = prepare.check_inputs(exp_dir, version, sr_key, f0)
    for stale in exp_dir.glob(temp_glob("[GD]_*.pth")):  # a checkpoint save killed midway
        stale.unlink(missing_ok=True)
    cfg = prepare.load_config(ctx)
    mute_feats, mute_kind = prepare.mute_features(ctx, version)
    split = _hold_out(ctx)
    filelist = write_filelist(exp_dir, version, f0, sr_key, spec.model.speaker_id, exp_dir / "mute",
                              seed=spec.train.seed, mute_features=mute_feats, exclude=split.excluded)
    items = read_filelist(filelist, f0)
    n_real, ok, short, long_ = prepare.check_items(items, filelist, cfg.hop_length, counts)
    world, _ = world_size(spec)
    batch = prepare.batch_size(ctx, ok + (len(items) - n_real), world)  # the mute lines are usable too
    plan = choose_init(ctx, version, sr_key, f0)
    job = TrainJob(ctx.experiment, str(ctx.workdir), str(filelist), cfg.to_json(), plan, batch,
                   ctx.workers, mute_kind)
    if is_primary():
        hp = prepare.hparams(ctx, cfg.to_json(), plan, batch, filelist)
        with open(exp_dir / layout.TRAIN_LOG_FILE, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}\t{ctx.name}\tINFO\t{hp!r}\n")
    summary = launch(job, ctx, hooks)
    summary.update({"items": n_real, "usable_items": ok, "too_short": short, "too_long": long_,
                    "inputs": counts})
    return summary
