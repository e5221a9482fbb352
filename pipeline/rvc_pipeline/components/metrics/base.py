"""The voice-metric interface and its registry.

A metric scores a batch of `Pair`s (a converted clip and, for the intrusive metrics, a reference clip)
and returns named floats: `score(pairs) -> {key: value}`, each the aggregate over the batch. One metric
has one direction (`higher_is_better`) for all its keys and one `primary` key (what checkpoint selection
reads). Each file in this package declares its metrics in a `CATALOG` literal (read without importing by
rvc_pipeline.core.catalog) and registers the classes with `@register`; `get(name)` imports the file.

Inputs are checked once, when a `Clip` is made: mono 1-D audio (a file read by `Clip.from_file` is mixed
down), at least one sample, finite float values (integer PCM is scaled by its full range), a sample rate
of 8-192 kHz; an optional f0 track in Hz per 10 ms frame (the pitch methods' convention, 0 = unvoiced).
Anything else raises `MetricInputError`, one line naming the clip. A metric that has nothing to measure
returns nan for that key (e.g. f0 RMSE when no frame is voiced in both clips): "not measured", never a
good score.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rvc_pipeline.core.catalog import METRICS as CATALOG_METRICS
from rvc_pipeline.core.catalog import Component, Registry

SR_MIN = 8000
SR_MAX = 192000
MAX_LENGTH_MISMATCH = 0.10  # an RVC output may be cut or padded a little; more: not the same utterance

METRICS: dict[str, Component] = CATALOG_METRICS


class MetricInputError(ValueError):
    """Audio a metric cannot score (empty, NaN, not mono, bad rate ...): permanent, one line."""


def _checked_f0(track: object, label: str) -> np.ndarray:
    try:
        f0 = np.asarray(track, dtype=np.float64)
    except (TypeError, ValueError):
        raise MetricInputError(f"{label}: f0 must be numbers (Hz per 10 ms frame)") from None
    if f0.ndim != 1:
        raise MetricInputError(f"{label}: f0 must be a 1-D track, got shape {f0.shape}")
    if not np.all(np.isfinite(f0)) or np.any(f0 < 0):
        raise MetricInputError(f"{label}: f0 must be finite and >= 0 Hz (0 = unvoiced)")
    return f0


def _samples(audio: object, label: str) -> np.ndarray:
    """Mono float32 samples; integer PCM (e.g. int16) is scaled by its full range to [-1, 1)."""
    x = np.asarray(audio)
    if x.ndim != 1:
        raise MetricInputError(f"{label}: expected mono 1-D audio, got shape {x.shape} "
                               f"(mix down to one channel first)")
    if x.size == 0:
        raise MetricInputError(f"{label}: empty audio (no samples)")
    if np.issubdtype(x.dtype, np.integer):
        return (x / float(np.iinfo(x.dtype).max + 1)).astype(np.float32)
    if not np.issubdtype(x.dtype, np.floating):
        raise MetricInputError(f"{label}: audio must be numeric samples, got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise MetricInputError(f"{label}: audio contains NaN or infinite samples")
    return x.astype(np.float32, copy=False)


def _check_rate(sr: object, label: str) -> int:
    if isinstance(sr, bool) or not isinstance(sr, int | np.integer) or not SR_MIN <= sr <= SR_MAX:
        raise MetricInputError(f"{label}: sample rate {sr!r}: expected an integer from {SR_MIN} to "
                               f"{SR_MAX} Hz")
    return int(sr)


@dataclass(frozen=True)
class Clip:
    """Mono audio at `sr` Hz (float, or integer PCM scaled by its full range); `f0`: optional pitch
    track (Hz, one value per 10 ms, 0 = unvoiced)."""

    audio: np.ndarray
    sr: int
    f0: np.ndarray | None = None
    name: str = "audio"

    def __post_init__(self) -> None:
        object.__setattr__(self, "audio", _samples(self.audio, self.name))
        object.__setattr__(self, "sr", _check_rate(self.sr, self.name))
        if self.f0 is not None:
            object.__setattr__(self, "f0", _checked_f0(self.f0, self.name))

    @property
    def seconds(self) -> float:
        return len(self.audio) / self.sr

    @classmethod
    def from_file(cls, path: str | Path, f0: np.ndarray | None = None) -> Clip:
        """A sound file (any channel count: mixed down to mono by averaging)."""
        import soundfile as sf

        try:
            x, sr = sf.read(str(path), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise MetricInputError(f"{path}: not a readable sound file ({str(e).splitlines()[0]})") from None
        return cls(x.mean(axis=1), int(sr), f0, str(path))


@dataclass(frozen=True)
class Pair:
    """One evaluated conversion: `converted` (the model's output) and `reference`, whose meaning is the
    metric's: the ground truth (spectral), the target speaker's audio (speaker), the input before
    conversion (pitch; `transpose` semitones are applied to its f0). DNSMOS needs no reference."""

    converted: Clip
    reference: Clip | None = None
    transpose: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.transpose, bool) or not isinstance(self.transpose, int | float) \
                or not np.isfinite(self.transpose):
            raise MetricInputError(f"{self.converted.name}: transpose {self.transpose!r}: expected a finite "
                                   f"number of semitones")

    def need_reference(self, metric: str, i: int) -> Clip:
        if self.reference is None:
            raise MetricInputError(f"pair {i} ({self.converted.name}): {metric} needs a reference clip")
        return self.reference


# What a metric's Pair.reference must be (Metric.reference)
REF_TRUTH = "truth"  # the ground truth of the converted clip, same utterance (reconstruction)
REF_SPEAKER = "speaker"  # any audio of the target speaker
REF_INPUT = "input"  # the audio that was converted (its f0 after Pair.transpose)
REF_NONE = "none"  # no reference: the metric judges the converted clip alone


class Metric(ABC):
    """One voice metric. `keys`: what `score` returns; `primary`: the key selection reads;
    `reference`: what its pairs' reference clip is (REF_*)."""

    name: str = ""
    higher_is_better: bool = False
    keys: tuple[str, ...] = ()
    primary: str = ""
    reference: str = REF_TRUTH

    @abstractmethod
    def score(self, pairs: Sequence[Pair]) -> dict[str, float]:
        """The metric over all pairs (MetricInputError for unusable ones or an empty batch)."""


def common_length(pair: Pair, i: int, metric: str, lengths: tuple[int, int], unit: str) -> int:
    """The shorter of (converted, reference) lengths; MetricInputError if they differ by > 10%."""
    n, longest = min(lengths), max(lengths)
    if n < (1 - MAX_LENGTH_MISMATCH) * longest:
        raise MetricInputError(f"pair {i} ({pair.converted.name}): {metric}: converted and reference differ "
                               f"in length by more than {MAX_LENGTH_MISMATCH:.0%} ({lengths[0]} vs "
                               f"{lengths[1]} {unit})")
    return n


def need_pairs(pairs: Sequence[Pair], metric: str) -> None:
    if len(pairs) == 0:
        raise MetricInputError(f"{metric}: no clips to score")


def _defaults(cls: type[Metric], name: str) -> None:
    cls.primary = cls.primary or name
    cls.keys = cls.keys or (name,)


REGISTRY: Registry[type[Metric]] = Registry("metric", METRICS, on_register=_defaults)
register = REGISTRY.register


def get(name: str, **opts: Any) -> Metric:
    """The metric `name` made with `opts`; ValueError naming the choices for an unknown one."""
    cls = REGISTRY.cls(name)
    try:
        inspect.signature(cls).bind(**opts)
    except TypeError as e:
        raise ValueError(f"metric {name!r}: options {sorted(opts)}: {e}") from None
    return cls(**opts)


def to_16k(clip: Clip) -> np.ndarray:
    """The clip's audio at 16 kHz (the rate of the speaker, DNSMOS and pitch models)."""
    from rvc_pipeline.audio import resample

    return resample(clip.audio, clip.sr, 16000).astype(np.float32, copy=False)
