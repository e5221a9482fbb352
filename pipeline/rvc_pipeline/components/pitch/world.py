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
    pass


@register("dio")
class Dio(_World):
    pass
