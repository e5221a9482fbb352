"""The step runner: the I/O shell every step runs in, the local multi-step runner, and the skeleton of
the per-file resumable steps (f0, features).

A step is `run(ctx: StepContext) -> dict` (a JSON-able summary). `run_step`:
1. checks the step's inputs (`stepio.INPUT_CHECKS`: the dataset for preprocess, the prerequisites' markers
   and outputs for the others) when asked to (`check_inputs=True`, as the CLI and the operator's Jobs do);
   nothing is invalidated or deleted before this check has passed;
2. deletes the step's completion marker (and those of later steps), so half-written output is never
   taken as complete, then the stale per-file outputs of later steps: only files the steps own, by name,
   inside logs/<experiment>/, never through a symlink (`stepio.OWNED_OUTPUTS`);
3. pulls the inputs the step needs from storage into local scratch (`ctx.pull`);
4. runs the step on local files under `ctx.exp_dir` (= <scratch>/logs/<experiment>/);
5. pushes the outputs (`ctx.push`), then writes the completion marker last.
A rerun skips a step whose marker exists (unless forced, or the spec fields it depends on or the
inputs its check fingerprints, such as the dataset manifest, changed since).

With local storage the experiment folder in storage *is* the working folder: nothing is copied.
What lies in storage (markers, owned outputs, input checks) is `stepio`'s; which process is primary and
how pools start is `steps.processes`' (re-exported here).
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from rvc_pipeline import stepio
from rvc_pipeline.core.errors import StepFailed
from rvc_pipeline.core.layout import PROGRESS_FILE, marker_key
from rvc_pipeline.core.spec import STEP_ORDER, Experiment, step_hashes
from rvc_pipeline.core.storage import Storage, same_content, scratch_dir
from rvc_pipeline.lease import check_current
from rvc_pipeline.progress import Reporter
from rvc_pipeline.provenance import read_record, record_changes, write_record
from rvc_pipeline.stepio import CheckedInputs, parallel_threads, under
from rvc_pipeline.steps.processes import (
    cpu_count,
    default_workers,
    is_primary,
    parallel_map,
    process_pool,
    start_method,
)

__all__ = ["PerFile", "StepContext", "cpu_count", "default_workers", "is_primary", "parallel_map",
           "per_file_step", "process_pool", "run_step", "run_steps", "start_method", "writer_lease"]

log = logging.getLogger("rvc_pipeline")
T = TypeVar("T")

StepFunction = Callable[["StepContext"], dict[str, Any]]

# step name -> "module:function"; modules are imported lazily so that `--help` stays fast and
# importing the spec never imports torch.
STEPS: dict[str, str] = {
    "preprocess": "rvc_pipeline.steps.preprocess:run",
    "f0": "rvc_pipeline.steps.f0:run",
    "features": "rvc_pipeline.steps.features:run",
    "train": "rvc_pipeline.steps.train:run",
    "index": "rvc_pipeline.steps.index:run",
}


def step_function(step: str) -> StepFunction:
    mod, _, fn = STEPS[step].partition(":")
    return getattr(importlib.import_module(mod), fn)


@dataclass
class StepContext:
    experiment: Experiment
    step: str
    storage: Storage
    workdir: Path  # contains logs/<experiment>/
    reporter: Reporter
    workers: int
    checked: CheckedInputs = field(default_factory=CheckedInputs)
    _pulled: set[str] = field(default_factory=set)

    @property
    def spec(self):  # noqa: ANN201 - ExperimentSpec
        return self.experiment.spec

    @property
    def name(self) -> str:
        return self.experiment.name

    @property
    def exp_key(self) -> str:
        return f"logs/{self.name}"

    @property
    def exp_dir(self) -> Path:
        return self.workdir / "logs" / self.name

    @property
    def remote(self) -> bool:
        return self.storage.local_path() is None

    def pull(self, *subpaths: str) -> None:
        """Download logs/<exp>/<sub> (files or folders) into exp_dir, skipping identical local files.

        "Identical" is same size and, on S3, same ETag (a rerun's features have the same size but new
        values, so size alone would keep stale files in a reused work folder).
        """
        if not self.remote:
            return
        for sub in subpaths:
            base = f"{self.exp_key}/{sub}"
            objs = [o for o in self.storage.list(base) if under(o.key, base)]
            todo = [(o.key, self.workdir / o.key) for o in objs if not same_content(self.workdir / o.key, o)]
            parallel_threads(lambda kd: self.storage.download(kd[0], kd[1]), todo)
            self._pulled.add(sub)

    def push(self, *subpaths: str, mirror: bool = False) -> None:
        """Upload exp_dir/<sub> (files or folders) to storage; identical stored objects are skipped.

        With `mirror=True`, stored objects under a pushed *folder* that no longer exist locally are
        deleted, so a rerun that makes fewer files (preprocess with other settings) leaves no stale ones
        for the next step to pick up. Use it only for folders the step owns and writes completely.
        """
        check_current()
        if not self.remote:
            return
        for sub in subpaths:
            local = self.exp_dir / sub
            if local.is_file():
                files = [local]
            elif local.is_dir():
                files = [p for p in sorted(local.rglob("*"))
                         if p.is_file() and not p.name.endswith(".partial")]
            else:
                continue
            base = f"{self.exp_key}/{sub}"
            have = {o.key: o for o in self.storage.list(base) if under(o.key, base)}
            keys = [(p, p.relative_to(self.workdir).as_posix()) for p in files]
            todo = [(p, k) for p, k in keys if k not in have or not same_content(p, have[k])]
            parallel_threads(lambda pk: self.storage.upload(pk[0], pk[1]), todo)
            if mirror and local.is_dir():
                keep = {k for _, k in keys}
                parallel_threads(self.storage.delete, [k for k in have if k not in keep])

    def push_file(self, path: Path) -> None:
        check_current()
        if self.remote:
            self.storage.upload(path, Path(path).relative_to(self.workdir).as_posix())


# ------------------------------------------------------------------------------------- one step
def _fresh_marker(storage: Storage, name: str, step: str, inputs_hash: str,
                  checked: CheckedInputs) -> tuple[dict[str, Any] | None, str | None]:
    """(stored summary, None) when the step completed for these inputs; (None, why) when it completed
    for other ones (rerun it from scratch); (None, None) when it has not completed."""
    if not stepio.is_complete(storage, name, step):
        return None, None
    summary = stepio.read_marker(storage, name, step)
    if summary is None:
        return None, f"its marker {marker_key(name, step)} is unreadable"
    done_hash = summary.get("inputs_hash")
    if done_hash not in (None, inputs_hash):
        return None, f"the spec changed since this step ran (inputs {done_hash} -> {inputs_hash})"
    for key, value in checked.fingerprint.items():
        old = summary.get(key)
        if old is None:
            log.warning("%s: the marker has no %s (made by an older version); not compared", step, key)
        elif old != value:
            return None, f"its inputs changed since it ran ({key} {old} -> {value})"
    return summary, None


def _invalidate(storage: Storage, name: str, step: str, force: bool) -> None:
    """Before the step runs (primary only): refuse linked output folders, delete the markers of this and
    later steps, and the per-file outputs that would otherwise be resumed from wrongly."""
    own = list(stepio.OWNED_OUTPUTS.get(step, ()))
    stepio.check_owned_folders(storage, name, stepio.stale_folders(step, force) + own)
    stepio.invalidate_from(storage, name, step)
    stepio.clear_stale_outputs(storage, name, step, force)


def run_step(
    exp: Experiment,
    step: str,
    fn: StepFunction,
    *,
    force: bool = False,
    workdir: Path | None = None,
    keep_scratch: bool = False,
    check_inputs: bool = False,
) -> dict[str, Any]:
    """Run one step through the I/O shell. Returns its summary (or the stored one if skipped).

    With `check_inputs` the step's input check (INPUT_CHECKS) runs first: a step whose inputs are
    missing, empty or unfinished fails (StepFailed) before any marker or output is touched."""
    storage = stepio.open_artifacts(exp)
    name = exp.name
    # Under torchrun (and on every node of multi-node training) each process runs this shell; the primary
    # one alone owns markers, events and uploads.
    primary = is_primary()
    inputs_hash = step_hashes(exp)[step]
    checked = stepio.INPUT_CHECKS[step](exp, storage) if check_inputs else CheckedInputs()
    if not force:
        summary, why = _fresh_marker(storage, name, step, inputs_hash, checked)
        if summary is not None:
            summary["skipped"] = True
            log.info("%s: already complete (marker %s), skipping", step, marker_key(name, step))
            return summary
        if why:  # recompute everything it makes
            log.info("%s: %s; running it again", step, why)
            force = True
    if primary:
        _invalidate(storage, name, step, force)
    local = storage.local_path()
    own_scratch = local is None and workdir is None
    wd = local if local is not None else Path(workdir) if workdir is not None else \
        scratch_dir(f"rvc-{name}-{step}-")
    try:
        ctx_args = (storage, wd, default_workers(exp.spec.resources.parallelism))
        return _execute(exp, step, fn, ctx_args, checked, primary, inputs_hash)
    finally:
        if own_scratch and not keep_scratch:
            shutil.rmtree(wd, ignore_errors=True)


def _execute(exp: Experiment, step: str, fn: StepFunction, ctx_args: tuple[Storage, Path, int],
             checked: CheckedInputs, primary: bool, inputs_hash: str) -> dict[str, Any]:
    storage, wd, workers = ctx_args
    name = exp.name
    exp_dir = wd / "logs" / name
    exp_dir.mkdir(parents=True, exist_ok=True)
    reporter = Reporter(exp_dir, name, step, exp.spec.metrics.pushgateway)
    ctx = StepContext(exp, step, storage, wd, reporter, workers, checked)
    # the progress log of earlier steps, so that pushing it back appends rather than replaces
    ctx.pull(PROGRESS_FILE)
    t0 = time.time()
    if not primary:
        return fn(ctx) or {}
    reporter.event("start")
    try:
        summary = fn(ctx) or {}
    except Exception as e:
        reporter.event("failed", error=str(e)[:2000])
        try:
            ctx.push(PROGRESS_FILE)
        except Exception as pe:  # noqa: BLE001 - never hide the step's own error
            log.warning("%s: could not upload %s after the failure: %s", step, PROGRESS_FILE, pe)
        raise
    summary = {"step": step, "experiment": name, "seconds": round(time.time() - t0, 3),
               "inputs_hash": inputs_hash, **summary}
    reporter.event("done", seconds=summary["seconds"])
    ctx.push(PROGRESS_FILE)
    check_current()  # a writer that lost its lease must not mark the step complete
    storage.write_bytes(marker_key(name, step), json.dumps(summary, indent=1, default=str).encode())
    return summary


# ------------------------------------------------------------------------------------- many steps
def writer_lease(exp: Experiment) -> AbstractContextManager[object]:
    """One writer per experiment (rvc_pipeline.lease): every command that writes it (each step, run,
    demo) holds the lease; a second one fails at once with LeaseHeld naming the holder."""
    from rvc_pipeline.lease import hold

    return hold(stepio.open_artifacts(exp), exp.name)


def run_steps(exp: Experiment, steps: list[str] | None = None, force: bool = False) -> list[dict[str, Any]]:
    """The local runner: every requested step in recipe order, each through the I/O shell."""
    todo = [s for s in STEP_ORDER if s in (steps or exp.spec.steps)]
    summaries = []
    with writer_lease(exp):
        for s in todo:
            t0 = time.time()
            log.info("== %s: %s", exp.name, s)
            summary = run_step(exp, s, step_function(s), force=force, check_inputs=True)
            summaries.append(summary)
            took = f"done in {time.time() - t0:.1f}s"
            state = "skipped (already complete)" if summary.get("skipped") else took
            log.info("== %s: %s %s", exp.name, s, state)
    return summaries


# ------------------------------------------------------------------------------------- per-file steps
PUSH_EVERY_SECONDS = 120.0
"""On remote storage, finished outputs are pushed this often while a per-file step runs: a preempted
pod loses at most this much work."""


def _any_file(path: Path) -> bool:
    return True


@dataclass(frozen=True)
class PerFile:
    """A per-file resumable step (f0, features): every input file in `in_dir` that `select` accepts gives
    the output files `outputs(input)` in `out_dirs` (folders the step owns, see stepio.OWNED_OUTPUTS).

    `params()` is what makes the outputs (method, settings, weights identity), recorded in `params_file`:
    outputs made any other way are all recomputed, never mixed. `done(input)` says its outputs are whole
    (default: they exist); such inputs are skipped (resume after an interruption)."""

    in_dir: str
    out_dirs: tuple[str, ...]
    params_file: str
    params: Callable[[], dict[str, Any]]
    outputs: Callable[[Path], tuple[Path, ...]]
    done: Callable[[Path], bool] | None = None
    select: Callable[[Path], bool] = _any_file
    pull: tuple[str, ...] = ()  # more files to pull (a summary of an earlier run)
    progress_every: float = 1.0  # seconds between progress events (0: one per update)
    report_seconds: bool = False  # progress events carry audio_seconds

    def is_done(self, wav: Path) -> bool:
        if self.done is not None:
            return self.done(wav)
        return all(p.is_file() for p in self.outputs(wav))


@dataclass
class FileProgress:
    """Progress of a per-file step: events (files done of total, audio seconds), and on remote storage
    the outputs pushed every PUSH_EVERY_SECONDS."""

    ctx: StepContext
    pf: PerFile
    total: int
    done: int
    seconds: float = 0.0
    _last_event: float = 0.0
    _last_push: float = field(default_factory=time.time)

    def event(self) -> None:
        extra = {"audio_seconds": round(self.seconds, 3)} if self.pf.report_seconds else {}
        self.ctx.reporter.event("progress", files_done=self.done, files_total=self.total, **extra)
        self._last_event = time.time()

    def advance(self, files: int, seconds: float = 0.0) -> None:
        """`files` more inputs have their outputs (`seconds` of audio)."""
        self.done += files
        self.seconds += seconds
        now = time.time()
        if now - self._last_event >= self.pf.progress_every or self.done >= self.total:
            self.event()
        if self.ctx.remote and now - self._last_push > PUSH_EVERY_SECONDS:
            # checkpoint progress (a preempted pod loses little); the progress file too, for the
            # operator's estimate of the time left (status.steps.<step>.etaSeconds)
            self.ctx.push(*self.pf.out_dirs, PROGRESS_FILE)
            self._last_push = time.time()

    def bar(self, items: Iterable[T], total: int, desc: str, unit: str = "file") -> Iterator[T]:
        return self.ctx.reporter.bar(items, total=total, desc=desc, unit=unit)


@dataclass
class PerFileRun(Generic[T]):
    """What `per_file_step` did: every input, those computed now, the process result, compute seconds."""

    inputs: list[Path]
    todo: list[Path]
    result: T
    seconds: float

    @property
    def resumed(self) -> int:
        return len(self.inputs) - len(self.todo)


def _start_or_resume(ctx: StepContext, pf: PerFile, params: dict[str, Any]) -> None:
    """Remove partial files; and every output when they were made another way (or by an unknown one);
    then record how this run makes them (before any output is written)."""
    for d in pf.out_dirs:
        stepio.remove_owned_local(ctx.exp_dir / d, ("*.partial",))
        (ctx.exp_dir / d).mkdir(parents=True, exist_ok=True)
    pfile = ctx.exp_dir / pf.params_file
    old = read_record(pfile)
    if old != params:
        if any(any(ctx.exp_dir.joinpath(d).glob("*.npy")) for d in pf.out_dirs):
            log.info("%s: existing outputs were made another way (%s); recomputing all", ctx.step,
                     "; ".join(record_changes(old, params)))
        for d in pf.out_dirs:
            stepio.remove_owned_local(ctx.exp_dir / d, stepio.owned_patterns(d))
            if ctx.remote:
                stepio.remove_owned(ctx.storage, ctx.name, d)
        write_record(pfile, params)
    ctx.push(pf.params_file)


def _inputs(ctx: StepContext, pf: PerFile) -> list[Path]:
    in_dir = ctx.exp_dir / pf.in_dir
    wavs = sorted(p for p in in_dir.glob("*.wav") if p.is_file() and pf.select(p)) if in_dir.is_dir() else []
    if not wavs:
        raise StepFailed(f"{ctx.step}: no input files in {pf.in_dir}/ of {ctx.exp_key} (no .wav files; "
                         "run the preprocess step first)")
    return wavs


def _check_outputs(ctx: StepContext, pf: PerFile, inputs: list[Path]) -> None:
    missing = [w.name for w in inputs if not all(p.is_file() for p in pf.outputs(w))]
    if missing:
        raise StepFailed(f"{ctx.step}: no output for {len(missing)} of {len(inputs)} files: "
                         + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))


def _push_outputs_after_failure(ctx: StepContext, pf: PerFile) -> None:
    try:
        ctx.push(*pf.out_dirs)  # what is done stays done for the rerun
    except Exception as e:  # noqa: BLE001 - never hide the step's own error
        log.warning("%s: could not push partial outputs: %s", ctx.step, e)


def per_file_step(ctx: StepContext, pf: PerFile,
                  process: Callable[[list[Path], list[Path], FileProgress], T]) -> PerFileRun[T]:
    """The skeleton of a per-file resumable step: pull the inputs and earlier (partial) outputs, start
    over or resume (`PerFile.params`), `process(inputs, todo, progress)` the inputs whose outputs are not
    done (it writes each output atomically and calls `progress.advance`), check that every input has its
    outputs (StepFailed naming those without), push them. `process` is called even when nothing is left
    to do (todo empty), so it can inspect every input."""
    ctx.pull(pf.in_dir, pf.params_file, *pf.out_dirs, *pf.pull)  # partial outputs too: resume remotely
    inputs = _inputs(ctx, pf)
    params = pf.params()
    _start_or_resume(ctx, pf, params)
    todo = [w for w in inputs if not pf.is_done(w)]
    if len(todo) < len(inputs):
        log.info("%s: %d of %d files already done, resuming", ctx.step, len(inputs) - len(todo), len(inputs))
    progress = FileProgress(ctx, pf, len(inputs), len(inputs) - len(todo))
    progress.event()
    t0 = time.time()
    try:
        result = process(inputs, todo, progress)
    except BaseException:
        if ctx.remote:
            _push_outputs_after_failure(ctx, pf)
        raise
    seconds = time.time() - t0
    _check_outputs(ctx, pf, inputs)
    ctx.push(*pf.out_dirs)
    return PerFileRun(inputs, todo, result, seconds)
