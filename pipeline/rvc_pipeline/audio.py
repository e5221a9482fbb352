"""Audio I/O for the pipeline: ffmpeg decoding (whole or streamed), RVC's high-pass, float32 WAVs, resampling.

Decoding follows RVC's `load_audio`: `ffmpeg -nostdin -threads 0 -i FILE -f f32le -acodec pcm_f32le -ac 1
-ar SR -`, so ffmpeg does the down-mixing and resampling and any format ffmpeg reads is accepted.
Nothing here imports torch.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np

from rvc_pipeline.core.fileio import atomic_write

HP_ORDER = 5
HP_CUTOFF_HZ = 48.0
WAV_F32_HEADER_BYTES = 58
"""Size of the header scipy.io.wavfile.write puts before float32 samples (RIFF, fmt with cbSize, fact)."""

_NOISE = ("Guessed Channel Layout", "Estimating duration from bitrate")


class AudioError(ValueError):
    """A file ffmpeg cannot decode as audio (not audio, corrupt, empty). The message names the file."""


def _ffmpeg_cmd(path: Path | str, sr: int, loglevel: str = "warning") -> list[str]:
    return ["ffmpeg", "-nostdin", "-hide_banner", "-nostats", "-v", loglevel, "-threads", "0",
            "-i", str(path), "-f", "f32le", "-acodec", "pcm_f32le", "-ac", "1", "-ar", str(int(sr)), "-"]


def _reason(stderr: str, path: Path | str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.strip().startswith(_NOISE)]
    if not lines:
        return "ffmpeg produced no audio"
    last = lines[-1]
    # ffmpeg prefixes errors with the input name: "file.txt: Invalid data found when processing input"
    prefix = f"{path}: "
    if last.startswith(prefix):
        last = last[len(prefix):]
    return last[:300]


def _warnings(stderr: str) -> list[str]:
    out = []
    for ln in stderr.splitlines():
        ln = re.sub(r"^\[[^\]]*@ 0x[0-9a-f]+\]\s*", "", ln.strip())
        if ln and not ln.startswith(_NOISE) and ln not in out:
            out.append(ln[:300])
    return out[:5]


def load_audio(path: Path | str, sr: int) -> np.ndarray:
    """Decode a whole file to float32 mono at `sr` (RVC's load_audio). Raises AudioError."""
    try:
        proc = subprocess.run(_ffmpeg_cmd(path, sr, "error"), stdin=subprocess.DEVNULL,
                              capture_output=True, check=False)
    except FileNotFoundError:
        raise AudioError("ffmpeg not found: install ffmpeg") from None
    if proc.returncode != 0:
        why = _reason(proc.stderr.decode(errors="replace"), path)
        raise AudioError(f"{path}: not audio or corrupt ({why})")
    n = len(proc.stdout) // 4
    if n == 0:
        raise AudioError(f"{path}: no audio samples (ffmpeg decoded nothing)")
    return np.frombuffer(proc.stdout[: n * 4], dtype=np.float32).copy()


class AudioStream:
    """Decode a file with ffmpeg in fixed-size float32 chunks, never holding the whole file.

    Iterate to get chunks of `chunk_samples` (the last may be shorter). After iteration:
    `samples` (total decoded), `warnings` (ffmpeg warnings such as corrupt packets). Iteration raises
    AudioError when ffmpeg fails or decodes nothing. stderr goes to a temporary file, so a chatty
    ffmpeg can never block on a full pipe.
    """

    def __init__(self, path: Path | str, sr: int, chunk_samples: int = 1 << 18):
        self.path = Path(path)
        self.sr = int(sr)
        self.chunk_samples = int(chunk_samples)
        self.samples = 0
        self.warnings: list[str] = []

    @property
    def seconds(self) -> float:
        return self.samples / self.sr

    def __iter__(self) -> Iterator[np.ndarray]:
        nbytes = self.chunk_samples * 4
        with tempfile.TemporaryFile() as errf:
            try:
                proc = subprocess.Popen(_ffmpeg_cmd(self.path, self.sr), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=errf, bufsize=0)
            except FileNotFoundError:
                raise AudioError("ffmpeg not found: install ffmpeg") from None
            assert proc.stdout is not None
            rest = b""
            try:
                while True:
                    buf = _read_full(proc.stdout, nbytes - len(rest))
                    if not buf:
                        break
                    buf = rest + buf
                    usable = len(buf) // 4 * 4
                    rest = buf[usable:]
                    if usable:
                        x = np.frombuffer(buf[:usable], dtype=np.float32)
                        self.samples += x.size
                        yield x
            finally:
                proc.stdout.close()
                if proc.poll() is None:
                    proc.kill()
                rc = proc.wait()
            errf.seek(0)
            stderr = errf.read().decode(errors="replace")
        if rc != 0:
            raise AudioError(f"{self.path}: not audio or corrupt ({_reason(stderr, self.path)})")
        self.warnings = _warnings(stderr)
        if self.samples == 0:
            raise AudioError(f"{self.path}: no audio samples (ffmpeg decoded nothing)")


def _read_full(f, n: int) -> bytes:  # noqa: ANN001 - a raw pipe
    """Read exactly n bytes unless EOF comes first."""
    parts = []
    got = 0
    while got < n:
        b = f.read(n - got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def probe_duration(path: Path | str) -> float:
    """Duration in seconds as ffprobe reports it (container/stream metadata). Raises AudioError."""
    cmd = ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of",
           "default=noprint_wrappers=1:nokey=1", str(path)]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    except FileNotFoundError:
        raise AudioError("ffprobe not found: install ffmpeg") from None
    out = proc.stdout.decode().strip()
    if proc.returncode != 0:
        why = _reason(proc.stderr.decode(errors="replace"), path)
        raise AudioError(f"{path}: not audio or corrupt ({why})")
    try:
        return float(out.splitlines()[0])
    except (ValueError, IndexError):
        raise AudioError(f"{path}: ffprobe reports no duration") from None


@lru_cache(maxsize=16)
def hp_coefficients(sr: int) -> tuple[np.ndarray, np.ndarray]:
    """RVC's high-pass: Butterworth, order 5, 48 Hz, designed at fs=sr. Returns (b, a)."""
    from scipy.signal import butter

    b, a = butter(N=HP_ORDER, Wn=HP_CUTOFF_HZ, btype="high", fs=sr)
    return b, a


def high_pass(x: np.ndarray, sr: int, mode: str = "lfilter") -> np.ndarray:
    """48 Hz high-pass. 'lfilter' (causal, RVC's preprocessing), 'filtfilt' (zero-phase, RVC's inference),
    or 'none'. Returns float64 like scipy (RVC keeps that dtype until it writes the pieces)."""
    if mode == "none":
        return np.asarray(x, dtype=np.float64)
    from scipy.signal import filtfilt, lfilter

    b, a = hp_coefficients(int(sr))
    if mode == "lfilter":
        return lfilter(b, a, x)
    if mode == "filtfilt":
        return filtfilt(b, a, x)
    raise ValueError(f"high_pass mode: got {mode!r}; allowed values: 'lfilter', 'filtfilt', 'none'")


class HighPassStream:
    """Causal high-pass over consecutive chunks; the filter state carries over, so the output equals
    `high_pass(whole, sr, 'lfilter')`. For 'filtfilt'/'none' chunks are only converted to float64
    (zero-phase filtering needs the whole block: apply `high_pass` to each block instead)."""

    def __init__(self, sr: int, mode: str = "lfilter"):
        self.mode = mode
        self.zi: np.ndarray | None = None
        if mode == "lfilter":
            self.b, self.a = hp_coefficients(int(sr))
            self.zi = np.zeros(max(len(self.a), len(self.b)) - 1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.mode != "lfilter":
            return np.asarray(x, dtype=np.float64)
        from scipy.signal import lfilter

        y, self.zi = lfilter(self.b, self.a, x, zi=self.zi)
        return y


def write_wav_f32(path: Path | str, x: np.ndarray, sr: int) -> None:
    """Write a float32 WAV exactly as scipy.io.wavfile.write does, atomically (core.fileio.atomic_write)."""
    from scipy.io import wavfile

    with atomic_write(path, fsync=False) as f:  # bulk pieces (preprocess), re-created by a rerun
        wavfile.write(f, int(sr), np.asarray(x, dtype=np.float32))


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample like RVC's `librosa.resample(x, orig_sr, target_sr)` with librosa's default res_type.

    librosa >= 0.10 defaults to 'soxr_hq': soxr's HQ quality, then `fix_length` to
    ceil(len * sr_out / sr_in) samples (zero-padded or trimmed). This calls soxr directly with the same
    settings (bit-identical to librosa 0.11's output, without its overhead). Keeps the input dtype
    (float32 or float64).
    """
    if sr_in == sr_out:
        return np.asarray(x)
    import soxr

    n_out = int(np.ceil(len(x) * float(sr_out) / float(sr_in)))
    y = soxr.resample(np.asarray(x), sr_in, sr_out, quality="HQ")
    if len(y) < n_out:
        y = np.pad(y, (0, n_out - len(y)))
    return y[:n_out]
