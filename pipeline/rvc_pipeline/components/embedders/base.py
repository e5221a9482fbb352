"""Content embedders: one interface, one registry, one loader.

An embedder turns 16 kHz mono waveforms into RVC content features: `dim(version)` is the feature size
(v1: 256, v2: 768 for HuBERT-base) and `extract(clips, version)` gives one float32 [frames, dim] array
per clip, each equal to running that clip alone. The features step, training's mute set and inference
all get theirs from `load_embedder` (a weights file or folder, or None for the demo's random weights).

A new embedder is ONE new file in this package: a module that declares `CATALOG = {name: {...}}` (read
without importing by rvc_pipeline.core.catalog: needs_gpu, weights, speed), defines an `Embedder`
subclass (or a loader returning an existing one) and calls `register(EmbedderKind(name, accepts,
load))` at import. `load_embedder` imports every module the catalog lists on first use and asks each
registered kind, in name order, whether it `accepts` the given path; nothing else needs editing.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rvc_pipeline.core.layout import VERSIONS, Version

SR = 16000
RANDOM_KIND = "random"


class Embedder(ABC):
    """A loaded embedder on a device."""

    source: str = ""  # what it was loaded from (a path, or random(seed=...))
    dtype: Any = None  # the torch dtype it runs in

    @abstractmethod
    def dim(self, version: Version) -> int:
        """Feature size for `version` (ValueError when this embedder cannot make it)."""

    @abstractmethod
    def frames(self, n_samples: int) -> int:
        """Number of feature frames for a clip of `n_samples` samples."""

    @abstractmethod
    def extract(self, clips: np.ndarray | Sequence[np.ndarray], version: Version = "v2",
                batch_seconds: float | None = None) -> list[np.ndarray]:
        """16 kHz mono float waveforms (one 1-D array or a list) -> [frames, dim] float32, one per clip."""


@dataclass(frozen=True)
class EmbedderKind:
    """A registered kind of embedder: `accepts(path)` says whether a file/folder is this kind's;
    `load(path, device, half)` loads it (path None: only for the random demo kind)."""

    name: str
    accepts: Callable[[Path], bool]
    load: Callable[[Path | None, str, bool], Embedder]


EMBEDDERS: dict[str, EmbedderKind] = {}


def register(kind: EmbedderKind) -> EmbedderKind:
    EMBEDDERS[kind.name] = kind
    return kind


def _discover() -> None:
    """Import every module the catalog lists for this package (each registers its kinds)."""
    from rvc_pipeline.core.catalog import EMBEDDERS as DECLARED

    for component in DECLARED.values():
        importlib.import_module(component.module)


def load_embedder(ref: str | Path | None, device: str = "cpu", half: bool = False) -> Embedder:
    """The embedder in file/folder `ref` (the first registered kind that accepts it); None: the demo's
    random HuBERT-base (the caller warns). FileNotFoundError / ValueError name the path."""
    _discover()
    if ref is None:
        return EMBEDDERS[RANDOM_KIND].load(None, device, half)
    p = Path(ref)
    if not p.exists():
        raise FileNotFoundError(f"embedder {p} does not exist")
    for name in sorted(EMBEDDERS):
        kind = EMBEDDERS[name]
        if kind.accepts(p):
            return kind.load(p, device, half)
    raise ValueError(f"{p}: not a known embedder format (known: {', '.join(sorted(EMBEDDERS))})")


def as_clips(wavs: np.ndarray | Sequence[np.ndarray], min_samples: int) -> list[np.ndarray]:
    """A list of 1-D clips; ValueError naming the clip that is not 1-D or shorter than `min_samples`."""
    clips = [wavs] if isinstance(wavs, np.ndarray) and wavs.ndim == 1 else list(wavs)
    for i, w in enumerate(clips):
        if np.ndim(w) != 1:
            raise ValueError(f"clip {i}: expected a 1-D waveform, got shape {np.shape(w)}")
        if len(w) < min_samples:
            raise ValueError(f"clip {i}: {len(w)} samples; need at least {min_samples}")
    return clips


def check_version(version: str) -> None:
    if version not in VERSIONS:  # (the message is part of the embedder interface's contract)
        raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")


def batches_by_seconds(lengths: Sequence[int], batch_seconds: float | None, sr: int = SR) -> list[list[int]]:
    """Consecutive groups of indices whose padded size (count x longest) stays within batch_seconds."""
    if not batch_seconds:
        return [list(range(len(lengths)))] if lengths else []
    cap = batch_seconds * sr
    out: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if cur and (len(cur) + 1) * max(longest, n) > cap:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    return out


def equal_length_batches(lengths: Sequence[int], batch_seconds: float | None) -> list[list[int]]:
    """Indices grouped by equal length (shortest first), each group cut by batch_seconds: a batch never
    pads, so each clip's result is the one it gets alone."""
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_len.setdefault(n, []).append(i)
    out: list[list[int]] = []
    for n in sorted(by_len):
        same = by_len[n]
        out.extend([same[j] for j in b] for b in batches_by_seconds([n] * len(same), batch_seconds))
    return out
