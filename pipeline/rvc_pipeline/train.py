"""Step 3, training: filelist, dataset, the GAN training loop (AMP, DDP), checkpoints with resume, export.

Inputs (pulled from storage): `0_gt_wavs/`, `3_feature{256,768}/`, `2a_f0/` + `2b-f0nsf/` (pitch models),
`config.json` (if an earlier run wrote one) and the newest G_/D_ checkpoint pair of this experiment.
Outputs: `config.json` (RVC layout, written only if absent), `filelist.txt`, `G_<step>.pth`/`D_<step>.pth`
(or `G_2333333.pth`/`D_2333333.pth` with saveLatestOnly), the exported small model
`weights/<exp>.pth` (RVC's format; RVC itself writes it to `assets/weights/<exp>.pth`: ours stays inside
the experiment folder so that storage holds one self-contained tree), `weights/<exp>_e<E>_s<S>.pth` with
saveEveryWeights, `train.log` (first line: the hparams dict, as RVC writes it), `train_summary.json`, and
progress events in `progress.jsonl`.

The recipe is RVC's (reference §8): AdamW(lr, betas (0.8, 0.99), eps 1e-9, weight_decay 0.01 - torch's
default, as RVC), ExponentialLR(lr_decay) stepped per epoch, LSGAN D loss, G loss = adv + 2*fm + 45*mel +
KL, no gradient clipping (norms are only logged). Deliberate differences, each for a user problem:

* Resume. RVC stores the epoch and re-runs it on resume with global_step recomputed. We save the
  COMPLETED epoch and resume at epoch+1 with the optimizer, GradScaler, global step, LR schedule
  position and loss history restored, so a preempted node costs at most one save interval and nothing
  is trained twice. Order of sources: (a) this experiment's newest checkpoint pair in storage (a
  truncated one falls back to the previous pair), (b) spec.train.resumeFrom (a G_*.pth URI; its D_
  sibling alongside; the epoch count continues from it), (c) the pretrained G/D (strict load after an
  architecture check), (d) random initialisation (fromScratch, or DEMO random weights).
* Checkpoints are written atomically and uploaded right after they are written.
* Precision: `auto` = bf16 autocast on CUDA GPUs that support it, fp16 + GradScaler on other GPUs, fp32
  on CPU. The mel of y_hat and every loss are computed in fp32 in every mode. TF32 is enabled on CUDA.
* A non-finite loss or gradient norm skips that step's update (counted in the summary); 20 consecutive
  ones stop training with StepFailed, without overwriting the last good checkpoint.
* The sampler gets the per-GPU batch size (RVC passed batch*n_gpus); a dataset smaller than one batch
  lowers the batch size instead of repeating items; no usable clip at all is a StepFailed.
* Progress from the first step: `train_step` events (steps 1..10, then every 50 steps or 30 s), one
  `epoch` event per epoch with the loss averages, progress.jsonl pushed to storage after every epoch, a
  tqdm bar per epoch. Over-training aid: per-epoch averages and EMA-smoothed (0.987) histories of the
  mel and G losses in train_summary.json (no early stopping).

Multi-GPU and multi-node (torch DDP; rank 0 does all I/O: logs, checkpoints, uploads, export):

* `spec.train.gpus > 1` and more than one CUDA device: this process spawns one worker per GPU
  (torch.multiprocessing), NCCL backend, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT unless set.
* Several nodes without torchrun: set NNODES and NODE_RANK (and MASTER_ADDR/MASTER_PORT of node 0) on
  each node's pod; each spawns its GPUs' workers with global rank NODE_RANK*gpus + local rank.
* Under torchrun (or any launcher that sets RANK, WORLD_SIZE and LOCAL_RANK): every process already is a
  rank; nothing is spawned. Each process runs the step (pull, checks, filelist) and then joins the group.
* On CPU (tests, fallback) everything runs in one process, torch.set_num_threads(ctx.workers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from . import checkpoints as ck
from .data import (
    BUCKET_BOUNDARIES,
    DistributedBucketSampler,
    TextAudioCollate,
    TextAudioDataset,
    bucket_index,
    feature_dir_name,
    is_mute_item,
    mute_features_from_embedder,
    read_filelist,
    write_filelist,
)
from .losses import discriminator_loss, feature_loss, generator_loss, kl_loss, mel_loss
from .mel import mel_spectrogram, spec_to_mel
from .progress import Reporter
from .spec import SAMPLE_RATES, Experiment
from .stepio import StepContext, StepFailed, open_artifacts
from .storage import StorageError
from .weights import DEMO_WARNING, WeightsNotFound, resolve_weight

log = logging.getLogger("rvc_pipeline")

MAX_NONFINITE_STREAK = 20
EMA_SMOOTHING = 0.987
LOG_FIRST_STEPS = 10
LOG_EVERY_STEPS = 50
LOG_EVERY_SECONDS = 30.0

# Test hook (documented): when set, called as hook(global_step, which, loss) -> loss with which = "d" or "g"
# right after that loss is computed, e.g. to inject NaN for some steps. Never set in production code.
LOSS_HOOK: Callable[[int, str, torch.Tensor], torch.Tensor] | None = None


# ------------------------------------------------------------------------------------------ plan
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


def _exp_dir(job: TrainJob) -> Path:
    return Path(job.workdir) / "logs" / job.experiment.name


# ------------------------------------------------------------------------------------ input checks
def check_inputs(exp_dir: Path, version: str, sr_key: str, f0: bool) -> dict[str, int]:
    """Consistency of the inputs with the spec; StepFailed naming the folder/file otherwise."""
    exp_dir = Path(exp_dir)
    fd = feature_dir_name(version)
    other = feature_dir_name("v1" if version == "v2" else "v2")
    dim = 256 if version == "v1" else 768
    wavs = sorted((exp_dir / "0_gt_wavs").glob("*.wav"))
    if not wavs:
        raise StepFailed(f"{exp_dir / '0_gt_wavs'}: no WAV files; run the preprocess step first")
    feats = sorted((exp_dir / fd).glob("*.npy"))
    if not feats:
        if any((exp_dir / other).glob("*.npy")):
            raise StepFailed(
                f"{exp_dir / fd}: no features, but {other}/ has some: the features were extracted for "
                f"{'v1' if version == 'v2' else 'v2'} while spec.model.version is {version} (needs {fd}/ "
                f"with {dim}-d features). Rerun the features step or change spec.model.version."
            )
        raise StepFailed(f"{exp_dir / fd}: no feature files; run the features step first")
    for p in feats:
        try:
            arr = np.load(p, mmap_mode="r")
        except Exception as e:  # noqa: BLE001
            raise StepFailed(f"{p}: unreadable feature file ({e})") from None
        if arr.ndim != 2 or arr.shape[1] != dim:
            raise StepFailed(
                f"{p}: features of shape {tuple(arr.shape)} in {fd}/; spec.model.version {version} needs "
                f"[frames, {dim}]"
            )
    sr = SAMPLE_RATES[sr_key]
    for p in wavs:
        try:
            info = sf.info(str(p))
        except Exception as e:  # noqa: BLE001
            raise StepFailed(f"{p}: unreadable WAV ({e})") from None
        if info.samplerate != sr:
            raise StepFailed(
                f"{p}: sample rate {info.samplerate} Hz, but spec.model.sampleRate is {sr_key} ({sr} Hz); "
                "rerun the preprocess step for this sample rate"
            )
    counts = {"0_gt_wavs": len(wavs), fd: len(feats)}
    if f0:
        for sub in ("2a_f0", "2b-f0nsf"):
            n = len(list((exp_dir / sub).glob("*.npy")))
            if n == 0:
                raise StepFailed(
                    f"{exp_dir / sub}: no pitch files, but spec.model.pitchGuidance is true; run the f0 step "
                    "(or set pitchGuidance: false)"
                )
            counts[sub] = n
    return counts


def usable_items(items: list[list[str]], hop: int) -> tuple[int, int, int]:
    """(usable, too short, too long) real (non-mute) items by the sampler's length rule."""
    ok = short = long_ = 0
    for it in items:
        if is_mute_item(it):
            continue
        n = os.path.getsize(it[0]) // (3 * hop)
        if bucket_index(n) >= 0:
            ok += 1
        elif n <= BUCKET_BOUNDARIES[0]:
            short += 1
        else:
            long_ += 1
    return ok, short, long_


