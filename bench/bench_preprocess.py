"""Benchmark step 2a (preprocess): seconds of audio per wall second, 1 process and all cores.

Makes about 6 minutes of real speech in 12 files (rvc_pipeline.demo.voices.make_voice_set, cached under
~/.cache/rvc-operator/bench-voices), runs the whole step (run_step with local storage, at 40k) once
per process count, and compares with RVC's own figures (same data size, 2 cores):
6 min of speech at 40k in 3.6 s with one process and 3.0 s with two.

    .venv/bin/python bench/bench_preprocess.py [--files 12] [--seconds 30]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

RVC_SECONDS = {1: 3.6, 2: 3.0}
RVC_AUDIO_SECONDS = 360.0


def voice_set(n_files: int, seconds: float) -> Path:
    from rvc_pipeline.demo.voices import CACHE_ROOT, make_voice_set

    d = CACHE_ROOT / "bench-voices" / f"v1-{n_files}x{seconds:g}s"
    if len(list(d.glob("*.wav"))) != n_files:
        shutil.rmtree(d, ignore_errors=True)
        t = time.time()
        make_voice_set(d, n_files=n_files, seconds_each=seconds, seed=42, sr=44100)
        print(f"made {n_files} speech files in {time.time() - t:.1f} s -> {d}")
    return d


def run_once(data: Path, workers: int) -> dict:
    from rvc_pipeline.core.spec import parse_manifest
    from rvc_pipeline.steps import preprocess
    from rvc_pipeline.steps.runner import run_step

    store = Path(tempfile.mkdtemp(prefix="rvc-bench-pp-"))
    exp = parse_manifest({"metadata": {"name": "bench"}, "spec": {
        "dataset": {"source": str(data)}, "storage": {"uri": str(store)},
        "model": {"sampleRate": "40k"}, "resources": {"device": "cpu", "parallelism": workers}}})
    r0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    s = run_step(exp, "preprocess", preprocess.run, force=True)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime for a, b in zip(r0, r1))
    shutil.rmtree(store, ignore_errors=True)
    return {"workers": workers, "wall_s": round(wall, 3), "pieces": s["pieces"],
            "audio_s": s["input_seconds"], "x_realtime": round(s["input_seconds"] / wall, 1),
            "cpu_s": round(cpu, 2), "load_avg_1m": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    os.environ.setdefault("RVC_NO_PROGRESS", "1")
    data = voice_set(args.files, args.seconds)
    cores = len(os.sched_getaffinity(0))
    results = [run_once(data, 1)]  # warm-up run (page cache), not reported
    results = [run_once(data, w) for w in sorted({1, 2, cores})]
    for r in results:
        rvc = RVC_SECONDS.get(r["workers"])
        cmp = ""
        if rvc:
            rvc_speed = RVC_AUDIO_SECONDS / rvc
            cmp = (f"  (RVC: {rvc:.1f} s for 360 s = {rvc_speed:.0f}x; "
                   f"ours {r['x_realtime'] / rvc_speed:.2f}x RVC's speed)")
        print(f"preprocess 40k, {r['workers']} process(es): {r['audio_s']:.1f} s of audio, "
              f"{r['pieces']} pieces in {r['wall_s']:.2f} s = {r['x_realtime']:.0f}x real time, "
              f"CPU {r['cpu_s']:.2f} s (ffmpeg included), load {r['load_avg_1m']:.1f}{cmp}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
