"""Step 4: the retrieval index (RVC's `train_index`), a faiss IVF-Flat index over the HuBERT features.

The recipe, exactly as RVC does it (reference section 9):

1. load every ``.npy`` in ``3_feature256`` (v1) or ``3_feature768`` (v2), sorted, concatenated (float32);
2. shuffle the rows;
3. if there are more than 200 000 rows, replace them by the 10 000 centroids of a scikit-learn
   ``MiniBatchKMeans(batch_size=256*n_cpu, compute_labels=False, init="random")``; if that fails the
   original rows are kept;
4. save them as ``total_fea.npy``;
5. ``n_ivf = min(int(16*sqrt(N)), N // 39)`` with N counted after step 3;
6. ``index_factory(dim, "IVF{n_ivf},Flat")`` (L2), ``nprobe = 1`` set through ``extract_index_ivf`` (it is
   stored in the file);
7. train, write ``trained_IVF{n}_Flat_nprobe_1_{exp}_{version}.index``;
8. add the rows in batches of 8192, write ``added_IVF{n}_Flat_nprobe_1_{exp}_{version}.index``.

Deliberate differences, none of which changes the files' format or what RVC and Applio read from them:

* Step 7 trains the quantizer on a seeded sample of ``16 * n_ivf`` vectors for 5 k-means iterations (RVC:
  all vectors, 10 iterations) once there are more than 20 000 vectors: 3.3x less CPU for the whole build
  at 200k x 768 with the same recall@8 at nprobe 1 (``TRAIN_POINTS_PER_LIST`` and bench/README.md have
  the measurements). n_ivf, the index type, nprobe
  and the file names are RVC's, and every vector is added; up to 20 000 vectors training is RVC's.
* Fewer than 39 vectors (a few seconds of speech) would give ``n_ivf = 0``, which faiss refuses. We use
  ``IVF1,Flat`` then: one inverted list, so nprobe = 1 searches every vector (an exact search), and the file
  names keep RVC's ``IVF{n}_Flat`` pattern that its index lookup expects.
* Threads are bounded (faiss OpenMP and the BLAS/OpenMP pools scikit-learn uses) to the step's worker
  count: RVC users report thread blow-ups on big machines.
* Memory: the features are read into one preallocated matrix (no list of arrays plus a concatenated copy),
  shuffled in place, and the k-means runs on mini-batches; when k-means replaced the full matrix, it is
  dropped before training.
* Features that are not finite or of the wrong width fail the step with the file named.
* A GPU build of faiss (faiss-gpu does not fall back to the CPU by itself) is used only when
  ``faiss.get_num_gpus() > 0``: training and the adds run on the GPU, and the index is copied back to
  the CPU before each file is written (the files are the same CPU ``IndexIVFFlat`` either way).
* Files are written atomically (temporary name, then rename); index files of an earlier run with another
  ``n_ivf`` are removed so RVC's lookup finds exactly one ``added_*`` index.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from rvc_pipeline.core import layout
from rvc_pipeline.core.errors import StepFailed
from rvc_pipeline.core.fileio import atomic_path, save_npy_atomic
from rvc_pipeline.steps.runner import StepContext

log = logging.getLogger("rvc_pipeline")

KMEANS_THRESHOLD = 200_000
KMEANS_CLUSTERS = 10_000
ADD_BATCH = 8192
MIN_POINTS_PER_LIST = 39  # faiss' own minimum of training points per centroid, and RVC's N // 39
TRAIN_POINTS_PER_LIST = 16
"""Above ``TRAIN_SAMPLE_FLOOR`` vectors the IVF quantizer trains on a seeded random sample of
``TRAIN_POINTS_PER_LIST * n_ivf`` of them, for ``TRAIN_ITERATIONS`` k-means iterations.

