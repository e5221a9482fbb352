"""speaker_sim: cosine between speaker embeddings of the converted clips and of the reference (target) clips.

The encoder is Resemblyzer's VoiceEncoder (GE2E, 256-d) with the `pretrained.pt` that ships inside the
`resemblyzer` wheel. `import resemblyzer` needs webrtcvad (a C extension with no wheel on PyPI), so the
wheel is installed with --no-deps and this file builds the network itself with the wheel's parameter
names, finds `resemblyzer/pretrained.pt` without importing the package (else <weights cache>/resemblyzer/
pretrained.pt) and loads it through safeload. Facts of Resemblyzer 0.1.4 reproduced here:

* input: 16 kHz, loudness raised (never lowered) to -30 dBFS, long pauses cut; mel = librosa's power
  mel spectrogram (n_fft 400, hop 160, 40 mels, not log);
* utterance: partials of 160 frames (1.6 s) every round(16000 / 1.3 / 160) = 77 frames; the audio is
  zero-padded to the end of the last partial, which is dropped when it covers < 75% and is not the only
  one; network 3-layer LSTM(40 -> 256) -> final hidden state of the last layer -> Linear(256, 256) ->
  ReLU -> L2 norm; the utterance embedding is the L2-normed mean of its partials.

Difference: Resemblyzer cuts pauses with webrtcvad (30 ms windows, mode 3); here a 30 ms window is
speech when its level is within 40 dB of the loudest window (then the same smoothing: moving average
of 8 windows, dilation by 6).

Score: the speaker embedding of all references is the L2-normed mean of their utterance embeddings (as
Resemblyzer's `embed_speaker`); speaker_sim is the mean cosine of each converted clip with it (higher is
better, at most 1). A converted clip with no speech (silence) scores 0; a reference with none is refused.
Reference embeddings are kept by content in the metric object (evaluation scores the same targets each
epoch).
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rvc_pipeline.components.metrics.base import (
    REF_SPEAKER,
    Clip,
    Metric,
    MetricInputError,
    Pair,
    need_pairs,
    register,
    to_16k,
)
from rvc_pipeline.components.pitch.base import cached
from rvc_pipeline.core.errors import WeightsNotFound

# speed: seconds of converted audio scored (with as much reference audio) per second, bench/bench_metrics.py
# (60 s at 40 kHz in 6 s pieces, 1 thread, on a 2-core machine shared with other jobs: load average ~7, so
# a lower bound)
CATALOG = {"speaker_sim": {"needs_gpu": False, "weights": ["resemblyzer/pretrained.pt"], "speed": 13.0}}

SR = 16000
N_MELS = 40
N_FFT = 400
HOP = 160
HIDDEN = 256
LAYERS = 3
PARTIAL = 160
STEP = round(SR / 1.3 / HOP)
MIN_COVERAGE = 0.75
TARGET_DBFS = -30.0
VAD_WINDOW = 480
VAD_RANGE_DB = 40.0
VAD_AVERAGE = 8
VAD_DILATE = 6
INT16_MAX = 2**15 - 1
MAX_CACHED = 1024


class SpeakerEncoderError(ValueError):
    """Speaker-encoder weights that cannot be used (permanent)."""


class VoiceEncoderNet(nn.Module):
    """[B, frames, 40] mel -> [B, 256] L2-normed embeddings (parameter names as in the wheel)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(N_MELS, HIDDEN, LAYERS, batch_first=True)
        self.linear = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        raw = torch.relu(self.linear(hidden[-1]))
        return raw / torch.linalg.norm(raw, dim=1, keepdim=True).clamp_min(1e-12)


def asset_path() -> Path:
    """resemblyzer/pretrained.pt from the installed wheel (not imported), else the weights cache."""
    from rvc_pipeline.weights import local_cache_dir

    spec = importlib.util.find_spec("resemblyzer")
    tried = [Path(loc) / "pretrained.pt" for loc in (spec.submodule_search_locations or [])] if spec else []
    tried.append(local_cache_dir() / "resemblyzer" / "pretrained.pt")
    for p in tried:
        if p.is_file():
            return p
    raise WeightsNotFound(f"speaker_sim: no Resemblyzer weights (tried {', '.join(map(str, tried))}). "
                          f"Install the wheel that carries them: pip install --no-deps resemblyzer==0.1.4")


def load_encoder(path: Path | None = None) -> VoiceEncoderNet:
    from rvc_pipeline import safeload

    path = path or asset_path()
    try:
        ckpt = safeload.load(path, what="speaker encoder weights file")
    except safeload.UnreadableFile as e:
        raise SpeakerEncoderError(f"speaker_sim: {e}") from None
    state = ckpt.get("model_state") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise SpeakerEncoderError(f"speaker_sim: {path}: expected a checkpoint with a 'model_state' dict")
    state = {k: v for k, v in state.items() if not k.startswith("similarity_")}  # GE2E training only
    net = VoiceEncoderNet()
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise SpeakerEncoderError(f"speaker_sim: {path}: {str(e).splitlines()[0]}") from None
    return net.eval()


