"""The index step (RVC's train_index): n_ivf formula, faiss index contents, k-means branch, the step."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
from rvc_pipeline.core import layout
from rvc_pipeline.core.errors import StepFailed
from rvc_pipeline.core.layout import marker_key
from rvc_pipeline.core.spec import Experiment, parse_manifest
from rvc_pipeline.steps import index as ix
from rvc_pipeline.steps.runner import run_step


def _exp(root: Path, name: str = "voice1", version: str = "v2", **index: int) -> Experiment:
    return parse_manifest({
        "apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment", "metadata": {"name": name},
        "spec": {"dataset": {"source": str(root / "data")}, "storage": {"uri": str(root / "store")},
                 "model": {"version": version}, "index": index,
                 "resources": {"device": "cpu", "parallelism": 1}},
    })


def _write_feats(folder: Path, lengths: list[int], dim: int, seed: int = 0) -> np.ndarray:
    """Feature files like the features step writes them ([T, dim] float32, <i>_<j>.npy); returns the
    concatenation in sorted-file order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for i, n in enumerate(lengths):
        a = rng.standard_normal((n, dim)).astype(np.float32)
        name = f"{i}_{i % 3}.npy"
        np.save(folder / name, a)
        arrays[name] = a
    return np.concatenate([arrays[k] for k in sorted(arrays)])


def _rows(a: np.ndarray) -> np.ndarray:
    """Rows in a canonical order, to compare two matrices as multisets of rows."""
    return a[np.lexsort(a.T[::-1])]


# ---------------------------------------------------------------- formula and names


@pytest.mark.parametrize(("n", "want"), [
    (1, 1), (20, 1), (38, 1),              # guard: N // 39 == 0 -> IVF1
    (39, 1), (78, 2), (1000, 25),
    (10_000, 256),                         # the k-means case: 10000 centroids -> IVF256
    (17_900, 458),                         # DESIGN's 6 minutes of speech
    (200_000, 5128),                       # RVC's largest un-reduced case: IVF5128
    (1_000_000, 16_000),                   # where 16*sqrt(N) is the smaller term
])
def test_n_ivf_formula(n: int, want: int) -> None:
    assert ix.n_ivf_for(n) == want


def test_n_ivf_of_zero_vectors_is_an_error() -> None:
    with pytest.raises(ValueError, match="0 vectors"):
        ix.n_ivf_for(0)


def test_file_names_follow_rvc() -> None:
    assert ix.index_file_names(458, "voice1", "v2") == (
        "trained_IVF458_Flat_nprobe_1_voice1_v2.index", "added_IVF458_Flat_nprobe_1_voice1_v2.index")
    assert layout.feature_dir("v1") == "3_feature256"
    assert layout.feature_dir("v2") == "3_feature768"


# ---------------------------------------------------------------- load_features


def test_load_features_sorted_concatenation(tmp_path: Path) -> None:
    want = _write_feats(tmp_path / "f", [5, 7, 3, 11], 8)
    (tmp_path / "f" / "notes.txt").write_text("ignored")
    got = ix.load_features(tmp_path / "f", dim=8)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert got.shape == (26, 8)
    np.testing.assert_array_equal(got, want)


def test_load_features_converts_dtype(tmp_path: Path) -> None:
    (tmp_path / "f").mkdir()
    np.save(tmp_path / "f" / "a.npy", np.arange(12, dtype=np.float64).reshape(3, 4))
    got = ix.load_features(tmp_path / "f")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.arange(12, dtype=np.float32).reshape(3, 4))


@pytest.mark.parametrize(("bad", "match"), [
    (np.zeros((4, 6), np.float32), r"b_bad\.npy: features are 6-d, expected 8-d"),
    (np.zeros(8, np.float32), r"b_bad\.npy: expected a 2-D"),
    (np.full((2, 8), np.nan, np.float32), r"b_bad\.npy: features contain NaN"),
])
def test_load_features_bad_file_named(tmp_path: Path, bad: np.ndarray, match: str) -> None:
    _write_feats(tmp_path / "f", [4], 8)
    np.save(tmp_path / "f" / "b_bad.npy", bad)
    with pytest.raises(ValueError, match=match):
        ix.load_features(tmp_path / "f", dim=8)


