"""Step 2b (pitch): f0 of every 16 kHz slice, saved as RVC does.

For each `1_16k_wavs/<name>.wav` (names containing "spec" are skipped, as in RVC) this writes
`2b-f0nsf/<name>.wav.npy` (f0 in Hz, float64, 0 = unvoiced, one value per 10 ms frame) and
`2a_f0/<name>.wav.npy` (RVC's coarse mel bins 1..255, int64). Both are `np.save(dir / "<name>.wav", a)`
files, so they are interchangeable with RVC's.

Methods are the files of rvc_pipeline.components.pitch (listed by rvc_pipeline.core.catalog): pm, harvest,
dio, crepe, rmvpe, fcpe ... Every method returns exactly p_len = len(x)//160 frames; frame i is centred on
sample 160*i (pm: RVC's centred zero padding). RVC itself saves len//160 + 1 frames for pyworld/rmvpe;
training never reads the last one (the data loader cuts pitch to the feature length).

The pure functions (`compute_f0`, `coarse_f0`) take and return arrays; `run(ctx)` is the step. CPU methods
run in `ctx.workers` processes, each taking chunks of files (no per-file start-up, models loaded once per
process); methods with a network (catalog: needs_gpu) on a GPU run in one process, batched. A rerun
skips files whose outputs exist (resume after an interruption) as long as the method and settings are
unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rvc_pipeline.audio import load_audio
from rvc_pipeline.components.pitch import base as pitch
from rvc_pipeline.components.pitch.base import F0_MAX, F0_MIN, HOP, SR
from rvc_pipeline.core import layout
from rvc_pipeline.core.catalog import PITCH, pitch_needs_gpu
from rvc_pipeline.core.fileio import pick_device, read_16k, save_npy_atomic
from rvc_pipeline.steps.processes import cpu_count, parallel_map

if TYPE_CHECKING:
    from rvc_pipeline.steps.runner import FileProgress, StepContext

log = logging.getLogger("rvc_pipeline")

__all__ = ["F0_MAX", "F0_MIN", "HOP", "SR", "coarse_f0", "compute_f0", "compute_f0_batch", "run"]

F0_BIN = 256
F0_MEL_MIN = 1127.0 * math.log(1.0 + F0_MIN / 700.0)
F0_MEL_MAX = 1127.0 * math.log(1.0 + F0_MAX / 700.0)

IN_DIR = layout.WAVS_16K_DIR
COARSE_DIR = layout.F0_COARSE_DIR
NSF_DIR = layout.F0_NSF_DIR
PARAMS_FILE = layout.params_file("f0")
PARAMS_VERSION = 1


# ------------------------------------------------------------------------------------------------
# pure functions


def coarse_f0(f0: np.ndarray) -> np.ndarray:
    """RVC's coarse pitch: mel scale mapped to integer bins 1..255 (unvoiced and <= 50 Hz -> 1)."""
    f = np.asarray(f0, dtype=np.float64)
    mel = 1127.0 * np.log(1.0 + f / 700.0)
    voiced = mel > 0
    mel[voiced] = (mel[voiced] - F0_MEL_MIN) * (F0_BIN - 2) / (F0_MEL_MAX - F0_MEL_MIN) + 1.0
    mel[mel <= 1.0] = 1.0
    mel[mel > F0_BIN - 1] = F0_BIN - 1
    coarse = np.rint(mel).astype(np.int64)
    if coarse.size and not (coarse.min() >= 1 and coarse.max() <= 255):
        raise ValueError(f"coarse f0 out of range 1..255: {coarse.min()}..{coarse.max()}")
    return coarse


def frame_count(n_samples: int) -> int:
    """RVC's p_len: one f0 frame per 160 samples (10 ms at 16 kHz)."""
    return n_samples // HOP


def _check_audio(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"audio: expected a 1-D 16 kHz signal, got shape {list(x.shape)}")
    if x.size and not np.isfinite(x).all():
        raise ValueError("audio: contains NaN or infinite samples")
    return x


def compute_f0(x: np.ndarray, method: str, p_len: int | None = None, **opts: Any) -> np.ndarray:
    """f0 in Hz (float64, 0 = unvoiced) per 10 ms frame of 16 kHz audio `x`, p_len frames (len(x)//160).

    opts are the method's (see its class in rvc_pipeline.components.pitch), e.g. crepe: `model`, `device`;
    rmvpe: `checkpoint` or `rmvpe` (a loaded RMVPE), `threshold`; fcpe: `device`, `threshold`.
    """
    x = _check_audio(x)
    if p_len is None:
        p_len = frame_count(len(x))
    tracker = pitch.get(method)  # ValueError naming the choices
    if p_len <= 0:
        return np.zeros(0)
    return tracker.extract([x], [p_len], **opts)[0]


