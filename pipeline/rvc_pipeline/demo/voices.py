"""Real speech for tests, benchmarks and the demo, made with the speech synthesisers Debian ships.

`make_voice_set` writes WAV files of real (synthetic but natural) speech: sentences spoken by
espeak-ng (several voices and pitches), flite (slt, kal, awb, rms) and festival (kal diphone, slt HTS)
where installed, joined with pauses of 0.5-1.2 s so that RVC's silence slicer has something to cut
on, over a very low noise floor (about -75 dBFS, well below the slicer's -42 dB threshold).
The output depends only on the arguments (the synthesisers are deterministic and the pauses, gains and
sentence order come from a seeded generator).

`arctic_sample` returns a real human recording (CMU Arctic `arctic_a0007.wav`, shipped inside the
pysptk source distribution). `make_tone` writes a harmonic tone of known pitch.

Nothing here imports torch.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rvc_pipeline.core.fileio import atomic_path, write_bytes_atomic

log = logging.getLogger("rvc_pipeline")

CACHE_ROOT = Path(os.environ.get("RVC_CACHE", Path.home() / ".cache" / "rvc-operator"))

SENTENCES: tuple[str, ...] = (
    "The morning train left the station a little after seven.",
    "She kept a small notebook in the pocket of her coat.",
    "A cold wind came down from the hills and rattled the windows.",
    "We counted the boats in the harbour before the storm arrived.",
    "The old clock in the hall has not worked for many years.",
    "He poured the tea slowly and looked out at the garden.",
    "Bright lanterns hung along the path to the river.",
    "The baker opens his shop before the sun is up.",
    "Please put the blue folder on the second shelf.",
    "The children ran across the field to meet their father.",
    "A thin layer of snow covered the roofs of the village.",
    "Nobody expected the meeting to last until midnight.",
    "The map showed a narrow road winding through the valley.",
    "Her voice was calm, even when the lights went out.",
    "They planted apple trees along the southern wall.",
    "The library was quiet except for the sound of turning pages.",
    "A flock of geese flew low over the frozen lake.",
    "He fixed the bicycle with nothing but a spoon and some wire.",
    "The soup was too hot, so we waited a few minutes.",
    "On clear nights you can see the lighthouse from here.",
    "The painter mixed a colour somewhere between green and grey.",
    "Every Sunday the market fills the square with noise.",
    "The letter arrived three weeks after it was sent.",
    "A small dog barked at the postman and then wagged its tail.",
    "The bridge was built of stone more than two centuries ago.",
    "We walked along the beach and collected smooth white pebbles.",
    "The kettle whistled, and everyone turned towards the kitchen.",
    "Heavy rain kept the farmers indoors for most of the week.",
    "The teacher wrote a single word on the board and waited.",
    "Sunlight came through the curtains and warmed the floor.",
    "The ship's captain studied the clouds with a worried face.",
    "A basket of ripe pears stood on the kitchen table.",
    "The road to the mountain village is closed in winter.",
    "He whistled an old tune while he painted the fence.",
    "The museum keeps a collection of ancient coins and maps.",
    "Our neighbours have a cat that sleeps on the garden wall.",
    "The candle flickered as the door opened behind us.",
    "She answered every question with patience and good humour.",
    "The orchestra tuned their instruments in the dim hall.",
    "A gentle rain began to fall as we reached the top of the hill.",
    "The fisherman mended his nets on the quay every evening.",
    "Five yellow ducks swam in a line across the pond.",
    "The radio played softly in the corner of the workshop.",
    "We found an old photograph hidden inside the book.",
    "The path through the forest was covered with fallen leaves.",
    "His grandmother told stories about the great flood.",
    "The sky turned orange, then purple, as the sun went down.",
    "A stranger asked us for directions to the railway station.",
)


@dataclass(frozen=True)
class Voice:
    """One synthesiser voice. `pitch`/`speed` are used by espeak-ng only (0-99, words per minute)."""

    engine: str  # "espeak-ng" | "flite" | "festival"
    name: str  # espeak-ng voice ("en-us+f3"), flite voice ("slt"), festival voice ("kal_diphone")
    pitch: int = 50
    speed: int = 165

    @property
    def label(self) -> str:
        base = self.name.replace("+", "-").replace("_", "-")
        if self.engine == "espeak-ng":
            return f"espeak-{base}-p{self.pitch}"
        return f"{self.engine}-{base}"


DEFAULT_VOICES: tuple[Voice, ...] = (
    Voice("flite", "slt"),
    Voice("espeak-ng", "en-us", pitch=40, speed=160),
    Voice("flite", "awb"),
    Voice("festival", "cmu_us_slt_arctic_hts"),
    Voice("flite", "rms"),
    Voice("espeak-ng", "en-gb+f3", pitch=70, speed=150),
    Voice("flite", "kal"),
    Voice("festival", "kal_diphone"),
    Voice("espeak-ng", "en-us+m3", pitch=30, speed=170),
    Voice("espeak-ng", "en-gb-x-rp+f2", pitch=60, speed=155),
)


def _festival_voice_installed(name: str) -> bool:
    for root in ("/usr/share/festival/voices", "/usr/local/share/festival/voices"):
        if list(Path(root).glob(f"*/{name}")):
            return True
    return False


def voice_available(v: Voice) -> bool:
    if v.engine == "festival":
        return shutil.which("festival") is not None and _festival_voice_installed(v.name)
    if v.engine in ("espeak-ng", "flite"):
        return shutil.which(v.engine) is not None
    return False


def available_voices(voices: Sequence[Voice] = DEFAULT_VOICES) -> list[Voice]:
    return [v for v in voices if voice_available(v)]


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return x.mean(axis=1).astype(np.float32), int(sr)


def _run(cmd: list[str], **kw: object) -> None:
    try:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]
    except subprocess.CalledProcessError as e:
        err = (e.stderr or b"").decode(errors="replace").strip()[-500:]
        raise RuntimeError(f"{cmd[0]} failed (exit {e.returncode}): {err}") from None


def synthesize(voice: Voice, sentences: Sequence[str], workdir: Path) -> list[tuple[np.ndarray, int]]:
    """Speak each sentence with `voice`; returns (float32 mono samples, sample rate) per sentence."""
    workdir.mkdir(parents=True, exist_ok=True)
    paths = [workdir / f"s{i:03d}.wav" for i in range(len(sentences))]
    if voice.engine == "espeak-ng":
        for text, p in zip(sentences, paths):
            _run(["espeak-ng", "-v", voice.name, "-p", str(voice.pitch), "-s", str(voice.speed),
                  "-w", str(p), text])
    elif voice.engine == "flite":
        for text, p in zip(sentences, paths):
            _run(["flite", "-voice", voice.name, "-t", text, "-o", str(p)])
    elif voice.engine == "festival":
        # One festival process for all sentences: its start-up dominates the cost of a sentence.
        lines = [f"(voice_{voice.name})"]
        for text, p in zip(sentences, paths):
            safe = text.replace("\\", " ").replace('"', "'")
            lines.append(f'(utt.save.wave (utt.synth (Utterance Text "{safe}")) "{p}" \'riff)')
        script = workdir / "say.scm"
        script.write_text("\n".join(lines) + "\n")
        _run(["festival", "-b", str(script)])
    else:
        raise ValueError(f"unknown speech engine {voice.engine!r}")
    return [_read_wav(p) for p in paths]


def _resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    if sr_in == sr_out:
        return x
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(sr_in, sr_out)
    return resample_poly(x, sr_out // g, sr_in // g).astype(np.float32)


def _trim(x: np.ndarray, sr: int, floor: float = 1e-3) -> np.ndarray:
    """Cut the synthesiser's own leading/trailing silence so pauses are only the ones we add."""
    idx = np.flatnonzero(np.abs(x) > floor)
    if idx.size == 0:
        return x
    pad = int(0.02 * sr)
    return x[max(0, idx[0] - pad): idx[-1] + pad + 1]


