"""Filelist, mute files, dataset/collate and the bucket sampler (reference §5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from rvc_pipeline.data import (
    DistributedBucketSampler,
    TextAudioCollate,
    TextAudioDataset,
    bucket_index,
    is_mute_item,
    make_mute_files,
    mute_features_from_embedder,
    read_filelist,
    spec_cache_path,
    write_filelist,
)

SR, HOP, NFFT = 40000, 400, 2048


def _make_exp(root: Path, seconds: list[float], version: str = "v2", f0: bool = True) -> Path:
    exp = root / "logs" / "exp1"
    dim = 768 if version == "v2" else 256
    rng = np.random.default_rng(0)
    for i, sec in enumerate(seconds):
        stem = f"0_{i}"
        n = int(sec * SR)
        (exp / "0_gt_wavs").mkdir(parents=True, exist_ok=True)
        sf.write(exp / "0_gt_wavs" / f"{stem}.wav", (0.1 * rng.standard_normal(n)).astype(np.float32), SR,
                 subtype="FLOAT")
        n16 = int(sec * 16000)
        frames = (n16 - 400) // 320 + 1
        fd = exp / f"3_feature{dim}"
        fd.mkdir(exist_ok=True)
        np.save(fd / f"{stem}.npy", rng.standard_normal((frames, dim)).astype(np.float32))
        if f0:
            for sub in ("2a_f0", "2b-f0nsf"):
                (exp / sub).mkdir(exist_ok=True)
            nf = n16 // 160 + 1
            hz = rng.uniform(100, 250, nf)
            np.save(exp / "2a_f0" / f"{stem}.wav.npy", np.clip(np.round(hz / 2), 1, 255).astype(np.int64))
            np.save(exp / "2b-f0nsf" / f"{stem}.wav.npy", hz)
    return exp


def test_mute_files(tmp_path: Path) -> None:
    p = make_mute_files(tmp_path / "mute", "48k", "v1")
    audio, sr = sf.read(p["wav"], dtype="int16")
    assert sr == 48000 and audio.shape == (144000,) and not audio.any()
    assert sf.info(str(p["wav"])).subtype == "PCM_16"
    feat = np.load(p["feat"])
    assert feat.shape == (149, 256) and feat.dtype == np.float32
    assert p["feat"].parent.name == "3_feature256"
    coarse, hz = np.load(p["coarse"]), np.load(p["hz"])
    assert coarse.shape == (301,) and (coarse == 1).all()
    assert hz.shape == (301,) and (hz == 0).all()
    real = np.full((149, 768), 0.5, np.float32)
    p2 = make_mute_files(tmp_path / "m2", "40k", "v2", features=real)
    assert np.load(p2["feat"]).mean() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="768"):
        make_mute_files(tmp_path / "m3", "40k", "v2", features=np.zeros((149, 256), np.float32))


def test_mute_features_from_an_embedder(tmp_path: Path) -> None:
    seen: list[np.ndarray] = []

    def extract(w: np.ndarray) -> np.ndarray:  # a HuBERT-like frame count: floor((N-400)/320)+1
        seen.append(w)
        return np.full(((len(w) - 400) // 320 + 1, 768), 0.25, np.float32)

    feats = mute_features_from_embedder(extract)
    assert seen[0].shape == (48000,) and not seen[0].any() and seen[0].dtype == np.float32
    assert feats.shape == (149, 768)
    p = make_mute_files(tmp_path, "40k", "v2", feats)
    assert np.load(p["feat"]).mean() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="frames, channels"):
        mute_features_from_embedder(lambda w: np.zeros(5))


def test_filelist_format_and_mute_lines(tmp_path: Path) -> None:
    exp = _make_exp(tmp_path, [1.5, 2.0, 2.5])
    # a stem missing its Hz pitch file is left out (intersection of stems)
    (exp / "2b-f0nsf" / "0_2.wav.npy").unlink()
    fl = write_filelist(exp, "v2", True, "40k", 3, exp / "mute")
    lines = fl.read_text().split("\n")
    assert len(lines) == 2 + 2
    mute = [ln for ln in lines if "/mute/" in ln]
    assert len(mute) == 2 and mute[0] == mute[1]
    for ln in lines:
        parts = ln.split("|")
        assert len(parts) == 5 and parts[-1] == "3"
        assert all(Path(x).is_absolute() and Path(x).exists() for x in parts[:4])
    real = sorted(ln for ln in lines if "/mute/" not in ln)
    w, f, c, h, _ = real[0].split("|")
    assert w.endswith("/0_gt_wavs/0_0.wav") and f.endswith("/3_feature768/0_0.npy")
    assert c.endswith("/2a_f0/0_0.wav.npy") and h.endswith("/2b-f0nsf/0_0.wav.npy")
    assert mute[0].split("|")[0].endswith("/mute/0_gt_wavs/mute40k.wav")
    # seeded shuffle: same seed, same order
    again = write_filelist(exp, "v2", True, "40k", 3, exp / "mute").read_text()
    assert again == "\n".join(lines)
    # no-f0: wav|feat|sid
    fl2 = write_filelist(exp, "v2", False, "40k", 0, exp / "mute")
    rows = read_filelist(fl2, f0=False)
    assert len(rows) == 3 + 2 and all(len(r) == 3 for r in rows)
    assert sum(is_mute_item(r) for r in rows) == 2
    with pytest.raises(ValueError, match="expected 5"):
        read_filelist(fl2, f0=True)


def test_dataset_items_and_collate(tmp_path: Path) -> None:
    exp = _make_exp(tmp_path, [1.5, 2.2, 12.0])
    fl = write_filelist(exp, "v2", True, "40k", 0, exp / "mute")
    ds = TextAudioDataset(fl, f0=True, sampling_rate=SR, filter_length=NFFT, hop_length=HOP, win_length=NFFT)
    by_name = {Path(it[0]).name: i for i, it in enumerate(ds.items)}
    spec, wav, phone, pitch, pitchf, sid = ds[by_name["0_0.wav"]]
    # 1.5 s: 16k features (24000-400)//320+1 = 74 -> x2 = 148; spec 60000/400 = 150 -> trimmed to 148
    assert phone.shape == (148, 768) and spec.shape == (1025, 148) and wav.shape == (1, 148 * HOP)
    assert pitch.dtype == torch.long and pitchf.dtype == torch.float32
    assert pitch.shape == pitchf.shape == (148,)
    assert sid.tolist() == [0]
    # the first copy of each feature frame is repeated twice
    feats = np.load(ds.items[by_name["0_0.wav"]][1])
    np.testing.assert_array_equal(phone[0].numpy(), feats[0])
    np.testing.assert_array_equal(phone[1].numpy(), feats[0])
    # cached spectrogram, reused
    cache = spec_cache_path(ds.items[by_name["0_0.wav"]][0])
    assert cache.name == "0_0.spec.pt" and cache.exists()
    torch.testing.assert_close(torch.load(cache)[:, :148], spec)
    cache.write_bytes(b"garbage")  # a broken cache is recomputed
    torch.testing.assert_close(ds[by_name["0_0.wav"]][0], spec)
    # 12 s: capped at 900 frames
    s12 = ds[by_name["0_2.wav"]]
    assert s12[2].shape[0] == 900 and s12[0].shape[1] == 900
    # mute: int16 zeros, [149*2=298] frames
    m = ds[by_name["mute40k.wav"]]
    assert m[2].shape == (298, 768) and not m[1].any() and (m[3] == 1).all()
    # collate: sorted by spec length, zero-padded, RVC's order
    batch = [ds[by_name["0_0.wav"]], ds[by_name["0_1.wav"]], m]
    out = TextAudioCollate(f0=True)(batch)
    phone_p, phone_l, pitch_p, pitchf_p, spec_p, spec_l, wave_p, wave_l, sid_b = out
    assert spec_l.tolist() == sorted(spec_l.tolist(), reverse=True) == [298, 218, 148]
    assert phone_p.shape == (3, 298, 768) and spec_p.shape == (3, 1025, 298)
    assert wave_p.shape == (3, 1, 298 * HOP)
    assert phone_l.tolist() == [298, 218, 148] and wave_l.tolist() == [298 * HOP, 218 * HOP, 148 * HOP]
    assert pitch_p.dtype == torch.long and (pitch_p[2, 148:] == 0).all() and (spec_p[2, :, 148:] == 0).all()
    assert sid_b.shape == (3,)
    out2 = TextAudioCollate(f0=False)([x[:3] + x[5:] for x in batch])
    assert len(out2) == 7 and out2[2].shape == (3, 1025, 298)


def test_dataset_rejects_wrong_sample_rate(tmp_path: Path) -> None:
    exp = _make_exp(tmp_path, [1.5])
    fl = write_filelist(exp, "v2", True, "40k", 0, None)
    ds = TextAudioDataset(fl, f0=True, sampling_rate=48000, filter_length=NFFT, hop_length=480,
                          win_length=NFFT)
    with pytest.raises(ValueError, match="0_0.wav: sample rate 40000 Hz does not match the model's 48000"):
        ds[0]


def test_bucket_rules() -> None:
    assert bucket_index(100) == -1 and bucket_index(101) == 0 and bucket_index(200) == 0
    assert bucket_index(201) == 1 and bucket_index(900) == 7 and bucket_index(901) == -1
    # float32 WAV bytes // (3*hop): 0.75 s is the limit at 40k (44-byte header)
    assert (44 + 4 * int(0.74 * SR)) // (3 * HOP) <= 100 < (44 + 4 * int(0.76 * SR)) // (3 * HOP)


def test_sampler_padding_and_drop() -> None:
    lengths = [50, 150, 150, 150, 250, 950, 180]  # 50 and 950 dropped
    s = DistributedBucketSampler(lengths, batch_size=2, num_replicas=1, rank=0)
    assert s.buckets == [[1, 2, 3, 6], [4]] and s.boundaries == [100, 200, 300]
    assert s.num_samples_per_bucket == [4, 2] and len(s) == 3
    batches = list(s)
    assert len(batches) == 3 and all(len(b) == 2 for b in batches)
    flat = [i for b in batches for i in b]
    assert 0 not in flat and 5 not in flat
    assert flat.count(4) == 2  # the 1-item bucket is padded by repeating its own item
    for b in batches:  # a batch never mixes buckets
        assert len({lengths[i] > 200 for i in b}) == 1


def test_sampler_epoch_determinism_and_ranks() -> None:
    rng = np.random.default_rng(1)
    lengths = rng.integers(101, 900, size=48).tolist()
    # make every bucket a multiple of replicas*batch so no padding is needed
    s0 = DistributedBucketSampler(lengths, 3, num_replicas=2, rank=0)
    padded = sum(s0.num_samples_per_bucket) - sum(len(b) for b in s0.buckets)
    s1 = DistributedBucketSampler(lengths, 3, num_replicas=2, rank=1)
    for s in (s0, s1):
        s.set_epoch(5)
    a, b = list(s0), list(s1)
    assert len(a) == len(b) == len(s0) == s0.num_samples // 3
    fa, fb = [i for x in a for i in x], [i for x in b for i in x]
    assert len(fa) + len(fb) == sum(s0.num_samples_per_bucket)
    # every real item is used; only padding repeats, so the overlap is at most the padding
    assert set(fa) | set(fb) == set(range(48))
    assert len(fa) + len(fb) - len(set(fa) | set(fb)) == padded
    # the same epoch gives the same batches; another epoch another order
    s0b = DistributedBucketSampler(lengths, 3, num_replicas=2, rank=0)
    s0b.set_epoch(5)
    assert list(s0b) == a
    s0b.set_epoch(6)
    assert list(s0b) != a
    # exact multiples: ranks are disjoint
    even = [150] * 12 + [450] * 12
    r = [DistributedBucketSampler(even, 2, num_replicas=3, rank=k) for k in range(3)]
    parts = [{i for bt in x for i in bt} for x in r]
    assert sum(len(p) for p in parts) == 24 and set.union(*parts) == set(range(24))
    with pytest.raises(ValueError):
        DistributedBucketSampler(even, 2, num_replicas=2, rank=2)
