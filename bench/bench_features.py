"""Benchmark: HuBERT-base v2 (768-d, layer 12) features in fp32 on CPU, in seconds of audio per wall second.

Speed does not depend on the weights, so the full-size model has random weights. The audio is real speech
(espeak-ng, several voices) resampled to 16 kHz by ffmpeg and cut into RVC-like 3.7 s pieces.

Methods:
  eager-1by1   fairseq-style attention (separate q/k/v GEMMs, explicit softmax(QK^T)V), one clip at a time
               (how RVC's extract_feature_print.py runs), as the baseline of this implementation;
  sdpa-1by1    our model (fused q/k/v GEMM, scaled_dot_product_attention), one clip at a time;
  sdpa-batch   our model, clips sorted by length and batched by --batch-seconds (the features step);
  bf16-batch   (informational, not exact) the batch under CPU bf16 autocast (AMX where the CPU has it),
               with its max deviation from fp32.
RVC's own figures on this machine kind (DESIGN.md): 5x real time on one thread, 9x on two.

    .venv/bin/python bench/bench_features.py --seconds 90 --threads 1 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from rvc_pipeline import hubert

TEXT = (
    "Retrieval based voice conversion learns a voice from a few minutes of recordings. The recordings are "
    "cut into short pieces, the pitch of every piece is measured, and a self supervised speech model turns "
    "the sound into content features. A generator then learns to speak those features with the new voice. "
    "Training runs for many epochs, and an index of the features helps the model keep the accent. "
)
VOICES = ["en", "en-us", "en+f3", "en+m3", "en-gb-x-rp", "en+f2"]
RVC_FIGURES = {1: 5.0, 2: 9.0}


def make_speech(seconds: float, work: Path) -> list[np.ndarray]:
    """Real speech pieces of 3.7 s (hop 3.4 s, as RVC's preprocess) totalling about `seconds`."""
    pieces: list[np.ndarray] = []
    total = 0.0
    i = 0
    while total < seconds:
        raw, wav = work / f"s{i}.raw.wav", work / f"s{i}.wav"
        subprocess.run(
            ["espeak-ng", "-v", VOICES[i % len(VOICES)], "-s", str(150 + 10 * (i % 4)), "-w", str(raw), TEXT],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                "ffmpeg",
                "-loglevel",
                "error",
                "-y",
                "-i",
                str(raw),
                "-ar",
                "16000",
                "-ac",
                "1",
                "-c:a",
                "pcm_f32le",
                str(wav),
            ],
            check=True,
        )
        audio, _ = sf.read(wav, dtype="float32")
        for start in range(0, len(audio), int(3.4 * 16000)):
            piece = audio[start : start + int(3.7 * 16000)]
            if len(piece) >= 8000 and total < seconds:
                pieces.append(piece)
                total += len(piece) / 16000
        i += 1
    return pieces


def eager_attention(
    self: hubert.SelfAttention, x: torch.Tensor, attn_mask: torch.Tensor | None
) -> torch.Tensor:
    bsz, t, c = x.shape
    h, d = self.heads, c // self.heads
    q = (self.q_proj(x) * d**-0.5).view(bsz, t, h, d).transpose(1, 2)
    k = self.k_proj(x).view(bsz, t, h, d).transpose(1, 2)
    v = self.v_proj(x).view(bsz, t, h, d).transpose(1, 2)
    w = q @ k.transpose(-1, -2)
    if attn_mask is not None:
        w = w.masked_fill(~attn_mask, float("-inf"))
    o = F.softmax(w, dim=-1) @ v
    return self.out_proj(o.transpose(1, 2).reshape(bsz, t, c))


def timed(fn, clips: list[np.ndarray]) -> tuple[float, float]:  # noqa: ANN001
    """(wall seconds, process CPU seconds) of fn(clips), after a warm-up on one clip."""
    fn(clips[:1])  # warm-up (allocator, kernels)
    t0, c0 = time.perf_counter(), time.process_time()
    fn(clips)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=90.0, help="seconds of speech")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-seconds", type=float, default=16.0)
    ap.add_argument("--methods", nargs="+", default=["eager-1by1", "sdpa-1by1", "sdpa-batch", "bf16-batch"])
    args = ap.parse_args()
    if not (shutil.which("espeak-ng") and shutil.which("ffmpeg")):
        raise SystemExit("needs espeak-ng and ffmpeg")
    with tempfile.TemporaryDirectory() as tmp:
        clips = make_speech(args.seconds, Path(tmp))
    audio_s = sum(len(c) for c in clips) / 16000
    print(
        f"speech: {len(clips)} pieces, {audio_s:.1f} s; cpu: {torch.backends.cpu.get_cpu_capability()}, "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}"
    )

    emb = hubert.random_embedder("cpu", False, seed=0)
    model = emb.model
    ref: list[np.ndarray] | None = None

    def one_by_one(cs: list[np.ndarray]) -> list[np.ndarray]:
        return [emb.extract(c, "v2")[0] for c in cs]

    def batched(cs: list[np.ndarray]) -> list[np.ndarray]:
        return emb.extract(cs, "v2", batch_seconds=args.batch_seconds)

    def bf16(cs: list[np.ndarray]) -> list[np.ndarray]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return batched(cs)

    results: dict[tuple[str, int], float] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for method in args.methods:
            original = hubert.SelfAttention.forward
            if method == "eager-1by1":
                for layer in model.encoder.layers:
                    layer.self_attn._fused = None
                hubert.SelfAttention.forward = eager_attention  # type: ignore[method-assign]
            try:
                fn = {
                    "eager-1by1": one_by_one,
                    "sdpa-1by1": one_by_one,
                    "sdpa-batch": batched,
                    "bf16-batch": bf16,
                }[method]
                wall, cpu = timed(fn, clips)
                extra = ""
                if method in ("bf16-batch", "sdpa-batch", "eager-1by1"):
                    out = fn(clips) if method == "bf16-batch" else None
                    if method == "sdpa-batch" and ref is None:
                        ref = one_by_one(clips)
                    if out is not None and ref is not None:
                        dev = max(
                            float(np.abs(a - b).max() / (np.abs(b).max() + 1e-9)) for a, b in zip(out, ref)
                        )
                        extra = f"  (max deviation from fp32: {dev:.2e} of the peak)"
            finally:
                hubert.SelfAttention.forward = original  # type: ignore[method-assign]
                for layer in model.encoder.layers:
                    layer.self_attn.fuse()
            rt = audio_s / wall
            results[(method, threads)] = rt
            rvc = RVC_FIGURES.get(threads)
            vs = f", {rt / rvc:.2f}x RVC's {rvc:.0f}x" if rvc else ""
            print(
                f"{method:>11} threads={threads}: wall {wall:6.2f} s -> {rt:5.1f}x real time{vs}; "
                f"cpu {cpu:6.2f} s -> {audio_s / cpu:5.1f} audio s per cpu s{extra}",
                flush=True,
            )
    print(
        f"load average after: {os.getloadavg()[0]:.2f}. On a shared machine wall figures drop (2 threads "
        "worst: OpenMP spin-waits); audio s per cpu s at 1 thread approximates the uncontended speed."
    )


if __name__ == "__main__":
    main()
