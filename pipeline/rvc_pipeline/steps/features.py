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
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from rvc_pipeline.provenance import RANDOM, read_record, record_changes, weight_identity, write_record
from rvc_pipeline.stepio import OWNED_OUTPUTS, StepContext, StepFailed, remove_owned, remove_owned_local
from rvc_pipeline.weights import DEMO_WARNING, WeightsNotFound, resolve_weight

log = logging.getLogger("rvc_pipeline")

SR = 16000
IN_DIR = "1_16k_wavs"
SUMMARY_FILE = "features.json"
PARAMS_FILE = ".rvc/features.params.json"  # what made the outputs (see provenance.py)
PARAMS_VERSION = 1
PUSH_EVERY_SECONDS = 120.0
CPU_BATCH_SECONDS = 16.0
"""Batch cap on CPU: per-clip CPU time is flat from 1 to 16 clips of 3.7 s, fewer/larger ops help threads."""


def feature_dir_name(version: str) -> str:
    return "3_feature256" if version == "v1" else "3_feature768"


def output_name(wav_name: str) -> str:
    """RVC's naming: every 'wav' in the file name becomes 'npy' (0_1.wav -> 0_1.npy)."""
    return wav_name.replace("wav", "npy")


def read_16k(path: Path) -> np.ndarray:
    """Mono float32 samples of a 16 kHz file (stereo averaged); StepFailed naming the file otherwise."""
    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise StepFailed(f"{path.name}: cannot read audio: {e}") from None
    if sr != SR:
        raise StepFailed(f"{path.name}: sample rate {sr} Hz; features need 16000 Hz files in {IN_DIR}/")
    return audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]


def save_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def pick_device(spec: Any) -> str:
    import torch

    if spec.resources.device == "gpu":
        if torch.cuda.is_available():
            return "cuda"
        log.warning("features: resources.device is gpu but CUDA is not available; running on CPU")
    return "cpu"


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
    half = bool(spec.features.half_precision)
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
    return {"version": PARAMS_VERSION, "embedder": weight_identity(emb_path),
            "model_version": spec.model.version, "dim": spec.model.feature_dim}


def _start_or_resume(ctx: StepContext, out_name: str, params: dict[str, Any]) -> None:
    """Remove partial files, and every output when they were made another way (or by an unknown one),
    then record how this run makes them (before any output is written)."""
    out_dir = ctx.exp_dir / out_name
    remove_owned_local(out_dir, ("*.partial",))
    out_dir.mkdir(parents=True, exist_ok=True)
    pfile = ctx.exp_dir / PARAMS_FILE
    old = read_record(pfile)
    if old != params:
        if any(out_dir.glob("*.npy")):
            log.info("features: existing outputs were made another way (%s); recomputing all",
                     "; ".join(record_changes(old, params)))
        remove_owned_local(out_dir, OWNED_OUTPUTS["features"][out_name])
        if ctx.remote:
            remove_owned(ctx.storage, ctx.name, out_name)
        write_record(pfile, params)
    ctx.push(PARAMS_FILE)


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
    ex.device = pick_device(spec)
    if ex.device == "cpu":
        ex.threads = max(1, ctx.workers)
        torch.set_num_threads(ex.threads)
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
                 files_total: int) -> _Extraction:
    """Features of every file in `todo`, batched by length; pushed every few minutes on S3."""
    from rvc_pipeline.components.embedders.base import batches_by_seconds

    spec, ex = ctx.spec, _Extraction()
    emb = _embedder_for_run(ctx, emb_path, ex)
    out_name = feature_dir_name(spec.model.version)
    todo.sort(key=lambda p: (infos[p], p.name))
    batch_s = float(spec.features.batch_seconds)
    if ex.device == "cpu":  # on CPU big batches only add memory traffic (bench/bench_features.py)
        batch_s = min(batch_s, CPU_BATCH_SECONDS)
    batches = batches_by_seconds([infos[p] for p in todo], batch_s)
    ex.batches = len(batches)
    files_done = files_total - len(todo)
    ctx.reporter.event("progress", files_done=files_done, files_total=files_total, audio_seconds=0.0)
    last_push = time.time()
    try:
        for batch in ctx.reporter.bar(batches, total=len(batches), desc="features", unit="batch"):
            paths = [todo[i] for i in batch]
            feats = emb.extract([read_16k(p) for p in paths], spec.model.version)
            for p, f in zip(paths, feats):
                if np.isnan(f).any():
                    ex.nan_files.append(p.name)
                    log.error("features: %s has NaN features; not saved", p.name)
                    continue
                save_atomic(ctx.exp_dir / out_name / output_name(p.name), f.astype(np.float32, copy=False))
            files_done += len(paths)
            ex.seconds += sum(infos[p] for p in paths) / SR
            ctx.reporter.event("progress", files_done=files_done, files_total=files_total,
                               audio_seconds=round(ex.seconds, 3))
            if ctx.remote and time.time() - last_push > PUSH_EVERY_SECONDS:
                ctx.push(out_name)  # checkpoint progress: a preempted pod loses little
                last_push = time.time()
    finally:
        if ctx.remote:
            try:
                ctx.push(out_name)
            except Exception as e:  # noqa: BLE001 - never hide the step's own error
                log.warning("features: could not push partial outputs: %s", e)
    return ex