def preprocess(x: np.ndarray) -> np.ndarray:
    """16 kHz audio -> loudness raised to -30 dBFS, long pauses cut (empty if there is no speech)."""
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    if rms * INT16_MAX < 1:  # below one 16-bit step: silence
        return x[:0]
    gain_db = TARGET_DBFS - 20 * np.log10(rms)
    x = x * np.float32(10 ** (max(gain_db, 0.0) / 20))
    return trim_pauses(x)


def trim_pauses(x: np.ndarray) -> np.ndarray:
    n = len(x) - len(x) % VAD_WINDOW
    if n == 0:
        return x[:0]
    level = 10 * np.log10(np.mean(np.square(x[:n].reshape(-1, VAD_WINDOW)), axis=1) + 1e-12)
    flags = (level > level.max() - VAD_RANGE_DB).astype(np.float64)
    kernel = np.ones(VAD_AVERAGE) / VAD_AVERAGE
    padded = np.concatenate([np.zeros((VAD_AVERAGE - 1) // 2), flags, np.zeros(VAD_AVERAGE // 2)])
    mask = np.round(np.convolve(padded, kernel, mode="valid")).astype(bool)
    mask = np.convolve(mask, np.ones(VAD_DILATE + 1), mode="same") > 0  # dilation by VAD_DILATE / 2 each side
    return x[:n][np.repeat(mask, VAD_WINDOW)]


def partial_starts(n_samples: int) -> list[int]:
    """First mel frame of each 160-frame partial of an utterance of n_samples."""
    n_frames = int(np.ceil((n_samples + 1) / HOP))
    starts = list(range(0, max(1, n_frames - PARTIAL + STEP + 1), STEP))
    coverage = (n_samples - starts[-1] * HOP) / (PARTIAL * HOP)
    if coverage < MIN_COVERAGE and len(starts) > 1:
        starts.pop()
    return starts


def embed(net: VoiceEncoderNet, x: np.ndarray) -> np.ndarray | None:
    """The utterance embedding of 16 kHz audio (None when it holds no speech)."""
    import librosa

    wav = preprocess(x)
    if len(wav) == 0:
        return None
    starts = partial_starts(len(wav))
    wav = np.pad(wav, (0, max(0, (starts[-1] + PARTIAL) * HOP - len(wav))))
    mel = librosa.feature.melspectrogram(y=wav, sr=SR, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS)
    mel = mel.astype(np.float32).T
    batch = torch.from_numpy(np.stack([mel[s : s + PARTIAL] for s in starts]))
    with torch.inference_mode():
        partials = net(batch).numpy()
    mean = partials.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    return mean / norm if norm > 0 else None


@register("speaker_sim")
class SpeakerSimilarity(Metric):
    """opts: `encoder` (a loaded VoiceEncoderNet; default: the wheel's, loaded once per process)."""

    higher_is_better = True
    reference = REF_SPEAKER

    def __init__(self, encoder: VoiceEncoderNet | None = None) -> None:
        self.net = encoder or cached(("resemblyzer",), load_encoder)
        self._refs: dict[bytes, np.ndarray] = {}  # reference embeddings by content: the same every epoch

    def _reference(self, ref: Clip) -> np.ndarray:
        key = hashlib.blake2b(ref.audio.tobytes(), digest_size=16, key=str(ref.sr).encode()).digest()
        if key not in self._refs:
            e = embed(self.net, to_16k(ref))
            if e is None:
                raise MetricInputError(f"{ref.name}: speaker_sim: the reference holds no speech (silent or "
                                       f"shorter than 30 ms)")
            if len(self._refs) >= MAX_CACHED:
                self._refs.clear()
            self._refs[key] = e
        return self._refs[key]

    def speaker(self, refs: Sequence[Clip]) -> np.ndarray:
        """The L2-normed mean embedding of the distinct reference clips."""
        mean = np.mean([self._reference(r) for r in {id(r): r for r in refs}.values()], axis=0)
        return mean / np.linalg.norm(mean)

    def score(self, pairs: Sequence[Pair]) -> dict[str, float]:
        need_pairs(pairs, self.name)
        target = self.speaker([p.need_reference(self.name, i) for i, p in enumerate(pairs)])
        sims = []
        for p in pairs:
            e = embed(self.net, to_16k(p.converted))
            sims.append(0.0 if e is None else float(np.dot(e, target)))
        return {"speaker_sim": float(np.mean(sims))}
