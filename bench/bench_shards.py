"""Benchmark sharded data steps: wall time of preprocess + f0 + features run unsharded (one process per
step) and as 2 shards (`rvc-pipeline <step> --shard I/2`, two processes at once per step), on a few
minutes of real speech (rvc_pipeline.demo.voices, cached under ~/.cache/rvc-operator/bench-voices), local
storage, one process and one torch thread per shard (`resources.parallelism: 1`), DEMO random HuBERT.
Also checks that both runs made the same files, byte for byte.

    .venv/bin/python bench/bench_shards.py [--files 6] [--seconds 30] [--f0 harvest]
"""

from __future__ import annotations

import argparse
import filecmp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_preprocess import voice_set  # (bench/ is on sys.path: the scripts run as bench/<name>.py)

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("preprocess", "f0", "features")
OUTPUTS = ("0_gt_wavs", "1_16k_wavs", "2a_f0", "2b-f0nsf", "3_feature768")


def manifest(root: Path, data: Path, name: str, f0: str) -> Path:
    import yaml

    doc = {"apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment", "metadata": {"name": name},
           "spec": {"dataset": {"source": str(data)}, "storage": {"uri": str(root / "store")},
                    "resources": {"device": "cpu", "parallelism": 1}, "f0": {"method": f0},
                    "demoRandomWeights": True}}
    p = root / f"{name}.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def step_cmd(spec: Path, step: str, shard: str | None) -> list[str]:
    return [sys.executable, "-m", "rvc_pipeline.cli", step, "--spec", str(spec)] + (
        ["--shard", shard] if shard else [])


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_all(spec: Path, shards: int) -> tuple[dict[str, float], float]:
    """(wall seconds of each step, CPU seconds of all): `shards` processes at once (1: unsharded)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "pipeline"), "RVC_NO_PROGRESS": "1"}
    out: dict[str, float] = {}
    cpu0 = _cpu()
    for step in STEPS:
        t = time.perf_counter()
        procs = [subprocess.Popen(step_cmd(spec, step, f"{i}/{shards}" if shards > 1 else None), env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for i in range(shards)]
        for p in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                raise SystemExit(f"{step} failed ({p.returncode}):\n{err[-3000:]}")
        out[step] = time.perf_counter() - t
    return out, _cpu() - cpu0


def same_files(a: Path, b: Path) -> tuple[int, list[str]]:
    n, diff = 0, []
    for sub in OUTPUTS:
        names = sorted(p.name for p in (a / sub).iterdir())
        if names != sorted(p.name for p in (b / sub).iterdir()):
            diff.append(f"{sub}/ (names)")
            continue
        for name in names:
            n += 1
            if not filecmp.cmp(a / sub / name, b / sub / name, shallow=False):
                diff.append(f"{sub}/{name}")
    return n, diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=30.0, help="seconds of speech per file")
    ap.add_argument("--f0", default="harvest", help="pitch method (pm: fast; harvest: CPU-heavy)")
    args = ap.parse_args()
    data = voice_set(args.files, args.seconds)
    root = Path(tempfile.mkdtemp(prefix="rvc-bench-shards-"))
    try:
        one, cpu_one = run_all(manifest(root, data, "one", args.f0), 1)
        two, cpu_two = run_all(manifest(root, data, "two", args.f0), 2)
        n, diff = same_files(root / "store" / "logs" / "one", root / "store" / "logs" / "two")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.files} files x {args.seconds:g} s of speech, f0 {args.f0}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'step':>12} {'unsharded s':>12} {'2 shards s':>11} {'speed-up':>9}")
    for step in [*STEPS, "total"]:
        a = sum(one.values()) if step == "total" else one[step]
        b = sum(two.values()) if step == "total" else two[step]
        print(f"{step:>12} {a:12.1f} {b:11.1f} {a / b:8.2f}x")
    print(f"CPU seconds (all processes): unsharded {cpu_one:.1f}, 2 shards {cpu_two:.1f}; "
          f"2 shards used {cpu_two / sum(two.values()):.2f} cores on average")
    same = "all byte-identical" if not diff else f"DIFFERENT: {diff[:10]}"
    print(f"outputs: {n} files compared, {same}")


if __name__ == "__main__":
    main()