def test_load_features_peak_memory_is_one_matrix(tmp_path: Path) -> None:
    """Reading into one preallocated matrix: peak allocation about 1x the data, where a list of arrays
    plus np.concatenate would need 2x (RVC users run out of memory on hours of audio)."""
    import tracemalloc

    want = _write_feats(tmp_path / "f", [2000] * 8, 256)  # 16 MB of features in 8 files
    tracemalloc.start()
    got = ix.load_features(tmp_path / "f", dim=256)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert got.nbytes == want.nbytes == 16_384_000
    assert peak < 1.15 * got.nbytes, peak / got.nbytes


def test_thread_limit_is_restored() -> None:
    before = faiss.omp_get_max_threads()
    feats = np.random.default_rng(10).standard_normal((500, 8)).astype(np.float32)
    ix.build_index(feats, n_threads=1)
    assert faiss.omp_get_max_threads() == before


def test_load_features_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "f").mkdir()
    with pytest.raises(ValueError, match="no .npy feature files"):
        ix.load_features(tmp_path / "f")


# ---------------------------------------------------------------- build_index


def test_index_holds_the_vectors_in_insertion_order() -> None:
    orig = np.random.default_rng(1).standard_normal((2000, 64)).astype(np.float32)
    feats = orig.copy()
    index, info = ix.build_index(feats, seed=3, n_threads=1)
    n_ivf = 2000 // 39
    assert info["n_ivf"] == n_ivf and info["vectors"] == 2000 and info["kmeans"] is False
    assert isinstance(index, faiss.IndexIVFFlat)
    assert index.ntotal == 2000 and index.d == 64 and index.nlist == n_ivf
    assert faiss.extract_index_ivf(index).nprobe == 1
    # feats was shuffled in place: it is now the insertion order, a permutation of the input rows
    assert not np.array_equal(feats, orig)
    np.testing.assert_array_equal(_rows(feats), _rows(orig))
    np.testing.assert_array_equal(index.reconstruct_n(0, index.ntotal), feats)
    # a query equal to a stored vector finds it at distance 0 when every list is probed
    faiss.extract_index_ivf(index).nprobe = n_ivf
    q = feats[::97]
    dist, ids = index.search(q, 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(0, 2000, 97))
    np.testing.assert_allclose(dist[:, 0], 0.0, atol=1e-4)


def test_nprobe_1_is_stored_in_the_file(tmp_path: Path) -> None:
    feats = np.random.default_rng(2).standard_normal((800, 16)).astype(np.float32)
    index, info = ix.build_index(feats, seed=0, n_threads=1)
    path = tmp_path / "added.index"
    ix.write_index_atomic(index, path)
    assert not (tmp_path / "added.index.partial").exists()
    back = faiss.read_index(str(path))
    ivf = faiss.extract_index_ivf(back)
    assert ivf.nprobe == 1 and ivf.nlist == 800 // 39 == info["n_ivf"] and back.ntotal == 800
    np.testing.assert_array_equal(back.reconstruct_n(0, 800), feats)


def test_add_in_small_batches_equals_one_batch() -> None:
    base = np.random.default_rng(4).standard_normal((1500, 16)).astype(np.float32)
    a, b = base.copy(), base.copy()
    ia, _ = ix.build_index(a, seed=7, add_batch=100, n_threads=1)
    ib, _ = ix.build_index(b, seed=7, add_batch=100_000, n_threads=1)
    np.testing.assert_array_equal(a, b)  # same seed, same shuffle
    assert ia.ntotal == ib.ntotal == 1500
    np.testing.assert_array_equal(ia.reconstruct_n(0, 1500), ib.reconstruct_n(0, 1500))
    for lst in range(ia.nlist):
        assert ia.invlists.list_size(lst) == ib.invlists.list_size(lst)


def test_tiny_feature_set_uses_one_list() -> None:
    feats = np.random.default_rng(5).standard_normal((20, 8)).astype(np.float32)
    index, info = ix.build_index(feats, n_threads=1)
    assert info["n_ivf"] == 1 and index.nlist == 1 and index.ntotal == 20
    dist, ids = index.search(feats, 1)  # nprobe 1 over one list: exact search
    np.testing.assert_array_equal(ids[:, 0], np.arange(20))
    np.testing.assert_allclose(dist[:, 0], 0.0, atol=1e-5)