def _make_one(
    path: Path, voice: Voice, seconds: float, sr: int, rng: np.random.Generator, order: list[int]
) -> Path:
    """Speak sentences (in `order`, cycling) with pauses until about `seconds` of audio."""
    parts: list[np.ndarray] = []
    total = rng.uniform(0.25, 0.6)  # leading silence
    lead = total
    k = 0
    with tempfile.TemporaryDirectory(prefix="rvc-voice-") as td:
        batch_no = 0
        done = False
        skips = 0
        while not done and total < seconds - 0.8:
            # estimate how many sentences are needed (about 14 characters per second of speech)
            need = seconds - total
            batch: list[str] = []
            est = 0.0
            while est < need and len(batch) < 40:
                text = SENTENCES[order[(k + len(batch)) % len(order)]]
                batch.append(text)
                est += len(text) / 14.0 + 0.8
            spoken = synthesize(voice, batch, Path(td) / f"b{batch_no}")
            batch_no += 1
            for y, ysr in spoken:
                y = _trim(_resample(y, ysr, sr), sr)
                pause = rng.uniform(0.5, 1.2)
                dur = len(y) / sr
                if parts and total + dur > seconds + 1.0:
                    skips += 1  # this sentence would overshoot: try a shorter one, a few times
                    k += 1
                    if skips > 6:
                        done = True
                        break
                    continue
                parts.append(y)
                parts.append(np.zeros(int(pause * sr), dtype=np.float32))
                total += dur + pause
                k += 1
                if total >= seconds - 0.8:
                    break
    if not parts:
        raise RuntimeError(f"{voice.label}: produced no speech")
    parts[-1] = np.zeros(int(rng.uniform(0.3, 0.7) * sr), dtype=np.float32)  # trailing silence
    x = np.concatenate([np.zeros(int(lead * sr), dtype=np.float32), *parts])
    peak = float(np.max(np.abs(x))) or 1.0
    x = x * (rng.uniform(0.45, 0.9) / peak)
    x = x + rng.standard_normal(len(x)).astype(np.float32) * 10 ** (-75 / 20)
    _write_pcm16(path, x, sr)
    return path


def _write_pcm16(path: Path, x: np.ndarray, sr: int) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        sf.write(str(tmp), np.clip(x, -1.0, 1.0), sr, subtype="PCM_16", format="WAV")


