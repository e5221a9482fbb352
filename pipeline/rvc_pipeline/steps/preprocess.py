"""Step 2a, preprocess: cut the dataset into normalised pieces in `0_gt_wavs/` (model sr) and
`1_16k_wavs/` (16 kHz), float32 WAVs named `<idx0>_<idx1>.wav` exactly like RVC.

The recipe (reference section 2): decode with ffmpeg to float32 mono at the model sr, 48 Hz order-5
Butterworth high-pass (causal lfilter by default), RVC's silence slicer, pieces of `per` s (3.7) every
`per - overlap` s with the tail rule and RVC's idx1 numbering quirk, normalise with
0.675*x/max|x| + 0.25*x, skip pieces whose peak exceeds 2.5, write float32 at sr and resampled to
16 kHz (librosa's default soxr_hq).

Differences from RVC: the table `DEVIATIONS` below is the one list (docs/preprocess.md explains it,
`preprocess.json` names the ones in force). All but one are on by default and off with the spec's
`preprocess.rvcCompatible: true`, which then writes RVC's pieces and names byte for byte.

Streaming (the `block_seconds` deviation): a file is decoded as a stream (ffmpeg stdout read in chunks of
2^18 samples), high-passed chunk by chunk with the filter state carried over (identical to filtering
the whole file), and buffered into blocks of at most `block_seconds` (60 s). A full block is cut in
the middle of the last silence (a run of at least min_interval silent frames) in its second half, or
at its end if there is none, and each block is sliced and segmented on its own (the idx1 counter
runs on across blocks). A file shorter than one block is processed exactly as RVC does; for longer
ones, pieces differ only near block boundaries, which lie in silences where RVC's slicer would cut
anyway. Peak memory per worker is a few block sizes, whatever the file length. With the
'filtfilt' high-pass, zero-phase filtering is applied per block.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rvc_pipeline.audio import (
    WAV_F32_HEADER_BYTES,
    AudioError,
    AudioStream,
    HighPassStream,
    high_pass,
    resample,
    write_wav_f32,
)
from rvc_pipeline.core import layout
from rvc_pipeline.core.folders import inside
from rvc_pipeline.core.storage import open_storage, scratch_dir
from rvc_pipeline.provenance import sha256_file
from rvc_pipeline.slicer import Slicer, frame_rms, silent_runs
from rvc_pipeline.steps.processes import parallel_map

if TYPE_CHECKING:  # the worker processes import this module: keep pydantic (spec, stepio) out of it
    from rvc_pipeline.core.spec import Experiment
    from rvc_pipeline.core.storage import Storage
    from rvc_pipeline.stepio import CheckedInputs
    from rvc_pipeline.steps.runner import FileProgress, StepContext

log = logging.getLogger("rvc_pipeline")

GT_DIR = layout.GT_WAVS_DIR
WAV16_DIR = layout.WAVS_16K_DIR
REPORT = "preprocess.json"
LOGFILE = "preprocess.log"
SR_16K = 16000
NORM_MAX = 0.9
NORM_ALPHA = 0.75
BLOCK_SECONDS = 60.0
STREAM_CHUNK_SAMPLES = 1 << 18


@dataclass(frozen=True)
class Deviation:
    """One deliberate difference from RVC's preprocess.

    `switch` is the `Params` field that turns it on or off and `rvc` the value that gives RVC's
    behaviour (what `preprocess.rvcCompatible: true` sets); `switch` None: kept in every mode.
    """

    name: str
    switch: str | None
    rvc: Any
    ours: str
    rvc_does: str


DEVIATIONS: tuple[Deviation, ...] = (
    Deviation("renumber", "fix_overwrite", False,
              "a chunk's first full piece that would reuse the number of the previous chunk's last piece "
              "gets the next free number (see Segmenter)",
              "writes both under one name: the later piece overwrites the earlier one, which is lost"),
    Deviation("drop-short", "drop_short", False,
              "pieces shorter than min_train_samples (about 0.76 s) are not written",
              "writes them; its trainer then drops them (items of at most 100 frames), after f0 and "
              "features were computed for nothing"),
    Deviation("blocks", "block_seconds", None,
              "files longer than block_seconds (60 s) are streamed in blocks cut at silences",
              "decodes, filters and slices the whole file at once (memory grows with the file length)"),
    Deviation("no-nan", None, None,
              "a piece whose peak is 0 (digital silence) is not written",
              "divides by the zero peak and writes a piece of NaNs"),
)


def min_train_samples(sr: int) -> int:
    """Fewest samples a float32 WAV piece needs so that RVC's sampler keeps it.

    The sampler's length is `file bytes // (3*hop)` (hop = sr/100 in every RVC config) and items with
    a length <= 100 are dropped: that is about 0.76 s at every sample rate.
    """
    hop3 = 3 * (sr // 100)
    return math.ceil((101 * hop3 - WAV_F32_HEADER_BYTES) / 4)


# ------------------------------------------------------------------------------------------------
# Pure functions: arrays in, arrays out
# ------------------------------------------------------------------------------------------------


class Segmenter:
    """RVC's cutting of each slicer chunk into pieces, with its file-wide idx1 counter.

    For i = 0, 1, ...: start = int(sr*(per-overlap)*i); while the rest is longer than (per+overlap)*sr
    emit `per` seconds and count idx1 up; otherwise count idx1 up first, emit the rest, stop (so the
    last piece of a chunk skips a number: a short chunk becomes `_1`, not `_0`).

    RVC bug, fixed by default: the counter is not advanced after a chunk's last piece, so when the next
    chunk starts with a full piece, that piece gets the same idx1 and RVC's write silently overwrites
    the previous chunk's last piece (data loss). With `fix_overwrite` (default) the counter is bumped
    in exactly that case, so names equal RVC's up to the first such collision, every piece is kept,
    and `collisions` counts the pieces RVC would have lost. With `fix_overwrite=False` the duplicate
    numbers are produced as RVC produces them (write them in order and the last one wins, as in RVC).
    """

    def __init__(self, sr: int, per: float = 3.7, overlap: float = 0.3, fix_overwrite: bool = True):
        self.sr = sr
        self.per = per
        self.overlap = overlap
        self.tail = per + overlap
        self.fix_overwrite = fix_overwrite
        self.idx1 = 0
        self.collisions = 0
        self._last_tail: int | None = None

    def segments(self, chunk: np.ndarray) -> list[tuple[int, np.ndarray]]:
        out: list[tuple[int, np.ndarray]] = []
        i = 0
        while True:
            start = int(self.sr * (self.per - self.overlap) * i)
            i += 1
            if len(chunk[start:]) > self.tail * self.sr:
                if self.idx1 == self._last_tail:
                    self.collisions += 1
                    if self.fix_overwrite:
                        self.idx1 += 1
                out.append((self.idx1, chunk[start: start + int(self.per * self.sr)]))
                self.idx1 += 1
            else:
                self.idx1 += 1
                out.append((self.idx1, chunk[start:]))
                self._last_tail = self.idx1
                return out


def normalize(x: np.ndarray, max_peak: float = 2.5) -> np.ndarray | None:
    """RVC's norm_write: None when max|x| > max_peak (or 0), else x/m*(0.9*0.75) + (1-0.75)*x."""
    m = float(np.abs(x).max()) if len(x) else 0.0
    if m > max_peak or m == 0.0:
        return None
    return (x / m * (NORM_MAX * NORM_ALPHA)) + (1 - NORM_ALPHA) * x


