"""Step 2b (features): HuBERT content features of every 16 kHz slice, as RVC's extract_feature_print.py.

Input `1_16k_wavs/<name>.wav` (16 kHz, stereo averaged) -> `3_feature256/<name>.npy` (v1: final_proj of
layer 9) or `3_feature768/<name>.npy` (v2: layer 12), float32 [T, C] with T = floor((N-400)/320)+1.
The output name is the input name with every "wav" replaced by "npy", as RVC does.

Files are sorted by length and run in batches of about `spec.features.batchSeconds` of audio (each
clip's result equals running it alone). Existing outputs are kept (resume); every file is written
atomically. Files whose features contain NaN are not saved and fail the step, as does any input left
without an output.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from rvc_pipeline.core import layout
from rvc_pipeline.core.errors import StepFailed, WeightsNotFound
from rvc_pipeline.core.fileio import SR_16K, pick_device, read_16k, save_npy_atomic
from rvc_pipeline.core.heap import keep_freed_memory
from rvc_pipeline.provenance import RANDOM, weight_identity
from rvc_pipeline.steps.runner import FileProgress, PerFile, StepContext, per_file_step
from rvc_pipeline.weights import DEMO_WARNING, resolve_weight

log = logging.getLogger("rvc_pipeline")

SR = SR_16K
IN_DIR = layout.WAVS_16K_DIR
SUMMARY_FILE = "features.json"
PARAMS_FILE = layout.params_file("features")  # what made the outputs (see provenance.py)
PARAMS_VERSION = 1
CPU_BATCH_SECONDS = 16.0
"""Batch cap on CPU: per-clip CPU time is flat from 1 to 16 clips of 3.7 s, fewer/larger ops help threads."""


def output_name(wav_name: str) -> str:
    """RVC's naming: every 'wav' in the file name becomes 'npy' (0_1.wav -> 0_1.npy)."""
    return wav_name.replace("wav", "npy")


def resolve_spec_embedder(ctx: StepContext) -> Path | None:
    """The file named by spec.features.embedder; None when it is missing and demo random weights are on."""
    spec = ctx.spec
    try:
        return resolve_weight(spec.features.embedder, spec, what="HuBERT embedder")
    except WeightsNotFound:
        if not spec.demo_random_weights:
            raise
        return None


def load_spec_embedder(ctx: StepContext, device: str, path: Path | None) -> tuple[Any, bool]:
    """The embedder at `path` (see resolve_spec_embedder; None: random demo weights); (embedder, random)."""
    from rvc_pipeline.components.embedders.base import load_embedder

    spec = ctx.spec
    half = bool(spec.features.cpu_bf16 if device == "cpu" else spec.features.half_precision)
    if path is None:
        msg = DEMO_WARNING.format(what="HuBERT embedder")
        log.warning("!" * 100)
        log.warning(msg)
        log.warning("!" * 100)
        ctx.reporter.event("warning", message=msg)
        return load_embedder(None, device, half), True
    try:
        return load_embedder(path, device, half), False
    except ValueError as e:
        raise StepFailed(f"HuBERT embedder {spec.features.embedder}: {e}") from None


def _params(ctx: StepContext, emb_path: Path | None) -> dict[str, Any]:
    """What makes the outputs (their provenance): a difference from the recorded one recomputes all."""
    spec = ctx.spec
    out = {"version": PARAMS_VERSION, "embedder": weight_identity(emb_path),
           "model_version": spec.model.version, "dim": spec.model.feature_dim}
    if spec.features.cpu_bf16:  # only when set: the provenance of existing fp32 outputs stays as it was
        out["cpu_bf16"] = True
    return out


def _clip_lengths(wavs: list[Path]) -> dict[Path, int]:
    """Frames of every 16 kHz input; StepFailed naming the files of another rate or too short."""
    infos: dict[Path, int] = {}
    bad_rate, too_short = [], []
    for p in wavs:
        try:
            info = sf.info(str(p))
        except (RuntimeError, sf.LibsndfileError) as e:
            raise StepFailed(f"{p.name}: cannot read audio: {e}") from None
        if info.samplerate != SR:
            bad_rate.append(f"{p.name} ({info.samplerate} Hz)")
        elif info.frames < 400:
            too_short.append(f"{p.name} ({info.frames} samples)")
        infos[p] = int(info.frames)
    if bad_rate:
        raise StepFailed(f"features need 16000 Hz files in {IN_DIR}/; wrong rate: {', '.join(bad_rate)}")
    if too_short:
        raise StepFailed(f"clips shorter than one HuBERT window (400 samples): {', '.join(too_short)}")
    return infos


@dataclass
class _Extraction:
    device: str = "none"
    dtype: str = "none"
    threads: int = 0
    batches: int = 0
    seconds: float = 0.0
    nan_files: list[str] = field(default_factory=list)


def _embedder_for_run(ctx: StepContext, emb_path: Path | None, ex: _Extraction) -> Any:
    import torch

    spec = ctx.spec
    version = spec.model.version
    ex.device = pick_device("gpu" if spec.gpu else "cpu", what="features")
    if ex.device == "cpu":
        ex.threads = max(1, ctx.workers)
        torch.set_num_threads(ex.threads)
        keep_freed_memory()
    emb, _ = load_spec_embedder(ctx, ex.device, emb_path)
    ex.dtype = str(emb.dtype).replace("torch.", "")
    log.info("features: HuBERT %s on %s (%s, %d threads)", emb.source, ex.device, ex.dtype,
             ex.threads or torch.get_num_threads())
    dim = emb.dim(version)
    if dim != spec.model.feature_dim:
        raise StepFailed(
            f"HuBERT embedder {spec.features.embedder}: gives {dim}-d {version} features; an RVC "
            f"{version} model needs {spec.model.feature_dim}-d"
        )
    return emb