# ------------------------------------------------------------------------------------ storage / init
def _pull_checkpoints(ctx: StepContext) -> list[str]:
    """Names of this experiment's checkpoint files in storage (downloaded lazily by _ensure_local)."""
    if not ctx.remote:
        return []
    names = []
    for o in ctx.storage.list(ctx.exp_key, recursive=False):
        name = o.key.rsplit("/", 1)[-1]
        if ck.checkpoint_number(name) is not None and name[:2] in ("G_", "D_"):
            local = ctx.exp_dir / name
            if local.exists() and local.stat().st_size != o.size:
                local.unlink()  # stale local copy of an object that was rewritten (latest-only)
            names.append(name)
    return names


def _pull_append(ctx: StepContext, name: str) -> None:
    """Fetch an append-only log from storage and keep what this run already wrote after it (a resumed
    pod starts with a fresh scratch; pushing its own file alone would drop the earlier history)."""
    if not ctx.remote:
        return
    key = f"{ctx.exp_key}/{name}"
    if not ctx.storage.exists(key):
        return
    local = ctx.exp_dir / name
    mine = local.read_bytes() if local.exists() else b""
    tmp = local.with_name(name + ".remote.partial")
    ctx.storage.download(key, tmp)
    old = tmp.read_bytes()
    if old and not old.endswith(b"\n"):
        old += b"\n"
    local.write_bytes(old + mine)
    tmp.unlink()


def _ensure_local(ctx: StepContext, name: str) -> Path:
    p = ctx.exp_dir / name
    if not p.exists() and ctx.remote:
        ctx.storage.download(f"{ctx.exp_key}/{name}", p)
    return p


def _candidate_pairs(ctx: StepContext, remote_names: list[str]) -> list[tuple[str, str]]:
    names = set(remote_names)
    for p in ctx.exp_dir.glob("*.pth"):
        names.add(p.name)
    gs = sorted((n for n in names if n.startswith("G_") and ck.checkpoint_number(n) is not None),
                key=lambda n: ck._order_key(Path(n)), reverse=True)
    return [(g, "D_" + g[2:]) for g in gs if "D_" + g[2:] in names]


