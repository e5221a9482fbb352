"""Training data: filelist, mute files, dataset, collate and the bucket sampler.

Filelist (`logs/<exp>/filelist.txt`, RVC's format): one line per training piece, the intersection of
file stems across `0_gt_wavs/`, `3_feature{256,768}/` and, for pitch models, `2a_f0/` (coarse) and
`2b-f0nsf/` (Hz). Lines are `wav|feat|coarse|hz|sid` (f0) or `wav|feat|sid`, with absolute paths of
the local scratch, plus two "mute" lines, shuffled with a seeded RNG.

Mute files: RVC ships `logs/mute/` (3.0 s of int16 zeros at the model rate, HuBERT features of that
silence [149, C], coarse pitch 301 x 1, Hz pitch 301 x 0.0). They teach the model that silent content
maps to silent output. We generate them per experiment (`make_mute_files`). The features are the
embedder's output for the silent 16 kHz clip when an embedder is passed (see
`mute_features_from_embedder`); without one they are zeros of the right shape. Zeros are *not* what
HuBERT outputs for silence, so the mute lines then only teach "zero content -> silence"; this is
documented in the training summary (`mute_features`).

Dataset: features repeated x2 along time (20 ms -> 10 ms frames), capped at 900 frames; pitch as
long, pitchf as float; audio read as float (our gt WAVs are float32 in +-1; the int16 mute WAV is all
zeros so scaling does not matter); the linear spectrogram is cached as `<stem>.spec.pt` next to the
WAV (recomputed when it fails to load, has other parameters, or is older than the WAV); all lengths
are trimmed to the minimum.

Sampler: RVC's DistributedBucketSampler (boundaries 100..900 on `bytes // (3*hop)`, items outside
dropped, each bucket padded to a multiple of replicas*batch by repeating its own items, shuffles
seeded by the epoch, every num_replicas-th item from `rank`). One deliberate fix: it gets the
PER-GPU batch size (classic RVC passed batch*n_gpus, so each GPU trained with n_gpus times the batch
the user asked for; Applio fixed it the same way).
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from rvc_pipeline.core.fileio import atomic_path, atomic_write, save_npy_atomic, write_text_atomic
from rvc_pipeline.core.layout import (
    F0_COARSE_DIR,
    F0_NSF_DIR,
    FILELIST_FILE,
    GT_WAVS_DIR,
    feature_dim,
    feature_dir,
)
from rvc_pipeline.mel import spectrogram

log = logging.getLogger("rvc_pipeline")

SAMPLE_RATES: dict[str, int] = {"32k": 32000, "40k": 40000, "48k": 48000}
BUCKET_BOUNDARIES: tuple[int, ...] = (100, 200, 300, 400, 500, 600, 700, 800, 900)
MAX_FRAMES = 900
MUTE_SECONDS = 3.0
MUTE_FEATURE_FRAMES = 149
MUTE_F0_FRAMES = 301
MUTE_LINES = 2


def _stem(name: str) -> str:
    """RVC's name key: the text before the first '.'."""
    return name.split(".", 1)[0]


def _stems(folder: Path, suffix: str) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {_stem(p.name): p for p in folder.iterdir() if p.is_file() and p.name.endswith(suffix)}


# --------------------------------------------------------------------------------------- mute files
def mute_features_from_embedder(
    extract: Callable[[np.ndarray], np.ndarray], seconds: float = MUTE_SECONDS,
) -> np.ndarray:
    """The embedder's features of `seconds` of 16 kHz silence (RVC's real mute.npy). `extract` maps
    a float32 16 kHz waveform to [frames, C] features (an embedder's extract)."""
    feats = np.asarray(extract(np.zeros(int(16000 * seconds), dtype=np.float32)), dtype=np.float32)
    if feats.ndim != 2:
        raise ValueError(f"embedder returned shape {feats.shape}; expected [frames, channels]")
    return feats


