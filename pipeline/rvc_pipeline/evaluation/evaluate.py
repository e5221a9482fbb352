"""Evaluate a generator: reconstruct held-out pieces from their own features and f0, convert preview
clips through the same inference path users run (`infer.convert`), and score both with the voice metrics
(components/metrics).

What each metric compares (its `reference`, components/metrics/base.py REF_*):
* truth: the held-out piece's ground truth at the model's rate (mel_l1, mrstft), reconstructions only;
* speaker: the target's held-out audio (speaker_sim), reconstructions and conversions;
* input: the audio fed in, f0 after transpose (f0): reconstructions use the piece's own f0 track;
* none: DNSMOS, on every output.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rvc_pipeline.components.metrics import base as metrics
from rvc_pipeline.components.metrics.base import REF_INPUT, REF_SPEAKER, REF_TRUTH, Clip, Metric, Pair
from rvc_pipeline.core import layout

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Piece:
    """One held-out piece: ground truth at the model rate, its 16 kHz audio, features and f0 files."""

    stem: str
    gt: Path
    wav16k: Path
    feats: Path
    coarse: Path | None = None
    nsf: Path | None = None

    @classmethod
    def of(cls, exp_dir: Path, stem: str, version: str, f0: bool) -> Piece:
        f0_files = [exp_dir / d / f"{stem}.wav.npy" for d in layout.F0_DIRS] if f0 else [None, None]
        return cls(stem, exp_dir / layout.GT_WAVS_DIR / f"{stem}.wav",
                   exp_dir / layout.WAVS_16K_DIR / f"{stem}.wav",
                   exp_dir / layout.feature_dir(version) / f"{stem}.npy", *f0_files)


@dataclass
class Output:
    """A generated clip with what it is compared with: `truth` (same rate), `input` (f0 reference)."""

    label: str
    clip: Clip
    truth: Clip | None
    input: Clip
    transpose: float = 0.0


@dataclass
class Result:
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    previews: list[tuple[str, np.ndarray, int]] = field(default_factory=list)
    seconds: float = 0.0


def _read(path: Path, sr: int, name: str) -> Clip:
    import soundfile as sf

    x, file_sr = sf.read(str(path), dtype="float32", always_2d=True)
    if file_sr != sr:
        raise metrics.MetricInputError(f"{path}: {file_sr} Hz, expected {sr} Hz")
    return Clip(x.mean(axis=1), sr, name=name)


def reconstruct(net_g: Any, piece: Piece, sid: int, seed: int = 0) -> np.ndarray:
    """net_g.infer on the piece's own features (repeated to 100 frames/s, as in training) and f0."""
    import torch

    feats = np.repeat(np.load(piece.feats), 2, axis=0)
    dev = next(net_g.parameters()).device
    n = len(feats)
    f0 = [np.load(p).reshape(-1) for p in (piece.coarse, piece.nsf) if p is not None]
    n = min([n, *(len(a) for a in f0)])
    phone = torch.from_numpy(np.ascontiguousarray(feats[:n], dtype=np.float32))[None].to(dev)
    args: list[Any] = [phone, torch.tensor([n], device=dev)]
    if f0:
        args += [torch.from_numpy(np.ascontiguousarray(f0[0][:n])).long()[None].to(dev),
                 torch.from_numpy(np.ascontiguousarray(f0[1][:n], dtype=np.float32))[None].to(dev)]
    args.append(torch.tensor([sid], device=dev))
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.inference_mode():
        out = net_g.infer(*args, generator=gen)[0]
    return out[0, 0].float().cpu().numpy()


def reconstructions(net_g: Any, pieces: Sequence[Piece], sr: int, sid: int) -> list[Output]:
    outs = []
    for i, p in enumerate(pieces):
        audio = reconstruct(net_g, p, sid, seed=i)
        truth = _read(p.gt, sr, f"{p.stem} (truth)")
        f0 = np.load(p.nsf).reshape(-1) if p.nsf is not None else None
        src = Clip(truth.audio, sr, f0=f0, name=f"{p.stem} (input)")
        outs.append(Output(f"reconstructed {p.stem}", Clip(audio, sr, name=p.stem), truth, src))
    return outs