RVC trains on every vector for faiss' default 10 iterations. With its ``n_ivf = N // 39`` (every N up to
389k, so every index RVC builds at or below its 200k k-means threshold) that is already 39 points per
list, so a bound of 39..256 points per list (where faiss stops warning / starts sampling itself) would
change nothing: the k-means work (points x iterations) has to go below it. It is ~90% of the build (91 of
102 s at 200k on 2 cores). Measured (recall@8 at nprobe 1 against exact search, held-out queries; see
bench/README.md for the 200k figures): on 40k x 768-d vectors, 16..20 points x 4..5 iterations (1/5 of
RVC's work) keeps recall within +-0.5 point of RVC on a HuBERT-like mixture and keeps the list-size
imbalance near RVC's; 5..10 points x 10 iterations raise recall on the mixture but make lists very
unequal on random vectors (imbalance 25-70 vs 5.8), i.e. slower searches. 16 x 4 (1/6 of the work) over
3 seeds of 20k x 768-d mixtures: +0.07 point on average; on 32-d mixtures -0.85 point (any 1/5 cut we
tried costs that much there; HuBERT features are 768-d). Chosen: 16 x 5 (1/4.9 of the work), which at 200k
x 768 gave +0.55 point on the mixture with 3.3x less CPU for the whole build (16 x 4: 4.1x, -0.96 point).
faiss warns below 39 points per centroid: the warning is silenced on purpose (min_points_per_centroid 1).
Not a spec field: nothing for a user to tune (n_ivf, nprobe and the files are RVC's either way).
"""
TRAIN_ITERATIONS = 5
"""k-means iterations on the bounded sample (faiss' default for an IVF quantizer, and RVC's, is 10); see
``TRAIN_POINTS_PER_LIST``. Below the floor the default 10 is kept."""
TRAIN_SAMPLE_FLOOR = 20_000
"""Up to this many vectors (about 1 s of training on 2 cores) the quantizer is trained on all of them,
exactly as RVC does."""
TRAIN_SAMPLE_SEED = 1234
"""Seed of the training sample (faiss' own k-means seed is 1234 too): the same vectors give the same index."""


def index_file_names(n_ivf: int, experiment: str, version: str) -> tuple[str, str]:
    """(trained, added) index file names, exactly as RVC names them."""
    trained, added = (layout.index_name(kind, n_ivf, experiment, version) for kind in layout.INDEX_KINDS)
    return trained, added


def n_ivf_for(n: int) -> int:
    """RVC's number of inverted lists, ``min(int(16*sqrt(N)), N // 39)``, and at least 1 (see module doc)."""
    if n < 1:
        raise ValueError("cannot build an index over 0 vectors")
    return max(1, min(int(16 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))


def train_sample_size(
    n: int, n_ivf: int | None = None, points_per_list: int | None = TRAIN_POINTS_PER_LIST
) -> int:
    """How many of `n` vectors train the quantizer: all of them up to ``TRAIN_SAMPLE_FLOOR``, when
    ``points_per_list * n_ivf`` is not fewer, or when `points_per_list` is None (RVC's recipe); else that
    many."""
    if points_per_list is None:
        return n
    n_ivf = n_ivf_for(n) if n_ivf is None else n_ivf
    return min(n, max(TRAIN_SAMPLE_FLOOR, points_per_list * n_ivf))


def training_sample(
    vectors: np.ndarray, n_ivf: int, points_per_list: int | None = TRAIN_POINTS_PER_LIST,
    seed: int = TRAIN_SAMPLE_SEED,
) -> np.ndarray:
    """The vectors the quantizer trains on: `vectors` itself when small (see ``train_sample_size``), else a
    seeded uniform sample without replacement, rows kept in their order (a new C-contiguous matrix)."""
    n = vectors.shape[0]
    m = train_sample_size(n, n_ivf, points_per_list)
    if m >= n:
        return vectors
    rows = np.random.default_rng(seed).choice(n, size=m, replace=False)
    rows.sort()
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def load_features(folder: str | Path, dim: int | None = None) -> np.ndarray:
    """Every ``.npy`` in `folder` (sorted by name), concatenated into one C-contiguous float32 matrix.

    The files are read twice: once memory-mapped for their shapes, then straight into a preallocated
    matrix, so peak memory is the matrix itself. Raises ValueError naming the file for anything that is
    not a finite 2-D array of width `dim` (or of the first file's width when `dim` is None), and when the
    folder holds no ``.npy`` file.
    """
    folder = Path(folder)
    files = sorted(folder.glob("*.npy")) if folder.is_dir() else []
    if not files:
        raise ValueError(f"{folder}: no .npy feature files")
    shapes: list[tuple[int, int]] = []
    for f in files:
        try:
            a = np.load(f, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any unreadable file is bad input
            raise ValueError(f"{f}: not a readable .npy array ({e})") from None
        if a.ndim != 2:
            raise ValueError(f"{f}: expected a 2-D [frames, dim] array, got shape {a.shape}")
        want = dim if dim is not None else (shapes[0][1] if shapes else a.shape[1])
        if a.shape[1] != want:
            raise ValueError(f"{f}: features are {a.shape[1]}-d, expected {want}-d")
        shapes.append((int(a.shape[0]), int(a.shape[1])))
        del a
    total = sum(s[0] for s in shapes)
    width = shapes[0][1]
    out = np.empty((total, width), dtype=np.float32)
    row = 0
    for f, (n, _) in zip(files, shapes):
        block = out[row : row + n]
        block[...] = np.load(f, mmap_mode="r", allow_pickle=False)
        if not np.isfinite(block).all():
            raise ValueError(f"{f}: features contain NaN or infinite values")
        row += n
    return out


def reduce_kmeans(
    feats: np.ndarray, n_clusters: int = KMEANS_CLUSTERS, seed: int | None = None, n_cpu: int | None = None
) -> np.ndarray:
    """RVC's reduction of a large feature set: the centroids of a mini-batch k-means (float32).

    `n_clusters` is capped at the number of rows. Threads are bounded to `n_cpu`.
    """
    from sklearn.cluster import MiniBatchKMeans  # type: ignore[import-untyped]
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    n_cpu = n_cpu or _cpu_count()
    k = max(1, min(n_clusters, feats.shape[0]))
    km = MiniBatchKMeans(
        n_clusters=k, batch_size=256 * n_cpu, compute_labels=False, init="random", random_state=seed,
        verbose=False,
    )
    with threadpool_limits(limits=n_cpu):
        km.fit(feats)
    return np.ascontiguousarray(km.cluster_centers_, dtype=np.float32)


def prepare_vectors(
    feats: np.ndarray,
    kmeans_threshold: int = KMEANS_THRESHOLD,
    n_clusters: int = KMEANS_CLUSTERS,
    seed: int | None = None,
    n_cpu: int | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Steps 2-3 of the recipe: shuffle the rows, then reduce to k-means centroids above the threshold.

    `feats` is shuffled **in place** (no copy of a possibly multi-GB matrix); the returned matrix is either
    `feats` itself (then holding the shuffled rows) or the new centroid matrix.
    """
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise ValueError(f"expected a non-empty [N, dim] matrix, got shape {feats.shape}")
    if feats.dtype != np.float32 or not feats.flags.c_contiguous:
        feats = np.ascontiguousarray(feats, dtype=np.float32)
    rng = np.random.default_rng(seed)
    rng.shuffle(feats, axis=0)
    info: dict[str, Any] = {"input_vectors": int(feats.shape[0]), "dim": int(feats.shape[1]),
                            "kmeans": False, "kmeans_seconds": 0.0}
    if feats.shape[0] > kmeans_threshold:
        t0 = time.perf_counter()
        try:
            cents = reduce_kmeans(feats, n_clusters=n_clusters, seed=seed, n_cpu=n_cpu)
        except Exception as e:  # noqa: BLE001 - RVC keeps the original rows when k-means fails
            log.warning("index: k-means reduction of %d vectors failed (%s); keeping all of them",
                        feats.shape[0], e)
            info["kmeans_error"] = str(e)[:500]
        else:
            info.update(kmeans=True, kmeans_clusters=int(cents.shape[0]))
            feats = cents
        info["kmeans_seconds"] = round(time.perf_counter() - t0, 3)
    info["vectors"] = int(feats.shape[0])
    return feats, info


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees a GPU (faiss-gpu does not fall back itself)."""
    import faiss

    try:
        return bool(hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0)
    except Exception:  # noqa: BLE001 - a broken CUDA runtime means: no GPU
        return False


class _OmpThreads:
    """Bound faiss' OpenMP threads (and the BLAS pools) for the duration of a block."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self) -> _OmpThreads:
        import faiss
        from threadpoolctl import threadpool_limits

        self._prev = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(self.n)
        self._limits = threadpool_limits(limits=self.n)
        return self

    def __exit__(self, *exc: object) -> None:
        import faiss

        self._limits.restore_original_limits()
        faiss.omp_set_num_threads(self._prev)


def _train_on_gpu(index: Any, sample: np.ndarray) -> Any:
    """Train the CPU `index` on GPU 0 with its clustering parameters; returns the trained CPU index."""
    import faiss

    res = faiss.StandardGpuResources()
    gindex = faiss.index_cpu_to_gpu(res, 0, index)
    cp, gcp = faiss.extract_index_ivf(index).cp, getattr(gindex, "cp", None)  # GpuIndexIVF has its own
    if gcp is not None:
        gcp.niter, gcp.min_points_per_centroid = cp.niter, cp.min_points_per_centroid
    gindex.train(sample)
    out = faiss.index_gpu_to_cpu(gindex)
    del gindex
    faiss.extract_index_ivf(out).nprobe = 1
    return out


def train_ivf(
    vectors: np.ndarray,
    use_gpu: bool | None = None,
    n_threads: int | None = None,
    trained_path: Path | None = None,
    points_per_list: int | None = TRAIN_POINTS_PER_LIST,
) -> tuple[Any, dict[str, Any]]:
    """Steps 5-7: create ``IVF{n_ivf},Flat`` with nprobe 1 (n_ivf from all of `vectors`) and train it on
    ``training_sample(vectors, n_ivf, points_per_list)`` (None: on all of them, RVC's recipe).

    Returns the trained (empty) CPU index and info. When `trained_path` is given the trained index is
    written there atomically (RVC's ``trained_*`` file).
    """
    import faiss

    n, dim = vectors.shape
    n_ivf = n_ivf_for(n)
    sample = training_sample(vectors, n_ivf, points_per_list)
    if use_gpu is None:
        use_gpu = gpu_available()
    elif use_gpu and not gpu_available():
        raise RuntimeError("use_gpu=True but this faiss build sees no GPU (faiss.get_num_gpus() == 0)")
    index = faiss.index_factory(dim, f"IVF{n_ivf},Flat")
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = 1
    if sample.shape[0] < n_ivf * MIN_POINTS_PER_LIST:
        ivf.cp.min_points_per_centroid = 1  # on purpose: the tiny-N IVF1 case, or the bounded sample
    if sample.shape[0] < n:
        ivf.cp.niter = TRAIN_ITERATIONS
    t0 = time.perf_counter()
    with _OmpThreads(n_threads or _cpu_count()):
        if use_gpu:
            index = _train_on_gpu(index, sample)
        else:
            index.train(sample)
    info = {"n_ivf": n_ivf, "gpu": bool(use_gpu), "train_vectors": int(sample.shape[0]),
            "train_seconds": round(time.perf_counter() - t0, 3)}
    if trained_path is not None:
        write_index_atomic(index, trained_path)
    return index, info


def add_vectors(
    index: Any,
    vectors: np.ndarray,
    add_batch: int = ADD_BATCH,
    n_threads: int | None = None,
    progress: Any = None,
    use_gpu: bool = False,
) -> tuple[Any, float]:
    """Step 8: add the rows in batches of `add_batch` (insertion order = row order).

    Returns the filled CPU index and the seconds it took. With `use_gpu` the trained index is copied to
    the GPU for the adds (each add assigns its rows to the nearest of n_ivf centroids, the costly part)
    and copied back.
    """
    import faiss

    t0 = time.perf_counter()
    starts = range(0, vectors.shape[0], max(1, add_batch))
    it = progress(starts) if progress is not None else starts
    with _OmpThreads(n_threads or _cpu_count()):
        if use_gpu:
            res = faiss.StandardGpuResources()
            target = faiss.index_cpu_to_gpu(res, 0, index)
        else:
            target = index
        for i in it:
            target.add(vectors[i : i + add_batch])
        if use_gpu:
            index = faiss.index_gpu_to_cpu(target)
            faiss.extract_index_ivf(index).nprobe = 1
            del target
    return index, round(time.perf_counter() - t0, 3)


def build_index(
    feats: np.ndarray,
    kmeans_threshold: int = KMEANS_THRESHOLD,
    add_batch: int = ADD_BATCH,
    use_gpu: bool | None = None,
    seed: int | None = None,
    n_clusters: int = KMEANS_CLUSTERS,
    n_threads: int | None = None,
    points_per_list: int | None = TRAIN_POINTS_PER_LIST,
) -> tuple[Any, dict[str, Any]]:
    """The whole recipe in memory: shuffle, optional k-means, train ``IVF{n},Flat`` (nprobe 1) on the
    bounded sample (`points_per_list` None: on all vectors, RVC's recipe), add.

    `feats` is shuffled in place (pass a copy to keep it). Without k-means, after this call `feats` holds
    the rows in the index's insertion order, so ``index.reconstruct_n(0, N)`` equals `feats`.
    Returns the CPU index and a JSON-able info dict.
    """
    vectors, info = prepare_vectors(feats, kmeans_threshold, n_clusters=n_clusters, seed=seed,
                                    n_cpu=n_threads)
    index, tinfo = train_ivf(vectors, use_gpu=use_gpu, n_threads=n_threads, points_per_list=points_per_list)
    info.update(tinfo)
    index, info["add_seconds"] = add_vectors(index, vectors, add_batch, n_threads=n_threads,
                                             use_gpu=tinfo["gpu"])
    return index, info


def write_index_atomic(index: Any, path: Path) -> None:
    """faiss.write_index to a temporary name in the same folder, then rename over `path`."""
    import faiss

    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def _stale_index_names(names: list[str], experiment: str, version: str, keep: set[str]) -> list[str]:
    pat = layout.index_name_pattern(experiment, version)
    return sorted(n for n in names if pat.match(n) and n not in keep)


def _load(ctx: StepContext) -> tuple[np.ndarray, int]:
    """Pull and load the features of the spec's model version: (vectors, files); StepFailed when there
    are none (with a hint when the other version's folder has some) or they do not fit."""
    version, dim = ctx.spec.model.version, ctx.spec.model.feature_dim
    sub = layout.feature_dir(version)
    ctx.pull(sub)
    folder = ctx.exp_dir / sub
    if not (folder.is_dir() and any(folder.glob("*.npy"))):
        other_version = "v1" if version == "v2" else "v2"
        other = layout.feature_dir(other_version)
        hint = ""
        if ctx.storage.list(f"{ctx.exp_key}/{other}"):
            hint = f" (there are features in {other}: were they extracted for model version {other_version}?)"
        raise StepFailed(f"index: no feature files (*.npy) in {ctx.exp_key}/{sub}{hint}; "
                         "run the features step first")
    try:
        feats = load_features(folder, dim=dim)
    except ValueError as e:
        raise StepFailed(f"index: bad features for model version {version} ({dim}-d): {e}") from None
    return feats, sum(1 for _ in folder.glob("*.npy"))


def _build(ctx: StepContext, vectors: np.ndarray, threads: int) -> tuple[str, str, dict[str, Any]]:
    """Train the IVF index on `vectors`, add them, write RVC's trained and added files atomically.
    Returns (trained name, added name, facts for the summary)."""
    spec = ctx.spec
    n_ivf = n_ivf_for(vectors.shape[0])
    trained_name, added_name = index_file_names(n_ivf, ctx.name, spec.model.version)
    index, tinfo = train_ivf(vectors, n_threads=threads, trained_path=ctx.exp_dir / trained_name)
    ctx.reporter.event("trained", n_ivf=n_ivf, seconds=tinfo["train_seconds"])
    n_batches = math.ceil(vectors.shape[0] / spec.index.add_batch_size)
    index, add_s = add_vectors(
        index, vectors, spec.index.add_batch_size, n_threads=threads,
        progress=lambda it: ctx.reporter.bar(it, total=n_batches, desc="index add", unit="batch"),
        use_gpu=tinfo["gpu"],
    )
    if index.ntotal != vectors.shape[0]:
        raise StepFailed(f"index: added {index.ntotal} vectors, expected {vectors.shape[0]}")
    write_index_atomic(index, ctx.exp_dir / added_name)
    return trained_name, added_name, {"n_ivf": n_ivf, "train_seconds": tinfo["train_seconds"],
                                      "train_vectors": tinfo["train_vectors"], "add_seconds": add_s,
                                      "gpu": tinfo["gpu"]}


def _push_and_prune(ctx: StepContext, files: list[str]) -> list[str]:
    """Push `files`, then delete the index files of an earlier run with another n_ivf (RVC's lookup would
    also find them), here and in storage. Returns the names deleted."""
    local_names = [p.name for p in ctx.exp_dir.glob("*.index")]
    remote_names = [o.key.rsplit("/", 1)[-1] for o in ctx.storage.list(ctx.exp_key, recursive=False)] \
        if ctx.remote else []
    stale = _stale_index_names(sorted(set(local_names + remote_names)), ctx.name, ctx.spec.model.version,
                               set(files))
    ctx.push(*files)
    for name in stale:
        (ctx.exp_dir / name).unlink(missing_ok=True)
        if ctx.remote:
            ctx.storage.delete(f"{ctx.exp_key}/{name}")
    return stale


def run(ctx: StepContext) -> dict[str, Any]:
    """The index step: pull the features, build the index, write and push RVC's three files."""
    t_all = time.perf_counter()
    feats, n_files = _load(ctx)
    ctx.reporter.event("loaded", vectors=int(feats.shape[0]), files=n_files)
    threads = max(1, ctx.workers)
    vectors, info = prepare_vectors(feats, ctx.spec.index.kmeans_threshold, n_clusters=KMEANS_CLUSTERS,
                                    n_cpu=threads)
    del feats  # with k-means the centroids replace the full matrix: free it before training
    if info["kmeans"]:
        ctx.reporter.event("kmeans", vectors=info["vectors"], seconds=info["kmeans_seconds"])
    save_npy_atomic(ctx.exp_dir / layout.TOTAL_FEA_FILE, vectors)
    trained_name, added_name, built = _build(ctx, vectors, threads)
    files = [layout.TOTAL_FEA_FILE, trained_name, added_name]
    stale = _push_and_prune(ctx, files)
    return {
        "vectors": int(vectors.shape[0]),
        "input_vectors": info["input_vectors"],
        "dim": ctx.spec.model.feature_dim,
        "files_in": n_files,
        "n_ivf": built["n_ivf"],
        "train_vectors": built["train_vectors"],
        "kmeans": info["kmeans"],
        "kmeans_seconds": info["kmeans_seconds"],
        "train_seconds": built["train_seconds"],
        "add_seconds": built["add_seconds"],
        "index_seconds": round(time.perf_counter() - t_all, 3),
        "gpu": built["gpu"],
        "files": files,
        "removed_stale": stale,
    }