def preprocess_audio(
    x: np.ndarray,
    sr: int,
    per: float = 3.7,
    overlap: float = 0.3,
    hp_mode: str = "lfilter",
    slicer: Slicer | None = None,
    max_peak: float = 2.5,
    fix_overwrite: bool = True,
) -> list[tuple[int, np.ndarray]]:
    """RVC's preprocessing of one decoded file (float32 mono at sr): [(idx1, normalised piece)].

    Pieces are float64 (as RVC has them before writing). Peak-filtered pieces (and zero-peak ones,
    which RVC would turn into NaNs) are left out; their idx1 numbers stay unused, as in RVC.
    With `fix_overwrite=False` the result is exactly the set of files RVC leaves on disk (a piece
    that RVC overwrites with a later one of the same name is replaced by it); see `Segmenter`.
    """
    sl = slicer or Slicer(sr)
    seg = Segmenter(sr, per, overlap, fix_overwrite=fix_overwrite)
    y = high_pass(x, sr, hp_mode)
    out: dict[int, np.ndarray] = {}
    for chunk in sl.slice(y):
        for idx1, piece in seg.segments(chunk):
            z = normalize(piece, max_peak)
            if z is not None:
                out[idx1] = z
    return sorted(out.items(), key=lambda kv: kv[0])


def blocks_at_silences(
    chunks: Iterable[np.ndarray], slicer: Slicer, block_samples: int | None
) -> Iterator[np.ndarray]:
    """Regroup a stream of sample chunks into blocks of at most `block_samples`, each cut (except the
    last) in the middle of the last silent run (>= min_interval frames) of its second half, or at
    `block_samples` when that half has no such silence. Memory: one block plus one chunk.
    `block_samples` None: one block, the whole stream (RVC's way)."""
    parts: list[np.ndarray] = []
    n = 0
    for c in chunks:
        parts.append(c)
        n += len(c)
        while block_samples is not None and n >= block_samples:
            buf = np.concatenate(parts) if len(parts) > 1 else parts[0]
            parts = []  # free the chunks before the block is used
            cut = _block_cut(buf[:block_samples], slicer)
            yield buf[:cut]
            rest = buf[cut:].copy()
            del buf
            parts, n = [rest], len(rest)
    if n:
        last = np.concatenate(parts) if len(parts) > 1 else parts[0]
        parts = []  # free the chunks while the block is used (the whole file without blocks)
        yield last


def _block_cut(region: np.ndarray, slicer: Slicer) -> int:
    half = len(region) // 2
    rms = frame_rms(region[half:], slicer.win, slicer.hop)
    starts, ends = silent_runs(rms, slicer.threshold)
    long_enough = np.flatnonzero(ends - starts >= slicer.min_interval)
    if long_enough.size == 0:
        return len(region)
    k = long_enough[-1]
    mid = (int(starts[k]) + int(ends[k])) // 2
    return min(len(region), max(1, half + mid * slicer.hop))


