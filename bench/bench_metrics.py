"""Benchmark: seconds per voice metric for 60 s of real speech on the CPU.

The speech is a voice set (rvc_pipeline.demo.voices) at 40 kHz (an RVC model's rate), scored two ways:
as one 60 s clip, and as pieces of about 6 s (how held-out pieces come out of RVC's slicer). The
converted clip is the speech with noise at 20 dB SNR, the reference the clean speech (same speaker);
f0 uses 'pm'; DNSMOS is also shown with 9 s between its 9.01 s windows (speechmos: 1 s). Models are
loaded before timing (the "load" column: once per process); each metric is timed over `--repeat` runs
and the best is shown.

    .venv/bin/python bench/bench_metrics.py --seconds 60 --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from rvc_pipeline.components.metrics import base
from rvc_pipeline.components.metrics.base import Clip, Pair
from rvc_pipeline.demo.voices import make_voice_set

SR = 40000


def speech(seconds: float) -> np.ndarray:
    with tempfile.TemporaryDirectory() as d:
        files = make_voice_set(Path(d), n_files=int(seconds // 30) + 1, seconds_each=30.0, seed=3, sr=SR)
        x = np.concatenate([sf.read(str(p), dtype="float32")[0] for p in files])
    return x[: int(seconds * SR)]


def pairs(x: np.ndarray, piece_seconds: float) -> list[Pair]:
    rng = np.random.default_rng(0)
    n = rng.standard_normal(len(x)).astype(np.float32) * np.sqrt(np.mean(x**2)) / 10.0
    step = int(piece_seconds * SR)
    return [Pair(Clip(x[s : s + step] + n[s : s + step], SR, name=f"piece {s // step}"),
                 Clip(x[s : s + step], SR)) for s in range(0, len(x) - SR, step)]


def timed(metric: base.Metric, batch: list[Pair], repeat: int) -> tuple[float, dict[str, float]]:
    best, out = float("inf"), {}
    for _ in range(repeat):
        t = time.perf_counter()
        out = metric.score(batch)
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--piece-seconds", type=float, default=6.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    x = speech(args.seconds)
    batches = {"one clip": pairs(x, args.seconds),
               f"{args.piece_seconds:g} s pieces": pairs(x, args.piece_seconds)}
    print(f"{len(x) / SR:.0f} s of speech at {SR} Hz, CPU")
    heads = " ".join(f"{k + ' s':>14s}" for k in batches)
    print(f"{'metric':12s} {'load s':>7s} {heads}  values (pieces)")
    runs: list[tuple[str, str, dict[str, float]]] = [(name, name, {}) for name in base.METRICS]
    runs.append(("dnsmos hop 9", "dnsmos", {"hop_seconds": 9.0}))
    for label, name, opts in runs:
        t = time.perf_counter()
        metric = base.get(name, **opts)
        load = time.perf_counter() - t
        cells: list[str] = []
        values: dict[str, float] = {}
        for batch in batches.values():
            sec, values = timed(metric, batch, args.repeat)
            cells.append(f"{sec:14.2f}")
        shown = ", ".join(f"{k} {v:.3g}" for k, v in values.items())
        print(f"{label:12s} {load:7.2f} {' '.join(cells)}  {shown}")


if __name__ == "__main__":
    main()
