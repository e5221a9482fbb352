"""Benchmark: HuBERT-base v2 features (768-d, layer 12, fp32, CPU): ours vs a plain per-file HF loop.

"plain" is RVC's extract_feature_print.py loop with transformers.HubertModel standing in for fairseq: one
clip at a time, `model(wav[None]).last_hidden_state` under no_grad, HF's defaults (sdpa attention, weight
norm on the positional conv). "ours" is the features step's call: HFHubert.extract over equal-length
batches of at most steps.features.CPU_BATCH_SECONDS (packed oneDNN linears, conv front end per clip).
Both have the same random weights (speed does not depend on them; seed 0) and run on the same clips in
the same process, interleaved (plain, ours, plain, ours ...); each figure is the median over --repeat.
Two phases in the one run: first under glibc's default malloc settings (how RVC's script runs), then
after core.heap.keep_freed_memory() (what the features step sets for its own process; it applies
to the whole process, so the plain loop gets it too). The headline ratio is the step (phase 2 "ours")
against RVC's stand-in (phase 1 "plain"); each phase's own ratio is printed too. On a CPU with native
bf16, phase 2 also runs the step as spec.features.cpuBf16 makes it ("bf16"), with its smallest per-frame
cosine similarity to the fp32 features.
The audio is real speech (espeak-ng voices, 16 kHz) cut into RVC's 3.7 s pieces every 3.4 s.

Printed per method: CPU seconds per audio second (user + sys, from getrusage), wall seconds per audio
second (the real-time factor) and its inverse, sys seconds, minor page faults, and ours / plain.

    .venv/bin/python bench/bench_features.py --seconds 60 --threads 1 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from rvc_pipeline.components.embedders.hf_hubert import HFHubert, hf_config
from rvc_pipeline.components.embedders.random import random_embedder
from rvc_pipeline.core.fileio import cpu_bf16_supported
from rvc_pipeline.core.heap import keep_freed_memory
from rvc_pipeline.steps.features import CPU_BATCH_SECONDS

SR = 16000
TEXT = (
    "Retrieval based voice conversion learns a voice from a few minutes of recordings. The recordings are "
    "cut into short pieces, the pitch of every piece is measured, and a self supervised speech model turns "
    "the sound into content features. A generator then learns to speak those features with the new voice. "
)
VOICES = ["en", "en-us", "en+f3", "en+m3", "en-gb-x-rp", "en+f2"]
Fn = Callable[[list[np.ndarray]], list[np.ndarray]]


def make_speech(seconds: float, work: Path) -> list[np.ndarray]:
    """Real speech pieces of 3.7 s every 3.4 s (RVC's preprocess), at least 0.5 s, about `seconds` in all."""
    pieces: list[np.ndarray] = []
    total, i = 0.0, 0
    while total < seconds:
        raw, wav = work / f"s{i}.raw.wav", work / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-v", VOICES[i % len(VOICES)], "-s", str(150 + 10 * (i % 4)), "-w",
                        str(raw), TEXT], check=True, capture_output=True)
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(raw), "-ar", str(SR), "-ac", "1",
                        "-c:a", "pcm_f32le", str(wav)], check=True)
        audio, _ = sf.read(wav, dtype="float32")
        for start in range(0, len(audio), int(3.4 * SR)):
            piece = audio[start: start + int(3.7 * SR)]
            if len(piece) >= SR // 2 and total < seconds:
                pieces.append(piece)
                total += len(piece) / SR
        i += 1
    return pieces


@dataclass
class Sample:
    """One timed run: process CPU (user + sys) and sys seconds, minor faults, wall seconds."""

    cpu: float
    sys: float
    minflt: float
    wall: float


def timed(fn: Fn, clips: list[np.ndarray]) -> Sample:
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn(clips)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return Sample(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, r1.ru_stime - r0.ru_stime,
                  r1.ru_minflt - r0.ru_minflt, wall)


