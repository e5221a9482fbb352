"""Index build, ours vs RVC's recipe, same vectors, same run: time, speed-up and recall@8.

    .venv/bin/python bench/bench_index.py                        # 50k vectors, about 20 s on 2 cores
    .venv/bin/python bench/bench_index.py --vectors 200000       # the issue-13 figure, 5-7 min on 2 cores
    .venv/bin/python bench/bench_index.py --vectors 250000 --data mixture   # the k-means (> 200k) branch

Both recipes go through rvc_pipeline.steps.index exactly as the step does (shuffle in place, k-means to
10k centroids above 200k, ``IVF{n_ivf},Flat`` with RVC's n_ivf, nprobe 1, adds in batches of 8192, the
trained_/added_ files written); they differ only in the vectors the IVF quantizer trains on: RVC all of
them, ours a seeded sample of ``TRAIN_POINTS_PER_LIST * n_ivf`` (index.py explains the choice).

Two kinds of 768-d vectors: ``mixture`` (HuBERT-like: a mixture of 300 Gaussian components, each with a
16-dimensional low-rank spread plus isotropic noise) and ``random`` (i.i.d. Gaussian, the worst case for
an IVF index). Recall@8: for 2000 held-out queries from the same distribution, the share of the 8 exact
nearest neighbours (faiss IndexFlatL2 over the vectors the index holds) that the index returns with
nprobe 1, as RVC searches. The shuffle is seeded here (RVC's is not) so that both recipes see the rows
in the same order: RVC's own recall moves by about 0.6 point from one shuffle to another.
``imbalance`` is faiss' list-size imbalance factor (1 = equal lists; the search cost at nprobe 1 grows
with it).

Wall seconds depend on what else runs on the machine; cpu_s (process CPU time, all threads) is the
steadier figure on a shared machine: with T idle cores, wall is about cpu_s / T.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RVC_SECONDS = {17_900: 1.05, 200_000: 102.0}  # RVC's own train_index on this machine kind, 2 cores
QUERIES = 2000
K = 8


def mixture(n: int, dim: int, seed: int, components: int = 300, rank: int = 16) -> np.ndarray:
    """`n` HuBERT-like vectors: Gaussian components with a low-rank spread plus isotropic noise."""
    r = np.random.default_rng(seed)
    centres = r.standard_normal((components, dim), dtype=np.float32)
    spread = r.standard_normal((components, rank, dim), dtype=np.float32) * np.float32(0.35)
    out = np.empty((n, dim), np.float32)
    for i in range(0, n, 20_000):
        m = min(20_000, n - i)
        lab = r.integers(0, components, m)
        z = r.standard_normal((m, rank), dtype=np.float32)
        out[i : i + m] = centres[lab] + np.einsum("nr,nrd->nd", z, spread[lab])
        out[i : i + m] += np.float32(0.15) * r.standard_normal((m, dim), dtype=np.float32)
    return out


def make(kind: str, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, held-out queries) of one kind; the same seed gives the same data for both recipes."""
    if kind == "mixture":
        both = mixture(n + QUERIES, dim, seed=0)
    else:
        both = np.random.default_rng(1).standard_normal((n + QUERIES, dim), dtype=np.float32)
    return np.ascontiguousarray(both[:n]), np.ascontiguousarray(both[n:])


def recall_at_k(index: Any, queries: np.ndarray, k: int = K) -> float:
    """Share of the k exact nearest neighbours (IndexFlatL2 over the index's own vectors) that `index`
    returns at its stored nprobe."""
    import faiss

    flat = faiss.IndexFlatL2(index.d)
    flat.add(index.reconstruct_n(0, index.ntotal))
    _, want = flat.search(queries, k)
    _, got = index.search(queries, k)
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(want, got))
    return hits / (k * queries.shape[0])