def make_mute_files(
    folder: Path, sr_key: str, version: str, features: np.ndarray | None = None,
) -> dict[str, Path]:
    """Write RVC's mute set under `folder` (like RVC's logs/mute/) and return the four paths.

    features: [frames, C] HuBERT output for 3 s of silence; None -> zeros [149, C]."""
    if sr_key not in SAMPLE_RATES:
        raise ValueError(f"sample rate {sr_key!r} is not one of {sorted(SAMPLE_RATES)}")
    dim = feature_dim(version)
    folder = Path(folder)
    paths = {
        "wav": folder / GT_WAVS_DIR / f"mute{sr_key}.wav",
        "feat": folder / feature_dir(version) / "mute.npy",
        "coarse": folder / F0_COARSE_DIR / "mute.wav.npy",
        "hz": folder / F0_NSF_DIR / "mute.wav.npy",
    }
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    n = int(SAMPLE_RATES[sr_key] * MUTE_SECONDS)
    if features is None:
        feats = np.zeros((MUTE_FEATURE_FRAMES, dim), dtype=np.float32)
    else:
        feats = np.asarray(features, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[1] != dim:
            raise ValueError(f"mute features have shape {feats.shape}; expected [frames, {dim}]")
    # atomic writes: several ranks of one DDP run may generate the same files at once
    if not paths["wav"].exists() or sf.info(str(paths["wav"])).frames != n:
        with atomic_path(paths["wav"]) as tmp:
            sf.write(str(tmp), np.zeros(n, dtype=np.int16), SAMPLE_RATES[sr_key], subtype="PCM_16",
                     format="WAV")
    for key, arr in (("feat", feats), ("coarse", np.ones(MUTE_F0_FRAMES, dtype=np.int64)),
                     ("hz", np.zeros(MUTE_F0_FRAMES, dtype=np.float64))):
        save_npy_atomic(paths[key], arr)
    return paths


# ----------------------------------------------------------------------------------------- filelist
def training_stems(exp_dir: Path, version: str, f0: bool) -> list[str]:
    """Stems present in every input folder (sorted)."""
    exp_dir = Path(exp_dir)
    sets = [
        set(_stems(exp_dir / GT_WAVS_DIR, ".wav")),
        set(_stems(exp_dir / feature_dir(version), ".npy")),
    ]
    if f0:
        sets.append(set(_stems(exp_dir / F0_COARSE_DIR, ".npy")))
        sets.append(set(_stems(exp_dir / F0_NSF_DIR, ".npy")))
    common = set.intersection(*sets)
    return sorted(common)


def filelist_lines(
    exp_dir: Path, version: str, f0: bool, speaker_id: int, mute: dict[str, Path] | None,
    seed: int = 1234, exclude: frozenset[str] = frozenset(),
) -> list[str]:
    """`exclude`: stems kept out of training (the held-out pieces and their guards)."""
    exp_dir = Path(exp_dir).resolve()
    fd = feature_dir(version)
    lines = []
    for s in training_stems(exp_dir, version, f0):
        if s in exclude:
            continue
        parts = [exp_dir / GT_WAVS_DIR / f"{s}.wav", exp_dir / fd / f"{s}.npy"]
        if f0:
            parts += [exp_dir / F0_COARSE_DIR / f"{s}.wav.npy", exp_dir / F0_NSF_DIR / f"{s}.wav.npy"]
        lines.append("|".join([*(p.as_posix() for p in parts), str(speaker_id)]))
    if mute is not None:
        parts = [mute["wav"], mute["feat"]] + ([mute["coarse"], mute["hz"]] if f0 else [])
        mline = "|".join([*(Path(p).resolve().as_posix() for p in parts), str(speaker_id)])
        lines += [mline] * MUTE_LINES
    random.Random(seed).shuffle(lines)
    return lines


def write_filelist(
    exp_dir: Path, version: str, f0: bool, sr_key: str, speaker_id: int, mute_dir: Path | None,
    *, seed: int = 1234, mute_features: np.ndarray | None = None, exclude: frozenset[str] = frozenset(),
) -> Path:
    """Write logs/<exp>/filelist.txt (RVC's format) and return its path.

    mute_dir: where the mute set is generated (None: no mute lines)."""
    mute = make_mute_files(mute_dir, sr_key, version, mute_features) if mute_dir is not None else None
    lines = filelist_lines(exp_dir, version, f0, speaker_id, mute, seed, exclude)
    out = Path(exp_dir) / FILELIST_FILE
    write_text_atomic(out, "\n".join(lines))
    return out


def read_filelist(path: Path, f0: bool) -> list[list[str]]:
    n = 5 if f0 else 3
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) != n:
            raise ValueError(f"{path}:{i}: expected {n} '|'-separated fields ({'with' if f0 else 'without'} "
                             f"pitch), got {len(parts)}")
        out.append(parts)
    return out


# ------------------------------------------------------------------------------------------ dataset
def read_wav(path: str | Path, expected_sr: int) -> torch.Tensor:
    """Audio as float32 [1, N]; float files as-is, integer PCM scaled to +-1 by soundfile."""
    audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    if sr != expected_sr:
        raise ValueError(f"{path}: sample rate {sr} Hz does not match the model's {expected_sr} Hz")
    return torch.from_numpy(np.ascontiguousarray(audio.mean(axis=1))).unsqueeze(0)


