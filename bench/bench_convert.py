"""Benchmark: `rvc-pipeline convert` on CPU, files per second and real-time factor for 1 vs 2 workers.

A full-size v2 40k generator with pitch (random weights, exported in RVC's small-model format) and a
full-size HuBERT-base (random weights through the demo fallback; speed does not depend on the weights)
convert N recordings of real speech (espeak-ng) with pm f0, no index, WAV out. Workers 1: this process,
torch on every core; workers 2: two processes, each loading the model once, torch threads split. The
wall time includes loading (once per process) and writing. Each batch runs as its own child process, so
that the CPU time of all its processes (pool workers included) is counted: on a shared machine the CPU
seconds per audio second are steadier than the wall time.

    .venv/bin/python bench/bench_convert.py --files 6 --seconds 4 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_infer import speak  # type: ignore[import-not-found]
from rvc_pipeline.convert import BatchOptions, Setup, run_batch
from rvc_pipeline.export import export_small_model
from rvc_pipeline.nn import build_generator, get_config

VOICES = ("en-us", "en+f3", "en+m3", "en-gb", "en+f2", "en+m1")


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def one_batch(model: str, src: str, out: str, workers: int) -> None:
    """The child: one batch, its report's totals as JSON on stdout."""
    setup = Setup(model=model, demo_random_weights=True, device="cpu", index_rate=0.0)
    rep = run_batch(BatchOptions(setup, (src,), Path(out), workers=workers, overwrite=True))
    from multiprocessing import forkserver

    stop = getattr(getattr(forkserver, "_forkserver", None), "_stop", None)
    if stop is not None:  # the pool's workers are the fork server's children: reap them into our count
        stop()
    r = resource.getrusage(resource.RUSAGE_SELF)
    cpu = r.ru_utime + r.ru_stime + children_cpu()
    print(json.dumps({"converted": rep.count("converted"), "audio": rep.input_seconds, "cpu": cpu}))


def timed(model: Path, src: Path, out: Path, workers: int) -> tuple[float, float, dict[str, float]]:
    """(wall s, CPU s of the child and its descendants, the batch's totals)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", str(model), str(src), str(out), str(workers)],
                          capture_output=True, text=True, check=True)
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    return time.perf_counter() - t0, rep["cpu"], rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each recording")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return one_batch(args.child[0], args.child[1], args.child[2], int(args.child[3]))
    os.environ.setdefault("RVC_NO_PROGRESS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.update(RVC_OFFLINE="1", RVC_WEIGHTS_DIR=str(work / "no-weights"))  # random HuBERT-base
        src = work / "in"
        src.mkdir()
        for i in range(args.files):  # spoken in a scratch folder (speak leaves its untrimmed take beside)
            (work / "raw").mkdir(exist_ok=True)
            rec = speak(work / "raw" / f"rec{i:02d}.wav", args.seconds, voice=VOICES[i % len(VOICES)])
            rec.rename(src / rec.name)
        cfg = get_config("v2", "40k")
        torch.manual_seed(0)
        model = work / "bench_v2_40k.pth"
        export_small_model(build_generator(cfg, "v2", True).state_dict(), cfg, "v2", True, model, "1epoch")
        print(f"{args.files} files x {args.seconds:.1f} s of espeak-ng speech; v2 40k f0 (random weights), "
              f"HuBERT-base (random weights), pm f0, no index, WAV; {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}")
        print(f"{'workers':>7} {'wall s':>7} {'files/s':>8} {'RTF':>6} {'cpu s':>7} {'audio s/cpu s':>13} "
              f"{'load avg':>8}", flush=True)
        for w in args.workers:
            wall, cpu, rep = timed(model, src, work / f"out{w}", w)
            print(f"{w:>7} {wall:>7.1f} {rep['converted'] / wall:>8.3f} {rep['audio'] / wall:>6.2f} "
                  f"{cpu:>7.1f} {rep['audio'] / cpu:>13.3f} {os.getloadavg()[0]:>8.1f}", flush=True)
        print("RTF = seconds of input audio / wall seconds of the whole batch (process start and model loads "
              "included); cpu s = CPU time of the batch's processes")


if __name__ == "__main__":
    main()
