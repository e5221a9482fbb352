"""RVC's silence slicer (infer/lib/slicer2.py), re-implemented with numpy.

Same constants, frame conversions and cut rules as RVC (reference section 2):
threshold -42 dB (linear RMS 10^(-42/20)), min_length 1500 ms, min_interval 400 ms, hop 15 ms,
max_sil_kept 500 ms; hop = round(sr*hop_ms/1000), win = min(round(sr*min_interval_ms/1000), 4*hop);
lengths in frames are rounded from ms. The frame RMS is librosa-style (zero padding of win//2 on both
sides, frames of `win` every `hop`). The cut decisions are taken per silent *run* (found with numpy)
rather than per frame, which gives the same tags as RVC's frame loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_RMS_BATCH_FRAMES = 512  # 512 frames x win 2400 x 8 bytes = 10 MB per temporary


def frame_rms(x: np.ndarray, win: int, hop: int) -> np.ndarray:
    """librosa-style RMS (center=True, zero padding): one value per `hop`, over windows of `win`.

    Frames are computed in batches so that memory stays a small multiple of the input.
    """
    x = np.asarray(x)
    pad = win // 2
    y = np.pad(x, (pad, pad), mode="constant")
    n_frames = 1 + (len(y) - win) // hop if len(y) >= win else 0
    out = np.empty(n_frames, dtype=np.float64)
    if n_frames == 0:
        return out
    view = np.lib.stride_tricks.sliding_window_view(y, win)[::hop]
    for s in range(0, n_frames, _RMS_BATCH_FRAMES):
        blk = view[s: s + _RMS_BATCH_FRAMES]
        out[s: s + len(blk)] = np.sqrt(np.mean(np.abs(blk) ** 2, axis=-1))
    return out


def silent_runs(rms: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) frame indices of every run of frames with rms < threshold."""
    silent = np.concatenate(([False], rms < threshold, [False]))
    d = np.diff(silent.astype(np.int8))
    return np.flatnonzero(d == 1), np.flatnonzero(d == -1)


@dataclass(frozen=True)
class Slicer:
    """RVC's `Slicer(sr, threshold, min_length, min_interval, hop_size, max_sil_kept)` (ms and dB)."""

    sr: int
    threshold_db: float = -42.0
    min_length_ms: float = 1500
    min_interval_ms: float = 400
    hop_size_ms: float = 15
    max_sil_kept_ms: float = 500

    def __post_init__(self) -> None:
        if not self.min_length_ms >= self.min_interval_ms >= self.hop_size_ms:
            raise ValueError("slicer: need min_length >= min_interval >= hop_size")
        if not self.max_sil_kept_ms >= self.hop_size_ms:
            raise ValueError("slicer: need max_sil_kept >= hop_size")

    @classmethod
    def from_spec(cls, sr: int, spec: object) -> Slicer:
        """From a spec.SlicerSpec (thresholdDb, minLengthMs, minIntervalMs, hopSizeMs, maxSilKeptMs)."""
        return cls(sr, spec.threshold_db, spec.min_length_ms, spec.min_interval_ms,  # type: ignore[attr-defined]
                   spec.hop_size_ms, spec.max_sil_kept_ms)  # type: ignore[attr-defined]

    # RVC's conversions ---------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        return 10 ** (self.threshold_db / 20.0)

    @property
    def hop(self) -> int:
        return round(self.sr * self.hop_size_ms / 1000)

    @property
    def win(self) -> int:
        return min(round(self.sr * self.min_interval_ms / 1000), 4 * self.hop)

    @property
    def min_length(self) -> int:
        return round(self.sr * self.min_length_ms / 1000 / self.hop)

    @property
    def min_interval(self) -> int:
        return round(self.sr * self.min_interval_ms / 1000 / self.hop)

    @property
    def max_sil_kept(self) -> int:
        return round(self.sr * self.max_sil_kept_ms / 1000 / self.hop)

    # the algorithm -------------------------------------------------------------------------------
    def tags(self, rms: np.ndarray) -> list[tuple[int, int]]:
        """The silence tags (start frame, end frame) to cut out, exactly as RVC's frame loop makes them."""
        msk, min_int, min_len = self.max_sil_kept, self.min_interval, self.min_length
        starts, ends = silent_runs(rms, self.threshold)
        total = len(rms)
        tags: list[tuple[int, int]] = []
        clip_start = 0
        trailing: int | None = None
        for s, i in zip(starts.tolist(), ends.tolist()):
            if i >= total:  # the run reaches the end: trailing silence, handled below
                trailing = s
                break
            leading = s == 0 and i > msk
            middle = i - s >= min_int and i - clip_start >= min_len
            if not leading and not middle:
                continue
            if i - s <= msk:
                pos = s + int(np.argmin(rms[s: i + 1]))
                tags.append((0, pos) if s == 0 else (pos, pos))
                clip_start = pos
            elif i - s <= 2 * msk:
                pos = i - msk + int(np.argmin(rms[i - msk: s + msk + 1]))
                pos_l = s + int(np.argmin(rms[s: s + msk + 1]))
                pos_r = i - msk + int(np.argmin(rms[i - msk: i + 1]))
                if s == 0:
                    tags.append((0, pos_r))
                    clip_start = pos_r
                else:
                    tags.append((min(pos_l, pos), max(pos_r, pos)))
                    clip_start = max(pos_r, pos)
            else:
                pos_l = s + int(np.argmin(rms[s: s + msk + 1]))
                pos_r = i - msk + int(np.argmin(rms[i - msk: i + 1]))
                tags.append((0, pos_r) if s == 0 else (pos_l, pos_r))
                clip_start = pos_r
        if trailing is not None and total - trailing >= min_int:
            end = min(total, trailing + msk)
            pos = trailing + int(np.argmin(rms[trailing: end + 1]))
            tags.append((pos, total + 1))
        return tags

    def bounds(self, x: np.ndarray) -> list[tuple[int, int]]:
        """Sample ranges [start, end) of the chunks RVC's slicer returns for `x` (mono, 1-D)."""
        return self.analyse(x)[0]

    def analyse(self, x: np.ndarray) -> tuple[list[tuple[int, int]], float]:
        """(chunk sample ranges, loudest frame RMS). The RMS tells whether anything is above threshold."""
        n = len(x)
        if n <= self.min_length:  # RVC's early exit (compares samples with frames; practically never)
            return [(0, n)], float(np.sqrt(np.mean(np.square(x)))) if n else 0.0
        rms = frame_rms(x, self.win, self.hop)
        loudest = float(rms.max()) if len(rms) else 0.0
        tags = self.tags(rms)
        if not tags:
            return [(0, n)], loudest
        hop, total = self.hop, len(rms)
        out: list[tuple[int, int]] = []
        if tags[0][0] > 0:
            out.append((0, min(n, tags[0][0] * hop)))
        for (_, a), (b, _) in zip(tags[:-1], tags[1:]):
            out.append((a * hop, min(n, b * hop)))
        if tags[-1][1] < total:
            out.append((tags[-1][1] * hop, min(n, total * hop)))
        return out, loudest

    def slice(self, x: np.ndarray) -> list[np.ndarray]:
        """The chunks (views of `x`), like RVC's Slicer.slice on a mono waveform."""
        if x.ndim > 1:
            x = x.mean(axis=0)
        return [x[a:b] for a, b in self.bounds(x)]