# ------------------------------------------------------------------------------------------------
# One file (runs in a worker process)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    sr: int
    per: float = 3.7
    overlap: float = 0.3
    hp_mode: str = "lfilter"
    max_peak: float = 2.5
    threshold_db: float = -42.0
    min_length_ms: float = 1500
    min_interval_ms: float = 400
    hop_size_ms: float = 15
    max_sil_kept_ms: float = 500
    # the switchable deviations (DEVIATIONS); block_seconds None: the whole file is one block
    block_seconds: float | None = BLOCK_SECONDS
    drop_short: bool = True
    fix_overwrite: bool = True

    def slicer(self) -> Slicer:
        return Slicer(self.sr, self.threshold_db, self.min_length_ms, self.min_interval_ms,
                      self.hop_size_ms, self.max_sil_kept_ms)

    def rvc_exact(self) -> Params:
        """These parameters with every switchable deviation turned off (RVC's behaviour)."""
        return replace(self, **{d.switch: d.rvc for d in DEVIATIONS if d.switch})

    @property
    def deviations(self) -> list[str]:
        """Names of the deviations in force (the ones kept in every mode included)."""
        return [d.name for d in DEVIATIONS if d.switch is None or getattr(self, d.switch) != d.rvc]

    def block_samples(self) -> int | None:
        if self.block_seconds is None:
            return None
        return max(int(self.block_seconds * self.sr), 4 * self.slicer().win)

    @classmethod
    def from_spec(cls, spec: Any, **over: Any) -> Params:
        p, s = spec.preprocess, spec.preprocess.slicer
        kw: dict[str, Any] = dict(
            sr=spec.model.sr, per=p.segment_seconds, overlap=p.overlap_seconds, hp_mode=p.high_pass,
            max_peak=p.max_peak, threshold_db=s.threshold_db, min_length_ms=s.min_length_ms,
            min_interval_ms=s.min_interval_ms, hop_size_ms=s.hop_size_ms, max_sil_kept_ms=s.max_sil_kept_ms,
        )
        if p.rvc_compatible:
            kw.update({d.switch: d.rvc for d in DEVIATIONS if d.switch})
        kw.update(over)
        return cls(**kw)


@dataclass
class FileJob:
    idx0: int
    name: str
    path: str
    exp_dir: str
    params: Params


@dataclass
class FileReport:
    index: int
    name: str
    status: str = "ok"  # ok | skipped
    reason: str | None = None
    duration_s: float = 0.0
    pieces: int = 0
    piece_seconds: float = 0.0
    peak_filtered: int = 0
    silent_pieces: int = 0
    short_pieces: int = 0
    short_seconds: float = 0.0
    rvc_overwrites_avoided: int = 0
    pieces_overwritten: int = 0  # rvcCompatible: pieces replaced by a later one of the same name, as in RVC
    piece_names: list[str] = field(default_factory=list)  # the pieces written (in the per-file record)
    peak: float = 0.0
    warnings: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)


def process_file(job: FileJob) -> FileReport:
    """Decode, slice, segment, normalise and write the pieces of one input file."""
    rep = FileReport(index=job.idx0, name=job.name)
    slicer = job.params.slicer()
    stream = AudioStream(job.path, job.params.sr, chunk_samples=STREAM_CHUNK_SAMPLES)
    try:
        loudest = _slice_and_write(job, stream, slicer, rep)
    except AudioError as e:
        _remove_pieces(job.idx0, Path(job.exp_dir) / GT_DIR, Path(job.exp_dir) / WAV16_DIR)
        rep.status, rep.pieces, rep.piece_seconds, rep.piece_names = "skipped", 0, 0.0, []
        why = str(e).removeprefix(f"{job.path}: ")
        # audio.py's own messages already say "not audio or corrupt (...)": do not say it twice
        rep.reason = why if why.startswith("not audio or corrupt") else f"not audio or corrupt: {why}"
        rep.duration_s = round(stream.seconds, 3)
        rep.log.append(f"{job.name}\t-> skipped: {rep.reason}")
        return rep
    rep.duration_s = round(stream.seconds, 3)
    rep.warnings = stream.warnings
    rep.piece_seconds = round(rep.piece_seconds, 3)
    rep.short_seconds = round(rep.short_seconds, 3)
    rep.peak = round(rep.peak, 4)
    if rep.pieces == 0:
        rep.status = "skipped"
        min_n = min_train_samples(job.params.sr) if job.params.drop_short else 0
        rep.reason = _why_nothing(rep, loudest, slicer, job.params.sr, min_n)
        rep.log.append(f"{job.name}\t-> skipped: {rep.reason}")
    else:
        rep.log.append(f"{job.name}\t-> Success ({rep.pieces} pieces, {rep.piece_seconds:.2f} s)")
    for w in rep.warnings:
        rep.log.append(f"{job.name}\t-> ffmpeg warning: {w}")
    return rep


def _blocks(stream: AudioStream, p: Params, slicer: Slicer) -> Iterator[np.ndarray]:
    """The high-passed file in blocks (one block, the whole file, without the 'blocks' deviation)."""
    hp = HighPassStream(p.sr, p.hp_mode)
    for block in blocks_at_silences((hp(c) for c in stream), slicer, p.block_samples()):
        yield high_pass(block, p.sr, "filtfilt") if p.hp_mode == "filtfilt" else block


