"""The index quantizer trained on a bounded, seeded sample (issue 13): still RVC's ``IVF{n},Flat`` with
RVC's n_ivf, nprobe 1 and file names; small inputs train on every vector as before; recall as RVC's."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
from rvc_pipeline.core.spec import parse_manifest
from rvc_pipeline.steps import index as ix
from rvc_pipeline.steps.runner import run_step


def _mixture(n: int, dim: int = 32, components: int = 60, seed: int = 0) -> np.ndarray:
    """Clustered (HuBERT-like) vectors: Gaussian components with a low-rank spread plus noise."""
    r = np.random.default_rng(seed)
    centres = r.standard_normal((components, dim)).astype(np.float32) * 2
    spread = r.standard_normal((components, 4, dim)).astype(np.float32) * 0.5
    lab = r.integers(0, components, n)
    z = r.standard_normal((n, 4)).astype(np.float32)
    x = centres[lab] + np.einsum("nr,nrd->nd", z, spread[lab]) + 0.2 * r.standard_normal((n, dim))
    return np.ascontiguousarray(x, dtype=np.float32)


def _centroids(index: faiss.Index) -> np.ndarray:
    q = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    return q.reconstruct_n(0, q.ntotal)


def _recall8(index: faiss.Index, queries: np.ndarray) -> float:
    flat = faiss.IndexFlatL2(index.d)
    flat.add(index.reconstruct_n(0, index.ntotal))
    _, want = flat.search(queries, 8)
    _, got = index.search(queries, 8)
    return sum(len(set(a) & set(b)) for a, b in zip(want.tolist(), got.tolist())) / want.size


# ---------------------------------------------------------------- sample size and the sample itself


@pytest.mark.parametrize(("n", "want"), [
    (1, 1), (38, 38), (17_900, 17_900),        # up to the floor: every vector, as RVC
    (20_000, 20_000), (30_000, 20_000),         # 16 * 769 = 12304 < floor: the floor
    (200_000, 82_048),                          # IVF5128: 16 points per list
    (1_000_000, 256_000),                       # IVF16000
])
def test_train_sample_size(n: int, want: int) -> None:
    assert ix.train_sample_size(n) == want
    assert ix.train_sample_size(n, points_per_list=None) == n  # RVC's recipe: all of them


def test_sample_is_seeded_distinct_rows_in_order() -> None:
    x = np.arange(30_000 * 2, dtype=np.float32).reshape(30_000, 2)  # row i is (2i, 2i+1)
    a = ix.training_sample(x, n_ivf=1000)  # 16 * 1000 < floor: 20000 of 30000 rows
    b = ix.training_sample(x.copy(), n_ivf=1000)
    assert a.shape == (20_000, 2) and a.dtype == np.float32 and a.flags.c_contiguous
    np.testing.assert_array_equal(a, b)  # deterministic
    rows = (a[:, 0] // 2).astype(np.int64)
    assert (np.diff(rows) > 0).all()  # distinct rows, in their order
    np.testing.assert_array_equal(a[:, 1], a[:, 0] + 1)  # whole rows, not mixed
    c = ix.training_sample(x, n_ivf=1000, seed=ix.TRAIN_SAMPLE_SEED + 1)
    assert not np.array_equal(a, c)  # the seed is what makes it deterministic
    # uniform over the rows: both halves of the input are represented about equally
    assert abs(int((rows < 15_000).sum()) - 10_000) < 300


def test_small_input_is_not_copied() -> None:
    x = np.zeros((ix.TRAIN_SAMPLE_FLOOR, 4), np.float32)
    assert ix.training_sample(x, n_ivf=ix.n_ivf_for(x.shape[0])) is x


# ---------------------------------------------------------------- the built index


def test_sampled_index_is_rvcs_ivf_flat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ix, "TRAIN_SAMPLE_FLOOR", 0)  # exercise the sample on a cheap size
    feats = _mixture(6000, dim=16)
    want_rows = feats.copy()
    index, info = ix.build_index(feats, seed=2, n_threads=1)
    n_ivf = 6000 // 39
    assert info["n_ivf"] == n_ivf == 153 and info["train_vectors"] == 16 * n_ivf
    assert isinstance(index, faiss.IndexIVFFlat) and index.nlist == n_ivf and index.ntotal == 6000
    assert faiss.extract_index_ivf(index).nprobe == 1 and index.metric_type == faiss.METRIC_L2
    # every vector is in the index, in insertion order (RVC reads reconstruct_n(0, ntotal))
    np.testing.assert_array_equal(index.reconstruct_n(0, 6000), feats)
    assert sorted(map(bytes, index.reconstruct_n(0, 6000))) == sorted(map(bytes, want_rows))
    # trained on exactly the seeded sample: the same centroids as faiss trained on it by hand
    by_hand = faiss.index_factory(16, f"IVF{n_ivf},Flat")
    faiss.extract_index_ivf(by_hand).cp.min_points_per_centroid = 1
    faiss.extract_index_ivf(by_hand).cp.niter = ix.TRAIN_ITERATIONS
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        by_hand.train(ix.training_sample(feats, n_ivf))
    finally:
        faiss.omp_set_num_threads(before)
    np.testing.assert_array_equal(_centroids(index), _centroids(by_hand))


def test_same_vectors_give_the_same_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ix, "TRAIN_SAMPLE_FLOOR", 0)
    feats = _mixture(4000, dim=16, seed=5)
    a, _ = ix.train_ivf(feats, n_threads=1)
    b, _ = ix.train_ivf(feats.copy(), n_threads=1)
    np.testing.assert_array_equal(_centroids(a), _centroids(b))


def test_small_input_trains_on_every_vector_as_rvc() -> None:
    feats = _mixture(3000, dim=16, seed=3)
    ours, info = ix.train_ivf(feats, n_threads=1)
    rvc, rinfo = ix.train_ivf(feats, n_threads=1, points_per_list=None)
    assert info["train_vectors"] == rinfo["train_vectors"] == 3000
    np.testing.assert_array_equal(_centroids(ours), _centroids(rvc))


def test_step_writes_rvc_file_names_with_the_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ix, "TRAIN_SAMPLE_FLOOR", 0)
    exp = parse_manifest({
        "apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment", "metadata": {"name": "voice1"},
        "spec": {"dataset": {"source": str(tmp_path / "data")}, "storage": {"uri": str(tmp_path / "store")},
                 "resources": {"device": "cpu", "parallelism": 1}},
    })
    feat_dir = tmp_path / "store" / "logs" / "voice1" / "3_feature768"
    feat_dir.mkdir(parents=True)
    for i in range(3):
        np.save(feat_dir / f"{i}_0.npy", _mixture(1000, dim=768, seed=10 + i))
    summary = run_step(exp, "index", ix.run)
    assert summary["n_ivf"] == 3000 // 39 == 76 and summary["train_vectors"] == 16 * 76
    added = feat_dir.parent / "added_IVF76_Flat_nprobe_1_voice1_v2.index"
    assert summary["files"] == ["total_fea.npy", "trained_IVF76_Flat_nprobe_1_voice1_v2.index", added.name]
    back = faiss.read_index(str(added))
    assert isinstance(back, faiss.IndexIVFFlat) and back.nlist == 76 and back.ntotal == 3000
    assert faiss.extract_index_ivf(back).nprobe == 1


# ---------------------------------------------------------------- retrieval quality


def test_recall_on_20k_clustered_vectors_matches_rvc(monkeypatch: pytest.MonkeyPatch) -> None:
    """recall@8 at nprobe 1 against exact search, 2000 held-out queries: ours >= RVC's recipe - 0.01, on
    768-d clustered (HuBERT-like) vectors. (On 32-d mixtures the sample costs 0.3-1.5 points, 0.8 on
    average over 6 seeds: the 1-point margin is for HuBERT's width.) About 4 CPU seconds."""
    monkeypatch.setattr(ix, "TRAIN_SAMPLE_FLOOR", 0)  # 20k would otherwise train on all of them
    data = _mixture(22_000, dim=768, components=100, seed=0)
    feats, queries = data[:20_000], data[20_000:]
    ours, oinfo = ix.build_index(feats.copy(), seed=1, n_threads=1)
    rvc, rinfo = ix.build_index(feats.copy(), seed=1, n_threads=1, points_per_list=None)
    assert oinfo["n_ivf"] == rinfo["n_ivf"] == 512
    assert oinfo["train_vectors"] == 16 * 512 and rinfo["train_vectors"] == 20_000
    r_ours, r_rvc = _recall8(ours, queries), _recall8(rvc, queries)
    assert r_rvc > 0.3  # the measure means something on these vectors
    assert r_ours >= r_rvc - 0.01, (r_ours, r_rvc)