def _pairs(metric: Metric, outputs: Sequence[Output], targets: Sequence[Clip]) -> list[Pair]:
    r = metric.reference
    if r == REF_TRUTH:
        return [Pair(o.clip, o.truth) for o in outputs if o.truth is not None]
    if r == REF_SPEAKER:
        return [Pair(o.clip, targets[i % len(targets)]) for i, o in enumerate(outputs)] if targets else []
    if r == REF_INPUT:
        return [Pair(o.clip, o.input, o.transpose) for o in outputs]
    return [Pair(o.clip) for o in outputs]


def score(chosen: Sequence[Metric], outputs: Sequence[Output], targets: Sequence[Clip],
          result: Result) -> None:
    """Every metric over the outputs it applies to; a metric that cannot run is recorded as skipped."""
    for m in chosen:
        pairs = _pairs(m, outputs, targets)
        if not pairs:
            result.skipped[m.name] = "nothing to compare with"
            continue
        try:
            result.metrics.update(m.score(pairs))
        except metrics.MetricInputError as e:
            result.skipped[m.name] = str(e)


def load_metrics(names: Sequence[str] | None, opts: dict[str, dict[str, Any]] | None = None
                 ) -> tuple[list[Metric], dict[str, str]]:
    """The metrics by name (default: every one in the catalog); those that cannot load here are skipped
    with the reason (a missing optional package or weight file), unless they were asked for by name."""
    chosen, skipped = [], {}
    for name in names or list(metrics.METRICS):
        try:
            chosen.append(metrics.get(name, **(opts or {}).get(name, {})))
        except (ImportError, OSError, RuntimeError) as e:
            if names:
                raise
            skipped[name] = f"cannot load here: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return chosen, skipped


Converter = Callable[[np.ndarray, float], tuple[np.ndarray, int]]


def conversions(convert: Converter, sources: Sequence[Clip], transpose: float) -> list[Output]:
    """`convert(audio16k, transpose) -> (int16 audio, sr)` over the 16 kHz source clips."""
    outs = []
    for src in sources:
        audio, sr = convert(src.audio, transpose)
        clip = Clip(np.asarray(audio, dtype=np.float32) / 32768.0, sr, name=f"converted {src.name}")
        outs.append(Output(f"converted {src.name}", clip, None, src, transpose))
    return outs


def _try_conversions(convert: Converter | None, sources: Sequence[Clip], transpose: float,
                     result: Result) -> list[Output]:
    """The previews; evaluation is advisory, so a conversion that cannot run here (e.g. a pitch method
    whose weights are missing) is recorded as skipped instead of failing the training run."""
    if convert is None or not sources:
        return []
    try:
        return conversions(convert, sources, transpose)
    except Exception as e:  # noqa: BLE001 - any failure: reported in eval.jsonl and the log, training goes on
        result.skipped["previews"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return []


def evaluate(net_g: Any, pieces: Sequence[Piece], sr: int, sid: int, chosen: Sequence[Metric],
             convert: Converter | None = None, sources: Sequence[Clip] = (), transpose: float = 0.0
             ) -> Result:
    """Score `net_g` (put in eval mode for the duration) on the held-out pieces and the sources."""
    t0, result = time.perf_counter(), Result()
    was_training = bool(getattr(net_g, "training", False))
    net_g.eval()
    try:
        outputs = reconstructions(net_g, pieces, sr, sid)
        converted = _try_conversions(convert, sources, transpose, result)
    finally:
        net_g.train(was_training)
    targets = [o.truth for o in outputs if o.truth is not None]
    score(chosen, [*outputs, *converted], targets, result)
    result.previews = [(o.label, o.clip.audio, o.clip.sr) for o in converted]
    result.seconds = time.perf_counter() - t0
    return result
