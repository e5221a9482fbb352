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
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rvc_pipeline.components.pitch import base as pitch
from rvc_pipeline.components.pitch.base import F0_MAX, F0_MIN, HOP, SR
from rvc_pipeline.core.catalog import PITCH, pitch_needs_gpu
from rvc_pipeline.provenance import read_record, record_changes, write_record
from rvc_pipeline.steps.runner import process_pool

if TYPE_CHECKING:
    from rvc_pipeline.stepio import StepContext

log = logging.getLogger("rvc_pipeline")

__all__ = ["F0_MAX", "F0_MIN", "HOP", "SR", "coarse_f0", "compute_f0", "compute_f0_batch", "run"]

F0_BIN = 256
F0_MEL_MIN = 1127.0 * math.log(1.0 + F0_MIN / 700.0)
F0_MEL_MAX = 1127.0 * math.log(1.0 + F0_MAX / 700.0)

IN_DIR = "1_16k_wavs"
COARSE_DIR = "2a_f0"
NSF_DIR = "2b-f0nsf"
PARAMS_FILE = ".rvc/f0.params.json"
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


def read_16k(path: Path) -> np.ndarray:
    """A 16 kHz mono slice as float32. soundfile reads the float32 WAVs preprocess writes (bit-identical to
    RVC's ffmpeg load_audio for them); anything else goes through ffmpeg."""
    import soundfile as sf

    try:
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
        if sr == SR and x.shape[1] == 1:
            return np.ascontiguousarray(x[:, 0])
    except (sf.LibsndfileError, RuntimeError, ValueError):
        pass
    from rvc_pipeline.audio import load_audio

    return load_audio(path, SR)


