"""Literal, test-side ports of RVC's preprocessing and NSF sine source, written from the RVC technical
reference (sections 2 and 7.4) as independent oracles for the package's code.

They follow RVC's control flow step by step (the slicer's frame loop, the `while` segment loop, the
write-then-overwrite naming) and import nothing from `rvc_pipeline`: constants are recomputed here from
the reference's formulas, decoding calls ffmpeg directly, writing uses scipy and librosa as RVC does.
"""

from __future__ import annotations

import math
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

# ------------------------------------------------------------------------------------------ slicer


@dataclass(frozen=True)
class SlicerFrames:
    """RVC's Slicer(sr, threshold=-42, min_length=1500, min_interval=400, hop_size=15, max_sil_kept=500)
    after its conversions (reference section 2)."""

    sr: int
    threshold_db: float = -42.0
    min_length_ms: float = 1500
    min_interval_ms: float = 400
    hop_size_ms: float = 15
    max_sil_kept_ms: float = 500

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


def rms_frames(x: np.ndarray, win: int, hop: int) -> np.ndarray:
    """librosa-style frame RMS: zero padding of win//2 each side, frames of `win` every `hop`, laid out
    [win, frames] and averaged over the window axis, sqrt(mean(x^2))."""
    y = np.pad(x, (win // 2, win // 2), mode="constant")
    n = 1 + (len(y) - win) // hop
    frames = np.lib.stride_tricks.as_strided(y, shape=(win, n), strides=(y.strides[0], y.strides[0] * hop))
    return np.sqrt(np.mean(np.abs(frames) ** 2, axis=-2))


class FrameConstants(Protocol):
    threshold: float
    min_interval: int
    min_length: int
    max_sil_kept: int


def slicer_tags(rms: np.ndarray, sl: FrameConstants) -> list[tuple[int, int]]:
    """RVC's frame-by-frame loop (kept as one loop on purpose, like the original)."""
    tags: list[tuple[int, int]] = []
    silence_start: int | None = None
    clip_start = 0
    msk = sl.max_sil_kept
    for i, v in enumerate(rms):
        if v < sl.threshold:
            if silence_start is None:
                silence_start = i
            continue
        if silence_start is None:
            continue
        leading = silence_start == 0 and i > msk
        middle = i - silence_start >= sl.min_interval and i - clip_start >= sl.min_length
        if not leading and not middle:
            silence_start = None
            continue
        s = silence_start
        if i - s <= msk:
            pos = int(rms[s: i + 1].argmin()) + s
            tags.append((0, pos) if s == 0 else (pos, pos))
            clip_start = pos
        elif i - s <= 2 * msk:
            pos = int(rms[i - msk: s + msk + 1].argmin()) + i - msk
            pos_l = int(rms[s: s + msk + 1].argmin()) + s
            pos_r = int(rms[i - msk: i + 1].argmin()) + i - msk
            if s == 0:
                tags.append((0, pos_r))
                clip_start = pos_r
            else:
                tags.append((min(pos_l, pos), max(pos_r, pos)))
                clip_start = max(pos_r, pos)
        else:
            pos_l = int(rms[s: s + msk + 1].argmin()) + s
            pos_r = int(rms[i - msk: i + 1].argmin()) + i - msk
            tags.append((0, pos_r) if s == 0 else (pos_l, pos_r))
            clip_start = pos_r
        silence_start = None
    total = len(rms)
    if silence_start is not None and total - silence_start >= sl.min_interval:
        end = min(total, silence_start + msk)
        pos = int(rms[silence_start: end + 1].argmin()) + silence_start
        tags.append((pos, total + 1))
    return tags


def slice_audio(x: np.ndarray, sl: SlicerFrames) -> list[np.ndarray]:
    """RVC's Slicer.slice on a mono waveform: early exit, tags, then the chunks between the tags."""
    if len(x) <= sl.min_length:  # samples compared with frames, as in RVC
        return [x]
    rms = rms_frames(x, sl.win, sl.hop)
    tags = slicer_tags(rms, sl)
    if not tags:
        return [x]
    hop, total, n = sl.hop, len(rms), len(x)
    chunks = []
    if tags[0][0] > 0:
        chunks.append(x[0: min(n, tags[0][0] * hop)])
    for k in range(len(tags) - 1):
        chunks.append(x[tags[k][1] * hop: min(n, tags[k + 1][0] * hop)])
    if tags[-1][1] < total:
        chunks.append(x[tags[-1][1] * hop: min(n, total * hop)])
    return chunks


# -------------------------------------------------------------------------------------- preprocess


def ffmpeg_load(path: Path, sr: int) -> np.ndarray:
    """RVC's load_audio: ffmpeg -> f32le mono at sr."""
    cmd = ["ffmpeg", "-nostdin", "-threads", "0", "-i", str(path), "-f", "f32le", "-acodec", "pcm_f32le",
           "-ac", "1", "-ar", str(sr), "-"]
    out = subprocess.run(cmd, capture_output=True, check=True).stdout
    return np.frombuffer(out, np.float32).flatten()


@dataclass
class PortLog:
    """What the port did: every name in write order (a name twice = RVC overwrote it), filtered pieces,
    and the files whose processing raised (RVC logs the traceback and goes on with the next file)."""

    writes: list[str]
    filtered: list[str]
    failed: list[str]


def _norm_write(x: np.ndarray, idx0: int, idx1: int, sr: int, out: Path, log: PortLog) -> None:
    import librosa
    from scipy.io import wavfile

    peak = np.abs(x).max()
    if peak > 2.5:
        log.filtered.append(f"{idx0}_{idx1}")
        return
    with np.errstate(invalid="ignore", divide="ignore"):  # a zero peak gives NaNs, as in RVC
        x = (x / peak * (0.9 * 0.75)) + (1 - 0.75) * x
    wavfile.write(str(out / "0_gt_wavs" / f"{idx0}_{idx1}.wav"), sr, x.astype(np.float32))
    x = librosa.resample(x, orig_sr=sr, target_sr=16000)  # raises on NaNs (after the piece above)
    wavfile.write(str(out / "1_16k_wavs" / f"{idx0}_{idx1}.wav"), 16000, x.astype(np.float32))
    log.writes.append(f"{idx0}_{idx1}.wav")


def preprocess_dataset(inp: Path, sr: int, out: Path, per: float = 3.7) -> PortLog:
    """RVC's preprocess of a whole folder into out/0_gt_wavs and out/1_16k_wavs, one file after another."""
    from scipy import signal

    (out / "0_gt_wavs").mkdir(parents=True, exist_ok=True)
    (out / "1_16k_wavs").mkdir(parents=True, exist_ok=True)
    b, a = signal.butter(N=5, Wn=48, btype="high", fs=sr)
    sl, overlap = SlicerFrames(sr), 0.3
    tail = per + overlap
    log = PortLog([], [], [])
    for idx0, name in enumerate(sorted(p.name for p in inp.iterdir())):
        try:
            audio = signal.lfilter(b, a, ffmpeg_load(inp / name, sr))
            idx1 = 0
            for chunk in slice_audio(audio, sl):
                i = 0
                while True:
                    start = int(sr * (per - overlap) * i)
                    i += 1
                    if len(chunk[start:]) > tail * sr:
                        piece = chunk[start: start + int(per * sr)]
                        _norm_write(piece, idx0, idx1, sr, out, log)
                        idx1 += 1
                    else:
                        piece = chunk[start:]
                        idx1 += 1
                        break
                _norm_write(piece, idx0, idx1, sr, out, log)
        except Exception:  # noqa: BLE001 - RVC's per-file catch-all
            log.failed.append(name)
    return log


# ------------------------------------------------------------------------------------ sine source


def sine_gen(f0: object, upp: int, sr: int, harmonic_num: int = 0, sine_amp: float = 0.1,
             noise_std: float = 0.003, voiced_threshold: float = 0.0) -> tuple[object, object, object]:
    """RVC's SineGen forward (reference 7.4, the 2024 form), in float32 on torch's global generator.

    f0 [B, T] Hz -> (sine_waves, uv, noise), each [B, T*upp, dim]/[B, T*upp, 1]. Draw order: U[0,1) of
    [1, 1, dim] for the overtones' initial phase (fundamental's zeroed), then N(0,1) for the noise.
    """
    import torch

    assert isinstance(f0, torch.Tensor)
    dim = harmonic_num + 1
    f = f0.float().unsqueeze(-1)  # [B, T, 1]
    k = torch.arange(1, upp + 1, dtype=torch.float32)
    rad = f / sr * k  # [B, T, upp]: phase inside each frame
    frame_adv = rad[:, :, -1:]  # a frame's whole advance, f0*upp/sr
    wrapped = frame_adv - torch.floor(frame_adv)
    before = torch.cumsum(wrapped, dim=1) - wrapped  # accumulated phase of the previous frames
    rad = rad + (before - torch.floor(before))
    rad = rad.reshape(f.shape[0], -1, 1) * torch.arange(1, dim + 1, dtype=torch.float32).reshape(1, 1, -1)
    ini = torch.rand(1, 1, dim)
    ini[..., 0] = 0
    sines = torch.sin(2 * math.pi * (rad + ini)) * sine_amp
    uv = (f > voiced_threshold).float().repeat_interleave(upp, dim=1)  # nearest upsampling
    noise = (uv * noise_std + (1 - uv) * sine_amp / 3) * torch.randn_like(sines)
    return sines * uv + noise, uv, noise
