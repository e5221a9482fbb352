"""Where training starts: the init plan (own checkpoints, resumeFrom, pretrained G/D, scratch), applying
it to the built models, and the LR schedule position.

Order of sources: (a) this experiment's newest checkpoint pair in storage (a truncated one falls back to
the previous pair), (b) spec.train.resumeFrom (a G_*.pth URI; its D_ sibling alongside; the epoch count
continues from it), (c) the pretrained G/D (strict load after an architecture check), (d) random
initialisation (fromScratch, or DEMO random weights). An epoch-end save holds the COMPLETED epoch and
resumes at epoch+1 with optimizer, GradScaler, global step, LR position and loss history restored (RVC
re-runs the epoch). A preemption save (SIGTERM, trainer.Trainer._preempt) is taken between two steps of
epoch E: its `iteration` is E-1 (so RVC's loader re-runs epoch E) and its `epoch_position`
(`EpochPosition`) says how many steps of E were done and their loss sums; a resume of this experiment
continues epoch E after those steps, with the RNG state of the moment of the save (`rng_state`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from rvc_pipeline import checkpoints as ck
from rvc_pipeline.core import layout
from rvc_pipeline.core.errors import StepFailed, StorageError, WeightsNotFound
from rvc_pipeline.core.spec import Experiment
from rvc_pipeline.steps.runner import StepContext
from rvc_pipeline.weights import DEMO_WARNING, resolve_weight

log = logging.getLogger("rvc_pipeline")

POSITION_KEY = "epoch_position"  # the checkpoint keys of a preemption save (saving.save_resumable)
RNG_KEY = "rng_state"


@dataclasses.dataclass
class InitPlan:
    """Where the weights come from."""

    kind: str  # "resume" | "resume_from" | "pretrained" | "scratch"
    g: str | None = None
    d: str | None = None
    random_weights: bool = False  # DEMO: pretrained missing -> random init


@dataclasses.dataclass
class TrainJob:
    """Everything a (possibly spawned) training worker needs; picklable."""

    experiment: Experiment
    workdir: str
    filelist: str
    config: dict[str, Any]
    init: InitPlan
    batch_size: int
    threads: int
    mute_features: str

    @property
    def exp_dir(self) -> Path:
        return Path(self.workdir) / "logs" / self.experiment.name


@dataclasses.dataclass
class EpochPosition:
    """How far a preempted run got into `epoch` (the checkpoint key `epoch_position`): `epoch_step` of its
    `steps_per_epoch` steps trained, `ok_steps` of them updated, their loss sums and wall seconds."""

    epoch: int
    epoch_step: int
    steps_per_epoch: int
    ok_steps: int = 0
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def parse(cls, obj: Any) -> EpochPosition | None:
        """The position a checkpoint holds; None when it has none or it does not add up (logged)."""
        if obj is None:
            return None
        try:
            pos = cls(int(obj["epoch"]), int(obj["epoch_step"]), int(obj["steps_per_epoch"]),
                      int(obj.get("ok_steps", 0)), {str(k): float(v) for k, v in dict(obj["sums"]).items()},
                      float(obj.get("seconds", 0.0)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            log.warning("resume: unreadable epoch_position in the checkpoint (%s); the epoch starts over", e)
            return None
        if not (pos.epoch >= 1 and 0 < pos.epoch_step < pos.steps_per_epoch and 0 <= pos.ok_steps
                <= pos.epoch_step):
            log.warning("resume: epoch_position %s does not add up; the epoch starts over", obj)
            return None
        return pos


@dataclasses.dataclass
class Start:
    """Where the epoch loop begins, after the plan was applied to the models (`position`: inside
    `epoch`, after a preemption; `rng`: the torch RNG states saved with it)."""

    epoch: int = 1
    global_step: int = 0
    history: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    position: EpochPosition | None = None
    rng: dict[str, Any] | None = None
    preemption_pair: tuple[str, str] | None = None  # resumed from these (G, D) of a preemption save

    @property
    def epoch_step(self) -> int:
        return self.position.epoch_step if self.position is not None else 0


# ------------------------------------------------------------------------------------------ planning
def _pull_checkpoints(ctx: StepContext) -> list[str]:
    """Names of this experiment's checkpoint files in storage (downloaded lazily by _ensure_local)."""
    if not ctx.remote:
        return []
    names = []
    for o in ctx.storage.list(ctx.exp_key, recursive=False):
        name = o.key.rsplit("/", 1)[-1]
        if ck.checkpoint_number(name) is not None and name[:2] in layout.CHECKPOINT_PREFIXES:
            local = ctx.exp_dir / name
            if local.exists() and local.stat().st_size != o.size:
                local.unlink()  # stale local copy of an object that was rewritten (latest-only)
            names.append(name)
    return names


