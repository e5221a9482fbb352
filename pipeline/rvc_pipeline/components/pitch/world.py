"""harvest and dio: PyWorld's trackers with StoneMask refinement (no median filter), as RVC trains."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rvc_pipeline.components.pitch.base import F0_MAX, F0_MIN, HOP, SR, PitchMethod, fit_length, register

CATALOG = {
    "harvest": {"needs_gpu": False, "weights": [], "speed": 3.5, "rank": 1},
    "dio": {"needs_gpu": False, "weights": [], "speed": 110.0, "rank": 2},
}


def f0_world(x: np.ndarray, p_len: int, which: str) -> np.ndarray:
    import pyworld

    xd = np.ascontiguousarray(x, dtype=np.float64)
    track = pyworld.harvest if which == "harvest" else pyworld.dio
    f0, t = track(xd, fs=SR, f0_ceil=F0_MAX, f0_floor=F0_MIN, frame_period=1000.0 * HOP / SR)
    f0 = pyworld.stonemask(xd, f0, t, SR)
    return fit_length(f0, p_len)


class _World(PitchMethod):
    def extract(self, clips: Sequence[np.ndarray], p_lens: Sequence[int], **opts: Any) -> list[np.ndarray]:
        return [f0_world(x, n, self.name) for x, n in zip(clips, p_lens)]


@register("harvest")
class Harvest(_World):
    def infer_f0(self, x: np.ndarray, p_len: int, filter_radius: int = 3, **opts: Any) -> np.ndarray:
        """RVC's inference keeps harvest's own p_len + 1 frames for a median filter (kernel 3, only when
        filter_radius > 2), then cuts to p_len."""
        from scipy.signal import medfilt  # type: ignore[import-untyped]

        f0 = f0_world(x, p_len + 1, self.name)
        if filter_radius > 2:
            f0 = medfilt(f0, 3)
        return np.asarray(f0[:p_len], dtype=np.float64)


@register("dio")
class Dio(_World):
    pass