def compute_f0_batch(
    xs: Sequence[np.ndarray], method: str, p_lens: Sequence[int] | None = None, **opts: Any
) -> list[np.ndarray]:
    """compute_f0 for several signals; methods with a network run it on batches across signals."""
    xs = [_check_audio(x) for x in xs]
    lens = list(p_lens) if p_lens is not None else [frame_count(len(x)) for x in xs]
    return pitch.get(method).extract(xs, lens, **opts)


# ------------------------------------------------------------------------------------------------
# worker side


@dataclass
class _Job:
    method: str
    opts: dict[str, Any]
    items: list[tuple[str, str, str]]  # (wav, nsf output, coarse output)
    torch_threads: int = 0
    batch_files: int = 1


@dataclass
class _Result:
    name: str
    frames: int = 0
    voiced: int = 0
    samples: int = 0
    error: str | None = None


@dataclass
class _Loaded:
    item: tuple[str, str, str]
    x: np.ndarray | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _load(item: tuple[str, str, str]) -> _Loaded:
    wav = Path(item[0])
    try:
        x = read_16k(wav, decode=load_audio)  # the float32 WAVs of preprocess; anything else via ffmpeg
    except Exception as e:  # noqa: BLE001 - reported as a StepFailed naming the file
        return _Loaded(item, error=f"{wav.name}: cannot load: {e}")
    if frame_count(len(x)) == 0:
        return _Loaded(item, error=f"{wav.name}: too short ({len(x)} samples, less than one 10 ms frame)")
    if not np.isfinite(x).all():
        return _Loaded(item, error=f"{wav.name}: contains NaN or infinite samples")
    return _Loaded(item, x=x)


def _save(item: tuple[str, str, str], f0: np.ndarray, n_samples: int) -> _Result:
    f0 = np.asarray(f0, dtype=np.float64)
    save_npy_atomic(item[1], f0, fsync=False)  # bulk per-file outputs (see core.fileio.atomic_path)
    save_npy_atomic(item[2], coarse_f0(f0), fsync=False)
    return _Result(Path(item[0]).name, len(f0), int((f0 > 0).sum()), n_samples)


def process_chunk(job: _Job) -> list[_Result]:
    """Compute and save f0 for a chunk of files (runs in a worker process or inline)."""
    if pitch_needs_gpu(job.method) and job.torch_threads > 0:
        import torch

        torch.set_num_threads(job.torch_threads)
    out: list[_Result] = []
    step = max(1, job.batch_files)
    for s in range(0, len(job.items), step):
        loaded = [_load(it) for it in job.items[s : s + step]]
        good = [ld for ld in loaded if ld.x is not None]
        out += [_Result(Path(ld.item[0]).name, error=ld.error) for ld in loaded if ld.error]
        if not good:
            continue
        try:
            xs = [ld.x for ld in good if ld.x is not None]
            f0s = compute_f0_batch(xs, job.method, **job.opts)
        except Exception as e:  # noqa: BLE001 - name the files, then the step fails
            names = ", ".join(Path(ld.item[0]).name for ld in good)
            out.append(_Result(names, error=f"{names}: f0 ({job.method}) failed: {type(e).__name__}: {e}"))
            continue
        for ld, f0, x in zip(good, f0s, xs):
            out.append(_save(ld.item, f0, len(x)))
    return out


# ------------------------------------------------------------------------------------------------
# the step


def _params(ctx: StepContext, method: str, opts: dict[str, Any]) -> dict[str, Any]:
    """What makes the outputs (their provenance): a difference from the recorded one recomputes all."""
    p: dict[str, Any] = {"version": PARAMS_VERSION, "method": method, "hop": HOP, "frames": "len//160"}
    return {**p, **pitch.get(method).provenance(ctx.spec, opts)}


def _device(ctx: StepContext, method: str) -> str:
    return pick_device("gpu" if pitch_needs_gpu(method) and ctx.spec.gpu else "cpu", what=f"f0 ({method})")


def _useful_procs(wavs: list[Path], method: str) -> int:
    """Worker processes worth starting: about one per second of estimated single-process work, so a
    handful of short files is not slowed down by pool start-up."""
    audio_s = sum(max(0, w.stat().st_size - 58) / 4 for w in wavs) / SR  # float32 samples
    return max(1, math.ceil(audio_s / PITCH[method].speed))


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _done(wav: Path, nsf: Path, coarse: Path) -> bool:
    """Outputs exist and match the input's frame count (a re-sliced input of another length is redone)."""
    if not (nsf.is_file() and coarse.is_file()):
        return False
    try:
        import soundfile as sf

        want = frame_count(sf.info(str(wav)).frames)
        return all(np.load(p, mmap_mode="r").shape == (want,) for p in (nsf, coarse))
    except Exception:  # noqa: BLE001 - unreadable output or input: redo it
        return False


def _method_opts(ctx: StepContext, method: str) -> dict[str, Any]:
    return {**pitch.get(method).spec_options(ctx.spec), "device": _device(ctx, method)}