def save_npy(path: Path, arr: np.ndarray) -> None:
    """np.save `arr` to exactly `path` (no suffix added), atomically."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


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
        x = read_16k(wav)
    except Exception as e:  # noqa: BLE001 - reported as a StepFailed naming the file
        return _Loaded(item, error=f"{wav.name}: cannot load: {e}")
    if frame_count(len(x)) == 0:
        return _Loaded(item, error=f"{wav.name}: too short ({len(x)} samples, less than one 10 ms frame)")
    if not np.isfinite(x).all():
        return _Loaded(item, error=f"{wav.name}: contains NaN or infinite samples")
    return _Loaded(item, x=x)


def _save(item: tuple[str, str, str], f0: np.ndarray, n_samples: int) -> _Result:
    f0 = np.asarray(f0, dtype=np.float64)
    save_npy(Path(item[1]), f0)
    save_npy(Path(item[2]), coarse_f0(f0))
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
    if not pitch_needs_gpu(method) or not ctx.spec.gpu:
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    log.warning("f0: resources.device is gpu but no CUDA device is visible; %s runs on the CPU", method)
    return "cpu"


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


def _start_or_resume(ctx: StepContext, old: dict[str, Any] | None, params: dict[str, Any]) -> None:
    """Remove partial files; and every output when they were made another way (or by an unknown one)."""
    from rvc_pipeline.stepio import OWNED_OUTPUTS, remove_owned, remove_owned_local

    for d in (NSF_DIR, COARSE_DIR):
        remove_owned_local(ctx.exp_dir / d, ("*.partial",))
        (ctx.exp_dir / d).mkdir(parents=True, exist_ok=True)
    if old == params:
        return
    if any(ctx.exp_dir.joinpath(d).glob("*.npy") for d in (NSF_DIR, COARSE_DIR)):
        log.info("f0: existing outputs were made another way (%s); recomputing all",
                 "; ".join(record_changes(old, params)))
    for d in (NSF_DIR, COARSE_DIR):
        remove_owned_local(ctx.exp_dir / d, OWNED_OUTPUTS["f0"][d])
        if ctx.remote:
            remove_owned(ctx.storage, ctx.name, d)


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
    threads = max(1, len(os.sched_getaffinity(0)) // procs) if procs > 1 else 0
    return procs, per, 1, threads


def _compute(ctx: StepContext, method: str, jobs: list[_Job], procs: int, n_items: int,
             n_skip: int, total: int) -> list[_Result]:
    from rvc_pipeline.stepio import StepFailed

    results: list[_Result] = []
    last_event = 0.0
    ctx.reporter.event("progress", files_done=n_skip, files_total=total)
    last_push = time.time()
    with _Runner(procs, len(jobs), method) as runner:
        for r in ctx.reporter.bar(runner.results(jobs), total=n_items, desc=f"f0 ({method})", unit="file"):
            if r.error:
                runner.cancel()
                raise StepFailed(f"f0: {r.error} (in {IN_DIR}/ of {ctx.exp_key})")
            results.append(r)
            now = time.time()
            if now - last_event >= 1.0 or len(results) == n_items:
                ctx.reporter.event("progress", files_done=n_skip + len(results), files_total=total)
                last_event = now
            if ctx.remote and now - last_push > 120:  # keep a spot-node restart from losing everything
                ctx.push(NSF_DIR, COARSE_DIR)
                last_push = now
    return results


def _voicing(wavs: list[Path], outs: dict[Path, tuple[Path, Path]]) -> tuple[int, int]:
    """(frames, voiced frames) over every output; StepFailed naming the inputs left without one."""
    from rvc_pipeline.stepio import StepFailed

    missing = [w.name for w in wavs if not all(p.is_file() for p in outs[w])]
    if missing:
        raise StepFailed(
            f"f0: no output for {len(missing)} of {len(wavs)} files: {', '.join(missing[:20])}"
            + (" ..." if len(missing) > 20 else "")
        )
    frames = voiced = 0
    for w in wavs:
        f0 = np.load(outs[w][0])
        frames += len(f0)
        voiced += int((f0 > 0).sum())
    return frames, voiced


def run(ctx: StepContext) -> dict[str, Any]:
    from rvc_pipeline.stepio import StepFailed

    spec = ctx.spec
    if not spec.model.pitch_guidance:
        return {"skipped_reason": "model without pitch"}
    method = spec.f0.method
    opts = _method_opts(ctx, method)
    device = opts["device"]

    ctx.pull(IN_DIR)
    exp = ctx.exp_dir
    in_dir, nsf_dir, coarse_dir = exp / IN_DIR, exp / NSF_DIR, exp / COARSE_DIR
    wavs = sorted(p for p in in_dir.glob("*.wav") if "spec" not in p.name) if in_dir.is_dir() else []
    if not wavs:
        raise StepFailed(f"f0: no input files in {IN_DIR}/ of {ctx.exp_key} (run preprocess first)")

    # resume: reuse outputs of an interrupted run made the same way, else start over (never mix)
    params = _params(ctx, method, opts)
    ctx.pull(PARAMS_FILE, NSF_DIR, COARSE_DIR)
    pfile = exp / PARAMS_FILE
    _start_or_resume(ctx, read_record(pfile), params)
    write_record(pfile, params)
    ctx.push(PARAMS_FILE)

    outs = {w: (nsf_dir / (w.name + ".npy"), coarse_dir / (w.name + ".npy")) for w in wavs}
    todo = [w for w in wavs if not _done(w, *outs[w])]
    n_skip = len(wavs) - len(todo)
    if n_skip:
        log.info("f0: %d of %d files already done, resuming", n_skip, len(wavs))

    items = [(str(w), str(outs[w][0]), str(outs[w][1])) for w in todo]
    procs, per, batch_files, threads = _plan(todo, method, device != "cpu", max(1, ctx.workers))
    jobs = [_Job(method, opts, ch, threads, batch_files) for ch in _chunks(items, per)]
    t0 = time.time()
    results = _compute(ctx, method, jobs, procs, len(items), n_skip, len(wavs))
    compute_s = time.time() - t0
    frames, voiced = _voicing(wavs, outs)
    ctx.push(NSF_DIR, COARSE_DIR)
    audio_s = sum(r.samples for r in results) / SR
    return {
        "files": len(wavs),
        "computed": len(results),
        "resumed": n_skip,
        "frames": frames,
        "voiced_ratio": round(voiced / frames, 4) if frames else 0.0,
        "method": method,
        "device": device,
        "processes": procs,
        "compute_seconds": round(compute_s, 3),
        "audio_seconds": round(audio_s, 3),
        "realtime_factor": round(audio_s / compute_s, 1) if compute_s > 0 and audio_s else None,
        **{k: v for k, v in params.items() if k.endswith("_weights")},
    }


class _Runner:
    """Runs jobs inline (one process) or on a process pool; yields per-file results.

    The pool starts by the one start-method rule (steps.runner.start_method): pm/harvest/dio workers
    are forked while torch is not loaded; workers of network methods (crepe, rmvpe, fcpe ...) never are
    (torch does not survive fork)."""

    def __init__(self, procs: int, n_jobs: int, method: str) -> None:
        self.pool: ProcessPoolExecutor | None = None
        self.futures: list[Future[list[_Result]]] = []
        if procs > 1 and n_jobs > 1:
            self.pool = process_pool(procs, torch_workers=pitch_needs_gpu(method))

    def __enter__(self) -> _Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def cancel(self) -> None:
        for f in self.futures:
            f.cancel()

    def results(self, jobs: list[_Job]) -> Iterator[_Result]:
        if self.pool is None:
            for job in jobs:
                yield from process_chunk(job)
            return
        self.futures = [self.pool.submit(process_chunk, job) for job in jobs]
        for fut in as_completed(self.futures):
            yield from fut.result()