def make_voice_set(
    dest: Path | str,
    n_files: int = 6,
    seconds_each: float = 10.0,
    seed: int = 0,
    voices: Sequence[Voice] | None = None,
    sr: int = 32000,
    threads: int = 4,
) -> list[Path]:
    """Write `n_files` WAVs of real speech (about `seconds_each` s each, 16-bit PCM at `sr`) to `dest`.

    Files are named `<nn>_<voice>.wav`; voices rotate through `voices` (default: every installed one of
    DEFAULT_VOICES). Durations are within about one second of `seconds_each` (whole sentences only;
    at least one sentence per file). Deterministic given the arguments. Returns the paths, sorted.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    pool = available_voices(voices if voices is not None else DEFAULT_VOICES)
    if not pool:
        raise RuntimeError(
            "no speech synthesiser found: install the Debian packages espeak-ng, flite or festival"
        )
    jobs = []
    for i in range(n_files):
        rng = np.random.default_rng([seed, i])
        voice = pool[i % len(pool)]
        order = [int(j) for j in rng.permutation(len(SENTENCES))]
        jobs.append((dest / f"{i:02d}_{voice.label}.wav", voice, float(seconds_each), sr, rng, order))
    with ThreadPoolExecutor(max_workers=max(1, min(threads, n_files))) as ex:
        paths = list(ex.map(lambda j: _make_one(*j), jobs))
    return sorted(paths)


def harmonic_tone(
    f0_hz: float, seconds: float, sr: int, n_harmonics: int = 8, peak: float = 0.5
) -> np.ndarray:
    """A tone at `f0_hz` with harmonics 1..n (amplitude 1/k, below Nyquist), peak-normalised to `peak`."""
    t = np.arange(int(round(seconds * sr)), dtype=np.float64) / sr
    x = np.zeros_like(t)
    for k in range(1, n_harmonics + 1):
        if k * f0_hz >= sr / 2:
            break
        x += np.sin(2 * np.pi * k * f0_hz * t) / k
    m = float(np.max(np.abs(x))) if x.size else 0.0
    if m > 0:
        x *= peak / m
    return x.astype(np.float32)


def make_tone(path: Path | str, f0_hz: float, seconds: float, sr: int = 16000, peak: float = 0.5) -> Path:
    """Write a harmonic test tone with known pitch `f0_hz` as a 16-bit PCM WAV; returns the path."""
    p = Path(path)
    _write_pcm16(p, harmonic_tone(f0_hz, seconds, sr, peak=peak), sr)
    return p


ARCTIC_NAME = "arctic_a0007.wav"


def arctic_sample(cache: Path | None = None) -> Path | None:
    """The CMU Arctic recording `arctic_a0007.wav` (a real human voice, 16 kHz, 4.0 s).

    It ships inside the pysptk source distribution: downloaded once with pip into
    `<cache>/sdists`, the one file extracted to `<cache>/arctic_a0007.wav`. Returns None when that is
    impossible (offline and not cached).
    """
    root = Path(cache) if cache is not None else CACHE_ROOT
    out = root / ARCTIC_NAME
    if out.is_file() and out.stat().st_size > 1000:
        return out
    sdists = root / "sdists"
    sdists.mkdir(parents=True, exist_ok=True)
    tars = sorted(sdists.glob("pysptk-*.tar.gz"))
    if not tars:
        # --no-binary for pysptk only: with ':all:' pip would also build pysptk's build
        # dependencies (numpy, cython) from source just to read its metadata, which fails.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "pysptk",
               "pysptk", "-d", str(sdists), "--quiet"]
        try:
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            log.warning("cannot download the pysptk sdist for %s: %s", ARCTIC_NAME, e)
            return None
        tars = sorted(sdists.glob("pysptk-*.tar.gz"))
        if not tars:
            return None
    try:
        with tarfile.open(tars[-1]) as tf:
            want = f"example_audio_data/{ARCTIC_NAME}"
            member = next((m for m in tf.getmembers() if m.name.endswith(want)), None)
            if member is None:
                return None
            f = tf.extractfile(member)
            if f is None:
                return None
            data = f.read()
    except (tarfile.TarError, OSError) as e:
        log.warning("cannot read %s: %s", tars[-1], e)
        return None
    write_bytes_atomic(out, data)
    return out


def speak(text: str, dest: Path | str, *, sr: int = 16000, channels: int = 1, voice: str = "en",
          speed: int | None = None, pitch: int | None = None) -> Path:
    """One espeak-ng utterance as a float32 WAV at `sr` with `channels` (ffmpeg converts); returns dest."""
    dest = Path(dest)
    raw = dest.with_suffix(".espeak.wav")
    cmd = ["espeak-ng", "-v", voice]
    if speed is not None:
        cmd += ["-s", str(speed)]
    if pitch is not None:
        cmd += ["-p", str(pitch)]
    _run([*cmd, "-w", str(raw), text])
    _run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(raw), "-ar", str(sr), "-ac",
          str(channels), "-c:a", "pcm_f32le", str(dest)])
    raw.unlink()
    return dest