def plain_hf_loop(seed: int = 0) -> Fn:
    """The per-file loop over a plain transformers.HubertModel (the weights of random_embedder(seed))."""
    import transformers

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = transformers.HubertModel(hf_config()).eval()
    torch.random.set_rng_state(state)

    def run(clips: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            return [model(torch.from_numpy(c)[None]).last_hidden_state[0].numpy() for c in clips]

    return run


def ours(emb: HFHubert) -> Fn:
    return lambda clips: emb.extract(clips, "v2", batch_seconds=CPU_BATCH_SECONDS)


def interleaved(fns: dict[str, Fn], clips: list[np.ndarray], repeat: int) -> dict[str, Sample]:
    """Median Sample of each function, run in turn `repeat` times."""
    runs: dict[str, list[Sample]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            runs[name].append(timed(fn, clips))
    return {name: Sample(*(statistics.median(getattr(s, f.name) for s in ss) for f in fields(Sample)))
            for name, ss in runs.items()}


def compare(clips: list[np.ndarray], threads: int = 1, repeat: int = 3) -> dict[str, Sample]:
    """Median Samples of the plain loop and ours on `threads` threads: 'plain', 'ours' under glibc's
    defaults, then 'plain+heap', 'ours+heap' after keep_freed_memory() (irreversible: call last);
    'deviation' holds in its cpu field the largest |ours - plain| over the first clips' features."""
    torch.set_num_threads(threads)
    fns = {"plain": plain_hf_loop(0), "ours": ours(random_embedder("cpu", False, seed=0))}
    dev = max(float(np.abs(a - b).max()) for a, b in zip(fns["ours"](clips[:4]), fns["plain"](clips[:4])))
    first = interleaved(fns, clips, repeat)
    if not keep_freed_memory():
        print("(no glibc mallopt here: the second phase runs with the same malloc settings)")
    if cpu_bf16_supported():  # spec.features.cpuBf16: the same step in bf16
        fns["bf16"] = ours(random_embedder("cpu", True, seed=0))
    second = interleaved(fns, clips, repeat)
    out = {**first, **{f"{k}+heap": v for k, v in second.items()}, "deviation": Sample(dev, 0.0, 0.0, 0.0)}
    if "bf16" in fns:
        out["bf16 cosine"] = Sample(min_cosine(fns["bf16"](clips), fns["plain"](clips)), 0.0, 0.0, 0.0)
    return out


def min_cosine(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """The smallest cosine similarity between corresponding frames of two feature lists."""
    return min(float(((x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))).min())
               for x, y in zip(a, b))


def report(res: dict[str, Sample], audio_s: float, threads: int) -> None:
    print(f"{'method':>10} {'thr':>3} {'cpu s/audio s':>13} {'RTF wall/audio':>14} {'x real time':>11} "
          f"{'sys s':>6} {'minor faults':>12}")
    for name in ("plain", "ours", "plain+heap", "ours+heap", "bf16+heap"):
        if name not in res:
            continue
        s = res[name]
        print(f"{name:>10} {threads:>3} {s.cpu / audio_s:13.3f} {s.wall / audio_s:14.3f} "
              f"{audio_s / s.wall:11.1f} {s.sys:6.2f} {s.minflt:12.0f}")
    p, o, ph, oh = res["plain"], res["ours"], res["plain+heap"], res["ours+heap"]
    print(f"ours vs plain, {threads} thread(s), glibc defaults: {p.cpu / o.cpu:.2f}x less CPU "
          f"({p.wall / o.wall:.2f}x wall); both with the step's malloc setting: {ph.cpu / oh.cpu:.2f}x "
          f"({ph.wall / oh.wall:.2f}x wall)")
    print(f"the features step (ours+heap) vs the plain loop as RVC runs it (plain): {p.cpu / oh.cpu:.2f}x "
          f"less CPU ({p.wall / oh.wall:.2f}x wall); largest |ours - plain| {res['deviation'].cpu:.1e}",
          flush=True)
    if "bf16+heap" in res:
        b = res["bf16+heap"]
        print(f"spec.features.cpuBf16 (bf16+heap) vs the plain loop (plain): {p.cpu / b.cpu:.2f}x less CPU "
              f"({p.wall / b.wall:.2f}x wall); smallest per-frame cosine to fp32 "
              f"{res['bf16 cosine'].cpu:.5f}", flush=True)
    else:
        print("spec.features.cpuBf16: this CPU has no native bf16 (AVX512-BF16/AMX): not measured",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="seconds of speech")
    ap.add_argument("--threads", type=int, nargs=1, default=[1])
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs per method; medians are shown")
    args = ap.parse_args()
    if not (shutil.which("espeak-ng") and shutil.which("ffmpeg")):
        raise SystemExit("needs espeak-ng and ffmpeg")
    with tempfile.TemporaryDirectory() as tmp:
        clips = make_speech(args.seconds, Path(tmp))
    audio_s = sum(len(c) for c in clips) / SR
    print(f"speech: {len(clips)} pieces, {audio_s:.1f} s; {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}; load average {os.getloadavg()[0]:.2f}")
    report(compare(clips, args.threads[0], args.repeat), audio_s, args.threads[0])
    print(f"load average after: {os.getloadavg()[0]:.2f} (on a shared machine CPU s per audio s is the "
          "steadier figure)")


if __name__ == "__main__":
    main()