def test_kmeans_branch_above_threshold() -> None:
    feats = np.random.default_rng(6).standard_normal((3000, 16)).astype(np.float32)
    index, info = ix.build_index(feats, kmeans_threshold=2000, n_clusters=400, seed=0, n_threads=1)
    assert info["kmeans"] is True and info["input_vectors"] == 3000
    assert info["vectors"] == 400 and info["kmeans_clusters"] == 400
    assert info["n_ivf"] == 400 // 39 == 10 and index.ntotal == 400
    cents = index.reconstruct_n(0, 400)
    assert cents.dtype == np.float32
    # they are k-means centroids: they quantise the data better than 400 of its own rows do
    def quant_err(codebook: np.ndarray) -> float:
        d = ((feats[:, None, :] - codebook[None]) ** 2).sum(-1)
        return float(d.min(1).mean())

    sample = feats[np.random.default_rng(0).choice(3000, 400, replace=False)]
    assert quant_err(cents) < 0.9 * quant_err(sample)


def test_kmeans_not_used_at_or_below_threshold() -> None:
    feats = np.random.default_rng(7).standard_normal((2000, 8)).astype(np.float32)
    _, info = ix.build_index(feats, kmeans_threshold=2000, n_clusters=100, n_threads=1)
    assert info["kmeans"] is False and info["vectors"] == 2000 and info["n_ivf"] == 51


def test_kmeans_clusters_capped_at_row_count() -> None:
    feats = np.random.default_rng(8).standard_normal((300, 8)).astype(np.float32)
    cents = ix.reduce_kmeans(feats, n_clusters=10_000, seed=0, n_cpu=1)
    assert cents.shape == (300, 8) and cents.dtype == np.float32


