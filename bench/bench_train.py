"""Seconds per training step of the RVC v2 40k pitch model (batch 4, 4 s clips, the real segment size).

CPU with 1 and 2 threads (fp32), and on CUDA when available: fp32 vs bf16 (and fp16) and the peak
memory per batch size 1/4/8 (torch.cuda.max_memory_allocated). RVC's own train.py took about 13 s per
step at batch 4 on two CPU threads on this machine kind (RVC's own script, measured).

    .venv/bin/python bench/bench_train.py [--steps 3] [--batch 4] [--threads 1,2] [--cuda-only]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from rvc_pipeline.nn import build_discriminator, build_generator, get_config
from rvc_pipeline.steps.train.trainer import GanStep, gan_step

RVC_CPU_2T_SECONDS = 13.0


def make_batch(cfg, batch: int, seconds: float, device: torch.device, seed: int = 0) -> tuple:
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


def setup(device: torch.device, precision: str) -> GanStep:
    cfg = get_config("v2", "40k")
    torch.manual_seed(0)
    net_g = build_generator(cfg, "v2", True).to(device).train()
    net_d = build_discriminator("v2").to(device).train()
    kw = dict(lr=1e-4, betas=(0.8, 0.99), eps=1e-9)
    og, od = torch.optim.AdamW(net_g.parameters(), **kw), torch.optim.AdamW(net_d.parameters(), **kw)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return GanStep(net_g, net_d, og, od, scaler, cfg, True, dtype, 1)


def time_steps(st: GanStep, batch: tuple, steps: int, device: torch.device) -> tuple[float, list[float]]:
    gan_step(st, batch, 1)  # warm-up (allocations, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    losses: list[float] = []
    for i in range(steps):
        t0 = time.perf_counter()
        _, _, vals = gan_step(st, batch, i + 2)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses = vals
    return sorted(times)[len(times) // 2], losses


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=4.0, help="clip length of each batch item")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--cuda-only", action="store_true")
    args = ap.parse_args()
    results = []
    if not args.cuda_only:
        cpu = torch.device("cpu")
        for th in [int(x) for x in args.threads.split(",") if x]:
            torch.set_num_threads(th)
            st = setup(cpu, "fp32")
            sec, _ = time_steps(st, make_batch(st.cfg, args.batch, args.seconds, cpu), args.steps, cpu)
            results.append({"device": "cpu", "threads": th, "precision": "fp32", "batch": args.batch,
                            "s_per_step": round(sec, 3),
                            "speedup_vs_rvc_2threads": round(RVC_CPU_2T_SECONDS / sec, 2)})
            print(json.dumps(results[-1]), flush=True)
            del st
    if torch.cuda.is_available():
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
                results.append({"device": torch.cuda.get_device_name(), "precision": prec, "batch": bs,
                                "s_per_step": round(sec, 4),
                                "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
                print(json.dumps(results[-1]), flush=True)
                del st
    print(f"reference: RVC train.py, v2 40k f0, batch 4, 2 CPU threads: ~{RVC_CPU_2T_SECONDS} s/step")


if __name__ == "__main__":
    main()
