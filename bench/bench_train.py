"""Seconds per training step (and samples per second) of the RVC v2 40k pitch model, 4 s clips.

CPU, fp32, at each thread count of --threads: our `gan_step`, and with `--rvc-dir DIR` RVC's own step
beside it on the same random batch, interleaved (ours, RVC, ours, RVC, ...), with both medians and the
ratio RVC s/step / ours s/step (> 1: ours is faster). RVC's step is the one of its train.py in fp32:
SynthesizerTrnMs768NSFsid + MultiPeriodDiscriminatorV2, its mel_processing and losses, AdamW, the
GradScaler/autocast calls disabled, `clip_grad_value_(params, None)` for the gradient norms. Both
models start from the same weights (RVC's, loaded into ours) and the same seed, so the first (warm-up)
step's losses must agree: the bench prints their largest relative difference. Each side runs in its own
process, set up as it ships: RVC's as its train.py leaves it (glibc's default malloc), ours as the Trainer
sets up its process (core.heap.keep_freed_memory); the parent only hands out step numbers. On a CPU
with native bf16 (AVX512-BF16 or AMX) a third side runs ours as `train.precision: bf16` makes it (bf16
autocast), with its first-step losses compared to ours in fp32.

DIR holds RVC's `infer/lib/infer_pack/*.py` and `infer/lib/train/{losses,mel_processing}.py` from
RVC-Project/Retrieval-based-Voice-Conversion-WebUI (a folder outside this repository; never vendored).
On CUDA (when available): fp32 vs bf16 (and fp16), peak memory per batch size 1/4/8.

    .venv/bin/python bench/bench_train.py [--steps 3] [--batch 4] [--threads 1,2] [--rvc-dir DIR]
        [--profile N] [--layers] [--cuda-only]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rvc_pipeline.core.fileio import cpu_bf16_supported
from rvc_pipeline.core.heap import keep_freed_memory
from rvc_pipeline.nn import build_discriminator, build_generator, constructor_args, get_config
from rvc_pipeline.steps.train.trainer import GanStep, gan_step, optimizer_flags
from torch.profiler import record_function

KW_ADAMW = dict(lr=1e-4, betas=(0.8, 0.99), eps=1e-9)
SEED = 1234
PHASES = ("g_forward", "d_step", "g_step")


def make_batch(cfg: Any, batch: int, seconds: float, device: torch.device, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    frames = int(seconds * cfg.sampling_rate) // cfg.hop_length
    phone = torch.randn(batch, frames, 768, generator=g)
    pitchf = 100 + 150 * torch.rand(batch, frames, generator=g)
    pitch = torch.clamp((pitchf / 2).round().long(), 1, 255)
    spec = torch.rand(batch, cfg.spec_channels, frames, generator=g)
    wave = 0.1 * torch.randn(batch, 1, frames * cfg.hop_length, generator=g)
    lengths = torch.full((batch,), frames, dtype=torch.long)
    sid = torch.zeros(batch, dtype=torch.long)
    out = (phone, lengths, pitch, pitchf, spec, lengths, wave, lengths * cfg.hop_length, sid)
    return tuple(x.to(device) for x in out)


def setup(device: torch.device, precision: str, weights: tuple[dict, dict] | None = None) -> GanStep:
    """Our step; `weights` = (G, D) state dicts to start from (RVC's: same weights in both benches)."""
    cfg = get_config("v2", "40k")
    torch.manual_seed(0)
    net_g = build_generator(cfg, "v2", True).to(device).train()
    net_d = build_discriminator("v2").to(device).train()
    if weights is not None:
        net_g.load_state_dict(weights[0])
        net_d.load_state_dict(weights[1])
    kw = {**KW_ADAMW, **optimizer_flags(device)}  # as the Trainer builds them
    og, od = torch.optim.AdamW(net_g.parameters(), **kw), torch.optim.AdamW(net_d.parameters(), **kw)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return GanStep(net_g, net_d, og, od, scaler, cfg, True, dtype, 1)


# ------------------------------------------------------------------------------------- RVC's own step
@dataclasses.dataclass
class RvcStep:
    """RVC's classes, losses and mel functions (imported from --rvc-dir) and its optimisers."""

    net_g: torch.nn.Module
    net_d: torch.nn.Module
    optim_g: torch.optim.Optimizer
    optim_d: torch.optim.Optimizer
    cfg: Any
    mods: dict[str, Any]


def rvc_setup(rvc_dir: Path, cfg: Any) -> RvcStep:
    """Import RVC's modules from `rvc_dir` and build its v2 40k f0 G and D as its train.py does."""
    if not (rvc_dir / "infer" / "lib" / "infer_pack" / "models.py").is_file():
        raise SystemExit(f"--rvc-dir {rvc_dir}: no infer/lib/infer_pack/models.py there (RVC's checkout)")
    sys.path.insert(0, str(rvc_dir))
    from infer.lib.infer_pack import commons, models
    from infer.lib.train import losses, mel_processing

    torch.manual_seed(0)
    net_g = models.SynthesizerTrnMs768NSFsid(*constructor_args(cfg), is_half=False).train()
    net_d = models.MultiPeriodDiscriminatorV2(cfg.model.use_spectral_norm).train()
    og = torch.optim.AdamW(net_g.parameters(), **KW_ADAMW)
    od = torch.optim.AdamW(net_d.parameters(), **KW_ADAMW)
    mods = {"commons": commons, "losses": losses, "mel": mel_processing}
    return RvcStep(net_g, net_d, og, od, cfg, mods)


def _rvc_forward(st: RvcStep, batch: tuple) -> tuple:
    """train.py's forward part: G, the mels, the sliced real wave."""
    c, mel, cfg = st.mods["commons"], st.mods["mel"], st.cfg
    d = cfg.data
    phone, phone_lengths, pitch, pitchf, spec, spec_lengths, wave, _wave_lengths, sid = batch
    (y_hat, ids_slice, _x_mask, z_mask, (_z, z_p, m_p, logs_p, _m_q, logs_q)) = st.net_g(
        phone, phone_lengths, pitch, pitchf, spec, spec_lengths, sid)
    y = mel.spec_to_mel_torch(spec, d.filter_length, d.n_mel_channels, d.sampling_rate, d.mel_fmin,
                              d.mel_fmax)
    y_mel = c.slice_segments(y, ids_slice, cfg.train.segment_size // d.hop_length)
    with torch.autocast("cpu", enabled=False):
        y_hat_mel = mel.mel_spectrogram_torch(y_hat.float().squeeze(1), d.filter_length, d.n_mel_channels,
                                              d.sampling_rate, d.hop_length, d.win_length, d.mel_fmin,
                                              d.mel_fmax)
    wave = c.slice_segments(wave, ids_slice * d.hop_length, cfg.train.segment_size)
    return y_hat, y_mel, y_hat_mel, wave, (z_p, m_p, logs_p, logs_q, z_mask)


def rvc_step(st: RvcStep, batch: tuple, scaler: Any) -> list[float]:
    """One iteration exactly as RVC's train.py (fp16_run False); returns [loss_g, loss_d, mel, kl, fm]."""
    c, lo = st.mods["commons"], st.mods["losses"]
    with record_function("g_forward"):  # (the labels only name the phases in --profile's table)
        y_hat, y_mel, y_hat_mel, wave, kl_args = _rvc_forward(st, batch)
    with record_function("d_step"):
        y_d_hat_r, y_d_hat_g, _, _ = st.net_d(wave, y_hat.detach())
        loss_disc, _, _ = lo.discriminator_loss(y_d_hat_r, y_d_hat_g)
        st.optim_d.zero_grad()
        scaler.scale(loss_disc).backward()
        scaler.unscale_(st.optim_d)
        c.clip_grad_value_(st.net_d.parameters(), None)
        scaler.step(st.optim_d)
    with record_function("g_step"):
        loss_g, *parts = _rvc_g_update(st, scaler, y_hat, y_mel, y_hat_mel, wave, kl_args)
    return [loss_g, float(loss_disc.detach()), *parts]


def _rvc_g_update(st: RvcStep, scaler: Any, y_hat: torch.Tensor, y_mel: torch.Tensor,
                  y_hat_mel: torch.Tensor, wave: torch.Tensor, kl_args: tuple) -> list[float]:
    """train.py's generator half: [loss_g, mel, kl, fm]."""
    c, lo, F = st.mods["commons"], st.mods["losses"], torch.nn.functional
    z_p, m_p, logs_p, logs_q, z_mask = kl_args
    y_d_hat_r, y_d_hat_g, fmap_r, fmap_g = st.net_d(wave, y_hat)
    loss_mel = F.l1_loss(y_mel, y_hat_mel) * st.cfg.train.c_mel
    loss_kl = lo.kl_loss(z_p, logs_q, m_p, logs_p, z_mask) * st.cfg.train.c_kl
    loss_fm = lo.feature_loss(fmap_r, fmap_g)
    loss_gen, _ = lo.generator_loss(y_d_hat_g)
    loss_gen_all = loss_gen + loss_fm + loss_mel + loss_kl
    st.optim_g.zero_grad()
    scaler.scale(loss_gen_all).backward()
    scaler.unscale_(st.optim_g)
    c.clip_grad_value_(st.net_g.parameters(), None)
    scaler.step(st.optim_g)
    scaler.update()
    return [float(x.detach()) for x in (loss_gen_all, loss_mel, loss_kl, loss_fm)]


# ------------------------------------------------------------------------------------- timing
def time_steps(st: GanStep, batch: tuple, steps: int, device: torch.device) -> tuple[float, list[float]]:
    """Median seconds of `steps` gan_steps after one warm-up, and the last step's values (gpu_check too)."""
    gan_step(st, batch, 1)  # warm-up (allocations, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times: list[float] = []
    values: list[float] = []
    for i in range(steps):
        t0 = time.perf_counter()
        values = gan_step(st, batch, i + 2)[2]
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), values


def _ours_fn(st: GanStep) -> Callable[[tuple, int], list[float]]:
    def run(batch: tuple, i: int) -> list[float]:
        torch.manual_seed(SEED + i)
        lg, _gng, ld, _gnd, lm, lk, lf = gan_step(st, batch, i)[2]
        return [lg, ld, lm, lk, lf]
    return run


def _rvc_fn(st: RvcStep) -> Callable[[tuple, int], list[float]]:
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def run(batch: tuple, i: int) -> list[float]:
        torch.manual_seed(SEED + i)
        return rvc_step(st, batch, scaler)
    return run


def interleaved(fns: dict[str, Callable[[tuple, int], list[float]]], batch: tuple, steps: int
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """One warm-up step each (its losses returned), then `steps` timed rounds A B A B ..."""
    first = {name: fn(batch, 0) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(steps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(batch, i + 1)
            times[name].append(time.perf_counter() - t0)
    return times, first


def _max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def _side_main(conn: Any, name: str, threads: int, args: argparse.Namespace, weights_file: str) -> None:
    """One side of the CPU bench in its own process: RVC's step in a process as RVC's train.py leaves it,
    ours in one set up as the Trainer sets up its process (core.heap.keep_freed_memory: glibc keeps freed
    activations for the next step). RVC's side writes its initial weights to `weights_file`; ours starts
    from them. Then: receive a step number, run it, send its losses; None ends."""
    torch.set_num_threads(threads)
    cpu, cfg = torch.device("cpu"), get_config("v2", "40k")
    if name == "rvc":
        rvc = rvc_setup(Path(args.rvc_dir), cfg)
        torch.save((rvc.net_g.state_dict(), rvc.net_d.state_dict()), weights_file)
        fn = _rvc_fn(rvc)
    else:  # "ours", or "ours-bf16": train.precision bf16 on a CPU with native bf16
        keep_freed_memory()
        weights = torch.load(weights_file) if os.path.exists(weights_file) else None
        fn = _ours_fn(setup(cpu, "bf16" if name == "ours-bf16" else "fp32", weights))
    batch = make_batch(cfg, args.batch, args.seconds, cpu)
    conn.send("ready")
    while (i := conn.recv()) is not None:
        conn.send(fn(batch, i))


def _start_side(ctx: Any, name: str, threads: int, args: argparse.Namespace, weights_file: str
                ) -> tuple[Any, Callable[[tuple, int], list[float]]]:
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_side_main, args=(child, name, threads, args, weights_file), daemon=True)
    proc.start()
    if parent.recv() != "ready":
        raise SystemExit(f"bench_train: the {name} side did not start")

    def remote(_batch: tuple, i: int) -> list[float]:
        parent.send(i)
        return parent.recv()
    return (parent, proc), remote


def cpu_bench(threads: int, args: argparse.Namespace) -> dict[str, Any]:
    """Our step (and RVC's with --rvc-dir) at `threads`, interleaved on one batch, each in its own process."""
    import multiprocessing
    import tempfile

    ctx = multiprocessing.get_context("spawn")
    sides: list[Any] = []
    fns: dict[str, Callable[[tuple, int], list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights_file = os.path.join(tmp, "rvc_init.pt")
        names = ("rvc",) if args.rvc_dir is not None else ()
        names += ("ours",) + (("ours-bf16",) if cpu_bf16_supported() else ())
        for name in names:
            side, fns[name] = _start_side(ctx, name, threads, args, weights_file)
            sides.append(side)
        fns = {"ours": fns["ours"], **{k: v for k, v in fns.items() if k != "ours"}}
        load_before = os.getloadavg()[0]
        times, first = interleaved(fns, (), args.steps)
        for conn, proc in sides:
            conn.send(None)
            proc.join(60)
    out: dict[str, Any] = {"device": "cpu", "threads": threads, "precision": "fp32", "batch": args.batch,
                           "steps": args.steps, "load_avg_1min": [load_before, os.getloadavg()[0]]}
    return out | _figures(times, first, args.batch)


def _figures(times: dict[str, list[float]], first: dict[str, list[float]], batch: int) -> dict[str, Any]:
    """Medians, samples per second and the ratios (> 1: ours is faster)."""
    out: dict[str, Any] = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[f"{name}_s_per_step"] = round(med, 3)
        out[f"{name}_samples_per_s"] = round(batch / med, 3)
        out[f"{name}_steps_s"] = [round(t, 2) for t in ts]
    if "rvc" in times:  # medians; on a shared machine also the ratio of the best steps and per round
        out["speedup_vs_rvc"] = round(out["rvc_s_per_step"] / out["ours_s_per_step"], 3)
        out["speedup_best_steps"] = round(min(times["rvc"]) / min(times["ours"]), 3)
        out["speedup_median_of_rounds"] = round(statistics.median(
            r / o for r, o in zip(times["rvc"], times["ours"])), 3)
        out["first_step_losses_max_rel_diff"] = float(f"{_max_rel_diff(first['ours'], first['rvc']):.2e}")
    if "ours-bf16" in times:  # [loss_g, loss_d, loss_mel, loss_kl, loss_fm] of the first step vs fp32
        out["bf16_speedup_vs_ours_fp32"] = round(out["ours_s_per_step"] / out["ours-bf16_s_per_step"], 3)
        if "rvc" in times:
            out["bf16_speedup_vs_rvc"] = round(out["rvc_s_per_step"] / out["ours-bf16_s_per_step"], 3)
        pairs = zip(first["ours-bf16"], first["ours"])
        out["bf16_first_step_losses_rel_diff"] = [float(f"{abs(a - b) / max(abs(b), 1e-12):.2e}")
                                                  for a, b in pairs]
    return out


def profile_ours(threads: int, args: argparse.Namespace) -> None:
    """torch.profiler over `args.profile` steps of ours (and RVC's) after one warm-up: top ops by self CPU."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    cpu, cfg = torch.device("cpu"), get_config("v2", "40k")
    fns = {"ours": _ours_fn(setup(cpu, "fp32"))}
    if args.rvc_dir is not None:
        fns["rvc"] = _rvc_fn(rvc_setup(Path(args.rvc_dir), cfg))
    batch = make_batch(cfg, args.batch, args.seconds, cpu)
    for name, fn in fns.items():
        fn(batch, 0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(args.profile):
                fn(batch, i + 1)
        print(f"== {name}: {args.profile} step(s), {threads} threads, batch {args.batch}", flush=True)
        events = prof.key_averages()
        print(events.table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
        total = sum(e.self_cpu_time_total for e in events)
        phases = {e.key: round(100 * e.cpu_time_total / total, 1) for e in events if e.key in PHASES}
        print(f"phases, % of the step's CPU time: {phases}", flush=True)


def _best_of(fn: Callable[[], None], n: int = 5) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _layer_times(b: int, cin: int, cout: int, stride: int, h: int, p: int) -> tuple[float, float]:
    """Best forward + backward seconds of one (5, 1) layer on [b, cin, h, p]: as Conv2d, as Conv1d."""
    import torch.nn.functional as F  # noqa: N812

    x = torch.randn(b, cin, h, p, requires_grad=True)
    w = (0.02 * torch.randn(cout, cin, 5, 1)).requires_grad_(True)
    x1 = x.detach().permute(0, 3, 1, 2).reshape(b * p, cin, h).contiguous().requires_grad_(True)

    def two_d() -> None:
        y = F.conv2d(x, w, None, (stride, 1), (2, 0))
        y.backward(torch.ones_like(y))

    def one_d() -> None:
        y = F.conv1d(x1, w.squeeze(-1), None, stride, 2)
        y.backward(torch.ones_like(y))

    return _best_of(two_d), _best_of(one_d)


def layer_bench(threads: int, args: argparse.Namespace) -> None:
    """Each (5, 1) layer of the period discriminators at every v2 period, forward + backward (weights and
    input), batch 2 x --batch (D's step: real and fake together) of RVC's 40k training segment (12800
    samples): seconds, GFLOP/s as Conv2d (RVC's form) and seconds as Conv1d over [B*p, C, T/p] (the same
    products)."""
    import math

    from rvc_pipeline.nn.discriminator import PERIODS

    torch.set_num_threads(threads)
    b, t = 2 * args.batch, get_config("v2", "40k").segment_size
    total = {"conv2d": 0.0, "conv1d": 0.0}
    shapes = ((1, 32, 3), (32, 128, 3), (128, 512, 3), (512, 1024, 3), (1024, 1024, 1))
    for layer, (cin, cout, stride) in enumerate(shapes, 1):
        row = []
        for p in PERIODS["v2"]:
            h = math.ceil(t / p)
            for _ in range(layer - 1):
                h = (h - 1) // 3 + 1
            s2, s1 = _layer_times(b, cin, cout, stride, h, p)
            total["conv2d"] += s2
            total["conv1d"] += s1
            gflop = 3 * 2 * b * p * ((h - 1) // stride + 1) * cin * cout * 5 / 1e9
            row.append(f"p{p} {s2 * 1e3:.0f} ms {gflop / s2:.0f} GFLOP/s (1-D {s1 * 1e3:.0f} ms)")
        print(f"layer {layer} {cin}->{cout}: " + " | ".join(row), flush=True)
    print(json.dumps({"threads": threads, "all_layers_s": {k: round(v, 3) for k, v in total.items()}}),
          flush=True)


def cuda_bench(args: argparse.Namespace) -> None:
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    precisions = ["fp32", "bf16"] if torch.cuda.is_bf16_supported() else ["fp32"]
    precisions.append("fp16")
    for prec in precisions:
        for bs in (1, 4, 8):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            st = setup(dev, prec)
            sec, _ = time_steps(st, make_batch(st.cfg, bs, args.seconds, dev), max(args.steps, 5), dev)
            print(json.dumps({"device": torch.cuda.get_device_name(), "precision": prec, "batch": bs,
                              "s_per_step": round(sec, 4), "samples_per_s": round(bs / sec, 2),
                              "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}),
                  flush=True)
            del st


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=4.0, help="clip length of each batch item")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rvc-dir", default=None, help="RVC checkout (infer/lib/...) for the baseline")
    ap.add_argument("--profile", type=int, default=0, help="profile N steps instead of timing")
    ap.add_argument("--cuda-only", action="store_true")
    ap.add_argument("--layers", action="store_true", help="time each period-discriminator layer instead")
    args = ap.parse_args()
    threads = [int(x) for x in args.threads.split(",") if x]
    if args.layers:
        for th in threads:
            layer_bench(th, args)
        return
    if args.profile:
        for th in threads:
            profile_ours(th, args)
        return
    if not args.cuda_only:
        for th in threads:
            print(json.dumps(cpu_bench(th, args)), flush=True)
        if args.rvc_dir is None:
            print("baseline: add --rvc-dir DIR (RVC's infer/lib/infer_pack and infer/lib/train, outside this "
                  "repository) to time RVC's own step beside ours, interleaved", flush=True)
    if torch.cuda.is_available():
        with contextlib.suppress(KeyboardInterrupt):
            cuda_bench(args)


if __name__ == "__main__":
    main()