def test_kmeans_failure_keeps_the_original(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> np.ndarray:
        raise MemoryError("simulated")

    monkeypatch.setattr(ix, "reduce_kmeans", boom)
    feats = np.random.default_rng(9).standard_normal((1200, 8)).astype(np.float32)
    index, info = ix.build_index(feats, kmeans_threshold=1000, n_threads=1)
    assert info["kmeans"] is False and "simulated" in info["kmeans_error"]
    assert info["vectors"] == 1200 and index.ntotal == 1200 and info["n_ivf"] == 30


def test_use_gpu_without_gpu_is_a_clear_error() -> None:
    if ix.gpu_available():
        pytest.skip("a GPU is present")
    feats = np.zeros((100, 4), np.float32)
    with pytest.raises(RuntimeError, match="no GPU"):
        ix.build_index(feats, use_gpu=True)


# ---------------------------------------------------------------- the step, local storage


def test_step_on_local_storage(tmp_path: Path) -> None:
    exp = _exp(tmp_path)
    exp_dir = tmp_path / "store" / "logs" / "voice1"
    want = _write_feats(exp_dir / "3_feature768", [150, 90, 240, 70], 768)
    summary = run_step(exp, "index", ix.run)
    n = 550
    n_ivf = n // 39
    trained, added = (f"{k}_IVF{n_ivf}_Flat_nprobe_1_voice1_v2.index" for k in ("trained", "added"))
    assert summary["vectors"] == n and summary["n_ivf"] == n_ivf == 14 and summary["kmeans"] is False
    assert summary["files"] == ["total_fea.npy", trained, added]
    assert summary["dim"] == 768 and summary["files_in"] == 4
    total = np.load(exp_dir / "total_fea.npy")
    assert total.shape == (n, 768) and total.dtype == np.float32
    np.testing.assert_array_equal(_rows(total), _rows(want))
    t_index = faiss.read_index(str(exp_dir / trained))
    a_index = faiss.read_index(str(exp_dir / added))
    assert t_index.ntotal == 0 and t_index.is_trained and t_index.nlist == n_ivf
    assert a_index.ntotal == n and a_index.nlist == n_ivf and faiss.extract_index_ivf(a_index).nprobe == 1
    # RVC inference reads big_npy = reconstruct_n(0, ntotal): the same rows as total_fea.npy, same order
    np.testing.assert_array_equal(a_index.reconstruct_n(0, n), total)
    marker = json.loads((tmp_path / "store" / marker_key("voice1", "index")).read_text())
    assert marker["n_ivf"] == n_ivf and marker["vectors"] == n
    assert not list(exp_dir.glob("*.partial"))


def test_step_v1_reads_256d_features(tmp_path: Path) -> None:
    exp = _exp(tmp_path, version="v1")
    exp_dir = tmp_path / "store" / "logs" / "voice1"
    _write_feats(exp_dir / "3_feature256", [60, 60], 256)
    summary = run_step(exp, "index", ix.run)
    assert summary["dim"] == 256 and summary["vectors"] == 120 and summary["n_ivf"] == 3
    assert (exp_dir / "added_IVF3_Flat_nprobe_1_voice1_v1.index").is_file()


def test_step_rerun_removes_index_files_with_another_n_ivf(tmp_path: Path) -> None:
    exp = _exp(tmp_path)
    exp_dir = tmp_path / "store" / "logs" / "voice1"
    _write_feats(exp_dir / "3_feature768", [100, 100], 768)
    first = run_step(exp, "index", ix.run)
    assert first["n_ivf"] == 5
    _write_feats(exp_dir / "3_feature768", [100, 100, 200, 200], 768, seed=1)
    second = run_step(exp, "index", ix.run, force=True)
    assert second["n_ivf"] == 600 // 39 == 15
    assert second["removed_stale"] == ["added_IVF5_Flat_nprobe_1_voice1_v2.index",
                                       "trained_IVF5_Flat_nprobe_1_voice1_v2.index"]
    assert sorted(p.name for p in exp_dir.glob("*.index")) == [
        "added_IVF15_Flat_nprobe_1_voice1_v2.index", "trained_IVF15_Flat_nprobe_1_voice1_v2.index"]


def test_step_without_features_fails_naming_the_folder(tmp_path: Path) -> None:
    exp = _exp(tmp_path)
    (tmp_path / "store" / "logs" / "voice1" / "3_feature768").mkdir(parents=True)
    with pytest.raises(StepFailed, match=r"no feature files \(\*\.npy\) in logs/voice1/3_feature768"):
        run_step(exp, "index", ix.run)
    assert not (tmp_path / "store" / marker_key("voice1", "index")).exists()


def test_step_hints_at_features_of_the_other_version(tmp_path: Path) -> None:
    exp = _exp(tmp_path)  # v2
    _write_feats(tmp_path / "store" / "logs" / "voice1" / "3_feature256", [50], 256)
    with pytest.raises(StepFailed, match=r"3_feature768 \(there are features in 3_feature256.*version v1"):
        run_step(exp, "index", ix.run)


def test_step_wrong_dim_fails_naming_file_and_dim(tmp_path: Path) -> None:
    exp = _exp(tmp_path)  # v2: 768-d expected
    exp_dir = tmp_path / "store" / "logs" / "voice1"
    _write_feats(exp_dir / "3_feature768", [50, 50], 256)
    msg = r"version v2 \(768-d\).*0_0\.npy: features are 256-d, expected 768-d"
    with pytest.raises(StepFailed, match=msg):
        run_step(exp, "index", ix.run)
    assert not list(exp_dir.glob("*.index"))


def test_step_kmeans_path_via_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the spec's threshold reaches prepare_vectors; a smaller cluster count keeps the test fast
    monkeypatch.setattr(ix, "KMEANS_CLUSTERS", 200)
    exp = _exp(tmp_path, kmeansThreshold=1000)
    exp_dir = tmp_path / "store" / "logs" / "voice1"
    _write_feats(exp_dir / "3_feature768", [600, 600], 768)
    summary = run_step(exp, "index", ix.run)
    assert summary["kmeans"] is True and summary["input_vectors"] == 1200 and summary["vectors"] == 200
    assert summary["n_ivf"] == 5
    assert np.load(exp_dir / "total_fea.npy").shape == (200, 768)
