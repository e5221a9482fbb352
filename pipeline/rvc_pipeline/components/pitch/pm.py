"""pm: Praat's autocorrelation pitch (parselmouth), RVC's settings and centred zero padding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rvc_pipeline.components.pitch.base import F0_MAX, F0_MIN, HOP, SR, PitchMethod, pad_centred, register

CATALOG = {"pm": {"needs_gpu": False, "weights": [], "speed": 400.0, "rank": 0}}


def f0_pm(x: np.ndarray, p_len: int) -> np.ndarray:
    import parselmouth

    snd = parselmouth.Sound(np.asarray(x, dtype=np.float64), SR)
    try:
        pitch = snd.to_pitch_ac(
            time_step=HOP / SR, voicing_threshold=0.6, pitch_floor=F0_MIN, pitch_ceiling=F0_MAX
        )
    except parselmouth.PraatError:
        # shorter than one analysis window (3 periods of 50 Hz = 60 ms): nothing is voiced
        return np.zeros(p_len)
    return pad_centred(pitch.selected_array["frequency"], p_len)


@register("pm")
class Pm(PitchMethod):
    def extract(self, clips: Sequence[np.ndarray], p_lens: Sequence[int], **opts: Any) -> list[np.ndarray]:
        return [f0_pm(x, n) for x, n in zip(clips, p_lens)]