def build(feats: np.ndarray, threads: int, points_per_list: int | None, folder: Path) -> tuple[Any, dict]:
    """One build through the step's functions, files written as the step writes them."""
    from rvc_pipeline.core.fileio import save_npy_atomic
    from rvc_pipeline.steps import index as ix

    t0, cpu0 = time.perf_counter(), time.process_time()
    vectors, info = ix.prepare_vectors(feats, n_cpu=threads, seed=0)  # both recipes: the same row order
    save_npy_atomic(folder / "total_fea.npy", vectors)
    trained, added = ix.index_file_names(ix.n_ivf_for(vectors.shape[0]), "bench", "v2")
    index, tinfo = ix.train_ivf(vectors, n_threads=threads, trained_path=folder / trained,
                                points_per_list=points_per_list)
    index, add_s = ix.add_vectors(index, vectors, ix.ADD_BATCH, n_threads=threads, use_gpu=tinfo["gpu"])
    ix.write_index_atomic(index, folder / added)
    info.update(tinfo, add_seconds=add_s, total_s=time.perf_counter() - t0, cpu_s=time.process_time() - cpu0)
    return index, info


def compare(kind: str, n: int, dim: int, threads: int) -> dict[str, dict]:
    """RVC's recipe then ours on the same vectors; returns {recipe: figures}."""
    import faiss
    from rvc_pipeline.steps import index as ix

    feats, queries = make(kind, n, dim)
    out: dict[str, dict] = {}
    for name, ppl in (("RVC", None), ("ours", ix.TRAIN_POINTS_PER_LIST)):
        with tempfile.TemporaryDirectory() as d:
            index, info = build(feats.copy(), threads, ppl, Path(d))
        faiss.omp_set_num_threads(threads)
        info["recall"] = recall_at_k(index, queries)
        info["imbalance"] = faiss.extract_index_ivf(index).invlists.imbalance_factor()
        out[name] = info
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vectors", type=int, default=50_000, help="number of vectors N (default 50000)")
    ap.add_argument("--data", choices=["mixture", "random", "both"], default="both")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    a = ap.parse_args()
    from rvc_pipeline.steps import index as ix

    rvc = RVC_SECONDS.get(a.vectors)
    print(f"faiss index build, {a.vectors} x {a.dim}-d, {a.threads} threads, {os.cpu_count()} CPUs visible, "
          f"load average {os.getloadavg()[0]:.1f}, GPU {ix.gpu_available()}; ours trains on "
          f"{ix.TRAIN_POINTS_PER_LIST} points per list" + (f"; RVC's script here: {rvc} s" if rvc else ""))
    print(" ".join(f"{h:>{w}}" for h, w in COLUMNS))
    kinds = ["mixture", "random"] if a.data == "both" else [a.data]
    for kind in kinds:
        res = compare(kind, a.vectors, a.dim, a.threads)
        for name, r in res.items():
            print(_row(kind, name, r), flush=True)
        rv, us = res["RVC"], res["ours"]
        print(f"{kind:>8} speed-up {rv['total_s'] / us['total_s']:.2f}x wall, "
              f"{rv['cpu_s'] / us['cpu_s']:.2f}x cpu; "
              f"recall@8 ours - RVC = {100 * (us['recall'] - rv['recall']):+.2f} points", flush=True)
    return 0


COLUMNS = [("data", 8), ("recipe", 6), ("n_ivf", 6), ("trained", 8), ("kmeans_s", 8), ("train_s", 8),
           ("add_s", 6), ("total_s", 8), ("cpu_s", 7), ("recall@8", 8), ("imbal", 6)]


def _row(kind: str, name: str, r: dict) -> str:
    vals = [kind, name, r["n_ivf"], r["train_vectors"], f"{r['kmeans_seconds']:.2f}",
            f"{r['train_seconds']:.2f}", f"{r['add_seconds']:.2f}", f"{r['total_s']:.2f}",
            f"{r['cpu_s']:.2f}", f"{r['recall']:.4f}", f"{r['imbalance']:.2f}"]
    return " ".join(f"{v:>{w}}" for v, (_, w) in zip(vals, COLUMNS))


if __name__ == "__main__":
    sys.exit(main())