def _plan(todo: list[Path], method: str, gpu: bool, workers: int) -> tuple[int, int, int, int]:
    """(processes, files per job, files per batch, torch threads per process)."""
    if gpu:
        return 1, 64, 64, 0
    n = len(todo)
    procs = min(workers, n, _useful_procs(todo, method)) if n else 1
    if pitch_needs_gpu(method):  # a torch process already uses several cores: >= 4 threads each
        procs = min(procs, max(1, workers // 4))
    per = max(1, min(32, math.ceil(n / (procs * 4)))) if n else 1
    threads = max(1, cpu_count() // procs) if procs > 1 else 0
    return procs, per, 1, threads


def _outputs(exp_dir: Path) -> Callable[[Path], tuple[Path, Path]]:
    """An input's outputs: (Hz in 2b-f0nsf/, coarse in 2a_f0/), both named `<input name>.npy`."""
    return lambda wav: (exp_dir / NSF_DIR / (wav.name + ".npy"), exp_dir / COARSE_DIR / (wav.name + ".npy"))


@dataclass
class _Computed:
    processes: int
    results: list[_Result]


def _compute(ctx: StepContext, method: str, opts: dict[str, Any], todo: list[Path],
             progress: FileProgress) -> _Computed:
    """f0 of every file in `todo`, in chunks over the planned worker processes."""
    from rvc_pipeline.core.errors import StepFailed

    outs = _outputs(ctx.exp_dir)
    items = [(str(w), *map(str, outs(w))) for w in todo]
    procs, per, batch_files, threads = _plan(todo, method, opts["device"] != "cpu", max(1, ctx.workers))
    jobs = [_Job(method, opts, ch, threads, batch_files) for ch in _chunks(items, per)]
    # pm/harvest/dio workers are forked (torch not loaded); those of network methods never are
    done = parallel_map(process_chunk, jobs, procs if len(jobs) > 1 else 1,
                        torch_workers=pitch_needs_gpu(method))
    results: list[_Result] = []
    with closing(done):  # an error below shuts the pool down before it propagates
        per_file = (r for _job, chunk in done for r in chunk)
        for r in progress.bar(per_file, total=len(items), desc=f"f0 ({method})"):
            if r.error:
                raise StepFailed(f"f0: {r.error} (in {IN_DIR}/ of {ctx.exp_key})")
            results.append(r)
            progress.advance(1)
    return _Computed(procs, results)


def _voicing(wavs: list[Path], outs: Callable[[Path], tuple[Path, Path]]) -> tuple[int, int]:
    """(frames, voiced frames) over every output."""
    frames = voiced = 0
    for w in wavs:
        f0 = np.load(outs(w)[0])
        frames += len(f0)
        voiced += int((f0 > 0).sum())
    return frames, voiced


def run(ctx: StepContext) -> dict[str, Any]:
    from rvc_pipeline.steps.runner import PerFile, per_file_step  # (not at import: pool workers import f0)

    if not ctx.spec.model.pitch_guidance:
        return {"skipped_reason": "model without pitch"}
    method = ctx.spec.f0.method
    opts = _method_opts(ctx, method)
    outs = _outputs(ctx.exp_dir)
    params = _params(ctx, method, opts)
    pf = PerFile(IN_DIR, (NSF_DIR, COARSE_DIR), PARAMS_FILE, lambda: params, outs,
                 done=lambda w: _done(w, *outs(w)), select=lambda w: "spec" not in w.name)  # as RVC
    done = per_file_step(ctx, pf, lambda inputs, todo, progress: _compute(ctx, method, opts, todo, progress))
    computed = done.result
    frames, voiced = _voicing(done.inputs, outs)
    audio_s = sum(r.samples for r in computed.results) / SR
    return {
        "files": len(done.inputs),
        "computed": len(computed.results),
        "resumed": done.resumed,
        "frames": frames,
        "voiced_frames": voiced,
        "voiced_ratio": round(voiced / frames, 4) if frames else 0.0,
        "method": method,
        "device": opts["device"],
        "processes": computed.processes,
        "compute_seconds": round(done.seconds, 3),
        "audio_seconds": round(audio_s, 3),
        "realtime_factor": round(audio_s / done.seconds, 1) if done.seconds > 0 and audio_s else None,
        **{k: v for k, v in params.items() if k.endswith("_weights")},
    }


def merge_shards(ctx: StepContext, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The step's summary over every shard (steps.shards): counts summed, the voiced ratio recomputed."""
    from rvc_pipeline.steps.shards import merge_summaries

    merged = merge_summaries(summaries)
    frames, voiced = merged.get("frames"), merged.get("voiced_frames")
    if isinstance(frames, int) and isinstance(voiced, int):
        merged["voiced_ratio"] = round(voiced / frames, 4) if frames else 0.0
    return merged