def _slice_and_write(job: FileJob, stream: AudioStream, slicer: Slicer, rep: FileReport) -> float:
    """Write the file's pieces, counting them into `rep`; returns the loudest frame RMS.

    Pieces are written in RVC's order, so a name written twice (rvcCompatible) ends up holding the
    later piece, as in RVC; it counts once in `rep.pieces`.
    """
    p = job.params
    seg = Segmenter(p.sr, p.per, p.overlap, fix_overwrite=p.fix_overwrite)
    min_n = min_train_samples(p.sr) if p.drop_short else 0
    written: dict[str, float] = {}  # name -> seconds
    loudest = 0.0
    for block in _blocks(stream, p, slicer):
        if len(block):  # max|x| without an |x| temporary
            rep.peak = max(rep.peak, float(block.max()), -float(block.min()))
        bounds, lb = slicer.analyse(block)
        loudest = max(loudest, lb)
        for a, b in bounds:
            for idx1, piece in seg.segments(block[a:b]):
                if _keep(piece, p, min_n, rep, f"{job.idx0}-{idx1}"):
                    stem = _write_piece(job, idx1, piece)
                    rep.pieces_overwritten += stem in written
                    written[stem] = len(piece) / p.sr
    rep.pieces, rep.piece_seconds = len(written), sum(written.values())
    rep.piece_names = sorted(written)
    rep.rvc_overwrites_avoided = seg.collisions if p.fix_overwrite else 0
    return loudest


def _keep(piece: np.ndarray, p: Params, min_n: int, rep: FileReport, label: str) -> bool:
    """Whether a piece is written; the reason it is not is counted into `rep`."""
    m = float(np.abs(piece).max()) if len(piece) else 0.0
    if m > p.max_peak:
        rep.peak_filtered += 1
        rep.log.append(f"{label}-filtered (peak {m:.2f} > {p.max_peak})")
        return False
    if m == 0.0:  # the 'no-nan' deviation
        rep.silent_pieces += 1
        return False
    if len(piece) < min_n:  # the 'drop-short' deviation
        rep.short_pieces += 1
        rep.short_seconds += len(piece) / p.sr
        return False
    return True


def _write_piece(job: FileJob, idx1: int, piece: np.ndarray) -> str:
    """Normalise and write one piece at the model rate and at 16 kHz, as RVC's norm_write; its name."""
    sr = job.params.sr
    y = normalize(piece, job.params.max_peak)
    assert y is not None
    stem = f"{job.idx0}_{idx1}.wav"
    write_wav_f32(Path(job.exp_dir) / GT_DIR / stem, y.astype(np.float32), sr)
    write_wav_f32(Path(job.exp_dir) / WAV16_DIR / stem, resample(y, sr, SR_16K).astype(np.float32), SR_16K)
    return stem


def _why_nothing(rep: FileReport, loudest: float, slicer: Slicer, sr: int, min_n: int) -> str:
    if rep.peak == 0.0 or loudest < slicer.threshold:
        level = 20 * math.log10(loudest) if loudest > 0 else float("-inf")
        return (f"all silence (loudest frame {level:.1f} dB RMS, below the slicer threshold "
                f"{slicer.threshold_db:g} dB)")
    if rep.duration_s * sr < min_n or (rep.short_pieces and not rep.peak_filtered):
        return (f"too short to train on ({rep.duration_s:.2f} s of audio, "
                f"{rep.short_pieces} piece(s) under {min_n / sr:.2f} s, which RVC's trainer drops)")
    if rep.peak_filtered:
        return (f"every piece was filtered: {rep.peak_filtered} piece(s) peak above the limit "
                f"(is it float audio far beyond full scale?)")
    return "no piece produced"


def _remove_pieces(idx0: int, *dirs: Path) -> None:
    for d in dirs:
        for q in d.glob(f"{idx0}_*.wav"):
            q.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------------


@dataclass
class _Input:
    idx0: int
    name: str
    local: Path | None  # set for local datasets; S3 inputs are downloaded first
    key: str | None = None


def list_dataset(source: str, endpoint: str | None = None, region: str | None = None) -> list[_Input]:
    """Files directly inside the dataset folder (sub-folders ignored), sorted by name; idx0 = position."""
    return scan_dataset(source, endpoint, region).inputs()


# ------------------------------------------------------------------------------------------------
# The dataset manifest: what preprocess read (part of its inputs, recorded beside its outputs)
# ------------------------------------------------------------------------------------------------

MANIFEST_FILE = layout.DATASET_MANIFEST_FILE  # in logs/<exp>/, beside the step markers


@dataclass(frozen=True)
class DatasetFile:
    name: str
    size: int
    digest: str  # "sha256:<hex>" of a local file, "etag:<etag>" of an S3 object


@dataclass
class Dataset:
    source: str
    files: list[DatasetFile]
    root: Path | None = None  # the local folder (None on S3)

    @property
    def digest(self) -> str:
        blob = json.dumps([[f.name, f.size, f.digest] for f in self.files])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def inputs(self) -> list[_Input]:
        if self.root is None:
            return [_Input(i, f.name, None, f.name) for i, f in enumerate(self.files)]
        return [_Input(i, f.name, self.root / f.name) for i, f in enumerate(self.files)]

    def manifest(self) -> dict[str, Any]:
        return {"source": self.source, "digest": self.digest, "files": [asdict(f) for f in self.files]}


def _local_digest(path: Path) -> str:
    try:
        return f"sha256:{sha256_file(path)}"
    except OSError as e:  # processed (and reported as skipped) like any unreadable file
        return f"unreadable:{e.strerror}"


