"""Benchmark: every data step, ours vs RVC's recipe, on one generated speech set in one run: one table.

The speech set is bench_preprocess.voice_set (demo voices, 44.1 kHz, cached). preprocess runs the step on
it, 1 process, beside RVC's preprocess as tests/support/rvc_port.py ports it line by line (ffmpeg decode
per file, RVC's slicer frame loop, scipy lfilter, librosa resample to 16 kHz, scipy wavfile writes: the
project's oracle for preprocess), interleaved, median of --repeat; f0 pm / dio / harvest and features
run on that set at 16 kHz (ffmpeg) cut into RVC's pieces of
3.7 s every 3.4 s: f0 by bench_f0.bench_method (the step vs RVC's per-file loop, ffmpeg load per file,
1 process each), features by bench_features.compare (the features step vs the plain per-file
transformers.HubertModel loop, RVC's stand-in; medians of --repeat, 1 thread); the index by
bench_index.compare on --vectors HuBERT-like 768-d vectors (the step's recipe vs RVC's, all cores).
Features run last but one: they set the features step's malloc setting for the rest of the process.
The training step runs last with `--rvc-dir DIR` (RVC's own code, a folder outside this repository; see
bench_train.py): bench_train.cpu_bench, ours vs RVC's train.py step interleaved on one batch, 2 threads.
On a CPU with native bf16 the table also has the opt-in bf16 rows (features.cpuBf16, train.precision
bf16) against the same RVC figures.

    .venv/bin/python bench/bench_vs_rvc.py                  # about 3-5 minutes on 2 idle cores
    .venv/bin/python bench/bench_vs_rvc.py --seconds 360 --vectors 200000
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import bench_f0  # (bench/ is on sys.path: the scripts run as bench/<name>.py)
import bench_features
import bench_index
import bench_preprocess
import bench_train
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests package: RVC's preprocess port
from tests.support.rvc_port import preprocess_dataset  # noqa: E402

SR = 16000


def row_preprocess(data: Path, repeat: int) -> tuple[str, float, float]:
    """Wall seconds of the preprocess step (1 process) and of RVC's preprocess (the port), interleaved."""
    ours: list[float] = []
    rvc: list[float] = []
    for _ in range(max(1, repeat)):
        ours.append(bench_preprocess.run_once(data, 1)["wall_s"])
        out = Path(tempfile.mkdtemp(prefix="bench-rvc-pp-"))
        t = time.perf_counter()
        preprocess_dataset(data, 40000, out)
        rvc.append(time.perf_counter() - t)
        shutil.rmtree(out, ignore_errors=True)
    return "preprocess 40k, 1 process (wall s)", statistics.median(ours), statistics.median(rvc)


