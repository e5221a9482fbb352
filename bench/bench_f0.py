"""Benchmark: the f0 step (pm, dio, harvest, crepe tiny/full) in seconds of audio per wall second.

The audio is real speech (rvc_pipeline.demo.voices: espeak-ng / flite / festival voices) at 16 kHz, cut into
RVC-like pieces of 3.7 s every 3.4 s (about 103 pieces for 6 minutes, as RVC was timed) and written
as float32 WAVs to a local experiment's 1_16k_wavs/. Each run is the whole step through the I/O shell
(`run_step(force=True)` after deleting the outputs): process start-up, loading, f0, saving both .npy files.
"step" is that wall time; "pure" is compute_f0 alone in this process (no I/O, no start-up), for reference;
"rvc-like" (with --baseline) is RVC's per-file loop measured here under the same load: a new Python process
that imports the f0 libraries, then per file an ffmpeg subprocess to load it (RVC's load_audio), f0 and
two np.save calls, files split over the processes as RVC does (paths[i::n]).
Harvest is pyworld's C code, one file per process: its levers are every core of a machine (the step's
worker processes, `--procs 1 2`: the 2-process speed-up is printed with the load average) and shards
across pods (`--shards 2`: `rvc-pipeline f0 --shard 0/2` and `1/2` as two concurrent processes against one
unsharded `rvc-pipeline f0`, timed by bench_shards.run_all on a cached speech set).

RVC's own figures on this machine kind, 6 min / 103 pieces, one / two processes:
pm 9.7 s / 5.3 s, dio 12.2 s / 6.4 s, harvest 108 s / 54 s.

    .venv/bin/python bench/bench_f0.py --seconds 360 --procs 1 2
    .venv/bin/python bench/bench_f0.py --seconds 60 --methods harvest --shards 2   # cores and shards
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from unittest import mock

import bench_shards  # (bench/ is on sys.path: the scripts run as bench/<name>.py)
import numpy as np
import soundfile as sf
from rvc_pipeline.core import layout
from rvc_pipeline.core.spec import parse_manifest
from rvc_pipeline.demo.voices import make_voice_set
from rvc_pipeline.steps import f0 as f0step
from rvc_pipeline.steps.runner import run_step

SR = 16000
RVC_SECONDS = {"pm": (9.7, 5.3), "dio": (12.2, 6.4), "harvest": (108.0, 54.0)}  # 360 s, 1 / 2 processes
RVC_AUDIO = 360.0


def make_pieces(seconds: float, work: Path) -> list[np.ndarray]:
    n_files = max(1, round(seconds / 30))
    src = make_voice_set(work / "voices", n_files=n_files, seconds_each=seconds / n_files, seed=7, sr=SR)
    pieces: list[np.ndarray] = []
    for p in src:
        x, sr = sf.read(p, dtype="float32")
        assert sr == SR
        for s in range(0, len(x), int(3.4 * SR)):
            piece = x[s : s + int(3.7 * SR)]
            if len(piece) >= SR // 2:
                pieces.append(piece)
    return pieces


def write_set(root: Path, pieces: list[np.ndarray]) -> Path:
    d = root / "store" / layout.exp_key("bench") / layout.WAVS_16K_DIR
    shutil.rmtree(d.parent, ignore_errors=True)
    d.mkdir(parents=True)
    for i, x in enumerate(pieces):
        sf.write(d / f"{i // 10}_{i % 10}.wav", x, SR, subtype="FLOAT")
    return d


def run_once(root: Path, method: str, procs: int, crepe_model: str = "full") -> tuple[float, dict]:
    exp = parse_manifest({"metadata": {"name": "bench"}, "spec": {
        "dataset": {"source": str(root / "data")},
        "storage": {"uri": str(root / "store")},
        "resources": {"device": "cpu", "parallelism": procs},
        "f0": {"method": method, "crepeModel": crepe_model},
    }})
    exp_dir = root / "store" / "logs" / "bench"
    for sub in layout.F0_DIRS:
        shutil.rmtree(exp_dir / sub, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run_step(exp, "f0", f0step.run, force=True)
    return time.perf_counter() - t0, summary


RVC_LIKE = r"""
import sys, subprocess, numpy as np, parselmouth, pyworld
from rvc_pipeline.steps.f0 import compute_f0, coarse_f0
method, i, n, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
for path in files[i::n]:
    cmd = ["ffmpeg", "-nostdin", "-threads", "0", "-i", path, "-f", "f32le", "-acodec", "pcm_f32le",
           "-ac", "1", "-ar", "16000", "-"]
    out = subprocess.run(cmd, capture_output=True, check=True).stdout
    x = np.frombuffer(out, np.float32)
    f0 = compute_f0(x, method)
    np.save(path + ".nsf", f0)
    np.save(path + ".coarse", coarse_f0(f0))