def run(ctx: StepContext) -> dict[str, Any]:
    spec = ctx.spec
    version = spec.model.version
    out_name = feature_dir_name(version)
    # earlier partial outputs (a preempted run) come back too, so the rerun resumes where it stopped
    ctx.pull(IN_DIR, out_name, SUMMARY_FILE, PARAMS_FILE)
    in_dir = ctx.exp_dir / IN_DIR
    out_dir = ctx.exp_dir / out_name
    wavs = sorted(p for p in in_dir.glob("*.wav") if p.is_file()) if in_dir.is_dir() else []
    if not wavs:
        raise StepFailed(f"no .wav files in {in_dir}; run the preprocess step first")
    emb_path = resolve_spec_embedder(ctx)
    params = _params(ctx, emb_path)
    _start_or_resume(ctx, out_name, params)
    infos = _clip_lengths(wavs)

    todo = [p for p in wavs if not (out_dir / output_name(p.name)).exists()]
    skipped = len(wavs) - len(todo)
    total_seconds = sum(infos.values()) / SR
    t0 = time.time()
    log.info("features: %d files (%.1f s of audio), %d already done", len(wavs), total_seconds, skipped)
    ex = _extract_all(ctx, emb_path, todo, infos, len(wavs)) if todo else _Extraction()
    elapsed = time.time() - t0
    if ex.nan_files:
        raise StepFailed(f"NaN in the HuBERT features of {len(ex.nan_files)} file(s): "
                         f"{', '.join(ex.nan_files)}")
    missing = [p.name for p in wavs if not (out_dir / output_name(p.name)).exists()]
    if missing:
        raise StepFailed(f"no features written for {len(missing)} file(s): {', '.join(missing[:50])}")

    summary: dict[str, Any] = {
        "version": version,
        "feature_dir": out_dir.name,
        "dim": spec.model.feature_dim,
        "embedder": spec.features.embedder,
        "embedder_weights": params["embedder"],
        "random_weights": params["embedder"] == RANDOM,  # the whole folder is the work of one embedder
        "device": ex.device,
        "dtype": ex.dtype,
        "threads": ex.threads,
        "batches": ex.batches,
        "files_total": len(wavs),
        "files_written": len(todo),
        "files_skipped": skipped,
        "audio_seconds": round(total_seconds, 3),
        "extracted_seconds": round(ex.seconds, 3),
        "extract_wall_seconds": round(elapsed, 3),
        "realtime_factor": round(ex.seconds / elapsed, 2) if ex.seconds and elapsed > 0 else None,
    }
    (ctx.exp_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    ctx.push(out_dir.name, SUMMARY_FILE)
    return summary