def _ensure_local(ctx: StepContext, name: str) -> Path:
    p = ctx.exp_dir / name
    if not p.exists() and ctx.remote:
        ctx.storage.download(f"{ctx.exp_key}/{name}", p)
    return p


def _candidate_pairs(ctx: StepContext, remote_names: list[str]) -> list[tuple[str, str]]:
    names = set(remote_names)
    for p in ctx.exp_dir.glob("*.pth"):
        names.add(p.name)
    pairs = [(g, d) for g in names if (d := layout.discriminator_of(g)) is not None and d in names
             and ck.checkpoint_number(g) is not None]
    return sorted(pairs, key=lambda gd: ck._order_key(Path(gd[0])), reverse=True)


def _own_checkpoint_plan(ctx: StepContext) -> InitPlan | None:
    for g_name, d_name in _candidate_pairs(ctx, _pull_checkpoints(ctx)):
        try:
            g = _ensure_local(ctx, g_name)
            d = _ensure_local(ctx, d_name)
            for p in (g, d):  # readable? (the architecture is checked against the built model later)
                ck.read_checkpoint(p)
        except (ck.CheckpointCorrupt, StorageError) as e:
            log.warning("resume: %s; falling back to the previous checkpoint", e)
            ctx.reporter.event("checkpoint_corrupt", file=g_name, error=str(e)[:500])
            continue
        except ck.CheckpointIncompatible as e:
            raise StepFailed(f"{e}. Delete the old checkpoints of experiment {ctx.name!r} or use another "
                             "experiment name.") from None
        return InitPlan("resume", str(g), str(d))
    return None


def _resume_from_plan(ctx: StepContext, uri: str) -> InitPlan:
    from rvc_pipeline.core.storage import fetch_uri

    spec = ctx.spec
    dest = ctx.exp_dir / "resume_from"
    try:
        g = fetch_uri(uri, dest, spec.storage.endpoint, spec.storage.region)
    except StorageError as e:
        if not e.permanent:
            raise  # storage unreachable: transient (exit 1), retried
        raise StepFailed(f"spec.train.resumeFrom: {e}") from None
    d_name = layout.discriminator_of(g.name)
    if d_name is None:
        raise StepFailed(f"spec.train.resumeFrom: {uri} is not a G_*.pth checkpoint")
    d_uri = uri.rsplit("/", 1)[0] + "/" + d_name if "/" in uri else d_name
    d: Path | None
    try:
        d = fetch_uri(d_uri, dest, spec.storage.endpoint, spec.storage.region)
    except StorageError as e:
        if not e.permanent:
            raise  # not "no D_ file": never start D from the pretrained file because S3 was down
        log.warning("resumeFrom: %s not found; the discriminator starts from the pretrained file", d_uri)
        d = None
    return InitPlan("resume_from", str(g), str(d) if d else None)


def _pretrained_plan(ctx: StepContext) -> InitPlan:
    spec = ctx.spec
    try:
        g = resolve_weight(spec.train.pretrained_g or spec.default_pretrained("G"), spec,
                           what="pretrained generator")
        d = resolve_weight(spec.train.pretrained_d or spec.default_pretrained("D"), spec,
                           what="pretrained discriminator")
    except WeightsNotFound as e:
        if not spec.demo_random_weights:
            raise
        msg = DEMO_WARNING.format(what="pretrained G/D")
        log.warning("%s (%s)", msg, e)
        ctx.reporter.event("warning", message=msg)
        return InitPlan("scratch", random_weights=True)
    return InitPlan("pretrained", str(g), str(d))