"""


def rvc_like(files: list[Path], method: str, procs: int) -> float:
    import subprocess
    import sys

    t0 = time.perf_counter()
    ps = [subprocess.Popen([sys.executable, "-c", RVC_LIKE, method, str(i), str(procs), *map(str, files)])
          for i in range(procs)]
    for p in ps:
        if p.wait() != 0:
            raise RuntimeError("rvc-like baseline failed")
    return time.perf_counter() - t0


def sharded(method: str, shards: int, seconds: float) -> None:
    """Wall time of `rvc-pipeline f0` unsharded (one process) vs `shards` concurrent --shard processes, on
    bench_shards' speech set preprocessed once per run (only preprocess and f0 run: features are not
    what this measures)."""
    from bench_preprocess import voice_set

    files = max(shards, round(seconds / 30))
    data = voice_set(files, seconds / files)
    walls: dict[int, float] = {}
    cpus: dict[int, float] = {}
    loads = [os.getloadavg()[0]]
    with mock.patch.object(bench_shards, "STEPS", ("preprocess", "f0")):
        for n in (1, shards):
            root = Path(tempfile.mkdtemp(prefix="bench-f0-shards-"))
            try:
                spec = bench_shards.manifest(root, data, f"s{n}", method)
                steps, cpus[n] = bench_shards.run_all(spec, n)
                walls[n] = steps["f0"]
            finally:
                shutil.rmtree(root, ignore_errors=True)
            loads.append(os.getloadavg()[0])
    print(f"{method} f0 step via the CLI, {files} files x {seconds / files:g} s of speech: unsharded "
          f"{walls[1]:.1f} s, {shards} shards at once {walls[shards]:.1f} s "
          f"-> {walls[1] / walls[shards]:.2f}x; CPU s (preprocess + f0) {cpus[1]:.1f} vs {cpus[shards]:.1f} "
          f"(load average {' / '.join(f'{x:.1f}' for x in loads)}; {len(os.sched_getaffinity(0))} cores)",
          flush=True)


def pure(pieces: list[np.ndarray], method: str, **opts: object) -> float:
    f0step.compute_f0(pieces[0][: SR // 2], method, **opts)  # imports, model load, decoder compilation
    t0 = time.perf_counter()
    for x in pieces:
        f0step.compute_f0(x, method, **opts)
    return time.perf_counter() - t0


def cpu_seconds() -> float:
    """User + sys seconds of this process and its reaped children (the step's worker processes)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def subset_for(m: str, pieces: list[np.ndarray], crepe_seconds: dict[str, float]) -> list[np.ndarray]:
    """All pieces, or for crepe-* the first ones up to that model's seconds (crepe is slow on CPU)."""
    if not m.startswith("crepe"):
        return pieces
    subset, acc = [], 0.0
    for p in pieces:
        if acc >= crepe_seconds[m]:
            break
        subset.append(p)
        acc += len(p) / SR
    return subset


def bench_method(m: str, subset: list[np.ndarray], root: Path, procs_list: list[int],
                 baseline: bool) -> dict[int, tuple[float, float | None, float]]:
    """Print one row per process count (and the RVC-like loop's with `baseline`); {procs: (step wall s,
    RVC-like wall s or None, step CPU s of every process)}."""
    method, model = (m.split("-") + ["full"])[:2] if m.startswith("crepe") else (m, "full")
    audio = sum(len(p) for p in subset) / SR
    write_set(root, subset)
    quarter = subset[: max(1, len(subset) // 4)]
    p_time, p_audio = pure(quarter, method, model=model), sum(len(p) for p in quarter) / SR
    out: dict[int, tuple[float, float | None, float]] = {}
    for procs in procs_list:
        cpu0 = cpu_seconds()
        wall, summary = run_once(root, method, procs, model)
        cpu = cpu_seconds() - cpu0
        assert summary["computed"] == len(subset), summary
        rvc = RVC_SECONDS.get(method)
        rvc_s = rvc[min(procs, 2) - 1] * audio / RVC_AUDIO if rvc and procs <= 2 else None
        print(f"{m:<11} {procs:>5} {audio:>8.1f} {wall:>8.2f} {audio / wall:>8.1f} {p_audio / p_time:>8.1f} "
              + (f"{rvc_s:>7.1f} {audio / rvc_s:>6.1f} {rvc_s / wall:>7.2f}x" if rvc_s else
                 f"{'-':>7} {'-':>6} {'-':>8}"), flush=True)
        base = None
        if baseline and method in RVC_SECONDS:
            files = sorted((root / "store" / layout.exp_key("bench") / layout.WAVS_16K_DIR).glob("*.wav"))
            base = rvc_like(files, method, procs)
            print(f"{'  rvc-like':<11} {procs:>5} {audio:>8.1f} {base:>8.2f} {audio / base:>8.1f} "
                  f"{'':>8} {'':>7} {'':>6} {base / wall:>7.2f}x  (same machine and load)", flush=True)
        out[procs] = (wall, base, cpu)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=360.0, help="seconds of speech for pm/dio/harvest")
    ap.add_argument("--crepe-tiny-seconds", type=float, default=30.0)
    ap.add_argument("--crepe-full-seconds", type=float, default=8.0)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--methods", nargs="+", default=["pm", "dio", "harvest", "crepe-tiny", "crepe-full"])
    ap.add_argument("--baseline", action="store_true", help="also time the RVC-like per-file loop")
    ap.add_argument("--shards", type=int, default=2,
                    help="harvest via the CLI unsharded vs N shards (0: skip)")
    args = ap.parse_args()
    os.environ["RVC_NO_PROGRESS"] = "1"
    logging.basicConfig(level=logging.WARNING)
    crepe = {"crepe-tiny": args.crepe_tiny_seconds, "crepe-full": args.crepe_full_seconds}
    work = Path(tempfile.mkdtemp(prefix="bench-f0-"))
    try:
        pieces = make_pieces(args.seconds, work)
        total = sum(len(p) for p in pieces) / SR
        print(f"cores: {len(os.sched_getaffinity(0))}; speech: {total:.1f} s in {len(pieces)} pieces "
              f"(3.7 s every 3.4 s, float32 16 kHz); load average {os.getloadavg()[0]:.1f}")
        print(f"{'method':<11} {'procs':>5} {'audio s':>8} {'step s':>8} {'x real':>8} {'pure x1':>8} "
              f"{'RVC s':>7} {'RVC x':>6} {'speed-up':>8}")
        for m in args.methods:
            walls = bench_method(m, subset_for(m, pieces, crepe), work / "exp", args.procs, args.baseline)
            if 1 in walls and 2 in walls:
                (w1, _, c1), (w2, _, c2) = walls[1], walls[2]
                print(f"{m}: 2 processes {w1 / w2:.2f}x 1 process in wall time; CPU s {c1:.1f} vs {c2:.1f} "
                      f"({c2 / w2:.2f} cores busy; load average now {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.shards > 1:
        sharded("harvest", args.shards, args.seconds)


if __name__ == "__main__":
    main()