def _extract_all(ctx: StepContext, emb_path: Path | None, todo: list[Path], infos: dict[Path, int],
                 progress: FileProgress) -> _Extraction:
    """Features of every file in `todo`, batched by length, each output written atomically."""
    from rvc_pipeline.components.embedders.base import batches_by_seconds

    spec, ex = ctx.spec, _Extraction()
    emb = _embedder_for_run(ctx, emb_path, ex)
    out_dir = ctx.exp_dir / layout.feature_dir(spec.model.version)
    todo = sorted(todo, key=lambda p: (infos[p], p.name))
    batch_s = float(spec.features.batch_seconds)
    if ex.device == "cpu":  # on CPU big batches only add memory traffic (bench/bench_features.py)
        batch_s = min(batch_s, CPU_BATCH_SECONDS)
    batches = batches_by_seconds([infos[p] for p in todo], batch_s)
    ex.batches = len(batches)
    for batch in progress.bar(batches, total=len(batches), desc="features", unit="batch"):
        paths = [todo[i] for i in batch]
        feats = emb.extract([read_16k(p) for p in paths], spec.model.version)  # StepFailed names a file
        for p, f in zip(paths, feats):
            if np.isnan(f).any():
                ex.nan_files.append(p.name)
                log.error("features: %s has NaN features; not saved", p.name)
                continue
            save_npy_atomic(out_dir / output_name(p.name), f.astype(np.float32, copy=False), fsync=False)
        seconds = sum(infos[p] for p in paths) / SR
        ex.seconds += seconds
        progress.advance(len(paths), seconds)
    return ex


@dataclass
class _Run:
    """One run of the step: the embedder file found for the provenance record, then what was extracted."""

    ctx: StepContext
    emb_path: Path | None = None
    params: dict[str, Any] = field(default_factory=dict)
    infos: dict[Path, int] = field(default_factory=dict)
    ex: _Extraction = field(default_factory=_Extraction)

    def provenance(self) -> dict[str, Any]:
        self.emb_path = resolve_spec_embedder(self.ctx)
        self.params = _params(self.ctx, self.emb_path)
        return self.params

    def process(self, inputs: list[Path], todo: list[Path], progress: FileProgress) -> None:
        self.infos = _clip_lengths(inputs)  # every input is checked, done or not
        log.info("features: %d files (%.1f s of audio), %d already done", len(inputs),
                 sum(self.infos.values()) / SR, len(inputs) - len(todo))
        if todo:
            self.ex = _extract_all(self.ctx, self.emb_path, todo, self.infos, progress)
        if self.ex.nan_files:
            raise StepFailed(f"NaN in the HuBERT features of {len(self.ex.nan_files)} file(s): "
                             f"{', '.join(self.ex.nan_files)}")


def run(ctx: StepContext) -> dict[str, Any]:
    spec = ctx.spec
    out_dir = ctx.exp_dir / layout.feature_dir(spec.model.version)
    r = _Run(ctx)
    pf = PerFile(IN_DIR, (out_dir.name,), PARAMS_FILE, r.provenance,
                 lambda wav: (out_dir / output_name(wav.name),), pull=(SUMMARY_FILE,), progress_every=0.0,
                 report_seconds=True)
    done = per_file_step(ctx, pf, r.process)
    ex, elapsed = r.ex, done.seconds
    summary: dict[str, Any] = {
        "version": spec.model.version,
        "feature_dir": out_dir.name,
        "dim": spec.model.feature_dim,
        "embedder": spec.features.embedder,
        "embedder_weights": r.params["embedder"],
        "random_weights": r.params["embedder"] == RANDOM,  # the whole folder is the work of one embedder
        "device": ex.device,
        "dtype": ex.dtype,
        "threads": ex.threads,
        "batches": ex.batches,
        "files_total": len(done.inputs),
        "files_written": len(done.todo),
        "files_skipped": done.resumed,
        "audio_seconds": round(sum(r.infos.values()) / SR, 3),
        "extracted_seconds": round(ex.seconds, 3),
        "extract_wall_seconds": round(elapsed, 3),
        "realtime_factor": round(ex.seconds / elapsed, 2) if ex.seconds and elapsed > 0 else None,
    }
    if ctx.shard is None:  # sharded: the merged summary, once (merge_shards)
        _write_summary(ctx, summary)
    return summary


def _write_summary(ctx: StepContext, summary: dict[str, Any]) -> None:
    (ctx.exp_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    ctx.push(SUMMARY_FILE)


def merge_shards(ctx: StepContext, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The step's summary over every shard (steps.shards), also written to features.json."""
    from rvc_pipeline.steps.shards import merge_summaries

    merged = merge_summaries(summaries)
    merged.pop("seconds", None)  # (the step shell's, set by shards.complete)
    for k in ("step", "experiment", "inputs_hash", "shards"):
        merged.pop(k, None)
    _write_summary(ctx, merged)
    return merged