def pieces_of(data: Path) -> list[np.ndarray]:
    """Every file of `data` at 16 kHz (ffmpeg), cut as RVC's preprocess cuts: 3.7 s every 3.4 s."""
    from rvc_pipeline.audio import load_audio
    from rvc_pipeline.core.fileio import read_16k

    out: list[np.ndarray] = []
    for p in sorted(data.glob("*.wav")):
        x = read_16k(p, load_audio)
        out += [x[s: s + int(3.7 * SR)] for s in range(0, len(x), int(3.4 * SR)) if len(x) - s >= SR // 2]
    return out


def rows_f0(pieces: list[np.ndarray], work: Path) -> list[tuple[str, float, float]]:
    rows = []
    print(f"{'method':<11} {'procs':>5} {'audio s':>8} {'step s':>8} {'x real':>8} {'pure x1':>8} "
          f"{'RVC s':>7} {'RVC x':>6} {'speed-up':>8}  (bench_f0.py's columns)")
    for m in ("pm", "dio", "harvest"):
        ours, rvc, _ = bench_f0.bench_method(m, pieces, work / "f0", [1], baseline=True)[1]
        rows.append((f"f0 {m}, 1 process (wall s)", ours, rvc if rvc is not None else float("nan")))
    return rows


def rows_features(pieces: list[np.ndarray], repeat: int) -> list[tuple[str, float, float]]:
    res = bench_features.compare(pieces, threads=1, repeat=repeat)
    bench_features.report(res, sum(len(p) for p in pieces) / SR, 1)
    rows = [("features v2, 1 thread (CPU s)", res["ours+heap"].cpu, res["plain"].cpu)]
    if "bf16+heap" in res:
        rows.append(("features v2, 1 thread, features.cpuBf16 (CPU s)", res["bf16+heap"].cpu,
                     res["plain"].cpu))
    return rows


def row_index(vectors: int) -> tuple[str, float, float]:
    res = bench_index.compare("mixture", vectors, 768, len(os.sched_getaffinity(0)))
    rv, us = res["RVC"], res["ours"]
    print(f"index recall@8: ours {us['recall']:.4f}, RVC {rv['recall']:.4f}")
    return f"index {vectors} x 768 (wall s)", us["total_s"], rv["total_s"]


def rows_train(rvc_dir: str, steps: int) -> list[tuple[str, float, float]]:
    args = argparse.Namespace(rvc_dir=rvc_dir, batch=4, seconds=4.0, steps=steps)
    res = bench_train.cpu_bench(2, args)
    print(f"train step: first-step losses max rel diff {res['first_step_losses_max_rel_diff']}, "
          f"ours {res['ours_steps_s']}, RVC {res['rvc_steps_s']}")
    rows = [("train step v2 40k, batch 4, 2 threads (s/step)", res["ours_s_per_step"], res["rvc_s_per_step"])]
    if "ours-bf16_s_per_step" in res:
        print(f"train step bf16: first-step losses rel diff to fp32 {res['bf16_first_step_losses_rel_diff']}")
        rows.append(("train step, train.precision bf16 (s/step)", res["ours-bf16_s_per_step"],
                     res["rvc_s_per_step"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="seconds of speech (files of 30 s)")
    ap.add_argument("--vectors", type=int, default=50_000, help="index vectors (RVC's 20k floor: above it)")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved preprocess and feature runs (medians)")
    ap.add_argument("--rvc-dir", help="RVC's code (infer/lib/...), outside this repository: adds the "
                    "training step (bench_train.py)")
    ap.add_argument("--train-steps", type=int, default=3, help="interleaved training steps (medians)")
    args = ap.parse_args()
    os.environ["RVC_NO_PROGRESS"] = "1"
    logging.basicConfig(level=logging.WARNING)
    files = max(1, round(args.seconds / 30))
    data = bench_preprocess.voice_set(files, args.seconds / files)
    pieces = pieces_of(data)
    audio = sum(len(p) for p in pieces) / SR
    load0 = os.getloadavg()[0]
    bench_preprocess.run_once(data, 1)  # warm-up: page cache, imports
    rows = [row_preprocess(data, args.repeat)]
    work = Path(tempfile.mkdtemp(prefix="bench-vs-rvc-"))
    try:
        rows += rows_f0(pieces, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows.append(row_index(args.vectors))
    rows += rows_features(pieces, args.repeat)
    if args.rvc_dir:
        rows += rows_train(args.rvc_dir, args.train_steps)
    print(f"\n{files} files, {audio:.1f} s of speech in {len(pieces)} pieces; {len(os.sched_getaffinity(0))} "
          f"cores; load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print(f"| {'step':<58} | {'ours':>8} | {'RVC':>8} | {'ratio':>6} |")
    print(f"|{'-' * 60}|{'-' * 10}|{'-' * 10}|{'-' * 8}|")
    for step, ours, rvc in rows:
        print(f"| {step:<58} | {ours:8.2f} | {rvc:8.2f} | {rvc / ours:5.2f}x |")
    if not args.rvc_dir:
        what = "train step: add --rvc-dir (bench/bench_train.py)"
        print(f"| {what:<58} | {'-':>8} | {'-':>8} | {'-':>6} |")


if __name__ == "__main__":
    main()