def choose_init(ctx: StepContext, version: str, sr_key: str, f0: bool) -> InitPlan:
    spec = ctx.spec
    remote_names = _pull_checkpoints(ctx)
    for g_name, d_name in _candidate_pairs(ctx, remote_names):
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
    if spec.train.resume_from:
        from .storage import fetch_uri

        uri = spec.train.resume_from
        dest = ctx.exp_dir / "resume_from"
        try:
            g = fetch_uri(uri, dest, spec.storage.endpoint, spec.storage.region)
        except StorageError as e:
            if not e.permanent:
                raise  # storage unreachable: transient (exit 1), retried
            raise StepFailed(f"spec.train.resumeFrom: {e}") from None
        d_uri = uri.rsplit("/", 1)[0] + "/" + "D_" + g.name[2:] if "/" in uri else "D_" + g.name[2:]
        if not g.name.startswith("G_"):
            raise StepFailed(f"spec.train.resumeFrom: {uri} is not a G_*.pth checkpoint")
        try:
            d = fetch_uri(d_uri, dest, spec.storage.endpoint, spec.storage.region)
        except StorageError as e:
            if not e.permanent:
                raise  # not "no D_ file": never start D from the pretrained file because S3 was down
            log.warning("resumeFrom: %s not found; the discriminator starts from the pretrained file", d_uri)
            d = None
        return InitPlan("resume_from", str(g), str(d) if d else None)
    if spec.train.from_scratch:
        return InitPlan("scratch")
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


def _pretrained_d(spec: Any) -> Path | None:
    if spec.train.from_scratch:
        return None
    try:
        return resolve_weight(spec.train.pretrained_d or spec.default_pretrained("D"), spec,
                              what="pretrained discriminator")
    except WeightsNotFound:
        return None


def _mute_features(ctx: StepContext, version: str) -> tuple[np.ndarray | None, str]:
    """HuBERT's output for 3 s of silence from the embedder that made the features (recorded by the
    features step), else zeros: the mute set never mixes embedders with the real items."""
    try:
        from . import hubert
    except ImportError:
        return None, "zeros"
    from .features import PARAMS_FILE as FEATURES_PARAMS
    from .provenance import RANDOM, read_record, weight_identity
    from .safeload import UnsafeFile

    made_by = (read_record(ctx.exp_dir / FEATURES_PARAMS) or {}).get("embedder")
    try:
        if made_by == RANDOM:  # the features step's demo embedder (same seed)
            emb, kind = hubert.random_embedder("cpu", seed=0), f"embedder:{RANDOM}"
        else:
            path = resolve_weight(ctx.spec.features.embedder, ctx.spec, what="HuBERT embedder",
                                  allow_online=False)
            kind = f"embedder:{Path(path).name}@{weight_identity(path)}"
            if made_by is not None and weight_identity(path) != made_by:
                log.info("mute features: %s did not make the features (%s); using zeros", path, made_by)
                return None, "zeros"
            emb = hubert.load_embedder(path, device="cpu")
        feats = mute_features_from_embedder(lambda w: emb.extract(w, version)[0])
        return feats, kind
    except UnsafeFile:  # a hostile embedder in the weights cache is news, not a reason for zeros
        raise
    except Exception as e:  # noqa: BLE001 - the mute features are a nicety; zeros work
        log.info("mute features: embedder not available (%s); using zeros", e)
        return None, "zeros"


def _hparams(ctx: StepContext, cfg: dict[str, Any], plan: InitPlan, batch: int, filelist: Path) -> dict:
    s = ctx.spec
    hp = json.loads(json.dumps(cfg))
    hp["train"]["batch_size"] = batch
    hp["data"]["training_files"] = str(filelist)
    hp.update({
        "model_dir": str(ctx.exp_dir), "experiment_dir": str(ctx.exp_dir), "name": ctx.name,
        "save_every_epoch": s.train.save_every_epoch, "total_epoch": s.train.epochs,
        "pretrainG": plan.g or "" if plan.kind == "pretrained" else "",
        "pretrainD": plan.d or "" if plan.kind == "pretrained" else "",
        "version": s.model.version, "gpus": str(s.train.gpus), "sample_rate": s.model.sample_rate,
        "if_f0": int(s.model.pitch_guidance), "if_latest": int(s.train.save_latest_only),
        "save_every_weights": "1" if s.train.save_every_weights else "0",
        "if_cache_data_in_gpu": int(s.train.cache_data_in_gpu),
    })
    return hp