def choose_init(ctx: StepContext, version: str, sr_key: str, f0: bool) -> InitPlan:
    """The plan, by the order of sources in the module docstring (the architecture is checked later,
    against the built models)."""
    plan = _own_checkpoint_plan(ctx)
    if plan is not None:
        return plan
    if ctx.spec.train.resume_from:
        return _resume_from_plan(ctx, ctx.spec.train.resume_from)
    if ctx.spec.train.from_scratch:
        return InitPlan("scratch")
    return _pretrained_plan(ctx)


# ------------------------------------------------------------------------------------------ applying
def pretrained_d(spec: Any) -> Path | None:
    if spec.train.from_scratch:
        return None
    try:
        return resolve_weight(spec.train.pretrained_d or spec.default_pretrained("D"), spec,
                              what="pretrained discriminator")
    except WeightsNotFound:
        return None


def load_pretrained_d(net_d: torch.nn.Module, spec: Any, version: str, sr_key: str, f0: bool) -> None:
    p = pretrained_d(spec)
    if p is None:
        log.warning("train: no discriminator checkpoint; the discriminator starts from random weights")
        return
    sd = ck.read_checkpoint(p)["model"]
    ck.check_model_compat(sd, net_d, version, sr_key, f0, f"pretrained discriminator {p}", "D")
    ck.load_into(net_d, sd, strict=True, what=f"pretrained discriminator {p}")


def _check_d_loaded(info: dict[str, Any], path: str) -> None:
    skipped = info.get("skipped_keys") or []
    if skipped:
        raise ck.CheckpointIncompatible(
            f"discriminator checkpoint {path}: {len(skipped)} keys missing or mis-shaped "
            f"(e.g. {skipped[0]}); it is a discriminator of another version"
        )


@dataclasses.dataclass
class Nets:
    """The models and optimizers a plan is applied to."""

    net_g: torch.nn.Module
    net_d: torch.nn.Module
    optim_g: torch.optim.Optimizer
    optim_d: torch.optim.Optimizer
    scaler: Any


def _load_resume(job: TrainJob, nets: Nets) -> dict[str, Any]:
    """Load G (and D, else the pretrained D) of a resume plan; returns G's checkpoint info."""
    plan, spec = job.init, job.experiment.spec
    m = spec.model
    what = "checkpoint" if plan.kind == "resume" else "spec.train.resumeFrom"
    try:
        gi = ck.load_checkpoint(Path(str(plan.g)), nets.net_g, nets.optim_g, version=m.version,
                                sr=m.sample_rate, f0=m.pitch_guidance, what=f"{what} (generator)")
        if plan.d:
            di = ck.load_checkpoint(Path(plan.d), nets.net_d, nets.optim_d, version=m.version,
                                    sr=m.sample_rate, f0=m.pitch_guidance, what=f"{what} (discriminator)",
                                    kind="D")
            _check_d_loaded(di, plan.d)
        else:
            load_pretrained_d(nets.net_d, spec, m.version, m.sample_rate, m.pitch_guidance)
    except ck.CheckpointIncompatible as e:
        raise StepFailed(str(e)) from None
    return gi


def _apply_resume(job: TrainJob, nets: Nets, steps_per_epoch: int) -> Start:
    plan = job.init
    gi = _load_resume(job, nets)
    done = int(gi.get("iteration", 0))
    start = Start(done + 1, int(gi.get("global_step", done * steps_per_epoch)), gi.get("history") or {},
                  {"init": plan.kind})
    if "scaler" in gi and gi["scaler"] and nets.scaler.is_enabled():
        nets.scaler.load_state_dict(gi["scaler"])
    if gi.get("random_weights"):
        # the weights descend from a DEMO random init: the resumed run and its export must say so too
        plan.random_weights = True
    start.info.update(resumed_from=plan.g, resumed_epoch=done,
                      optimizer_restored=gi.get("optimizer_restored"))
    if plan.kind == "resume":  # (another experiment's position means nothing for this data set)
        start.position = _position(gi, start.epoch, steps_per_epoch)
        start.rng = gi.get(RNG_KEY)
        if RNG_KEY in gi and not job.experiment.spec.train.save_latest_only:
            start.preemption_pair = (Path(str(plan.g)).name, Path(str(plan.d)).name)
    epochs = job.experiment.spec.train.epochs
    if plan.kind == "resume_from" and done >= epochs:
        raise StepFailed(f"spec.train.resumeFrom: {plan.g} is already at epoch {done}; set "
                         f"spec.train.epochs above {done} to continue training it")
    return start


