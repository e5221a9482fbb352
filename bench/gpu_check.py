"""One prepared GPU check: correctness on CUDA first, then throughput, in one JSON report.

    python bench/gpu_check.py [--dry-run] [--out gpu_report.json] [--quick]

(bench/gpu_check.sh wraps it: it installs carried wheels and sets PYTHONPATH; see bench/README.md.)

Correctness (each must pass when CUDA is visible; "unavailable" only where the hardware or a package
makes the check meaningless, e.g. DDP on one GPU, faiss without GPU support):
  train_precision   one RVC v2 40k training step from the same weights and batch in fp32, bf16 and fp16:
                    every loss finite, G's output within 5 % (bf16) / 1 % (fp16) of fp32's, loss_d,
                    loss_kl and loss_fm within 2 % (every loss and its difference reported)
  ddp               two ranks over NCCL (when >1 GPU): an all_reduce and a DDP step agree across ranks
  hubert_half       HuBERT-base fp16 vs fp32 on CUDA: mean cosine similarity of the features >= 0.98
  pitch_cuda        fcpe, rmvpe (random weights unless rmvpe.pt is in RVC_WEIGHTS_DIR), crepe (when its
                    weights are there) on CUDA vs CPU: voicing agreement >= 95 %, median |cents| <= 10
  faiss_gpu         the index built on the GPU vs on the CPU: recall@8 of each vs exact search
Throughput:
  train_throughput  steps/s and samples/s at batch 4/8/16/32 (auto precision), peak memory per batch,
                    GPU utilisation sampled by nvidia-smi while it runs
  features_speed    seconds of audio per second, HuBERT fp16, batched
  f0_speed          seconds of audio per second for fcpe and rmvpe on CUDA
  index_speed       index build time on 200k x 768 vectors (GPU when faiss has it)

Exit codes: 0 every check passed or was unavailable; 1 a check failed (the report says which and why);
2 no CUDA device is visible (nothing was checked; --dry-run lists the checks anywhere).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for sub in ("pipeline", "operator", ".", "bench"):
    if str(ROOT / sub) not in sys.path:
        sys.path.insert(0, str(ROOT / sub))

SR = 16000
DEVICE = "cuda"  # --device cpu: walk the code paths without a GPU (a smoke test of this script, no check)


class Unavailable(Exception):  # noqa: N818 - a reason, not an error
    """The check cannot mean anything here (one GPU for DDP, faiss without GPU support)."""


@dataclass(frozen=True)
class Check:
    name: str
    kind: str  # "correctness" | "throughput"
    what: str
    run: Callable[[argparse.Namespace], dict[str, Any]]


# ------------------------------------------------------------------------------------------ helpers
def _speech(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced, speech-like test signal at 16 kHz: a gliding harmonic tone with syllable envelopes."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t) + 10 * np.sin(2 * np.pi * 3.1 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    x = sum(np.sin(k * phase) / k for k in range(1, 8))
    env = 0.5 * (1 + np.sign(np.sin(2 * np.pi * 2.5 * t)))
    return (0.3 * x * env + 0.003 * rng.standard_normal(len(t))).astype(np.float32)


def _sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


class GpuSampler:
    """nvidia-smi utilisation and memory every 200 ms while the block runs."""

    def __init__(self) -> None:
        self.util: list[float] = []
        self.mem: list[float] = []
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 "-lms", "200", "-i", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return self
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and all(p.replace(".", "", 1).isdigit() for p in parts):
                self.util.append(float(parts[0]))
                self.mem.append(float(parts[1]))

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=5)

    def summary(self) -> dict[str, Any]:
        if not self.util:
            return {"gpu_util": "unavailable (no nvidia-smi samples)"}
        return {"gpu_util_mean_pct": round(float(np.mean(self.util)), 1),
                "gpu_util_p90_pct": round(float(np.percentile(self.util, 90)), 1),
                "gpu_mem_max_mib": max(self.mem), "samples": len(self.util)}


# ------------------------------------------------------------------------------------------ training
def _gan(precision: str, seed: int = 0) -> Any:
    import torch
    from bench_train import setup

    torch.manual_seed(seed)
    return setup(torch.device(DEVICE), precision)


def _one_step(precision: str, batch: int) -> tuple[list[float], Any]:
    """One training step from the same weights and batch: ([loss_g, grad_norm_g, loss_d, grad_norm_d,
    loss_mel, loss_kl, loss_fm], G's output y_hat of that step's first forward, fp32, on the CPU)."""
    import torch
    from bench_train import make_batch
    from rvc_pipeline.steps.train.trainer import _generate, gan_step

    st = _gan(precision)
    data = make_batch(st.cfg, batch, 4.0, torch.device(DEVICE), seed=1)
    torch.manual_seed(2)  # the same random segment slices and noise in every precision
    with torch.no_grad(), st._amp(data[0].device):
        y_hat = _generate(st, data)[0].float().cpu()
    torch.manual_seed(2)
    _, _, vals = gan_step(st, data, 1)
    _sync()
    return [float(v) for v in vals], y_hat


# Tolerances against fp32. y_hat: relative L2 error of the generator's output (bf16 keeps 8 mantissa bits,
# fp16 11; measured on CPU, random weights: bf16 2.4 %). loss_d/kl/fm: relative difference (CPU bf16: at
# most 0.07 %). loss_mel and loss_g are reported, not held to a bound: from random weights the log-mel of a
# near-silent output magnifies rounding (CPU bf16: loss_mel 18 % off with y_hat 2.4 % off). The gradient
# norms are reported only: fp16's GradScaler starts at 65536, so a first step with inf gradients (then
# skipped, the scale halved) is AMP working as designed.
Y_HAT_TOL = {"bf16": 0.05, "fp16": 0.01}
LOSS_TOL = 0.02
LOSS_NAMES = ("loss_g", "grad_norm_g", "loss_d", "grad_norm_d", "loss_mel", "loss_kl", "loss_fm")


def check_train_precision(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    ref, ref_y = _one_step("fp32", 4)
    out: dict[str, Any] = {"fp32": dict(zip(LOSS_NAMES, ref))}
    if DEVICE == "cpu":  # the smoke test: fp16 on a CPU is emulated (minutes) and never used by training
        precisions = ["bf16"]
    else:
        precisions = (["bf16"] if torch.cuda.is_bf16_supported() else []) + ["fp16"]
    for prec in precisions:
        vals, y = _one_step(prec, 4)
        rel = {k: abs(v - r) / max(abs(r), 1e-12) for k, v, r in zip(LOSS_NAMES, vals, ref)}
        y_err = float((y - ref_y).norm() / ref_y.norm())
        out[prec] = {**dict(zip(LOSS_NAMES, vals)), "y_hat_rel_err": round(y_err, 5),
                     **{f"{k}_rel_diff": round(v, 5) for k, v in rel.items()}}
        losses = [v for k, v in zip(LOSS_NAMES, vals) if k.startswith("loss")]
        assert all(np.isfinite(losses)), f"{prec}: non-finite losses {vals}"
        assert y_err <= Y_HAT_TOL[prec], f"{prec}: G output {y_err:.2%} off fp32 (> {Y_HAT_TOL[prec]:.0%})"
        for k in ("loss_d", "loss_kl", "loss_fm"):
            assert rel[k] <= LOSS_TOL, f"{prec}: {k} {rel[k]:.2%} off fp32 (> {LOSS_TOL:.0%})"
    torch.backends.cuda.matmul.allow_tf32 = True
    return out


def _ddp_worker(rank: int, world: int, port: int, q: Any) -> None:
    import os

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    t = torch.full((4,), float(rank + 1), device="cuda")
    dist.all_reduce(t)
    net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 8).cuda(), device_ids=[rank])
    net(torch.randn(16, 8, device="cuda") * (rank + 1)).square().mean().backward()
    grad = next(net.parameters()).grad.detach().sum().item()  # DDP averages: equal on every rank
    q.put((rank, t[0].item(), grad))
    dist.destroy_process_group()


def check_ddp(args: argparse.Namespace) -> dict[str, Any]:
    import socket

    import torch
    import torch.multiprocessing as mp

    world = torch.cuda.device_count()
    if world < 2:
        raise Unavailable(f"{world} GPU visible; DDP needs 2 or more")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(world, port, q), nprocs=world, join=True, start_method="spawn")
    got = sorted(q.get() for _ in range(world))
    expected = world * (world + 1) / 2
    assert all(abs(v - expected) < 1e-6 for _, v, _ in got), f"all_reduce: {got}, expected {expected}"
    grads = [g for _, _, g in got]
    assert max(grads) - min(grads) < 1e-5 * max(1.0, abs(grads[0])), f"DDP gradients differ: {grads}"
    return {"world": world, "all_reduce": expected, "grad_sum": grads[0]}


def check_train_throughput(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from bench_train import make_batch, time_steps
    from rvc_pipeline.steps.train.trainer import pick_precision

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    precision = pick_precision("auto", torch.device(DEVICE))
    out: dict[str, Any] = {"precision": precision, "device": str(torch.device(DEVICE))}
    for bs in (4, 8) if args.quick else (4, 8, 16, 32):
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        st = _gan(precision)
        with GpuSampler() as gpu:
            sec, _ = time_steps(st, make_batch(st.cfg, bs, 4.0, torch.device(DEVICE)), 3 if args.quick else 8,
                                torch.device(DEVICE))
        out[f"batch_{bs}"] = {"s_per_step": round(sec, 4), "steps_per_s": round(1 / sec, 2),
                              "samples_per_s": round(bs / sec, 1),
                              "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                              if DEVICE == "cuda" else None,
                              **gpu.summary()}
        del st
    return out


# ------------------------------------------------------------------------------------------ features
def check_hubert_half(args: argparse.Namespace) -> dict[str, Any]:
    from rvc_pipeline.components.embedders.random import random_embedder

    clips = [_speech(s, i) for i, s in enumerate((3.7, 3.7, 2.1, 5.0))]
    full = random_embedder(DEVICE, half=False).extract(clips, "v2")
    half = random_embedder(DEVICE, half=True).extract(clips, "v2")
    cos = []
    for a, b in zip(full, half):
        assert a.shape == b.shape and np.isfinite(b).all(), f"fp16 features {b.shape} vs {a.shape}"
        num = (a * b).sum(1)
        cos.append(float(np.mean(num / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-9))))
    assert min(cos) >= 0.98, f"fp16 vs fp32 cosine similarity {min(cos):.4f} < 0.98"
    return {"cosine_min": round(min(cos), 5), "cosine_mean": round(float(np.mean(cos)), 5)}


def check_features_speed(args: argparse.Namespace) -> dict[str, Any]:
    from rvc_pipeline.components.embedders.random import random_embedder

    emb = random_embedder(DEVICE, half=True)
    clips = [_speech(3.7, i) for i in range(64 if args.quick else 512)]
    emb.extract(clips[:8], "v2")
    _sync()
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        emb.extract(clips, "v2", batch_seconds=120.0)
        _sync()
        sec = time.perf_counter() - t0
    audio = 3.7 * len(clips)
    return {"audio_s": audio, "seconds": round(sec, 3), "audio_s_per_s": round(audio / sec, 1),
            **gpu.summary()}


# ------------------------------------------------------------------------------------------ pitch
def _pitch_opts(method: str, device: str, tmp: Path) -> dict[str, Any]:
    import os

    if method != "rmvpe":
        return {"device": device}
    real = Path(os.environ.get("RVC_WEIGHTS_DIR", "")) / "rmvpe.pt"
    if real.is_file():
        return {"checkpoint": str(real), "device": device}
    from tests.support.rmvpe_files import save_random_checkpoint

    path = tmp / "rmvpe-random.pt"
    if not path.exists():
        save_random_checkpoint(path, seed=0, half=False)
    return {"checkpoint": str(path), "device": device}


def _compare_f0(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    voiced_a, voiced_b = a > 0, b > 0
    agree = float(np.mean(voiced_a == voiced_b))
    both = voiced_a & voiced_b
    cents = np.abs(1200 * np.log2(a[both] / b[both])) if both.any() else np.zeros(1)
    return {"voicing_agreement": round(agree, 4), "median_abs_cents": round(float(np.median(cents)), 3),
            "voiced_frames": int(both.sum())}


def check_pitch_cuda(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    from rvc_pipeline.steps.f0 import compute_f0_batch

    clips = [_speech(4.0, i) for i in range(3)]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("fcpe", "rmvpe", "crepe"):
            try:
                cpu = compute_f0_batch(clips, method, **_pitch_opts(method, "cpu", Path(tmp)))
                gpu = compute_f0_batch(clips, method, **_pitch_opts(method, DEVICE, Path(tmp)))
            except FileNotFoundError as e:  # weights not on this machine (crepe)
                out[method] = f"unavailable: {str(e).splitlines()[0][:200]}"
                continue
            cmp = _compare_f0(np.concatenate(cpu), np.concatenate(gpu))
            out[method] = cmp
            assert cmp["voicing_agreement"] >= 0.95, f"{method}: voicing agreement {cmp}"
            assert cmp["median_abs_cents"] <= 10, f"{method}: CUDA vs CPU pitch differs {cmp}"
    return out


def check_f0_speed(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    from rvc_pipeline.steps.f0 import compute_f0_batch

    clips = [_speech(3.7, i) for i in range(32 if args.quick else 256)]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("fcpe", "rmvpe"):
            opts = _pitch_opts(method, DEVICE, Path(tmp))
            compute_f0_batch(clips[:4], method, **opts)
            t0 = time.perf_counter()
            compute_f0_batch(clips, method, **opts)
            _sync()
            sec = time.perf_counter() - t0
            out[method] = {"audio_s_per_s": round(3.7 * len(clips) / sec, 1), "seconds": round(sec, 3)}
    return out


# ------------------------------------------------------------------------------------------ index
def _vectors(n: int, dim: int = 768, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((256, dim)).astype(np.float32)
    return (centres[rng.integers(0, 256, n)] + 0.3 * rng.standard_normal((n, dim))).astype(np.float32)


def _recall(index: Any, vectors: np.ndarray, queries: np.ndarray, k: int = 8) -> float:
    import faiss

    exact = faiss.IndexFlatL2(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(queries, k)
    _, got = index.search(queries, k)
    return float(np.mean([len(set(t) & set(g)) / k for t, g in zip(truth, got)]))


def check_faiss_gpu(args: argparse.Namespace) -> dict[str, Any]:
    from rvc_pipeline.steps import index as idx

    if not idx.gpu_available():
        raise Unavailable("faiss has no GPU support here (faiss-cpu)")
    vectors = _vectors(20_000)
    queries = vectors[::50].copy()
    on_cpu, on_gpu = vectors.copy(), vectors.copy()  # build_index shuffles in place: ids follow each copy
    cpu = idx.build_index(on_cpu, use_gpu=False, seed=0)[0]
    gpu = idx.build_index(on_gpu, use_gpu=True, seed=0)[0]
    r_cpu, r_gpu = _recall(cpu, on_cpu, queries), _recall(gpu, on_gpu, queries)
    assert r_gpu >= r_cpu - 0.02, f"GPU index recall@8 {r_gpu:.3f} vs CPU {r_cpu:.3f}"
    return {"recall_cpu": round(r_cpu, 4), "recall_gpu": round(r_gpu, 4)}


def check_index_speed(args: argparse.Namespace) -> dict[str, Any]:
    from rvc_pipeline.steps import index as idx

    vectors = _vectors(50_000 if args.quick else 200_000)
    use_gpu = idx.gpu_available()
    t0 = time.perf_counter()
    built, info = idx.build_index(vectors, use_gpu=use_gpu)
    sec = time.perf_counter() - t0
    return {"vectors": len(vectors), "gpu": use_gpu, "seconds": round(sec, 2), "ntotal": int(built.ntotal),
            **{k: v for k, v in info.items() if isinstance(v, (int, float, bool, str))}}


CHECKS: tuple[Check, ...] = (
    Check("train_precision", "correctness", "training step fp32 vs bf16 vs fp16", check_train_precision),
    Check("ddp", "correctness", "NCCL all_reduce and a DDP step over every GPU", check_ddp),
    Check("hubert_half", "correctness", "HuBERT fp16 vs fp32 features", check_hubert_half),
    Check("pitch_cuda", "correctness", "fcpe/rmvpe/crepe on CUDA vs CPU", check_pitch_cuda),
    Check("faiss_gpu", "correctness", "faiss-gpu index vs CPU index (recall@8)", check_faiss_gpu),
    Check("train_throughput", "throughput", "training steps/s at batch 4/8/16/32, peak memory, GPU util",
          check_train_throughput),
    Check("features_speed", "throughput", "HuBERT fp16 seconds of audio per second", check_features_speed),
    Check("f0_speed", "throughput", "fcpe and rmvpe seconds of audio per second on CUDA", check_f0_speed),
    Check("index_speed", "throughput", "index build time on 200k x 768 vectors", check_index_speed),
)


def run_check(check: Check, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        result: dict[str, Any] = {"status": "passed", **check.run(args)}
    except Unavailable as e:
        result = {"status": "unavailable", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - every failure is recorded, loudly, and fails the run
        result = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()[-4000:]}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="list the checks and exit")
    ap.add_argument("--out", default="gpu_report.json", help="where the JSON report goes")
    ap.add_argument("--quick", action="store_true", help="smaller throughput runs (about 2 minutes)")
    ap.add_argument("--only", help="comma-separated check names")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: run the code paths without a GPU (smoke test of the script; checks nothing)")
    args = ap.parse_args(argv)
    chosen = [c for c in CHECKS if not args.only or c.name in args.only.split(",")]
    if args.dry_run:
        for c in chosen:
            print(f"{c.kind:12} {c.name:17} {c.what}")
        return 0
    import torch

    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible; nothing was checked (--dry-run lists the checks)",
              file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke test, no check)"
    report: dict[str, Any] = {"device": name, "torch": torch.__version__,
                              "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(), "checks": {}}
    for c in chosen:
        print(f"== {c.name}: {c.what}", flush=True)
        report["checks"][c.name] = res = run_check(c, args)
        print(json.dumps({k: v for k, v in res.items() if k != "traceback"}), flush=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    failed = [n for n, r in report["checks"].items() if r["status"] == "failed"]
    report["failed"] = failed
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"gpu_check: {len(chosen) - len(failed)}/{len(chosen)} passed or unavailable; report {args.out}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