def scan_dataset(source: str, endpoint: str | None = None, region: str | None = None) -> Dataset:
    """The dataset's manifest: every file directly inside the folder (sub-folders ignored), sorted by
    name, with its size and content digest (sha256 locally, the ETag on S3)."""
    if source.startswith("s3://"):
        st = open_storage(source, endpoint=endpoint, region=region)
        # (an empty name is the "folder" object some consoles create)
        objs = sorted((o for o in st.list("", recursive=False) if o.key and "/" not in o.key),
                      key=lambda o: o.key)
        return Dataset(source, [DatasetFile(o.key, o.size, f"etag:{o.etag or ''}") for o in objs])
    from rvc_pipeline.core.errors import StepFailed

    root = Path(source.removeprefix("file://")).expanduser()
    if not root.is_dir():
        raise StepFailed(f"dataset {source}: " + ("not a folder" if root.exists() else "no such folder"))
    files = []
    for n in sorted(os.listdir(root)):
        p = root / n
        if p.is_file():  # regular files (or links to them): no pipes, devices or dangling links
            files.append(DatasetFile(n, p.stat().st_size, _local_digest(p)))
    return Dataset(source, files, root)


def dataset_changes(old: dict[str, Any] | None, new: Dataset) -> dict[str, list[str]] | None:
    """Names added, removed and changed (size or content) since the manifest `old`; None without one."""
    if not isinstance(old, dict) or not isinstance(old.get("files"), list):
        return None
    before = {f["name"]: (f.get("size"), f.get("digest")) for f in old["files"]
              if isinstance(f, dict) and isinstance(f.get("name"), str)}  # a damaged manifest: no crash
    now = {f.name: (f.size, f.digest) for f in new.files}
    return {"added": sorted(set(now) - set(before)), "removed": sorted(set(before) - set(now)),
            "changed": sorted(n for n in set(now) & set(before) if now[n] != before[n])}


def _s3_overlap(source: str, storage_uri: str, exp_prefix: str) -> bool:
    def parts(uri: str) -> tuple[str, str]:
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        return bucket, "/".join(x for x in prefix.split("/") if x)

    (db, dp), (sb, sp) = parts(source), parts(storage_uri)
    ep = "/".join(x for x in (sp, exp_prefix) if x)
    return db == sb and (dp == ep or dp.startswith(ep + "/") or not dp or ep.startswith(dp + "/"))


def refuse_overlap(ds: Dataset, storage_uri: str, experiment: str) -> None:
    """StepFailed when the dataset is, lies inside or contains the experiment folder logs/<exp>/ of the
    storage (preprocess would delete or read back its own outputs), or a dataset file is a link into it."""
    from rvc_pipeline.core.errors import StepFailed

    exp_prefix = f"logs/{experiment}"
    why = (f"dataset {ds.source} overlaps the experiment folder {exp_prefix}/ of storage {storage_uri}; "
           "keep the recordings outside it")
    if ds.root is None:
        if storage_uri.startswith("s3://") and _s3_overlap(ds.source, storage_uri, exp_prefix):
            raise StepFailed(why)
        return
    if storage_uri.startswith("s3://"):
        return
    exp_real = (Path(storage_uri.removeprefix("file://")).expanduser() / exp_prefix).resolve()
    root_real = ds.root.resolve()
    if inside(root_real, exp_real) or inside(exp_real, root_real):
        raise StepFailed(why)
    for f in ds.files:
        if inside((ds.root / f.name).resolve(), exp_real):
            raise StepFailed(f"dataset {ds.source}: {f.name} is a link into the experiment folder "
                             f"{exp_prefix}/ of storage {storage_uri}; keep the recordings outside it")


def check_inputs(exp: Experiment, storage: Storage) -> CheckedInputs:
    """preprocess's input check (stepio.INPUT_CHECKS): the dataset lists, is not empty and does not
    overlap the experiment's folder. Fingerprint: the manifest digest (a changed dataset reruns)."""
    from rvc_pipeline.core.errors import StepFailed
    from rvc_pipeline.stepio import CheckedInputs

    spec = exp.spec
    source = spec.dataset.source
    ds = scan_dataset(source, spec.storage.endpoint, spec.storage.region)
    refuse_overlap(ds, spec.storage.uri, exp.name)
    if not ds.files:
        raise StepFailed(f"dataset {source}: no files")
    return CheckedInputs({"dataset_digest": ds.digest}, ds)


FETCH_AHEAD = 2
"""S3 datasets: files downloaded ahead of the workers (at most workers + FETCH_AHEAD on local disk)."""


def _jobs(inputs: list[_Input], make_job: Callable[[_Input, Path], FileJob],
          fetch: Callable[[_Input], Path] | None) -> Generator[FileJob, None, None]:
    """One job per input, in order. S3 inputs are downloaded by threads, FETCH_AHEAD files ahead of the
    job being drawn; local ones are read where they are."""
    if fetch is None:
        for inp in inputs:
            assert inp.local is not None
            yield make_job(inp, inp.local)
        return
    dl = ThreadPoolExecutor(4)
    pending = iter(inputs)
    ahead: deque[tuple[_Input, Future[Path]]] = deque()
    try:
        for inp in pending:
            ahead.append((inp, dl.submit(fetch, inp)))
            while len(ahead) > FETCH_AHEAD:
                first, fut = ahead.popleft()
                yield make_job(first, fut.result())
        while ahead:
            first, fut = ahead.popleft()
            yield make_job(first, fut.result())
    finally:
        dl.shutdown(wait=True, cancel_futures=True)


