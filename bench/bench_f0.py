"""Benchmark: the f0 step (pm, dio, harvest, crepe tiny/full) in seconds of audio per wall second.

The audio is real speech (rvc_pipeline.demo.voices: espeak-ng / flite / festival voices) at 16 kHz, cut into
RVC-like pieces of 3.7 s every 3.4 s (about 103 pieces for 6 minutes, as RVC was timed) and written
as float32 WAVs to a local experiment's 1_16k_wavs/. Each run is the whole step through the I/O shell
(`run_step(force=True)` after deleting the outputs): process start-up, loading, f0, saving both .npy files.
"step" is that wall time; "pure" is compute_f0 alone in this process (no I/O, no start-up), for reference;
"rvc-like" (with --baseline) is RVC's per-file loop measured here under the same load: a new Python process
that imports the f0 libraries, then per file an ffmpeg subprocess to load it (RVC's load_audio), f0 and
two np.save calls, files split over the processes as RVC does (paths[i::n]).

RVC's own figures on this machine kind, 6 min / 103 pieces, one / two processes:
pm 9.7 s / 5.3 s, dio 12.2 s / 6.4 s, harvest 108 s / 54 s.

    .venv/bin/python bench/bench_f0.py --seconds 360 --procs 1 2
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

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


def pure(pieces: list[np.ndarray], method: str, **opts: object) -> float:
    f0step.compute_f0(pieces[0][: SR // 2], method, **opts)  # imports, model load, decoder compilation
    t0 = time.perf_counter()
    for x in pieces:
        f0step.compute_f0(x, method, **opts)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=360.0, help="seconds of speech for pm/dio/harvest")
    ap.add_argument("--crepe-tiny-seconds", type=float, default=30.0)
    ap.add_argument("--crepe-full-seconds", type=float, default=8.0)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--methods", nargs="+", default=["pm", "dio", "harvest", "crepe-tiny", "crepe-full"])
    ap.add_argument("--baseline", action="store_true", help="also time the RVC-like per-file loop")
    args = ap.parse_args()
    os.environ["RVC_NO_PROGRESS"] = "1"
    logging.basicConfig(level=logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="bench-f0-"))
    try:
        pieces = make_pieces(args.seconds, work)
        total = sum(len(p) for p in pieces) / SR
        print(f"cores: {len(os.sched_getaffinity(0))}; speech: {total:.1f} s in {len(pieces)} pieces "
              f"(3.7 s every 3.4 s, float32 16 kHz)")
        print(f"{'method':<11} {'procs':>5} {'audio s':>8} {'step s':>8} {'x real':>8} {'pure x1':>8} "
              f"{'RVC s':>7} {'RVC x':>6} {'speed-up':>8}")
        for m in args.methods:
            method, model = (m.split("-") + ["full"])[:2] if m.startswith("crepe") else (m, "full")
            if method == "crepe":
                secs = args.crepe_tiny_seconds if model == "tiny" else args.crepe_full_seconds
                subset, acc = [], 0.0
                for p in pieces:
                    if acc >= secs:
                        break
                    subset.append(p)
                    acc += len(p) / SR
            else:
                subset = pieces
            audio = sum(len(p) for p in subset) / SR
            root = work / "exp"
            write_set(root, subset)
            p_time = pure(subset[: max(1, len(subset) // 4)], method, model=model)
            p_audio = sum(len(p) for p in subset[: max(1, len(subset) // 4)]) / SR
            for procs in args.procs:
                wall, summary = run_once(root, method, procs, model)
                assert summary["computed"] == len(subset), summary
                rvc = RVC_SECONDS.get(method)
                rvc_s = rvc[min(procs, 2) - 1] * audio / RVC_AUDIO if rvc and procs <= 2 else None
                print(f"{m:<11} {procs:>5} {audio:>8.1f} {wall:>8.2f} {audio / wall:>8.1f} "
                      f"{p_audio / p_time:>8.1f} "
                      + (f"{rvc_s:>7.1f} {audio / rvc_s:>6.1f} {rvc_s / wall:>7.2f}x" if rvc_s else
                         f"{'-':>7} {'-':>6} {'-':>8}"), flush=True)
                if args.baseline and method in RVC_SECONDS:
                    wav_dir = root / "store" / layout.exp_key("bench") / layout.WAVS_16K_DIR
                    files = sorted(wav_dir.glob("*.wav"))
                    base = rvc_like(files, method, procs)
                    print(f"{'  rvc-like':<11} {procs:>5} {audio:>8.1f} {base:>8.2f} {audio / base:>8.1f} "
                          f"{'':>8} {'':>7} {'':>6} {base / wall:>7.2f}x  (same machine and load)",
                          flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
