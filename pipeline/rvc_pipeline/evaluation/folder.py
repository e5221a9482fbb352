"""`rvc-pipeline eval`: score any RVC model (ours, RVC WebUI's, Applio's) on folders of recordings.

Each source file is converted through the same path as `rvc-pipeline infer` (`infer.convert`) and the
outputs are scored with the same code the training loop calls (`evaluate.score`): speaker similarity
against the target folder, DNSMOS, pitch fidelity against the source after transpose, and the spectral
distances where a target file has the same name as a source file (parallel recordings of one text).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rvc_pipeline.components.metrics.base import Clip, Metric
from rvc_pipeline.core.errors import StepFailed
from rvc_pipeline.core.folders import AUDIO_SUFFIXES
from rvc_pipeline.core.spec import RVC_CONVERSION
from rvc_pipeline.evaluation.evaluate import Output, Result, conversions, load_metrics, score


@dataclass(frozen=True)
class EvalOptions:
    model: Path
    target: Path
    source: Path
    index: Path | None = None
    transpose: float = 0.0
    f0_method: str = "pm"
    index_rate: float = RVC_CONVERSION.index_rate
    metrics: tuple[str, ...] | None = None
    device: str = "auto"
    embedder: str = "hubert_base.pt"
    limit: int = 50


@dataclass
class FolderResult:
    """`overall`: every metric over all files; `per_file`: file name -> its metrics."""

    overall: Result
    per_file: dict[str, dict[str, float]] = field(default_factory=dict)
    files: int = 0


def audio_files(folder: Path, limit: int, what: str) -> list[Path]:
    """Sorted audio files directly in `folder` (symlinks are not followed); ValueError naming the folder."""
    if not folder.is_dir() or folder.is_symlink():
        raise StepFailed(f"--{what} {folder}: not a folder")
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file() and not p.is_symlink())
    if not files:
        raise StepFailed(f"--{what} {folder}: no audio files ({', '.join(AUDIO_SUFFIXES)})")
    return files[:limit]


def _clip16k(path: Path) -> Clip:
    from rvc_pipeline.audio import load_audio
    from rvc_pipeline.core.fileio import read_16k

    return Clip(read_16k(path, decode=load_audio), 16000, name=path.name)


def _truths(outputs: list[Output], targets: dict[str, Path]) -> None:
    """Attach the same-named target recording as ground truth (at the output's rate)."""
    from rvc_pipeline.audio import load_audio

    for o in outputs:
        match = targets.get(Path(o.input.name).stem)
        if match is not None:
            o.truth = Clip(load_audio(match, o.clip.sr), o.clip.sr, name=match.name)


def _converter(opts: EvalOptions) -> Any:
    from rvc_pipeline import infer
    from rvc_pipeline.core.fileio import pick_device

    device = pick_device(opts.device, what="eval")
    net_g, meta = infer.load_model(opts.model, device)
    net_g.remove_weight_norm()
    index = big = None
    if opts.index is not None:
        index, big, _ = infer.load_index(opts.index, meta["version"])
    emb, _ = infer.resolve_embedder(opts.embedder, None, device, False, False)
    f0w = infer.pitch_weights(opts.f0_method, None, None) if meta["f0"] else None

    def convert(audio16k: Any, transpose: float) -> tuple[Any, int]:
        return infer.convert(audio16k, net_g, meta, emb, index, big, pitch=transpose,
                             f0_method=opts.f0_method,
                             index_rate=opts.index_rate if index is not None else 0.0, device=device,
                             half=False, seed=0, f0_weights=f0w)

    return convert


def score_folder(opts: EvalOptions, chosen: Sequence[Metric] | None = None) -> FolderResult:
    """Convert every source file and score the outputs (see the module docstring)."""
    sources = [_clip16k(p) for p in audio_files(opts.source, opts.limit, "source")]
    target_files = audio_files(opts.target, opts.limit, "target")
    targets = [_clip16k(p) for p in target_files]
    if chosen is None:
        try:
            chosen, skipped = load_metrics(list(opts.metrics) if opts.metrics else None)
        except ValueError as e:
            raise StepFailed(f"--metrics: {e}") from None
    else:
        skipped = {}
    outputs = conversions(_converter(opts), sources, opts.transpose)
    _truths(outputs, {p.stem: p for p in target_files})
    overall = Result(skipped=dict(skipped))
    score(chosen, outputs, targets, overall)
    per_file = {}
    for o in outputs:
        one = Result()
        score(chosen, [o], targets, one)
        per_file[o.input.name] = one.metrics
    return FolderResult(overall, per_file, len(outputs))


def table(res: FolderResult) -> str:
    """A plain-text table: one row per file, then the overall row."""
    keys = list(res.overall.metrics) or sorted({k for m in res.per_file.values() for k in m})
    width = max([len("file"), len("all files"), *(len(n) for n in res.per_file)])
    head = "file".ljust(width) + "".join(f"  {k:>14}" for k in keys)

    def row(name: str, m: dict[str, float]) -> str:
        vals = "".join(f"  {m[k]:>14.4g}" if k in m and not math.isnan(m[k]) else f"  {'-':>14}"
                       for k in keys)
        return name.ljust(width) + vals

    lines = [head, *(row(n, m) for n, m in res.per_file.items()), row("all files", res.overall.metrics)]
    lines += [f"skipped {k}: {why}" for k, why in res.overall.skipped.items()]
    return "\n".join(lines)
