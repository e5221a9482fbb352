"""Index build time (RVC's train_index recipe) for growing numbers of 768-d vectors.

    .venv/bin/python bench/bench_index.py                       # 17.9k, 50k, 100k, 200k; k-means at 250k
    .venv/bin/python bench/bench_index.py --sizes 17900 50000 --no-kmeans --threads 2

Each size runs in a fresh process (so peak memory is its own) on random Gaussian vectors, through
rvc_pipeline.steps.index exactly as the step does: shuffle in place, k-means above 200k, IVF{n},Flat training,
adds in batches of 8192, writing trained_/added_ files. RVC's own figures on this machine kind (2 CPU
cores): 1.05 s for 17.9k vectors, 102 s for 200k random vectors (91 s of it training IVF5128).

Wall seconds depend on what else runs on the machine; cpu_s (process CPU time, all threads) is the
steadier figure on a shared machine: with T idle cores, wall is about cpu_s / T.
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

RVC_SECONDS = {17_900: 1.05, 200_000: 102.0}
RVC_TRAIN_SECONDS = {200_000: 91.0}


def one(n: int, dim: int, threads: int, kmeans_threshold: int) -> dict[str, float | int | bool]:
    import numpy as np
    from rvc_pipeline.core.fileio import save_npy_atomic
    from rvc_pipeline.steps import index as ix

    feats = np.random.default_rng(n).standard_normal((n, dim), dtype=np.float32)
    with tempfile.TemporaryDirectory() as d:
        t0, cpu0 = time.perf_counter(), time.process_time()
        vectors, info = ix.prepare_vectors(feats, kmeans_threshold, n_cpu=threads)
        t_prep = time.perf_counter() - t0
        save_npy_atomic(Path(d) / "total_fea.npy", vectors)
        trained, added = ix.index_file_names(ix.n_ivf_for(vectors.shape[0]), "bench", "v2")
        index, tinfo = ix.train_ivf(vectors, n_threads=threads, trained_path=Path(d) / trained)
        index, add_s = ix.add_vectors(index, vectors, ix.ADD_BATCH, n_threads=threads, use_gpu=tinfo["gpu"])
        ix.write_index_atomic(index, Path(d) / added)
        total = time.perf_counter() - t0
    return {
        "vectors": n, "dim": dim, "threads": threads, "n_ivf": tinfo["n_ivf"], "kmeans": info["kmeans"],
        "kmeans_s": info["kmeans_seconds"], "prep_s": round(t_prep, 2), "train_s": tinfo["train_seconds"],
        "add_s": add_s, "total_s": round(total, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "cpu_s": round(time.process_time() - cpu0, 2),
        "data_mb": round(n * dim * 4 / 2**20),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[17_900, 50_000, 100_000, 200_000])
    ap.add_argument("--kmeans-size", type=int, default=250_000, help="size for the k-means path (0: skip)")
    ap.add_argument("--no-kmeans", action="store_true")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--threshold", type=int, default=200_000, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.dim, a.threads, a.threshold)))
        return 0

    sizes = list(a.sizes)
    if a.kmeans_size and not a.no_kmeans:
        sizes.append(a.kmeans_size)
    print(f"faiss index build, {a.dim}-d random vectors, {a.threads} threads, "
          f"{os.cpu_count()} CPUs visible; RVC on 2 cores: 1.05 s @17.9k, 102 s @200k (train 91 s)")
    hdr = (f"{'vectors':>8} {'n_ivf':>6} {'kmeans':>7} {'kmeans_s':>8} {'train_s':>8} {'add_s':>6} "
           f"{'total_s':>8} {'cpu_s':>7} {'RVC_s':>6} {'peak_MB':>8} {'data_MB':>8}")
    print(hdr)
    for n in sizes:
        cmd = [sys.executable, __file__, "--one", str(n), "--dim", str(a.dim), "--threads", str(a.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{n:>8} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rvc = RVC_SECONDS.get(n)
        print(f"{r['vectors']:>8} {r['n_ivf']:>6} {str(r['kmeans']):>7} {r['kmeans_s']:>8.2f} "
              f"{r['train_s']:>8.2f} {r['add_s']:>6.2f} {r['total_s']:>8.2f} {r['cpu_s']:>7.2f} "
              f"{(f'{rvc:.2f}' if rvc else '-'):>6} {r['peak_rss_mb']:>8} {r['data_mb']:>8}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
