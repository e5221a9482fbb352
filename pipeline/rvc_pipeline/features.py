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
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from .stepio import StepContext, StepFailed
from .weights import DEMO_WARNING, WeightsNotFound, resolve_weight

log = logging.getLogger("rvc_pipeline")

SR = 16000
IN_DIR = "1_16k_wavs"
SUMMARY_FILE = "features.json"
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


def load_spec_embedder(ctx: StepContext, device: str) -> tuple[Any, bool]:
    """The embedder named by spec.features.embedder; (embedder, random_weights)."""
    from . import hubert

    spec = ctx.spec
    half = bool(spec.features.half_precision)
    try:
        path = resolve_weight(spec.features.embedder, spec, what="HuBERT embedder")
    except WeightsNotFound:
        if not spec.demo_random_weights:
            raise
        msg = DEMO_WARNING.format(what="HuBERT embedder")
        log.warning("!" * 100)
        log.warning(msg)
        log.warning("!" * 100)
        ctx.reporter.event("warning", message=msg)
        return hubert.random_embedder(device, half, seed=0), True
    try:
        return hubert.load_embedder(path, device, half), False
    except ValueError as e:
        raise StepFailed(f"HuBERT embedder {spec.features.embedder}: {e}") from None


def run(ctx: StepContext) -> dict[str, Any]:
    import torch

    spec = ctx.spec
    version = spec.model.version
    out_name = feature_dir_name(version)
    # earlier partial outputs (a preempted run) come back too, so the rerun resumes where it stopped
    ctx.pull(IN_DIR, out_name, SUMMARY_FILE)
    in_dir = ctx.exp_dir / IN_DIR
    out_dir = ctx.exp_dir / out_name
    wavs = sorted(p for p in in_dir.glob("*.wav") if p.is_file()) if in_dir.is_dir() else []
    if not wavs:
        raise StepFailed(f"no .wav files in {in_dir}; run the preprocess step first")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.partial"):
        stale.unlink()

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

    todo = [p for p in wavs if not (out_dir / output_name(p.name)).exists()]
    skipped = len(wavs) - len(todo)
    total_seconds = sum(infos.values()) / SR
    summary_path = ctx.exp_dir / SUMMARY_FILE
    prev = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    random_weights = bool(prev.get("random_weights", False))
    device, dtype, threads, n_batches = "none", "none", 0, 0
    nan_files: list[str] = []
    done_seconds = 0.0
    t0 = time.time()
    log.info("features: %d files (%.1f s of audio), %d already done", len(wavs), total_seconds, skipped)
    if todo:
        device = pick_device(spec)
        if device == "cpu":
            threads = max(1, ctx.workers)
            torch.set_num_threads(threads)
        emb, rw = load_spec_embedder(ctx, device)
        random_weights = random_weights or rw  # any random-weight output taints the whole folder
        dtype = str(emb.dtype).replace("torch.", "")
        log.info(
            "features: HuBERT %s on %s (%s, %d threads)",
            emb.source,
            device,
            dtype,
            threads or torch.get_num_threads(),
        )
        dim = emb.dim(version)
        if dim != spec.model.feature_dim:
            raise StepFailed(
                f"HuBERT embedder {spec.features.embedder}: gives {dim}-d {version} features; an RVC "
                f"{version} model needs {spec.model.feature_dim}-d"
            )
        from .hubert import batches_by_seconds

        todo.sort(key=lambda p: (infos[p], p.name))
        batch_s = float(spec.features.batch_seconds)
        if device == "cpu":  # on CPU big batches only add memory traffic (bench/bench_features.py)
            batch_s = min(batch_s, CPU_BATCH_SECONDS)
        batches = batches_by_seconds([infos[p] for p in todo], batch_s)
        n_batches = len(batches)
        files_done = skipped
        ctx.reporter.event("progress", files_done=files_done, files_total=len(wavs), audio_seconds=0.0)
        last_push = time.time()
        try:
            for batch in ctx.reporter.bar(batches, total=len(batches), desc="features", unit="batch"):
                paths = [todo[i] for i in batch]
                feats = emb.extract([read_16k(p) for p in paths], version)
                for p, f in zip(paths, feats):
                    if np.isnan(f).any():
                        nan_files.append(p.name)
                        log.error("features: %s has NaN features; not saved", p.name)
                        continue
                    save_atomic(out_dir / output_name(p.name), f.astype(np.float32, copy=False))
                files_done += len(paths)
                done_seconds += sum(infos[p] for p in paths) / SR
                ctx.reporter.event(
                    "progress",
                    files_done=files_done,
                    files_total=len(wavs),
                    audio_seconds=round(done_seconds, 3),
                )
                if ctx.remote and time.time() - last_push > PUSH_EVERY_SECONDS:
                    ctx.push(out_name)  # checkpoint progress: a preempted pod loses little
                    last_push = time.time()
        finally:
            if ctx.remote:
                try:
                    ctx.push(out_name)
                except Exception as e:  # noqa: BLE001 - never hide the step's own error
                    log.warning("features: could not push partial outputs: %s", e)
    elapsed = time.time() - t0
    if nan_files:
        raise StepFailed(f"NaN in the HuBERT features of {len(nan_files)} file(s): {', '.join(nan_files)}")
    missing = [p.name for p in wavs if not (out_dir / output_name(p.name)).exists()]
    if missing:
        raise StepFailed(f"no features written for {len(missing)} file(s): {', '.join(missing[:50])}")

    summary: dict[str, Any] = {
        "version": version,
        "feature_dir": out_dir.name,
        "dim": spec.model.feature_dim,
        "embedder": spec.features.embedder,
        "random_weights": random_weights,
        "device": device,
        "dtype": dtype,
        "threads": threads,
        "batches": n_batches,
        "files_total": len(wavs),
        "files_written": len(todo),
        "files_skipped": skipped,
        "audio_seconds": round(total_seconds, 3),
        "extracted_seconds": round(done_seconds, 3),
        "extract_wall_seconds": round(elapsed, 3),
        "realtime_factor": round(done_seconds / elapsed, 2) if done_seconds and elapsed > 0 else None,
    }
    summary_path.write_text(json.dumps(summary, indent=1))
    ctx.push(out_dir.name, SUMMARY_FILE)
    return summary
