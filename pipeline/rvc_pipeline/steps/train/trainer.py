"""The GAN training loop (RVC's recipe), one `Trainer` per rank.

AdamW(lr, betas (0.8, 0.99), eps 1e-9, weight_decay 0.01 - torch's default, as RVC), ExponentialLR(lr_decay)
stepped per epoch, LSGAN D loss, G loss = adv + 2*fm + 45*mel + KL, no gradient clipping (norms are only
logged). Deliberate differences, each for a user problem:

* Precision: `auto` = bf16 autocast on CUDA GPUs that support it, fp16 + GradScaler on other GPUs, fp32
  on CPU. The mel of y_hat and every loss are computed in fp32 in every mode. TF32 is enabled on CUDA.
* A non-finite loss or gradient norm skips that step's update (counted in the summary); 20 consecutive
  ones stop training with StepFailed, without overwriting the last good checkpoint.
* Progress from the first step: `train_step` events (steps 1..10, then every 50 steps or 30 s), one
  `epoch` event per epoch with the loss averages, progress.jsonl pushed to storage after every epoch, a
  tqdm bar per epoch. Over-training aid: per-epoch averages and EMA-smoothed (0.987) histories of the
  mel and G losses in train_summary.json (no early stopping).
* Preemption costs at most one step: the epoch loop runs inside core.termination.graceful(), so SIGTERM
  only sets a flag; after the step it came in, rank 0 writes and uploads a resumable pair
  (saving.save_resumable: the position inside the epoch, partial loss sums, RNG state), a `preempted`
  event, and every rank raises termination.Preempted (exit 143). The next run continues that epoch after
  those steps (state.EpochPosition; the sampler skips the batches done) at the same LR.

Rank 0 does all I/O (logs, checkpoints, uploads, export). Test seams are `TrainHooks`, given to the
constructor (never module globals), so that spawned workers receive them too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.profiler import record_function

from rvc_pipeline.core import layout, termination
from rvc_pipeline.core.errors import StepFailed
from rvc_pipeline.core.fileio import cpu_bf16_supported, pick_device
from rvc_pipeline.core.heap import keep_freed_memory
from rvc_pipeline.data import DistributedBucketSampler, TextAudioCollate, TextAudioDataset
from rvc_pipeline.losses import discriminator_loss, feature_loss, generator_loss, kl_loss, mel_loss
from rvc_pipeline.mel import mel_spectrogram, spec_to_mel
from rvc_pipeline.steps.runner import StepContext
from rvc_pipeline.steps.train import judging, saving
from rvc_pipeline.steps.train.state import (
    EpochPosition,
    Nets,
    Start,
    TrainJob,
    apply_plan,
    lr_schedules,
    restore_rng,
    rng_state,
)

log = logging.getLogger("rvc_pipeline")

MAX_NONFINITE_STREAK = 20
EMA_SMOOTHING = 0.987
LOG_FIRST_STEPS = 10
LOG_EVERY_STEPS = 50
LOG_EVERY_SECONDS = 30.0
LOSS_KEYS = ("loss_g", "loss_d", "loss_mel", "loss_kl", "loss_fm")
HISTORY_KEYS = ("epoch", "loss_mel", "loss_g", "loss_d", "ema_loss_mel", "ema_loss_g", "ema_loss_d")

LossHook = Callable[[int, str, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class TrainHooks:
    """Seams for tests (picklable when the callables are module-level).

    discriminator_factory(version) builds D instead of RVC's (71 M parameters, 0.9 GB per checkpoint
    with AdamW state); loss_hook(global_step, "d" | "g", loss) -> loss runs right after that loss is
    computed (e.g. to inject NaN); max_nonfinite_streak is the run of skipped steps that stops training."""

    discriminator_factory: Callable[[str], torch.nn.Module] | None = None
    loss_hook: LossHook | None = None
    max_nonfinite_streak: int = MAX_NONFINITE_STREAK


# ------------------------------------------------------------------------------------- small helpers
def pick_precision(requested: str, device: torch.device) -> str:
    """train.precision on `device`. A CPU trains in fp32 (RVC's), or in bf16 autocast when asked and the
    CPU has native bf16 (fileio.cpu_bf16_supported: about 1.7x faster, bench/bench_train.py)."""
    if device.type != "cuda":
        if requested == "fp16":
            log.warning("train: fp16 is not used on CPU; training in fp32")
            return "fp32"
        if requested == "bf16" and not cpu_bf16_supported():
            log.warning("train: this CPU has no native bf16 (AVX512-BF16 or AMX); training in fp32")
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


def _all_finite(values: torch.Tensor, world: int) -> bool:
    flag = torch.isfinite(values).all().float()
    if world > 1:
        import torch.distributed as dist

        flag = flag.to(values.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class TrainLog:
    """train.log lines in RVC's layout (rank 0 only: path None elsewhere), mirrored to the logger."""

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


def _r(x: float) -> float | None:
    return round(float(x), 6) if math.isfinite(x) else None


def build_models(cfg: Any, version: str, f0: bool, device: torch.device,
                 discriminator_factory: Callable[[str], torch.nn.Module] | None = None) -> tuple[Any, Any]:
    """G from the experiment's config.json (RVC builds it from there too), RVC's D for the version."""
    from rvc_pipeline.nn import build_discriminator, build_generator

    net_g = build_generator(cfg, version, f0, spk_embed_dim=cfg.model.spk_embed_dim).to(device)
    net_d = (discriminator_factory or build_discriminator)(version).to(device)
    return net_g, net_d


# ------------------------------------------------------------------------------------- one iteration
@dataclasses.dataclass
class GanStep:
    """One RVC training iteration: D update, then G update, shared GradScaler."""

    net_g: torch.nn.Module
    net_d: torch.nn.Module
    optim_g: torch.optim.Optimizer
    optim_d: torch.optim.Optimizer
    scaler: Any
    cfg: Any
    f0: bool
    amp_dtype: torch.dtype | None = None
    world: int = 1
    loss_hook: LossHook | None = None

    def _amp(self, device: torch.device) -> Any:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.amp_dtype)

    def _hook(self, global_step: int, which: str, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.loss_hook is None else self.loss_hook(global_step, which, loss)

    def __call__(self, batch: tuple[torch.Tensor, ...], global_step: int) -> tuple[bool, bool, list[float]]:
        return gan_step(self, batch, global_step)


def _generate(st: GanStep, batch: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    """G forward, the mels and the real segment: (y_hat, y_mel, y_hat_mel, wave_seg, (z_p, m_p, logs_p,
    logs_q, z_mask))."""
    from rvc_pipeline.nn.commons import slice_segments

    cfg = st.cfg
    hop, seg, seg_frames = cfg.hop_length, cfg.segment_size, cfg.segment_frames
    mel_args = dict(n_fft=cfg.filter_length, num_mels=cfg.n_mel_channels, sampling_rate=cfg.sampling_rate,
                    fmin=cfg.data.mel_fmin, fmax=cfg.data.mel_fmax)
    if st.f0:
        phone, phone_len, pitch, pitchf, spec_b, spec_len, wave, _wave_len, sid = batch
        out = st.net_g(phone, phone_len, pitch, pitchf, spec_b, spec_len, sid)
    else:
        phone, phone_len, spec_b, spec_len, wave, _wave_len, sid = batch
        out = st.net_g(phone, phone_len, spec_b, spec_len, sid)
    y_hat, ids_slice, _x_mask, z_mask, (_z, z_p, m_p, logs_p, _m_q, logs_q) = out
    mel = spec_to_mel(spec_b, **mel_args)  # fp32 inside
    y_mel = slice_segments(mel, ids_slice, seg_frames)
    y_hat_mel = mel_spectrogram(y_hat.float().squeeze(1), hop_size=hop, win_size=cfg.win_length, **mel_args)
    wave_seg = slice_segments(wave, ids_slice * hop, seg)
    return y_hat, y_mel, y_hat_mel, wave_seg, (z_p, m_p, logs_p, logs_q, z_mask)


def optimizer_flags(device: torch.device) -> dict[str, bool]:
    """AdamW's multi-tensor update: fused on CUDA, foreach on CPU (the same update, one pass over the
    parameters instead of a Python loop of ~10 ops per tensor)."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def _d_for_generator(net_d: torch.nn.Module, wave_seg: torch.Tensor, y_hat: torch.Tensor) -> Any:
    """D(real, fake) for G's losses with D's parameters frozen during the forward pass.

    G's gradients are unchanged; backward no longer computes D's weight gradients (RVC computes and
    then discards them: optim_d.zero_grad() comes before D's next backward) nor the gradient of the
    real half, which now records no graph. Under DDP the bare module runs, so nothing is all-reduced."""
    from torch.nn.parallel import DistributedDataParallel

    d = net_d.module if isinstance(net_d, DistributedDataParallel) else net_d
    params = [p for p in d.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        return d(wave_seg, y_hat)
    finally:
        for p in params:
            p.requires_grad_(True)


def gan_step(
    st: GanStep, batch: tuple[torch.Tensor, ...], global_step: int,
) -> tuple[bool, bool, list[float]]:
    """Run one iteration on a collated batch already on the device.

    Returns (D updated, G updated, [loss_g, grad_norm_g, loss_d, grad_norm_d, loss_mel, loss_kl, loss_fm]).
    An update is skipped when its loss or gradient norm is not finite."""
    device = batch[0].device
    with st._amp(device), record_function("g_forward"):
        gen = _generate(st, batch)
    with record_function("d_step"):
        with st._amp(device):
            d_real, d_fake, _, _ = st.net_d(gen[3], gen[0].detach())
        loss_d, _, _ = discriminator_loss(d_real, d_fake)
        loss_d = st._hook(global_step, "d", loss_d)
        gn_d = _backward(st.scaler, st.optim_d, loss_d, st.net_d).to(device)
        ok_d = _all_finite(torch.stack([loss_d.detach(), gn_d]), st.world)
        if ok_d:
            st.scaler.step(st.optim_d)
    with record_function("g_step"):
        ok_g, vals = _g_update(st, global_step, gen)
    vals = torch.cat([vals[:2], torch.stack([loss_d.detach().float(), gn_d.float()]), vals[2:]])
    return ok_d, ok_g, vals.cpu().tolist()


def _g_update(st: GanStep, global_step: int, gen: tuple[Any, ...]) -> tuple[bool, torch.Tensor]:
    """G's losses (`gen` from _generate), backward and update: (updated, [loss_g, grad_norm_g, loss_mel,
    loss_kl, loss_fm])."""
    y_hat, y_mel, y_hat_mel, wave_seg, (z_p, m_p, logs_p, logs_q, z_mask) = gen
    with st._amp(y_hat.device):
        _, d_fake_g, fmap_r, fmap_g = _d_for_generator(st.net_d, wave_seg, y_hat)
    l_mel = mel_loss(y_mel, y_hat_mel, st.cfg.train.c_mel)
    l_kl = kl_loss(z_p, logs_q, m_p, logs_p, z_mask) * st.cfg.train.c_kl
    l_fm = feature_loss(fmap_r, fmap_g)
    l_gen, _ = generator_loss(d_fake_g)
    loss_g = st._hook(global_step, "g", l_gen + l_fm + l_mel + l_kl)
    gn_g = _backward(st.scaler, st.optim_g, loss_g, st.net_g).to(y_hat.device)
    vals = torch.stack([loss_g.detach(), gn_g, l_mel.detach(), l_kl.detach(), l_fm.detach()]).float()
    ok_g = _all_finite(vals[:2], st.world)
    if ok_g:
        st.scaler.step(st.optim_g)
    st.scaler.update()
    return ok_g, vals


# ------------------------------------------------------------------------------------- the trainer
@dataclasses.dataclass
class EpochTotals:
    sums: dict[str, float]
    ok_steps: int = 0
    steps: int = 0
    started: float = 0.0  # time.time() of the epoch's start (a resumed epoch: less the seconds done before)
    stopped: bool = False  # left between two steps because SIGTERM came


class Trainer:
    """One rank's training run: `Trainer(job, ...).fit()` -> the summary (empty on ranks > 0)."""

    def __init__(self, job: TrainJob, rank: int = 0, world: int = 1, local_rank: int = 0,
                 ctx: StepContext | None = None, hooks: TrainHooks | None = None) -> None:
        from rvc_pipeline.nn.config import RVCConfig

        self.job, self.rank, self.world, self.local_rank, self.ctx = job, rank, world, local_rank, ctx
        self.hooks = hooks or TrainHooks()
        self.spec = job.experiment.spec
        self.t = self.spec.train
        self.cfg = RVCConfig.from_json(job.config)
        self.is_main = rank == 0
        self.reporter = ctx.reporter if ctx is not None else None
        self.tlog = TrainLog(job.exp_dir / layout.TRAIN_LOG_FILE if self.is_main else None)
        self.use_cuda = pick_device("gpu" if self.spec.gpu else "cpu", what="train") == "cuda"
        self.device = torch.device(f"cuda:{local_rank}" if self.use_cuda else "cpu")
        self.precision = pick_precision(self.t.precision, self.device)
        self.hist: dict[str, list[float]] = {k: [] for k in HISTORY_KEYS}
        self.nonfinite_total = self.streak = 0
        self.saved: list[str] = []
        self.last_pair: list[str] = []  # the G/D names of the last epoch save
        self.last_event = 0.0
        self.last_saved_epoch: int | None = None
        self.gpu_cache: list[tuple[torch.Tensor, ...]] = []
        self.judge: Any = None  # evaluation.judge.Judge on the primary process when evaluation is on
        self.stop_early = False
        self.resume_rng: dict[str, Any] | None = None  # a preemption save's RNG, set once before training

    # --- set-up
    def _setup_process(self) -> None:
        if self.use_cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        else:
            torch.set_num_threads(max(1, self.job.threads))
        keep_freed_memory()  # no page faults for the same activations every step (core.heap)
        if self.world > 1:
            import torch.distributed as dist

            backend = "nccl" if self.use_cuda else "gloo"
            dist.init_process_group(backend, rank=self.rank, world_size=self.world)
        torch.manual_seed(self.t.seed + self.rank)

    def _setup_data(self) -> None:
        cfg, job, workers = self.cfg, self.job, self.t.data_workers
        dataset = TextAudioDataset(Path(job.filelist), f0=self.spec.model.pitch_guidance,
                                   sampling_rate=cfg.sampling_rate, filter_length=cfg.filter_length,
                                   hop_length=cfg.hop_length, win_length=cfg.win_length)
        self.sampler = DistributedBucketSampler(dataset.lengths, job.batch_size, num_replicas=self.world,
                                                rank=self.rank)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self.sampler, num_workers=workers,
            collate_fn=TextAudioCollate(self.spec.model.pitch_guidance), pin_memory=self.use_cuda,
            persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        )
        steps = len(self.sampler)
        if self.t.max_steps_per_epoch is not None:
            steps = min(steps, self.t.max_steps_per_epoch)
        if steps == 0:
            raise StepFailed(f"{job.filelist}: the sampler yields no batch (items {len(dataset)}, batch "
                             f"{job.batch_size}); too little usable data")
        self.steps_per_epoch = steps

    def _setup_models(self) -> None:
        m, t, cfg = self.spec.model, self.t, self.cfg
        net_g, net_d = build_models(cfg, m.version, m.pitch_guidance, self.device,
                                    self.hooks.discriminator_factory)
        b1, b2 = cfg.train.betas
        betas = (float(b1), float(b2))
        flags, lr, eps = optimizer_flags(self.device), t.learning_rate, cfg.train.eps
        optim_g = torch.optim.AdamW(net_g.parameters(), lr=lr, betas=betas, eps=eps, **flags)
        optim_d = torch.optim.AdamW(net_d.parameters(), lr=lr, betas=betas, eps=eps, **flags)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.nets = Nets(net_g, net_d, optim_g, optim_d, scaler)
        self.start: Start = apply_plan(self.job, self.nets, self.steps_per_epoch)
        for group in (g for o in (optim_g, optim_d) for g in o.param_groups):
            group.update(flags)  # a loaded optimizer state brings its own flags
        self.global_step = self.start.global_step
        for k in HISTORY_KEYS:
            self.hist[k] = list(self.start.history.get(k, []))
        self.scheds = lr_schedules((optim_g, optim_d), t.learning_rate, t.lr_decay, self.start.epoch)
        self.resume_rng = self.start.rng if self.is_main else None  # (it is rank 0's)
        # the GPU cache is filled by the first WHOLE epoch (a resumed one skips its first batches)
        self.cache_epoch = self.start.epoch + (1 if self.start.position is not None else 0)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.local_rank] if self.use_cuda else None
            net_g, net_d = DDP(net_g, device_ids=ids), DDP(net_d, device_ids=ids)
        net_g.train()
        net_d.train()
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.step_fn = GanStep(net_g, net_d, optim_g, optim_d, scaler, cfg, m.pitch_guidance, amp_dtype,
                               self.world, self.hooks.loss_hook)
        if self.is_main:
            self.judge = judging.setup(self.job, self.nets.net_g, self.device)

    def _announce(self) -> None:
        if not self.is_main:
            return
        s, t = self.start, self.t
        self.tlog("init: %s; epochs %d..%d (from step %d of epoch %d), %d steps/epoch, batch %d x %d, "
                  "precision %s, device %s", json.dumps(s.info, default=str), s.epoch, t.epochs, s.epoch_step,
                  s.epoch, self.steps_per_epoch, self.job.batch_size, self.world, self.precision, self.device)
        if self.reporter is not None:
            self.reporter.event("train_start", start_epoch=s.epoch, start_epoch_step=s.epoch_step,
                                epochs=t.epochs, global_step=s.global_step,
                                steps_per_epoch=self.steps_per_epoch, batch_size=self.job.batch_size,
                                world_size=self.world, precision=self.precision, device=str(self.device),
                                **s.info)

    # --- the loop
    def fit(self) -> dict[str, Any]:
        self._setup_process()
        self._setup_data()
        self._setup_models()
        self._announce()
        with termination.graceful():  # SIGTERM: finish the step, save, upload, raise Preempted (_preempt)
            last_epoch = self._epochs()
        summary = self._finish(last_epoch) if self.is_main else {}
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
        return summary

    def _epochs(self) -> int:
        """The epoch loop; returns the last epoch trained (start - 1 when none was left)."""
        epoch = self.start.epoch - 1
        for epoch in range(self.start.epoch, self.t.epochs + 1):
            totals = self._train_epoch(epoch)
            if totals.stopped:  # between two steps
                self._preempt(epoch, totals)
            self._end_epoch(epoch, totals, time.time() - totals.started)
            if self.stop_early:
                self.tlog("early stop after epoch %d: %d evaluations without a better score (best: epoch %s)",
                          epoch, self.spec.eval.patience, self.judge.best.epoch if self.judge else "?")
                break
            if epoch < self.t.epochs and self._stop_requested():  # (after the last one: finish, it is quick)
                self._preempt(epoch, None)
        return max(epoch, self.start.epoch - 1)

    def _batches(self, epoch: int, skip: int) -> Iterable[Any]:
        self.sampler.set_epoch(epoch, skip)  # a resumed epoch: its first `skip` batches are never loaded
        source: Iterable[Any] = self.loader
        if self.use_cuda and self.t.cache_data_in_gpu and self.gpu_cache:
            random.Random(epoch).shuffle(self.gpu_cache)
            source = list(self.gpu_cache)
        if self.is_main and self.reporter is not None:
            desc = f"epoch {epoch}/{self.t.epochs}"
            return self.reporter.bar(source, total=self.steps_per_epoch - skip, desc=desc, unit="step")
        return source

    def _epoch_totals(self, epoch: int) -> EpochTotals:
        """Fresh totals, or those of the steps a preempted run trained of this epoch."""
        pos = self.start.position
        if pos is None or pos.epoch != epoch:
            return EpochTotals(dict.fromkeys(LOSS_KEYS, 0.0), started=time.time())
        sums = {k: float(pos.sums.get(k, 0.0)) for k in LOSS_KEYS}
        return EpochTotals(sums, pos.ok_steps, pos.epoch_step, time.time() - pos.seconds)

    def _train_epoch(self, epoch: int) -> EpochTotals:
        """Train the epoch's (remaining) steps; stops early, between two steps, when SIGTERM came."""
        totals = self._epoch_totals(epoch)
        if totals.steps == 0:  # a resume at an epoch's start: before the loader draws its seed
            self._restore_rng()
        fill_cache = self.use_cuda and self.t.cache_data_in_gpu and epoch == self.cache_epoch
        for batch in self._batches(epoch, totals.steps):
            totals.steps += 1
            batch = tuple(x.to(self.device, non_blocking=True) for x in batch)
            if fill_cache:
                self.gpu_cache.append(batch)
            self._restore_rng()  # (mid-epoch: after the loader drew its seed, as in the uninterrupted run)
            self.global_step += 1
            ok_d, ok_g, vals = self.step_fn(batch, self.global_step)
            self._account(epoch, ok_d and ok_g, vals, totals)
            self._step_event(epoch, vals, totals.steps)
            if totals.steps >= self.steps_per_epoch:
                break
            if self._stop_requested():
                totals.stopped = True
                break
        return totals

    def _restore_rng(self) -> None:
        if self.resume_rng is not None:
            restore_rng(self.resume_rng, self.device)
            self.resume_rng = None

    def _stop_requested(self) -> bool:
        """SIGTERM reached this process, or (DDP) any rank: every rank gets the same answer."""
        flag = termination.requested()
        if self.world <= 1:
            return flag  # a Python flag: no device sync in the loop
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _account(self, epoch: int, ok: bool, vals: list[float], totals: EpochTotals) -> None:
        lg, _gng, ld, _gnd, lm, lk, lf = vals
        if ok:
            self.streak = 0
            totals.ok_steps += 1
            for k, v in zip(LOSS_KEYS, (lg, ld, lm, lk, lf)):
                totals.sums[k] += v
            return
        self.streak += 1
        self.nonfinite_total += 1
        if self.is_main:
            self.tlog("step %d: non-finite loss/gradient (loss_g %s, loss_d %s), update skipped "
                      "(%d in a row)", self.global_step, lg, ld, self.streak)
            if self.reporter is not None:
                self.reporter.event("nonfinite_step", epoch=epoch, global_step=self.global_step,
                                    streak=self.streak)
        if self.streak >= self.hooks.max_nonfinite_streak:
            raise StepFailed(
                f"training diverged: {self.streak} consecutive steps with NaN/inf loss or gradients "
                f"(epoch {epoch}, step {self.global_step}). The last good checkpoint was kept. Try a "
                f"lower spec.train.learningRate or spec.train.precision: fp32."
            )

    def _step_event(self, epoch: int, vals: list[float], epoch_step: int) -> None:
        now, step = time.time(), self.global_step
        if not (self.is_main and self.reporter is not None):
            return
        due = step <= LOG_FIRST_STEPS or step % LOG_EVERY_STEPS == 0
        if not (due or now - self.last_event >= LOG_EVERY_SECONDS):
            return
        self.last_event = now
        lg, gng, ld, gnd, lm, lk, lf = vals
        log.info("train: step %d (epoch %d, %d/%d) loss_g %.3f loss_d %.3f mel %.3f", step, epoch, epoch_step,
                 self.steps_per_epoch, lg, ld, lm)
        self.reporter.event("train_step", epoch=epoch, global_step=step, loss_g=_r(lg), loss_d=_r(ld),
                            loss_mel=_r(lm), loss_kl=_r(lk), loss_fm=_r(lf),
                            lr=self.nets.optim_g.param_groups[0]["lr"], grad_norm_g=_r(gng),
                            grad_norm_d=_r(gnd))

    def _end_epoch(self, epoch: int, totals: EpochTotals, seconds: float) -> None:
        lr_now = self.nets.optim_g.param_groups[0]["lr"]
        for sched in self.scheds:
            sched.step()
        if self.is_main:
            n = totals.ok_steps
            avg = {k: (v / n if n else float("nan")) for k, v in totals.sums.items()}
            self._record_epoch(epoch, totals.steps, avg, lr_now, seconds)
            if epoch % self.t.save_every_epoch == 0 or epoch == self.t.epochs:
                self._save(epoch)
            if self.ctx is not None:
                self.ctx.push(layout.PROGRESS_FILE)
                self.ctx.push(layout.TRAIN_LOG_FILE)
        saved_now = epoch % self.t.save_every_epoch == 0 or epoch == self.t.epochs
        if saved_now and self.spec.eval.patience:
            self.stop_early = judging.agree(self.stop_early, self.world, self.device)
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _record_epoch(self, epoch: int, steps: int, avg: dict[str, float], lr_now: float,
                      seconds: float) -> None:
        hist = self.hist
        hist["epoch"].append(epoch)
        for k in ("loss_mel", "loss_g", "loss_d"):
            ema = hist["ema_" + k]
            ema.append(_ema(ema, avg[k]) if math.isfinite(avg[k]) else (ema[-1] if ema else float("nan")))
            hist[k].append(avg[k])
        self.tlog("====> Epoch: %d [%d steps, %.1f s] loss_g %.3f loss_d %.3f mel %.3f kl %.3f fm %.3f "
                  "lr %.3g",
                  epoch, steps, seconds, avg["loss_g"], avg["loss_d"], avg["loss_mel"], avg["loss_kl"],
                  avg["loss_fm"], lr_now)
        if self.reporter is not None:
            self.reporter.event("epoch", epoch=epoch, epochs=self.t.epochs, seconds=round(seconds, 3),
                                steps=steps, global_step=self.global_step, lr=lr_now,
                                **{f"avg_{k}": _r(v) for k, v in avg.items()},
                                ema_loss_mel=_r(hist["ema_loss_mel"][-1]),
                                ema_loss_g=_r(hist["ema_loss_g"][-1]))

    def _save(self, epoch: int) -> None:
        files = saving.save(self.job, self.ctx, self.nets, epoch, self.global_step, self.hist)  # bare modules
        self.tlog("saving checkpoints %s, %s (epoch %d, step %d)", files[0], files[1], epoch,
                  self.global_step)
        self.saved += files
        self.last_saved_epoch = epoch
        self.last_pair = files[:2]
        self._drop_superseded(files)
        if self.judge is not None:
            self.stop_early = judging.after_save(self.judge, self.job, self.ctx, self.nets.net_g, self.cfg,
                                                 epoch, self.global_step, files[0])

    # --- preemption
    def _drop_superseded(self, written: list[str]) -> None:
        """Delete the preemption pair this run resumed from once a newer pair (`written`) is uploaded."""
        old = self.start.preemption_pair
        if old is not None and not set(old) & set(written):
            saving.remove_superseded(self.job, self.ctx, old)
            self.start.preemption_pair = None

    def _preempt(self, epoch: int, totals: EpochTotals | None) -> NoReturn:
        """SIGTERM came: rank 0 saves where training stands (`totals`: inside `epoch`; None: at its end)
        and uploads it; every rank then stops with termination.Preempted (exit 143)."""
        if self.is_main:
            self._save_preempted(epoch, totals)
        if self.world > 1:  # the other ranks wait for the upload: mp.spawn ends every worker when one exits
            import torch.distributed as dist

            dist.barrier()
        raise termination.Preempted(f"preempted (SIGTERM) in epoch {epoch} at step {self.global_step}; its "
                                    "checkpoint is saved, a rerun continues from there")

    def _save_preempted(self, epoch: int, totals: EpochTotals | None) -> None:
        since = termination.seconds_since_request() or 0.0
        t0 = time.monotonic()
        pos = None if totals is None else EpochPosition(
            epoch, totals.steps, self.steps_per_epoch, totals.ok_steps, dict(totals.sums),
            round(time.time() - totals.started, 3))
        if pos is None and self.last_saved_epoch == epoch:  # the epoch's own save is the resume point
            files, written, uploaded = self.last_pair, t0, t0
        else:
            done = epoch if pos is None else epoch - 1
            r = saving.save_resumable(self.job, self.ctx, self.nets, self.global_step, self.hist, done, pos,
                                      rng_state(self.device))
            files, written, uploaded = r.files, r.written_at, r.uploaded_at
            self._drop_superseded(files)
        resume_epoch, epoch_step = (epoch + 1, 0) if pos is None else (epoch, pos.epoch_step)
        to_ckpt, to_upload = round(since + written - t0, 3), round(since + uploaded - t0, 3)
        self.tlog("preempted (SIGTERM): saved %s at step %d (epoch %d, %d of %d steps done); from the "
                  "SIGTERM %.2f s to the step's end, %.2f s to the checkpoint, %.2f s to the upload",
                  ", ".join(files), self.global_step, resume_epoch, epoch_step, self.steps_per_epoch, since,
                  to_ckpt, to_upload)
        if self.reporter is not None:
            self.reporter.event("preempted", epoch=resume_epoch, global_step=self.global_step,
                                epoch_step=epoch_step, steps_per_epoch=self.steps_per_epoch,
                                seconds_to_step_end=round(since, 3), seconds_to_checkpoint=to_ckpt,
                                seconds_to_upload=to_upload, files=files)
        if self.ctx is not None:
            self.ctx.push(layout.PROGRESS_FILE)
            self.ctx.push(layout.TRAIN_LOG_FILE)

    # --- the end
    def _finish(self, last_epoch: int) -> dict[str, Any]:
        job, exp_dir = self.job, self.job.exp_dir
        judged = judging.summary(self.judge)
        if judged:  # weights/<exp>.pth is the best evaluated checkpoint, exported when it was judged
            final = job.exp_dir / layout.exported_model(job.experiment.name)
            info = saving.model_info(job, judged["best"]["epoch"])
            self.tlog("best evaluated checkpoint: epoch %d (%s), exported as %s", judged["best"]["epoch"],
                      judged["best"]["checkpoint"], final)
        else:
            final, info = saving.export_final(job, self.ctx, self.nets.net_g, self.cfg, last_epoch,
                                              self.global_step)
            self.tlog("exported %s (%s)", final, info)
        summary = {
            "epochs": self.t.epochs, "start_epoch": self.start.epoch,
            "start_epoch_step": self.start.epoch_step, "last_epoch": last_epoch,
            "global_step": self.global_step, "steps_per_epoch": self.steps_per_epoch,
            "batch_size": job.batch_size, "world_size": self.world, "precision": self.precision,
            "device": str(self.device), "nonfinite_steps": self.nonfinite_total, "checkpoints": self.saved,
            "last_saved_epoch": self.last_saved_epoch, "model": str(final.relative_to(exp_dir)), "info": info,
            **judged, "mute_features": job.mute_features, "random_weights": bool(job.init.random_weights),
            **self.start.info, "history": {k: [_r(x) for x in v] for k, v in self.hist.items()},
            "overtraining_note": "history.ema_* are EMA(0.987)-smoothed per-epoch loss averages; a rising "
                                 "ema_loss_mel over many epochs suggests over-training",
        }
        saving.write_summary(job, self.ctx, summary)
        return summary
