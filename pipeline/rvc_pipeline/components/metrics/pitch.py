"""f0: pitch fidelity between the input (after transpose) and the converted output (lower is better).

Both clips' f0 come from a pitch method of the registry (rvc_pipeline.components.pitch; default 'pm',
which needs no weights and runs at hundreds of times real time on a CPU), on 16 kHz audio, 10 ms frames;
a clip that carries its own f0 track (`Clip.f0`, e.g. the held-out piece's 2a_f0) is not re-tracked.
The reference (input) f0 is multiplied by 2^(transpose / 12).

* f0_rmse_cents: RMS of 1200 * log2(f0_out / f0_in) over the frames voiced in both clips, pooled over
  all pairs (nan when no frame is voiced in both);
* voicing_error: the share of frames voiced in exactly one of the two (0 = same voicing everywhere).

Tracks of different lengths are cut to the shorter (up to 10% apart, else refused).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rvc_pipeline.components.metrics.base import (
    REF_INPUT,
    Clip,
    Metric,
    Pair,
    common_length,
    need_pairs,
    register,
    to_16k,
)
from rvc_pipeline.components.pitch import base as pitch

# speed: seconds of converted audio scored per second, bench/bench_metrics.py (60 s at 40 kHz in 6 s pieces,
# 1 thread, on a 2-core machine shared with other jobs: load average ~7, so a lower bound), 'pm'
CATALOG = {"f0": {"needs_gpu": False, "weights": [], "speed": 75.0}}


@register("f0")
class PitchFidelity(Metric):
    """opts: `method` (a pitch method name, default 'pm'), other keys go to the method's `extract`."""

    higher_is_better = False
    keys = ("f0_rmse_cents", "voicing_error")
    primary = "f0_rmse_cents"
    reference = REF_INPUT

    def __init__(self, method: str = "pm", **method_opts: Any) -> None:
        self.method = pitch.get(method)
        self.opts = method_opts

    def track(self, clip: Clip) -> np.ndarray:
        if clip.f0 is not None:
            return clip.f0
        x = to_16k(clip)
        return self.method.extract([x], [len(x) // pitch.HOP], **self.opts)[0]

    def frames(self, pair: Pair, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(f0 out, f0 in after transpose), the same length."""
        f_in = self.track(pair.need_reference(self.name, i)) * 2.0 ** (pair.transpose / 12.0)
        f_out = self.track(pair.converted)
        n = common_length(pair, i, self.name, (len(f_out), len(f_in)), "f0 frames")
        return f_out[:n], f_in[:n]

    def score(self, pairs: Sequence[Pair]) -> dict[str, float]:
        need_pairs(pairs, self.name)
        cents: list[np.ndarray] = []
        mismatched, total = 0, 0
        for i, p in enumerate(pairs):
            f_out, f_in = self.frames(p, i)
            both = (f_out > 0) & (f_in > 0)
            cents.append(1200.0 * np.log2(f_out[both] / f_in[both]))
            mismatched += int(np.count_nonzero((f_out > 0) != (f_in > 0)))
            total += len(f_out)
        d = np.concatenate(cents)
        rmse = float(np.sqrt(np.mean(np.square(d)))) if d.size else float("nan")
        return {"f0_rmse_cents": rmse, "voicing_error": mismatched / max(total, 1)}