# ------------------------------------------------------------------------------------------ the step
def run(ctx: StepContext) -> dict[str, Any]:
    spec = ctx.spec
    version, sr_key, f0 = spec.model.version, spec.model.sample_rate, spec.model.pitch_guidance
    fd = feature_dir_name(version)
    pulls = ["0_gt_wavs", fd, "config.json", ".rvc/features.params.json"]  # (the features' provenance)
    pulls += ["2a_f0", "2b-f0nsf"] if f0 else []
    ctx.pull(*pulls)
    _pull_append(ctx, "train.log")  # (the step shell already pulled progress.jsonl)
    exp_dir = ctx.exp_dir
    counts = check_inputs(exp_dir, version, sr_key, f0)
    for stale in [*exp_dir.glob(".G_*.tmp"), *exp_dir.glob(".D_*.tmp")]:  # a save killed midway
        stale.unlink(missing_ok=True)

    from .models.config import RVCConfig, get_config

    cfg_path = exp_dir / "config.json"
    cfg = get_config(version, sr_key)
    if cfg_path.exists():
        try:
            existing = RVCConfig.from_json(json.loads(cfg_path.read_text()))
        except (ValueError, json.JSONDecodeError) as e:
            raise StepFailed(f"{cfg_path}: not a valid RVC config ({e}); delete it to regenerate") from None
        if existing.sampling_rate != cfg.sampling_rate or existing.hop_length != cfg.hop_length:
            raise StepFailed(f"{cfg_path}: written for {existing.sampling_rate} Hz, but "
                             f"spec.model.sampleRate is {sr_key}; delete it or use another experiment name")
        cfg = existing
    else:
        cfg_path.write_text(json.dumps(cfg.to_json(), indent=2))
    cfg = cfg.replace_train(batch_size=spec.train.batch_size, learning_rate=spec.train.learning_rate,
                            lr_decay=spec.train.lr_decay, seed=spec.train.seed)

    mute_feats, mute_kind = _mute_features(ctx, version)
    filelist = write_filelist(exp_dir, version, f0, sr_key, spec.model.speaker_id, exp_dir / "mute",
                              seed=spec.train.seed, mute_features=mute_feats)
    items = read_filelist(filelist, f0)
    n_real = sum(not is_mute_item(it) for it in items)
    if n_real == 0:
        raise StepFailed(
            f"{filelist}: no training items: no file stem is present in every input folder ({counts}); "
            "the preprocess, f0 and features outputs do not match"
        )
    ok, short, long_ = usable_items(items, cfg.hop_length)
    if ok == 0:
        raise StepFailed(
            f"{exp_dir / '0_gt_wavs'}: none of the {n_real} clips can be trained on: {short} are too short "
            f"(clips must be longer than 0.75 s) and {long_} too long (more than ~6.7 s); check the "
            "preprocess settings (segmentSeconds, slicer minLengthMs)"
        )
    if short or long_:
        log.warning("train: %d clip(s) shorter than 0.75 s and %d longer than ~6.7 s are not used",
                    short, long_)

    world, _ = _world_size(spec)
    batch = spec.train.batch_size
    n_items = ok + (len(items) - n_real)  # the mute lines are usable too
    if n_items < batch * world:
        new = max(1, n_items // world)
        msg = (f"only {n_items} usable training items for batch size {batch} x {world} GPU(s); "
               f"lowering the batch size to {new}")
        log.warning("train: %s", msg)
        ctx.reporter.event("warning", message=msg)
        batch = new

    plan = choose_init(ctx, version, sr_key, f0)
    hp = _hparams(ctx, cfg.to_json(), plan, batch, filelist)
    job = TrainJob(ctx.experiment, str(ctx.workdir), str(filelist), cfg.to_json(), plan, batch,
                   ctx.workers, mute_kind)
    if _launcher_rank() == 0:
        with open(exp_dir / "train.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}\t{ctx.name}\tINFO\t{hp!r}\n")
    summary = launch(job, ctx)
    summary.update({"items": n_real, "usable_items": ok, "too_short": short, "too_long": long_,
                    "inputs": counts})
    return summary


def _launcher_rank() -> int:
    """This process's rank when a launcher (torchrun) started one process per rank, else 0."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "LOCAL_RANK" in os.environ:
        return int(os.environ.get("RANK", "0") or 0)
    return 0


def _world_size(spec: Any) -> tuple[int, str]:
    """(world size, mode) where mode is 'torchrun', 'spawn' or 'single'."""
    env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if env_world > 1 and "RANK" in os.environ and "LOCAL_RANK" in os.environ:
        return env_world, "torchrun"
    n_dev = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec.gpu and spec.train.gpus > 1 and n_dev > 1:
        nproc = min(spec.train.gpus, n_dev)
        return nproc * int(os.environ.get("NNODES", "1") or 1), "spawn"
    return 1, "single"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(job: TrainJob, ctx: StepContext) -> dict[str, Any]:
    world, mode = _world_size(job.experiment.spec)
    if mode == "single":
        return train_worker(0, 1, 0, job, ctx)
    if mode == "torchrun":
        rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        return train_worker(rank, world, local, job, ctx if rank == 0 else None)
    import torch.multiprocessing as mp

    nnodes = int(os.environ.get("NNODES", "1") or 1)
    node_rank = int(os.environ.get("NODE_RANK", "0") or 0)
    nproc = world // nnodes
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    log.info("train: DDP on %d GPU(s) x %d node(s), master %s:%s", nproc, nnodes, os.environ["MASTER_ADDR"],
             os.environ["MASTER_PORT"])
    try:
        mp.spawn(_spawn_entry, args=(job, nproc, node_rank, world), nprocs=nproc, join=True)
    except Exception as e:  # ProcessRaisedException carries the child's traceback as text
        text = str(e)
        if "StepFailed" in text:
            raise StepFailed(text.strip().splitlines()[-1]) from None
        raise
    summary_path = _exp_dir(job) / "train_summary.json"
    return json.loads(summary_path.read_text()) if summary_path.exists() else {}


def _spawn_entry(local_rank: int, job: TrainJob, nproc: int, node_rank: int, world: int) -> None:
    rank = node_rank * nproc + local_rank
    ctx = None
    if rank == 0:
        exp = job.experiment
        exp_dir = _exp_dir(job)
        ctx = StepContext(exp, "train", open_artifacts(exp), Path(job.workdir),
                          Reporter(exp_dir, exp.name, "train", exp.spec.metrics.pushgateway), job.threads)
    train_worker(rank, world, local_rank, job, ctx)


# ------------------------------------------------------------------------------------- the worker
def pick_precision(requested: str, device: torch.device) -> str:
    if device.type != "cuda":
        if requested == "fp16":
            log.warning("train: fp16 is not used on CPU; training in fp32")
            return "fp32"
        return "bf16" if requested == "bf16" else "fp32"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return requested


def _backward(scaler: Any, optim: torch.optim.Optimizer, loss: torch.Tensor,
              net: torch.nn.Module) -> torch.Tensor:
    """Zero the grads, backward the (scaled) loss, unscale; returns the total grad norm (no clipping)."""
    optim.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optim)
    return _grad_norm(net.parameters())


def _grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack(norms), 2.0)


class _TrainLog:
    def __init__(self, path: Path | None):
        self.path = path

    def __call__(self, msg: str, *args: Any) -> None:
        text = msg % args if args else msg
        log.info("train: %s", text)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}\ttrain\tINFO\t{text}\n")


def _ema(history: list[float], value: float) -> float:
    return value if not history else EMA_SMOOTHING * history[-1] + (1 - EMA_SMOOTHING) * value


# Test hook (documented): when set, builds the discriminator instead of build_discriminator(version), so
# that tests can train with a tiny D (RVC's has 71 M parameters, 0.9 GB per checkpoint with AdamW state).
DISCRIMINATOR_FACTORY: Callable[[str], torch.nn.Module] | None = None


def _build_models(cfg: Any, version: str, f0: bool, device: torch.device) -> tuple[Any, Any]:
    """G from the experiment's config.json (RVC builds it from there too), RVC's D for the version."""
    from .models import build_discriminator, build_generator

    net_g = build_generator(cfg, version, f0, spk_embed_dim=cfg.model.spk_embed_dim).to(device)
    factory = DISCRIMINATOR_FACTORY or build_discriminator
    net_d = factory(version).to(device)
    return net_g, net_d


@dataclasses.dataclass
class GanStep:
    """One RVC training iteration (reference §8.3): D update, then G update, shared GradScaler."""

    net_g: torch.nn.Module
    net_d: torch.nn.Module
    optim_g: torch.optim.Optimizer
    optim_d: torch.optim.Optimizer
    scaler: Any
    cfg: Any
    f0: bool
    amp_dtype: torch.dtype | None = None
    world: int = 1

    def _amp(self, device: torch.device) -> Any:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.amp_dtype)

    def __call__(self, batch: tuple[torch.Tensor, ...], global_step: int) -> tuple[bool, bool, list[float]]:
        return gan_step(self, batch, global_step)


def gan_step(
    st: GanStep, batch: tuple[torch.Tensor, ...], global_step: int,
) -> tuple[bool, bool, list[float]]:
    """Run one iteration on a collated batch already on the device.

    Returns (D updated, G updated, [loss_g, grad_norm_g, loss_d, grad_norm_d, loss_mel, loss_kl, loss_fm]).
    An update is skipped when its loss or gradient norm is not finite."""
    from .models.commons import slice_segments

    cfg = st.cfg
    hop, seg, seg_frames = cfg.hop_length, cfg.segment_size, cfg.segment_frames
    mel_args = dict(n_fft=cfg.filter_length, num_mels=cfg.n_mel_channels, sampling_rate=cfg.sampling_rate,
                    fmin=cfg.data.mel_fmin, fmax=cfg.data.mel_fmax)
    if st.f0:
        phone, phone_len, pitch, pitchf, spec_b, spec_len, wave, _wave_len, sid = batch
    else:
        phone, phone_len, spec_b, spec_len, wave, _wave_len, sid = batch
    device = phone.device
    with st._amp(device):
        if st.f0:
            out = st.net_g(phone, phone_len, pitch, pitchf, spec_b, spec_len, sid)
        else:
            out = st.net_g(phone, phone_len, spec_b, spec_len, sid)
        y_hat, ids_slice, _x_mask, z_mask, (_z, z_p, m_p, logs_p, _m_q, logs_q) = out
        mel = spec_to_mel(spec_b, **mel_args)  # fp32 inside
        y_mel = slice_segments(mel, ids_slice, seg_frames)
        y_hat_mel = mel_spectrogram(y_hat.float().squeeze(1), hop_size=hop, win_size=cfg.win_length,
                                    **mel_args)
        wave_seg = slice_segments(wave, ids_slice * hop, seg)
        d_real, d_fake, _, _ = st.net_d(wave_seg, y_hat.detach())
    loss_d, _, _ = discriminator_loss(d_real, d_fake)
    if LOSS_HOOK is not None:
        loss_d = LOSS_HOOK(global_step, "d", loss_d)
    gn_d = _backward(st.scaler, st.optim_d, loss_d, st.net_d).to(device)
    ok_d = _all_finite(torch.stack([loss_d.detach(), gn_d]), st.world)
    if ok_d:
        st.scaler.step(st.optim_d)

    with st._amp(device):
        _, d_fake_g, fmap_r, fmap_g = st.net_d(wave_seg, y_hat)
    l_mel = mel_loss(y_mel, y_hat_mel, cfg.train.c_mel)
    l_kl = kl_loss(z_p, logs_q, m_p, logs_p, z_mask) * cfg.train.c_kl
    l_fm = feature_loss(fmap_r, fmap_g)
    l_gen, _ = generator_loss(d_fake_g)
    loss_g = l_gen + l_fm + l_mel + l_kl
    if LOSS_HOOK is not None:
        loss_g = LOSS_HOOK(global_step, "g", loss_g)
    gn_g = _backward(st.scaler, st.optim_g, loss_g, st.net_g).to(device)
    vals = torch.stack([loss_g.detach(), gn_g, loss_d.detach(), gn_d, l_mel.detach(), l_kl.detach(),
                        l_fm.detach()]).float()
    ok_g = _all_finite(vals[:2], st.world)
    if ok_g:
        st.scaler.step(st.optim_g)
    st.scaler.update()
    return ok_d, ok_g, vals.cpu().tolist()


def train_worker(rank: int, world: int, local_rank: int, job: TrainJob, ctx: StepContext | None) -> dict:
    from .models.config import RVCConfig

    spec = job.experiment.spec
    t = spec.train
    version, sr_key, f0 = spec.model.version, spec.model.sample_rate, spec.model.pitch_guidance
    cfg = RVCConfig.from_json(job.config)
    exp_dir = _exp_dir(job)
    name = job.experiment.name
    is_main = rank == 0
    use_cuda = spec.gpu and torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(max(1, job.threads))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    tlog = _TrainLog(exp_dir / "train.log" if is_main else None)
    reporter = ctx.reporter if ctx is not None else None
    precision = pick_precision(t.precision, device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    torch.manual_seed(t.seed + rank)

    # data
    dataset = TextAudioDataset(Path(job.filelist), f0=f0, sampling_rate=cfg.sampling_rate,
                               filter_length=cfg.filter_length, hop_length=cfg.hop_length,
                               win_length=cfg.win_length)
    sampler = DistributedBucketSampler(dataset.lengths, job.batch_size, num_replicas=world, rank=rank)
    workers = t.data_workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, collate_fn=TextAudioCollate(f0),
        pin_memory=use_cuda, persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
    )
    steps_per_epoch = len(sampler)
    if t.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, t.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise StepFailed(f"{job.filelist}: the sampler yields no batch (items {len(dataset)}, batch "
                         f"{job.batch_size}); too little usable data")

    # models, optimizers
    net_g, net_d = _build_models(cfg, version, f0, device)
    betas = tuple(cfg.train.betas)
    optim_g = torch.optim.AdamW(net_g.parameters(), lr=t.learning_rate, betas=betas, eps=cfg.train.eps)
    optim_d = torch.optim.AdamW(net_d.parameters(), lr=t.learning_rate, betas=betas, eps=cfg.train.eps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    plan = job.init
    start_epoch, global_step, history = 1, 0, {}
    init_info: dict[str, Any] = {"init": plan.kind}
    if plan.kind in ("resume", "resume_from"):
        what = "checkpoint" if plan.kind == "resume" else "spec.train.resumeFrom"
        try:
            gi = ck.load_checkpoint(Path(plan.g), net_g, optim_g, version=version, sr=sr_key, f0=f0,
                                    what=f"{what} (generator)")
            if plan.d:
                di = ck.load_checkpoint(Path(plan.d), net_d, optim_d, version=version, sr=sr_key, f0=f0,
                                        what=f"{what} (discriminator)", kind="D")
                _check_d_loaded(di, plan.d)
            else:
                _load_pretrained_d(net_d, spec, version, sr_key, f0)
        except ck.CheckpointIncompatible as e:
            raise StepFailed(str(e)) from None
        done = int(gi.get("iteration", 0))
        start_epoch = done + 1
        global_step = int(gi.get("global_step", done * steps_per_epoch))
        if "scaler" in gi and gi["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(gi["scaler"])
        history = gi.get("history") or {}
        if gi.get("random_weights"):
            # the weights descend from a DEMO random init: the resumed run and its export must say so too
            plan.random_weights = True
        init_info.update(resumed_from=plan.g, resumed_epoch=done,
                         optimizer_restored=gi.get("optimizer_restored"))
        if plan.kind == "resume_from" and done >= t.epochs:
            raise StepFailed(f"spec.train.resumeFrom: {plan.g} is already at epoch {done}; set "
                             f"spec.train.epochs above {done} to continue training it")
    elif plan.kind == "pretrained":
        try:
            for path, net, what in ((plan.g, net_g, "pretrained generator"),
                                    (plan.d, net_d, "pretrained discriminator")):
                sd = ck.read_checkpoint(Path(path))["model"]
                kind = "G" if net is net_g else "D"
                ck.check_model_compat(sd, net, version, sr_key, f0, f"{what} {path}", kind)
                ck.load_into(net, sd, strict=True, what=f"{what} {path}")
        except (ck.CheckpointIncompatible, ck.CheckpointCorrupt) as e:
            raise StepFailed(f"{e}. The pretrained files must match spec.model (version {version}, "
                             f"{sr_key}, pitch {'on' if f0 else 'off'}).") from None
        init_info.update(pretrained_g=plan.g, pretrained_d=plan.d)
    if plan.random_weights:
        init_info["random_weights"] = True
    # LR schedule position: the LR of epoch e is lr * gamma^(e-1), as RVC's per-epoch ExponentialLR.
    for opt in (optim_g, optim_d):
        for group in opt.param_groups:
            group["lr"] = t.learning_rate * t.lr_decay ** (start_epoch - 1)
            group["initial_lr"] = t.learning_rate
    sched_g = torch.optim.lr_scheduler.ExponentialLR(optim_g, gamma=t.lr_decay, last_epoch=start_epoch - 2)
    sched_d = torch.optim.lr_scheduler.ExponentialLR(optim_d, gamma=t.lr_decay, last_epoch=start_epoch - 2)
    for opt in (optim_g, optim_d):  # the scheduler's initial step must not move the LR we set
        for group in opt.param_groups:
            group["lr"] = t.learning_rate * t.lr_decay ** (start_epoch - 1)

    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [local_rank] if use_cuda else None
        net_g = DDP(net_g, device_ids=ids)
        net_d = DDP(net_d, device_ids=ids)
    net_g.train()
    net_d.train()

    if is_main:
        tlog("init: %s; epochs %d..%d, %d steps/epoch, batch %d x %d, precision %s, device %s",
             json.dumps(init_info, default=str), start_epoch, t.epochs, steps_per_epoch, job.batch_size,
             world, precision, device)
        if reporter is not None:
            reporter.event("train_start", start_epoch=start_epoch, epochs=t.epochs, global_step=global_step,
                           steps_per_epoch=steps_per_epoch, batch_size=job.batch_size, world_size=world,
                           precision=precision, device=str(device), **init_info)

    hist: dict[str, list[float]] = {k: list(history.get(k, [])) for k in
                                    ("epoch", "loss_mel", "loss_g", "loss_d", "ema_loss_mel", "ema_loss_g",
                                     "ema_loss_d")}
    nonfinite_total = 0
    streak = 0
    saved: list[str] = []
    last_event = 0.0
    gpu_cache: list[tuple[torch.Tensor, ...]] = []
    cache_gpu = t.cache_data_in_gpu and use_cuda
    st = GanStep(net_g, net_d, optim_g, optim_d, scaler, cfg, f0, amp_dtype, world)
    epoch = start_epoch - 1
    last_saved_epoch = None

    for epoch in range(start_epoch, t.epochs + 1):
        t_epoch = time.time()
        sampler.set_epoch(epoch)
        if cache_gpu and gpu_cache:
            import random

            random.Random(epoch).shuffle(gpu_cache)
            source: Iterable[Any] = list(gpu_cache)
        else:
            source = loader
        sums = dict.fromkeys(("loss_g", "loss_d", "loss_mel", "loss_kl", "loss_fm"), 0.0)
        n_ok = 0
        it: Iterable[Any] = source
        if is_main and reporter is not None:
            it = reporter.bar(source, total=steps_per_epoch, desc=f"epoch {epoch}/{t.epochs}", unit="step")
        step_in_epoch = 0
        for batch in it:
            step_in_epoch += 1
            batch = tuple(x.to(device, non_blocking=True) for x in batch)
            if cache_gpu and epoch == start_epoch:
                gpu_cache.append(batch)
            global_step += 1
            ok_d, ok_g, vals = gan_step(st, batch, global_step)
            lg, gng, ld, gnd, lm, lk, lf = vals
            if ok_d and ok_g:
                streak = 0
                n_ok += 1
                for k, v in zip(("loss_g", "loss_d", "loss_mel", "loss_kl", "loss_fm"), (lg, ld, lm, lk, lf)):
                    sums[k] += v
            else:
                streak += 1
                nonfinite_total += 1
                if is_main:
                    tlog("step %d: non-finite loss/gradient (loss_g %s, loss_d %s), update skipped "
                         "(%d in a row)", global_step, lg, ld, streak)
                    if reporter is not None:
                        reporter.event("nonfinite_step", epoch=epoch, global_step=global_step, streak=streak)
                if streak >= MAX_NONFINITE_STREAK:
                    raise StepFailed(
                        f"training diverged: {streak} consecutive steps with NaN/inf loss or gradients "
                        f"(epoch {epoch}, step {global_step}). The last good checkpoint was kept. Try a "
                        f"lower spec.train.learningRate or spec.train.precision: fp32."
                    )
            now = time.time()
            if is_main and reporter is not None and (
                    global_step <= LOG_FIRST_STEPS or global_step % LOG_EVERY_STEPS == 0
                    or now - last_event >= LOG_EVERY_SECONDS):
                last_event = now
                reporter.event("train_step", epoch=epoch, global_step=global_step, loss_g=_r(lg),
                               loss_d=_r(ld), loss_mel=_r(lm), loss_kl=_r(lk), loss_fm=_r(lf),
                               lr=optim_g.param_groups[0]["lr"], grad_norm_g=_r(gng), grad_norm_d=_r(gnd))
            if step_in_epoch >= steps_per_epoch:
                break

        lr_now = optim_g.param_groups[0]["lr"]
        sched_g.step()
        sched_d.step()
        seconds = time.time() - t_epoch
        avg = {k: (v / n_ok if n_ok else float("nan")) for k, v in sums.items()}
        if is_main:
            hist["epoch"].append(epoch)
            for k in ("loss_mel", "loss_g", "loss_d"):
                hist["ema_" + k].append(_ema(hist["ema_" + k], avg[k]) if math.isfinite(avg[k]) else
                                        (hist["ema_" + k][-1] if hist["ema_" + k] else float("nan")))
                hist[k].append(avg[k])
            tlog("====> Epoch: %d [%d steps, %.1f s] loss_g %.3f loss_d %.3f mel %.3f kl %.3f fm %.3f "
                 "lr %.3g", epoch, step_in_epoch, seconds, avg["loss_g"], avg["loss_d"], avg["loss_mel"],
                 avg["loss_kl"], avg["loss_fm"], lr_now)
            if reporter is not None:
                reporter.event("epoch", epoch=epoch, epochs=t.epochs, seconds=round(seconds, 3),
                               steps=step_in_epoch, global_step=global_step, lr=lr_now,
                               **{f"avg_{k}": _r(v) for k, v in avg.items()},
                               ema_loss_mel=_r(hist["ema_loss_mel"][-1]),
                               ema_loss_g=_r(hist["ema_loss_g"][-1]))
            if epoch % t.save_every_epoch == 0 or epoch == t.epochs:
                saved += _save(job, ctx, net_g, net_d, optim_g, optim_d, scaler, epoch, global_step, hist,
                               tlog)
                last_saved_epoch = epoch
            if ctx is not None:
                ctx.push("progress.jsonl")
                ctx.push("train.log")
        if world > 1:
            import torch.distributed as dist

            dist.barrier()

    summary: dict[str, Any] = {}
    if is_main:
        final = exp_dir / "weights" / f"{name}.pth"
        info = f"{max(epoch, start_epoch - 1)}epoch"
        if plan.random_weights:
            info = f"DEMO random init - not a real voice; {info}"
        _export(job, net_g, cfg, final, info, max(epoch, start_epoch - 1), global_step)
        if ctx is not None:
            ctx.push_file(final)
        tlog("exported %s (%s)", final, info)
        summary = {
            "epochs": t.epochs, "start_epoch": start_epoch, "last_epoch": max(epoch, start_epoch - 1),
            "global_step": global_step, "steps_per_epoch": steps_per_epoch, "batch_size": job.batch_size,
            "world_size": world, "precision": precision, "device": str(device),
            "nonfinite_steps": nonfinite_total, "checkpoints": saved, "last_saved_epoch": last_saved_epoch,
            "model": str(final.relative_to(exp_dir)), "info": info, "mute_features": job.mute_features,
            "random_weights": bool(plan.random_weights), **init_info,
            "history": {k: [_r(x) for x in v] for k, v in hist.items()},
            "overtraining_note": "history.ema_* are EMA(0.987)-smoothed per-epoch loss averages; a rising "
                                 "ema_loss_mel over many epochs suggests over-training",
        }
        out = exp_dir / "train_summary.json"
        out.write_text(json.dumps(summary, indent=1, default=str))
        if ctx is not None:
            ctx.push_file(out)
            ctx.push("train.log")
            ctx.push("config.json")
            ctx.push("filelist.txt")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return summary


def _r(x: float) -> float | None:
    return round(float(x), 6) if math.isfinite(x) else None


def _all_finite(values: torch.Tensor, world: int) -> bool:
    flag = torch.isfinite(values).all().float()
    if world > 1:
        import torch.distributed as dist

        flag = flag.to(values.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _check_d_loaded(info: dict[str, Any], path: str) -> None:
    skipped = info.get("skipped_keys") or []
    if skipped:
        raise ck.CheckpointIncompatible(
            f"discriminator checkpoint {path}: {len(skipped)} keys missing or mis-shaped "
            f"(e.g. {skipped[0]}); it is a discriminator of another version"
        )


def _load_pretrained_d(net_d: torch.nn.Module, spec: Any, version: str, sr_key: str, f0: bool) -> None:
    p = _pretrained_d(spec)
    if p is None:
        log.warning("train: no discriminator checkpoint; the discriminator starts from random weights")
        return
    sd = ck.read_checkpoint(p)["model"]
    ck.check_model_compat(sd, net_d, version, sr_key, f0, f"pretrained discriminator {p}", "D")
    ck.load_into(net_d, sd, strict=True, what=f"pretrained discriminator {p}")


def _export(job: TrainJob, net_g: torch.nn.Module, cfg: Any, path: Path, info: str, epoch: int,
            step: int) -> None:
    from .export import export_small_model

    spec = job.experiment.spec
    sd = ck.legacy_state_dict(net_g)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_small_model(sd, cfg, spec.model.version, spec.model.pitch_guidance, path, info,
                       extra={"epoch": epoch, "step": step, "model_name": job.experiment.name})


def _save(job: TrainJob, ctx: StepContext | None, net_g: Any, net_d: Any, optim_g: Any, optim_d: Any,
          scaler: Any, epoch: int, global_step: int, hist: dict[str, list[float]],
          tlog: Callable[..., None]) -> list[str]:
    spec = job.experiment.spec
    exp_dir = _exp_dir(job)
    num = ck.LATEST_ONLY_STEP if spec.train.save_latest_only else global_step
    common = {"global_step": global_step, "scaler": scaler.state_dict() if scaler.is_enabled() else None,
              "version": spec.model.version, "sr": spec.model.sample_rate,
              "f0": int(spec.model.pitch_guidance), "random_weights": bool(job.init.random_weights)}
    d_path = exp_dir / f"D_{num}.pth"
    g_path = exp_dir / f"G_{num}.pth"
    # D first, then G: resume looks for G files, so a G always has its D beside it.
    ck.save_checkpoint(d_path, net_d, optim_d, spec.train.learning_rate, epoch, common)
    ck.save_checkpoint(g_path, net_g, optim_g, spec.train.learning_rate, epoch,
                       {**common, "history": {k: list(v) for k, v in hist.items()}})
    tlog("saving checkpoints %s, %s (epoch %d, step %d)", g_path.name, d_path.name, epoch, global_step)
    if ctx is not None:
        ctx.push_file(d_path)
        ctx.push_file(g_path)
    out = [g_path.name, d_path.name]
    if spec.train.save_every_weights:
        from .models.config import RVCConfig

        w = exp_dir / "weights" / f"{job.experiment.name}_e{epoch}_s{global_step}.pth"
        info = f"{epoch}epoch"
        if job.init.random_weights:
            info = f"DEMO random init - not a real voice; {info}"
        _export(job, net_g, RVCConfig.from_json(job.config), w, info, epoch, global_step)
        if ctx is not None:
            ctx.push_file(w)
        out.append(f"weights/{w.name}")
    if ctx is not None:
        ctx.reporter.event("checkpoint", epoch=epoch, global_step=global_step, files=out)
    return out
