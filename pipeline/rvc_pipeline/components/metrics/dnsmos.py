"""dnsmos: DNSMOS P.835 (SIG, BAK, OVRL; 1-5, higher is better) of the converted clips, no reference.

The model is `dnsmos_models/sig_bak_ovr.onnx` from the `speechmos` wheel (Microsoft's DNS Challenge
models), run with onnxruntime. The wheel's own `speechmos.dnsmos` is not called: it imports `requests`
and librosa for nothing this needs, loops forever on an empty clip, and always also runs the P.808 model.
Facts of speechmos 0.0.1.1 reproduced here: 16 kHz input; a clip shorter than 9.01 s is doubled until it is
at least that long; windows of 144160 samples (9.01 s) every 1 s, num = int(floor(seconds) - 9.01) + 1;
raw scores calibrated per window by the polynomials below (non-personalized model); the clip's score is
the mean over its windows (speechmos drops a window whose end (i + 9.01) * 16000 rounds down to one sample
short; this keeps it: scores differ by < 0.01). Clips are averaged, each weighted by its duration.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rvc_pipeline.components.metrics.base import REF_NONE, Metric, Pair, need_pairs, register, to_16k
from rvc_pipeline.components.pitch.base import cached
from rvc_pipeline.core.errors import WeightsNotFound

# speed: seconds of converted audio scored per second, bench/bench_metrics.py (60 s at 40 kHz in 6 s pieces,
# 1 thread, on a 2-core machine shared with other jobs: load average ~7, so a lower bound); hop 1 s
CATALOG = {"dnsmos": {"needs_gpu": False, "weights": ["dnsmos/sig_bak_ovr.onnx"], "speed": 3.6}}

SR = 16000
WINDOW = int(9.01 * SR)
HOP_SECONDS = 1.0
MODEL = "sig_bak_ovr.onnx"
# np.poly1d coefficients (highest power first) mapping the raw outputs to MOS
POLY = {
    "dnsmos_sig": (-0.08397278, 1.22083953, 0.0052439),
    "dnsmos_bak": (-0.13166888, 1.60915514, -0.39604546),
    "dnsmos_ovrl": (-0.06766283, 1.11546468, 0.04602535),
}
BATCH = 8


class DNSMOSError(ValueError):
    """The DNSMOS model cannot be found or used (permanent)."""


def model_path() -> Path:
    """speechmos/dnsmos_models/sig_bak_ovr.onnx from the installed wheel (not imported), else the cache."""
    from rvc_pipeline.weights import local_cache_dir

    spec = importlib.util.find_spec("speechmos")
    tried = [Path(loc) / "dnsmos_models" / MODEL for loc in (spec.submodule_search_locations or [])] \
        if spec else []
    tried.append(local_cache_dir() / "dnsmos" / MODEL)
    for p in tried:
        if p.is_file():
            return p
    raise WeightsNotFound(f"dnsmos: no DNSMOS model (tried {', '.join(map(str, tried))}). Install the wheel "
                          f"that carries it: pip install speechmos==0.0.1.1")


def load_session(path: Path | None = None, threads: int = 0) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError("dnsmos: onnxruntime is not installed (pip install onnxruntime)") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    path = path or model_path()
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types for a bad file
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DNSMOSError(f"dnsmos: {path}: not a usable ONNX model ({detail})") from None


def windows(x: np.ndarray, hop_seconds: float = HOP_SECONDS) -> np.ndarray:
    """[num, 144160] float32 windows of one 16 kHz clip, as speechmos cuts them (its hop: 1 s)."""
    while len(x) < WINDOW:
        x = np.concatenate([x, x])
    num = int((np.floor(len(x) / SR) - 9.01) / hop_seconds) + 1
    starts = [int(i * hop_seconds * SR) for i in range(num)]
    return np.stack([x[s : s + WINDOW] for s in starts if s + WINDOW <= len(x)]).astype(np.float32)


def clip_scores(session: Any, x: np.ndarray, hop_seconds: float = HOP_SECONDS) -> np.ndarray:
    """[3] calibrated (sig, bak, ovrl) of one 16 kHz clip."""
    w = windows(x, hop_seconds)
    raw = np.concatenate([session.run(None, {"input_1": w[i : i + BATCH]})[0]
                          for i in range(0, len(w), BATCH)])
    mos = np.stack([np.polyval(POLY[k], raw[:, j]) for j, k in enumerate(POLY)], axis=1)
    return mos.mean(axis=0)


@register("dnsmos")
class DNSMOS(Metric):
    """opts: `session` (a loaded onnxruntime session; default: the wheel's model, loaded once);
    `hop_seconds` between 9.01 s windows (1.0 as speechmos; 9.0 scores long clips ~9x faster)."""

    higher_is_better = True
    keys = tuple(POLY)
    primary = "dnsmos_ovrl"
    reference = REF_NONE

    def __init__(self, session: Any = None, hop_seconds: float = HOP_SECONDS) -> None:
        if not 0 < hop_seconds <= 9.0:
            raise ValueError(f"dnsmos: hop_seconds {hop_seconds!r}: expected 0 < hop <= 9")
        self.session = session or cached(("dnsmos",), load_session)
        self.hop_seconds = hop_seconds

    def score(self, pairs: Sequence[Pair]) -> dict[str, float]:
        need_pairs(pairs, self.name)
        scores = np.stack([clip_scores(self.session, to_16k(p.converted), self.hop_seconds) for p in pairs])
        weights = [p.converted.seconds for p in pairs]
        mean = np.average(scores, axis=0, weights=weights)
        return {k: float(v) for k, v in zip(POLY, mean)}