def _previous_manifest(ctx: StepContext) -> dict[str, Any] | None:
    from rvc_pipeline.core.errors import StorageError

    try:
        data = json.loads(ctx.storage.read_bytes(f"{ctx.exp_key}/{MANIFEST_FILE}"))
    except StorageError as e:
        if not getattr(e, "permanent", True):
            raise  # unreachable storage is not "no earlier manifest"
        return None
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _s3_fetcher(ctx: StepContext, tmp_dir: Path) -> Callable[[_Input], Path]:
    spec = ctx.spec
    st = open_storage(spec.dataset.source, endpoint=spec.storage.endpoint, region=spec.storage.region)

    def fetch(inp: _Input) -> Path:
        dest = tmp_dir / f"{inp.idx0:06d}_{Path(inp.name).name}"
        st.download(inp.key or inp.name, dest)
        return dest

    return fetch


def _process_all(ctx: StepContext, inputs: list[_Input], params: Params, progress: FileProgress,
                 ds: Dataset) -> list[FileReport]:
    """Every input through `process_file`, in worker processes; each finished file's record is written
    (`_save_record`) before `progress.advance`, which pushes records after their pieces and raises
    Preempted after a SIGTERM (the pool then finishes the files in flight, draws no more). Reports
    sorted by idx0."""
    if not inputs:
        return []
    fetch: Callable[[_Input], Path] | None = None
    tmp: Path | None = None
    if ctx.spec.dataset.source.startswith("s3://"):
        tmp = scratch_dir("rvc-dataset-")
        fetch = _s3_fetcher(ctx, tmp)
    exp_dir = ctx.exp_dir

    def make_job(inp: _Input, path: Path) -> FileJob:
        return FileJob(inp.idx0, inp.name, str(path), str(exp_dir), params)

    workers = max(1, min(ctx.workers, len(inputs)))
    reports: list[FileReport] = []
    # the pool's workers start before the first job is drawn, so no download thread exists at the fork
    jobs = _jobs(inputs, make_job, fetch)
    done = parallel_map(process_file, jobs, workers, in_flight=workers)
    try:
        for job, rep in ctx.reporter.bar(done, total=len(inputs), desc="preprocess", unit="file"):
            if tmp is not None:
                Path(job.path).unlink(missing_ok=True)
            _save_record(exp_dir, ds.files[rep.index], rep)
            reports.append(rep)
            progress.advance(1, rep.duration_s)
    finally:
        done.close()  # the pool and the downloads stop before their folder goes
        jobs.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(reports, key=lambda r: r.index)


# ------------------------------------------------------------------------------------------------
# Per-file records: resume, shards, and the report summed over them
# ------------------------------------------------------------------------------------------------

RECORDS_DIR = layout.PREPROCESS_RECORDS_DIR
PARAMS_FILE = layout.params_file("preprocess")
OUTPUT_DIRS = (GT_DIR, WAV16_DIR, RECORDS_DIR)  # pushed in this order: a record never precedes its pieces


def _save_record(exp_dir: Path, f: DatasetFile, rep: FileReport) -> None:
    """The record of a finished dataset file: which file (name, digest), its pieces, its report."""
    from rvc_pipeline.core.fileio import write_text_atomic

    path = exp_dir / layout.preprocess_record(rep.index)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"name": f.name, "digest": f.digest, "report": asdict(rep)}))