def spec_cache_path(wav: str | Path) -> Path:
    """RVC's cache name: `<...>.wav` -> `<...>.spec.pt`."""
    p = Path(wav)
    return p.with_name(p.name[: -len(".wav")] + ".spec.pt") if p.name.endswith(".wav") else \
        p.with_name(p.name + ".spec.pt")


class TextAudioDataset(torch.utils.data.Dataset):
    """RVC's TextAudioLoaderMultiNSFsid (f0=True) / TextAudioLoader (f0=False)."""

    def __init__(
        self, filelist: Path | Sequence[Sequence[str]], *, f0: bool, sampling_rate: int, filter_length: int,
        hop_length: int, win_length: int, max_frames: int = MAX_FRAMES, cache_spec: bool = True,
    ):
        self.items = read_filelist(filelist, f0) if isinstance(filelist, str | Path) else \
            [list(x) for x in filelist]
        self.f0 = f0
        self.sampling_rate = sampling_rate
        self.filter_length = filter_length
        self.hop_length = hop_length
        self.win_length = win_length
        self.max_frames = max_frames
        self.cache_spec = cache_spec
        # RVC's bucketing length: a byte count, ~4/3 x spectrogram frames for float32 WAVs.
        self.lengths = [os.path.getsize(it[0]) // (3 * hop_length) for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def _spec(self, wav_path: str, audio: torch.Tensor) -> torch.Tensor:
        cache = spec_cache_path(wav_path)
        n_bins = self.filter_length // 2 + 1
        n_frames = audio.shape[-1] // self.hop_length
        if self.cache_spec and cache.exists() and cache.stat().st_mtime >= os.path.getmtime(wav_path):
            from rvc_pipeline import safeload

            try:
                spec = safeload.load(cache, what="spectrogram cache")
                if isinstance(spec, torch.Tensor) and spec.dim() == 2 and spec.shape == (n_bins, n_frames):
                    return spec
            except safeload.UnsafeFile as e:  # never run; overwritten below
                log.warning("%s; recomputing it", e)
            except Exception as e:  # noqa: BLE001 - a broken cache is just recomputed
                log.debug("%s: unreadable spectrogram cache, recomputing (%s)", cache, e)
        spec = spectrogram(audio, self.filter_length, self.hop_length, self.win_length).squeeze(0)
        if self.cache_spec:
            try:
                with atomic_write(cache, fsync=False) as f:  # a cache: recomputed when missing
                    torch.save(spec, f, _use_new_zipfile_serialization=False)
            except OSError as e:  # read-only data is fine, only slower
                log.debug("%s: cannot write spectrogram cache (%s)", cache, e)
        return spec

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        it = self.items[index]
        wav_path, feat_path = it[0], it[1]
        sid = torch.LongTensor([int(it[-1])])
        phone = np.load(feat_path)
        if phone.ndim != 2:
            raise ValueError(f"{feat_path}: features must be [frames, channels], got shape {phone.shape}")
        phone = np.repeat(phone, 2, axis=0)
        n = min(phone.shape[0], self.max_frames)
        pitch = pitchf = None
        if self.f0:
            pitch = np.load(it[2]).reshape(-1)
            pitchf = np.load(it[3]).reshape(-1)
            n = min(n, pitch.shape[0], pitchf.shape[0])
        audio = read_wav(wav_path, self.sampling_rate)
        spec = self._spec(wav_path, audio)
        n = min(n, spec.shape[-1])
        if n <= 0:
            raise ValueError(f"{wav_path}: no frames (audio or features empty)")
        spec = spec[:, :n]
        wav = audio[:, : n * self.hop_length]
        phone_t = torch.from_numpy(np.ascontiguousarray(phone[:n], dtype=np.float32))
        if not self.f0:
            return spec, wav, phone_t, sid
        pitch_t = torch.from_numpy(np.ascontiguousarray(pitch[:n])).long()
        pitchf_t = torch.from_numpy(np.ascontiguousarray(pitchf[:n], dtype=np.float32))
        return spec, wav, phone_t, pitch_t, pitchf_t, sid


class TextAudioCollate:
    """Zero-padding collate, sorted by spectrogram length (descending), RVC's tuple order:
    f0: (phone, phone_lengths, pitch, pitchf, spec, spec_lengths, wave, wave_lengths, sid);
    no f0: (phone, phone_lengths, spec, spec_lengths, wave, wave_lengths, sid)."""

    def __init__(self, f0: bool):
        self.f0 = f0

    def __call__(self, batch: Sequence[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        order = sorted(range(len(batch)), key=lambda i: batch[i][0].shape[1], reverse=True)
        b = len(batch)
        max_spec = max(x[0].shape[1] for x in batch)
        max_wave = max(x[1].shape[1] for x in batch)
        max_phone = max(x[2].shape[0] for x in batch)
        n_bins, dim = batch[0][0].shape[0], batch[0][2].shape[1]
        spec = torch.zeros(b, n_bins, max_spec)
        wave = torch.zeros(b, 1, max_wave)
        phone = torch.zeros(b, max_phone, dim)
        spec_len = torch.zeros(b, dtype=torch.long)
        wave_len = torch.zeros(b, dtype=torch.long)
        phone_len = torch.zeros(b, dtype=torch.long)
        sid = torch.zeros(b, dtype=torch.long)
        pitch = torch.zeros(b, max_phone, dtype=torch.long)
        pitchf = torch.zeros(b, max_phone)
        for j, i in enumerate(order):
            row = batch[i]
            s, w, p = row[0], row[1], row[2]
            spec[j, :, : s.shape[1]] = s
            spec_len[j] = s.shape[1]
            wave[j, :, : w.shape[1]] = w
            wave_len[j] = w.shape[1]
            phone[j, : p.shape[0]] = p
            phone_len[j] = p.shape[0]
            if self.f0:
                pitch[j, : row[3].shape[0]] = row[3]
                pitchf[j, : row[4].shape[0]] = row[4]
            sid[j] = row[-1].reshape(-1)[0]
        if self.f0:
            return phone, phone_len, pitch, pitchf, spec, spec_len, wave, wave_len, sid
        return phone, phone_len, spec, spec_len, wave, wave_len, sid


# ------------------------------------------------------------------------------------------ sampler
def bucket_index(length: int, boundaries: Sequence[int] = BUCKET_BOUNDARIES) -> int:
    """i with boundaries[i] < length <= boundaries[i+1]; -1 outside (dropped)."""
    for i in range(len(boundaries) - 1):
        if boundaries[i] < length <= boundaries[i + 1]:
            return i
    return -1


def usable_count(lengths: Sequence[int], boundaries: Sequence[int] = BUCKET_BOUNDARIES) -> int:
    return sum(bucket_index(n, boundaries) >= 0 for n in lengths)


class DistributedBucketSampler(torch.utils.data.Sampler[list[int]]):
    """Length-bucketed batch sampler (RVC's), yielding lists of dataset indices.

    batch_size is PER REPLICA (fixing classic RVC's batch*n_gpus)."""

    def __init__(
        self, lengths: Sequence[int], batch_size: int, boundaries: Sequence[int] = BUCKET_BOUNDARIES,
        num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.epoch = 0
        buckets: list[list[int]] = [[] for _ in range(len(boundaries) - 1)]
        for i, n in enumerate(self.lengths):
            b = bucket_index(n, boundaries)
            if b >= 0:
                buckets[b].append(i)
        self.boundaries = [boundaries[0]]
        self.buckets: list[list[int]] = []
        for i, bucket in enumerate(buckets):
            if bucket:
                self.buckets.append(bucket)
                self.boundaries.append(boundaries[i + 1])
        total = num_replicas * batch_size
        self.num_samples_per_bucket = [len(b) + (total - len(b) % total) % total for b in self.buckets]
        self.total_size = sum(self.num_samples_per_bucket)
        self.num_samples = self.total_size // num_replicas
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The epoch's order (deterministic per epoch); its first `start` batches are skipped without
        touching their data (a resume in the middle of an epoch). `len()` stays the whole epoch's."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.epoch = epoch
        self.start = start

    def _batches(self) -> list[list[int]]:
        g = torch.Generator()
        g.manual_seed(self.epoch)
        batches: list[list[int]] = []
        for bucket, n_target in zip(self.buckets, self.num_samples_per_bucket):
            n = len(bucket)
            order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
            rem = n_target - n
            ids = order + order * (rem // n) + order[: rem % n]
            ids = ids[self.rank :: self.num_replicas]
            for j in range(len(ids) // self.batch_size):
                batches.append([bucket[k] for k in ids[j * self.batch_size : (j + 1) * self.batch_size]])
        if self.shuffle:
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in perm]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches()[self.start :])

    def __len__(self) -> int:
        return self.num_samples // self.batch_size


_MUTE_RE = re.compile(r"(^|/)mute(\d\dk)?\.wav$")


def is_mute_item(item: Sequence[str]) -> bool:
    return bool(_MUTE_RE.search(item[0].replace("\\", "/")))