def _position(gi: dict[str, Any], epoch: int, steps_per_epoch: int) -> EpochPosition | None:
    """The checkpoint's position inside `epoch` when it still fits this run's epoch (same length)."""
    pos = EpochPosition.parse(gi.get(POSITION_KEY))
    if pos is None:
        return None
    if pos.epoch != epoch or pos.steps_per_epoch != steps_per_epoch:
        log.warning("resume: the checkpoint stopped in epoch %d after %d of %d steps, but this run starts "
                    "epoch %d with %d steps per epoch (data or batch size changed): the epoch starts over",
                    pos.epoch, pos.epoch_step, pos.steps_per_epoch, epoch, steps_per_epoch)
        return None
    return pos


def rng_state(device: torch.device) -> dict[str, Any]:
    """torch's RNG states (CPU, and this CUDA device when used) for a preemption checkpoint."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def restore_rng(state: dict[str, Any] | None, device: torch.device) -> bool:
    """Set torch's RNG states saved by `rng_state` (False, logged, when they do not fit this process)."""
    if not isinstance(state, dict):
        return False
    try:
        torch.set_rng_state(state["cpu"])
        if device.type == "cuda" and isinstance(state.get("cuda"), torch.Tensor):
            torch.cuda.set_rng_state(state["cuda"], device)
    except (KeyError, TypeError, RuntimeError) as e:
        log.warning("resume: RNG state not restored (%s); training goes on with a fresh one", e)
        return False
    return True


def _apply_pretrained(job: TrainJob, nets: Nets) -> Start:
    plan, m = job.init, job.experiment.spec.model
    try:
        for path, net, what, kind in ((plan.g, nets.net_g, "pretrained generator", "G"),
                                      (plan.d, nets.net_d, "pretrained discriminator", "D")):
            sd = ck.read_checkpoint(Path(str(path)))["model"]
            ck.check_model_compat(sd, net, m.version, m.sample_rate, m.pitch_guidance, f"{what} {path}", kind)
            ck.load_into(net, sd, strict=True, what=f"{what} {path}")
    except (ck.CheckpointIncompatible, ck.CheckpointCorrupt) as e:
        raise StepFailed(f"{e}. The pretrained files must match spec.model (version {m.version}, "
                         f"{m.sample_rate}, pitch {'on' if m.pitch_guidance else 'off'}).") from None
    return Start(info={"init": plan.kind, "pretrained_g": plan.g, "pretrained_d": plan.d})


def apply_plan(job: TrainJob, nets: Nets, steps_per_epoch: int) -> Start:
    """Load the planned weights into the models (resume: also optimizer, scaler, step, history)."""
    kind = job.init.kind
    if kind in ("resume", "resume_from"):
        start = _apply_resume(job, nets, steps_per_epoch)
    elif kind == "pretrained":
        start = _apply_pretrained(job, nets)
    else:
        start = Start(info={"init": kind})
    if job.init.random_weights:
        start.info["random_weights"] = True
    return start


def lr_schedules(optims: tuple[torch.optim.Optimizer, ...], lr: float, decay: float,
                 start_epoch: int) -> list[torch.optim.lr_scheduler.ExponentialLR]:
    """Per-epoch ExponentialLR positioned so that epoch e trains at lr * decay^(e-1), as RVC."""
    for opt in optims:
        for group in opt.param_groups:
            group["lr"] = lr * decay ** (start_epoch - 1)
            group["initial_lr"] = lr
    exp_lr = torch.optim.lr_scheduler.ExponentialLR
    scheds = [exp_lr(o, gamma=decay, last_epoch=start_epoch - 2) for o in optims]
    for opt in optims:  # the scheduler's initial step must not move the LR we set
        for group in opt.param_groups:
            group["lr"] = lr * decay ** (start_epoch - 1)
    return scheds