def _load_record(exp_dir: Path, idx0: int, f: DatasetFile) -> FileReport | None:
    """The report of dataset file `idx0` when its record is for this file (None: not done)."""
    try:
        data = json.loads((exp_dir / layout.preprocess_record(idx0)).read_text())
        if data["name"] != f.name or data["digest"] != f.digest:
            return None
        rep = FileReport(**data["report"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rep if rep.index == idx0 else None


def _stored_names(ctx: StepContext, sub: str) -> set[str]:
    base = f"{ctx.exp_key}/{sub}"
    names = (o.key[len(base) + 1:] for o in ctx.storage.list(base) if o.key.startswith(base + "/"))
    return {n for n in names if n and "/" not in n}


def _pieces_stored(ctx: StepContext) -> set[str]:
    """Pieces in storage at both rates."""
    return _stored_names(ctx, GT_DIR) & _stored_names(ctx, WAV16_DIR)


def _done_reports(ctx: StepContext, ds: Dataset, inputs: list[_Input]) -> dict[int, FileReport]:
    """The inputs already done: a record for this dataset file whose pieces are all stored."""
    wanted = {f"{i.idx0}.json" for i in inputs}
    ctx.pull(RECORDS_DIR, only=wanted.__contains__)
    stored = _pieces_stored(ctx)
    done = {}
    for inp in inputs:
        rep = _load_record(ctx.exp_dir, inp.idx0, ds.files[inp.idx0])
        if rep is not None and all(n in stored for n in rep.piece_names):
            done[inp.idx0] = rep
    return done


def _clear_for(ctx: StepContext, idx0s: list[int]) -> None:
    """Before dataset files are (re)done: delete their pieces, records and partial files, locally and
    in storage; nothing of any other file (shards running beside this one own those)."""
    from rvc_pipeline.stepio import parallel_threads
    from rvc_pipeline.steps.runner import partial_target

    mine = {str(i) for i in idx0s}
    for sub in (GT_DIR, WAV16_DIR):
        folder = ctx.exp_dir / sub
        folder.mkdir(parents=True, exist_ok=True)
        for p in folder.iterdir():
            name = partial_target(p.name) or p.name
            if name.endswith(".wav") and name.split("_", 1)[0] in mine and p.is_file():
                p.unlink(missing_ok=True)
    for i in idx0s:
        (ctx.exp_dir / layout.preprocess_record(i)).unlink(missing_ok=True)
    if ctx.remote:
        keys = [f"{ctx.exp_key}/{sub}/{n}" for sub in (GT_DIR, WAV16_DIR) for n in _stored_names(ctx, sub)
                if n.endswith(".wav") and n.split("_", 1)[0] in mine]
        keys += [f"{ctx.exp_key}/{layout.preprocess_record(i)}" for i in idx0s]
        parallel_threads(ctx.storage.delete, keys)


def _clear_all(ctx: StepContext) -> None:
    """Every piece and record (another generation: other settings or another dataset)."""
    from rvc_pipeline.stepio import OWNED_OUTPUTS, parallel_threads, remove_owned, remove_owned_local

    for sub, patterns in OWNED_OUTPUTS["preprocess"].items():
        remove_owned_local(ctx.exp_dir / sub, patterns)
        if ctx.remote:
            remove_owned(ctx.storage, ctx.name, sub)
    remove_owned_local(ctx.exp_dir / RECORDS_DIR, ("*.json", "*.partial"))
    if ctx.remote:
        parallel_threads(ctx.storage.delete, [f"{ctx.exp_key}/{RECORDS_DIR}/{n}"
                                              for n in _stored_names(ctx, RECORDS_DIR)])


def _generation_params(params: Params, ds: Dataset) -> dict[str, Any]:
    """What makes the pieces and their names: the settings and the dataset (idx0 = sorted position)."""
    return {**asdict(params), "dataset_digest": ds.digest}


def _start_lines(ds: Dataset, params: Params, changes: dict[str, list[str]] | None) -> list[str]:
    lines = [f"start preprocess: {len(ds.files)} files from {ds.source}, sr {params.sr}, "
             f"per {params.per}, overlap {params.overlap}, high-pass {params.hp_mode}, "
             f"deviations from RVC: {', '.join(params.deviations)}"]
    if changes is not None and any(changes.values()):
        what = "; ".join(f"{k}: {', '.join(v)}" for k, v in changes.items() if v)
        lines.append(f"dataset changed since the last run: {what}")
    return lines


def _finish(ctx: StepContext, ds: Dataset, report: dict[str, Any], reports: list[FileReport],
            changes: dict[str, list[str]] | None) -> None:
    """The whole-dataset files, once (the unsharded run, or the shard that completes the step): the
    log, the report and (when some piece was made) the dataset manifest; push them, the pieces and the
    records; delete stored pieces no record names (an earlier run's); StepFailed naming every file's
    reason when no piece was made."""
    from rvc_pipeline.core.errors import StepFailed
    from rvc_pipeline.core.fileio import write_text_atomic  # (two shards completing at once write alike)

    exp_dir = ctx.exp_dir
    params = Params.from_spec(ctx.spec)
    log_lines = _start_lines(ds, params, changes) + [line for r in reports for line in r.log]
    log_lines.append(f"end preprocess: {report['pieces']} pieces, {report['piece_seconds']} s "
                     f"from {report['files_used']}/{report['files_total']} files")
    write_text_atomic(exp_dir / LOGFILE, "\n".join(log_lines) + "\n")
    write_text_atomic(exp_dir / REPORT, json.dumps(report, indent=1) + "\n")
    if report["pieces"] == 0:
        why = "; ".join(f"{r.name}: {r.reason}" for r in reports)
        raise StepFailed(f"dataset {ds.source}: no training piece produced from any file ({why})")
    (exp_dir / MANIFEST_FILE).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(exp_dir / MANIFEST_FILE, json.dumps(ds.manifest(), indent=1) + "\n")
    ctx.push(*OUTPUT_DIRS, REPORT, LOGFILE, MANIFEST_FILE)
    _prune(ctx, {n for r in reports for n in r.piece_names})


def _summary(ds: Dataset, params: Params, reports: list[FileReport], seconds: float,
             changes: dict[str, list[str]] | None) -> dict[str, Any]:
    report = _dataset_report(ds.source, params, reports, seconds)
    report.update(dataset_files=len(ds.files), dataset_digest=ds.digest, dataset_changes=changes)
    return report


def _dataset(ctx: StepContext) -> Dataset:
    # the inputs first (checked by the step shell, or here when called directly): nothing is deleted
    # before the dataset is known to list, to be non-empty and to lie outside the experiment folder
    checked = ctx.checked.data
    return checked if isinstance(checked, Dataset) else check_inputs(ctx.experiment, ctx.storage).data


def _process_mine(ctx: StepContext, ds: Dataset, params: Params,
                  inputs: list[_Input]) -> tuple[list[FileReport], float]:
    """Resume or process this run's inputs; (their reports, wall seconds). On SIGTERM or a failure, what
    is done is pushed before the exception goes on."""
    from rvc_pipeline.core import termination
    from rvc_pipeline.steps.runner import FileProgress
    from rvc_pipeline.steps.shards import check_generation

    done = _done_reports(ctx, ds, inputs)
    todo = [i for i in inputs if i.idx0 not in done]
    if done:
        log.info("preprocess: %d of %d files already done, resuming", len(done), len(inputs))
    _clear_for(ctx, [i.idx0 for i in todo])
    gen = _generation_params(params, ds)
    progress = FileProgress(ctx, OUTPUT_DIRS, len(inputs), len(done), 0.0, True,
                            lambda: check_generation(ctx, gen))
    progress.seconds = sum(r.duration_s for r in done.values())
    t0 = time.time()
    try:
        with termination.graceful():
            new = _process_all(ctx, todo, params, progress, ds)
    except BaseException:
        if ctx.remote:
            _push_after_failure(ctx)
        raise
    return sorted([*done.values(), *new], key=lambda r: r.index), time.time() - t0


def _push_after_failure(ctx: StepContext) -> None:
    try:
        ctx.push(*OUTPUT_DIRS)  # what is done stays done for the rerun
        ctx.push_progress()
    except Exception as e:  # noqa: BLE001 - never hide the step's own error
        log.warning("preprocess: could not push what was done: %s", e)


def run(ctx: StepContext) -> dict[str, Any]:
    """The step (or one shard of it: the dataset files whose idx0 it owns). Files with a record whose
    pieces are stored are done (resume); the whole-dataset files (report, log, manifest) are written by
    the unsharded run or by the shard that completes the step (`merge_shards`)."""
    from rvc_pipeline.steps.shards import begin_generation, check_generation

    params = Params.from_spec(ctx.spec)
    ds = _dataset(ctx)
    shard = ctx.shard
    inputs = [i for i in ds.inputs() if shard is None or shard.owns(i.idx0)]
    changes = dataset_changes(_previous_manifest(ctx), ds)
    if changes is not None and any(changes.values()):
        log.info("preprocess: the dataset changed since the last run (%s)", changes)
    gen = _generation_params(params, ds)
    begin_generation(ctx, PARAMS_FILE, gen, lambda: _clear_all(ctx))
    reports, seconds = _process_mine(ctx, ds, params, inputs)
    report = _summary(ds, params, reports, seconds, changes)
    if shard is None:
        _finish(ctx, ds, report, reports, changes)
        return {k: v for k, v in report.items() if k != "files"}
    check_generation(ctx, gen)  # (a newer run took over: this shard must not count)
    ctx.push(*OUTPUT_DIRS)
    return {k: v for k, v in report.items() if k not in ("files", "skipped_files")}


def merge_shards(ctx: StepContext, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The step's summary once every shard is done (steps.shards.complete): the report over every
    dataset file from the per-file records, and the whole-dataset files (`_finish`). Deterministic (the
    records, and shard 0's view of the dataset changes), so two shards completing at once agree."""
    from rvc_pipeline.core.errors import StepFailed

    params = Params.from_spec(ctx.spec)
    ds = _dataset(ctx)
    ctx.pull(RECORDS_DIR)
    reports = [_load_record(ctx.exp_dir, i.idx0, ds.files[i.idx0]) for i in ds.inputs()]
    missing = [ds.files[i].name for i, r in enumerate(reports) if r is None]
    if missing:
        raise StepFailed(f"preprocess: every shard is done but {len(missing)} dataset file(s) have no record "
                         f"in {RECORDS_DIR}/: {', '.join(missing[:10])}; rerun the step")
    done = [r for r in reports if r is not None]
    changes = summaries[0].get("dataset_changes")
    seconds = max(float(s.get("wall_seconds") or 0.0) for s in summaries)
    report = _summary(ds, params, done, seconds, changes)
    _finish(ctx, ds, report, done, changes)
    return {k: v for k, v in report.items() if k != "files"}


def _dataset_report(source: str, p: Params, reports: list[FileReport], seconds: float) -> dict[str, Any]:
    used = [r for r in reports if r.status == "ok"]
    skipped = [r for r in reports if r.status != "ok"]
    files = []
    for r in reports:
        d = asdict(r)
        d.pop("log")
        d.pop("piece_names")  # (in the per-file records)
        files.append(d)
    return {
        "dataset": source,
        "sample_rate": p.sr,
        "segment_seconds": p.per,
        "overlap_seconds": p.overlap,
        "high_pass": p.hp_mode,
        "max_peak": p.max_peak,
        "min_piece_seconds": round(min_train_samples(p.sr) / p.sr, 4) if p.drop_short else 0.0,
        "rvc_compatible": p == p.rvc_exact(),
        "deviations": p.deviations,
        "files_total": len(reports),
        "files_used": len(used),
        "files_skipped": len(skipped),
        "input_seconds": round(sum(r.duration_s for r in reports), 3),
        "pieces": sum(r.pieces for r in reports),
        "piece_seconds": round(sum(r.piece_seconds for r in reports), 3),
        "peak_filtered_pieces": sum(r.peak_filtered for r in reports),
        "short_pieces_dropped": sum(r.short_pieces for r in reports),
        "short_seconds_dropped": round(sum(r.short_seconds for r in reports), 3),
        "silent_pieces_dropped": sum(r.silent_pieces for r in reports),
        "rvc_overwrites_avoided": sum(r.rvc_overwrites_avoided for r in reports),
        "pieces_overwritten": sum(r.pieces_overwritten for r in reports),
        "skipped_files": [{"name": r.name, "reason": r.reason} for r in skipped],
        "wall_seconds": round(seconds, 3),
        "files": files,
    }


def _prune(ctx: StepContext, keep: set[str]) -> None:
    """Delete the stored pieces (owned files directly in each folder only) that no per-file record
    names: left by an earlier run. Run once every file is done (no writer beside it)."""
    from rvc_pipeline.stepio import remove_owned

    for sub in (GT_DIR, WAV16_DIR):
        n = remove_owned(ctx.storage, ctx.name, sub, keep)
        if n:
            log.info("preprocess: removed %d stale pieces of %s", n, sub)
