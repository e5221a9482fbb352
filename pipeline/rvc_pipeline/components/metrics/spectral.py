"""mel_l1 and mrstft: spectral distances between a converted clip and its ground truth (lower is better).

* mel_l1: mean |log-mel(converted) - log-mel(reference)| with RVC's training mel (rvc_pipeline.mel): at
  32/40/48 kHz the settings of RVC's config for that rate (e.g. 40k: n_fft 2048, hop 400, 125 mels), at
  other rates n_fft = next power of two >= 50 ms, hop = 10 ms (even), 80 mels.
* mrstft: multi-resolution STFT distance (Parallel WaveGAN's loss as a metric): per resolution (fft, hop,
  win) in (512, 128, 512), (1024, 256, 1024), (2048, 512, 2048), spectral convergence
  ||R - C||_F / ||R||_F plus mean |log R - log C| of the magnitudes; averaged over resolutions.

Both are 0 for identical audio. A reference at another rate than the converted clip: the converted one is
resampled to the reference's rate. Lengths may differ by up to 10% (an RVC output is cut or padded a
little): both are cut to the shorter; more than that is refused (not the same utterance). Frames are
pooled over all pairs (a long clip weighs more than a short one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from rvc_pipeline.components.metrics.base import (
    Clip,
    Metric,
    MetricInputError,
    Pair,
    common_length,
    need_pairs,
    register,
)

if TYPE_CHECKING:
    import torch

# speed: seconds of converted audio scored per second, bench/bench_metrics.py (60 s at 40 kHz in 6 s pieces,
# 1 thread, on a 2-core machine shared with other jobs: load average ~7, so a lower bound)
CATALOG = {
    "mel_l1": {"needs_gpu": False, "weights": [], "speed": 100.0},
    "mrstft": {"needs_gpu": False, "weights": [], "speed": 60.0},
}

RESOLUTIONS: tuple[tuple[int, int, int], ...] = ((512, 128, 512), (1024, 256, 1024), (2048, 512, 2048))


def mel_settings(sr: int) -> tuple[int, int, int]:
    """(n_fft = win, hop, n_mels) of the mel used for mel_l1 at `sr`."""
    from rvc_pipeline.nn.config import CONFIG_FILES

    for cfg in CONFIG_FILES.values():
        if cfg.data.sampling_rate == sr:
            return cfg.data.filter_length, cfg.data.hop_length, cfg.data.n_mel_channels
    return 2 ** math.ceil(math.log2(0.05 * sr)), 2 * round(sr / 200), 80


def aligned(pair: Pair, i: int, metric: str, min_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(converted, reference) at the reference's rate, cut to the same length (>= min_samples)."""
    ref: Clip = pair.need_reference(metric, i)
    conv = pair.converted.audio
    if pair.converted.sr != ref.sr:
        from rvc_pipeline.audio import resample

        conv = resample(conv, pair.converted.sr, ref.sr)
    n = common_length(pair, i, metric, (len(conv), len(ref.audio)), f"samples at {ref.sr} Hz")
    if n < min_samples:
        raise MetricInputError(f"pair {i} ({pair.converted.name}): {metric}: {n} samples is too short "
                               f"(at least {min_samples})")
    return conv[:n], ref.audio[:n]


def _tensor(x: np.ndarray) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


@register("mel_l1")
class MelL1(Metric):
    higher_is_better = False

    def score(self, pairs: Sequence[Pair]) -> dict[str, float]:
        import torch

        from rvc_pipeline.mel import mel_spectrogram

        need_pairs(pairs, self.name)
        total, count = 0.0, 0
        with torch.inference_mode():
            for i, pair in enumerate(pairs):
                sr = pair.need_reference(self.name, i).sr
                n_fft, hop, n_mels = mel_settings(sr)
                conv, ref = aligned(pair, i, self.name, min_samples=n_fft)
                mels = [mel_spectrogram(_tensor(x), n_fft, n_mels, sr, hop, n_fft)
                        for x in (conv, ref)]
                diff = (mels[0] - mels[1]).abs()
                total, count = total + float(diff.sum()), count + diff.numel()
        return {"mel_l1": total / count}


def stft_distance(conv: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """(spectral convergence, log-magnitude distance, frames) averaged over RESOLUTIONS."""
    import torch

    from rvc_pipeline.mel import spectrogram

    sc, mag = 0.0, 0.0
    with torch.inference_mode():
        for n_fft, hop, win in RESOLUTIONS:
            c, r = (spectrogram(_tensor(x), n_fft, hop, win) for x in (conv, ref))
            sc += float(torch.linalg.norm(r - c) / torch.linalg.norm(r))
            mag += float((torch.log(r) - torch.log(c)).abs().mean())
    k = len(RESOLUTIONS)
    return sc / k, mag / k, len(conv) / RESOLUTIONS[0][1]


@register("mrstft")
class MultiResolutionSTFT(Metric):
    higher_is_better = False
    keys = ("mrstft", "mrstft_sc", "mrstft_mag")

    def score(self, pairs: Sequence[Pair]) -> dict[str, float]:
        need_pairs(pairs, self.name)
        parts = np.array([stft_distance(*aligned(p, i, self.name, min_samples=RESOLUTIONS[-1][0]))
                          for i, p in enumerate(pairs)])
        sc, mag = (float(np.average(parts[:, j], weights=parts[:, 2])) for j in (0, 1))
        return {"mrstft": sc + mag, "mrstft_sc": sc, "mrstft_mag": mag}
