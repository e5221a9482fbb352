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
5. pushes the outputs (`ctx.push`), then writes the completion marker last (a shard, `--shard I/N`: its
   shard marker, and the step's marker once every shard's is there: steps/shards.py).
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
from rvc_pipeline.core import termination
from rvc_pipeline.core.errors import StepFailed, StorageError
from rvc_pipeline.core.fileio import write_bytes_atomic
from rvc_pipeline.core.layout import PROGRESS_FILE, SHARDED_STEPS, marker_key
from rvc_pipeline.core.spec import STEP_ORDER, Experiment, SpecError, step_hashes
from rvc_pipeline.core.storage import Storage, same_content, scratch_dir
from rvc_pipeline.lease import check_current
from rvc_pipeline.progress import Reporter
from rvc_pipeline.stepio import CheckedInputs, Shard, parallel_threads, under
from rvc_pipeline.steps import shards
from rvc_pipeline.steps.processes import (
    cpu_count,
    default_workers,
    is_primary,
    parallel_map,
    process_pool,
    start_method,
)

__all__ = ["FileProgress", "PerFile", "StepContext", "cpu_count", "default_workers", "is_primary",
           "parallel_map", "per_file_step", "process_pool", "run_shard", "run_step", "run_steps",
           "start_method", "writer_lease"]

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
    "convert": "rvc_pipeline.steps.convert:run",
}

RESUME_WHEN_STALE: tuple[str, ...] = ("convert",)
"""Steps whose generation record (steps.shards) decides alone what to redo: a stale marker (a source
file added) reruns them without forcing, so only the missing outputs are made."""


def step_module(step: str) -> Any:
    """The module of a step (its `run`, and `merge_shards` where it merges its shards' summaries)."""
    return importlib.import_module(STEPS[step].partition(":")[0])


def step_function(step: str) -> StepFunction:
    return getattr(step_module(step), STEPS[step].partition(":")[2])


@dataclass
class StepContext:
    experiment: Experiment
    step: str
    storage: Storage
    workdir: Path  # contains logs/<experiment>/
    reporter: Reporter
    workers: int
    checked: CheckedInputs = field(default_factory=CheckedInputs)
    inputs_hash: str = ""  # the step's inputs hash (spec.step_hashes); recorded with its outputs
    shard: Shard | None = None  # this process runs one shard of the step (None: all of it)
    force: bool = False  # recompute every output (never with a shard)
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

    def pull(self, *subpaths: str, only: Callable[[str], bool] | None = None) -> None:
        """Download logs/<exp>/<sub> (files or folders) into exp_dir, skipping identical local files;
        with `only`, just the files of a folder whose path below it `only` accepts (a shard's inputs).

        "Identical" is same size and, on S3, same ETag (a rerun's features have the same size but new
        values, so size alone would keep stale files in a reused work folder).
        """
        if not self.remote:
            return
        for sub in subpaths:
            base = f"{self.exp_key}/{sub}"
            objs = [o for o in self.storage.list(base)
                    if under(o.key, base) and (only is None or only(o.key[len(base) + 1:]))]
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

    def push_progress(self) -> None:
        """Upload the progress log. A shard first merges in the lines that shards beside it pushed since
        (they push the same file: without this each push would drop the others' latest events; a line
        lost to two pushes at once comes back with the next push, since each keeps its own lines)."""
        if self.remote and self.shard is not None:
            self._merge_stored_progress()
        self.push(PROGRESS_FILE)

    def _merge_stored_progress(self) -> None:
        try:
            theirs = self.storage.read_bytes(f"{self.exp_key}/{PROGRESS_FILE}").splitlines(keepends=True)
        except StorageError as e:
            if not getattr(e, "permanent", True):
                raise
            return
        path = self.exp_dir / PROGRESS_FILE
        mine = path.read_bytes().splitlines(keepends=True) if path.is_file() else []
        known = set(theirs)
        merged = [ln if ln.endswith(b"\n") else ln + b"\n" for ln in theirs] + [ln for ln in mine
                                                                             if ln not in known]
        if merged != mine:
            write_bytes_atomic(path, b"".join(merged))

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


def _invalidate(storage: Storage, name: str, step: str, force: bool, shard: Shard | None = None) -> None:
    """Before the step runs (primary only; of a sharded step, shard 0 only): refuse linked output
    folders, delete the markers of this and later steps (and the shard markers of later steps; of this
    one too when unsharded), and the per-file outputs that would otherwise be resumed from wrongly.
    A shard never clears its own step's outputs here (`force` is False for shards): see
    `begin_generation`."""
    own = list(stepio.OWNED_OUTPUTS.get(step, ()))
    stepio.check_owned_folders(storage, name, stepio.stale_folders(step, force) + own)
    stepio.invalidate_from(storage, name, step)
    later = STEP_ORDER[STEP_ORDER.index(step) + (1 if shard is not None else 0):]
    stepio.delete_shard_markers(storage, name, [s for s in later if s in SHARDED_STEPS])
    stepio.clear_stale_outputs(storage, name, step, force)


def _check_shard_args(step: str, shard: Shard, force: bool) -> None:
    if step not in SHARDED_STEPS:
        raise SpecError(f"--shard: step '{step}' cannot be sharded (only {', '.join(SHARDED_STEPS)}); "
                        "run it without --shard")
    if force:
        raise SpecError("--force cannot be combined with --shard (a forced shard would delete the outputs of "
                        "shards running beside it); run the step unsharded with --force instead")


def run_step(
    exp: Experiment,
    step: str,
    fn: StepFunction,
    *,
    force: bool = False,
    workdir: Path | None = None,
    keep_scratch: bool = False,
    check_inputs: bool = False,
    shard: Shard | None = None,
) -> dict[str, Any]:
    """Run one step through the I/O shell. Returns its summary (or the stored one if skipped).

    With `check_inputs` the step's input check (INPUT_CHECKS) runs first: a step whose inputs are
    missing, empty or unfinished fails (StepFailed) before any marker or output is touched.
    With `shard` only that shard of a data step runs; the last shard to finish writes the step's marker
    (rvc_pipeline.steps.shards: who deletes what, completion, merged summaries)."""
    storage = stepio.open_artifacts(exp)
    name = exp.name
    # Under torchrun (and on every node of multi-node training) each process runs this shell; the primary
    # one alone owns markers, events and uploads.
    primary = is_primary()
    inputs_hash = step_hashes(exp)[step]
    if shard is not None:
        _check_shard_args(step, shard, force)
    checked = stepio.INPUT_CHECKS[step](exp, storage) if check_inputs else CheckedInputs()
    if not force:
        summary, why = _fresh_marker(storage, name, step, inputs_hash, checked)
        if summary is not None:
            summary["skipped"] = True
            log.info("%s: already complete (marker %s), skipping", step, marker_key(name, step))
            return summary
        if why:  # recompute everything it makes (a shard: through begin_generation, never by force)
            log.info("%s: %s; running it again", step, why)
            force = shard is None and step not in RESUME_WHEN_STALE
    if primary and (shard is None or shard.clears):
        _invalidate(storage, name, step, force, shard)
    local = storage.local_path()
    own_scratch = local is None and workdir is None
    wd = local if local is not None else Path(workdir) if workdir is not None else \
        scratch_dir(f"rvc-{name}-{step}-")
    try:
        ctx = StepContext(exp, step, storage, wd, Reporter(wd / "logs" / name, name, step,
                          exp.spec.metrics.pushgateway), default_workers(exp.spec.resources.parallelism),
                          checked, inputs_hash, shard, force)
        return _execute(ctx, fn, primary)
    finally:
        if own_scratch and not keep_scratch:
            shutil.rmtree(wd, ignore_errors=True)


def _execute(ctx: StepContext, fn: StepFunction, primary: bool) -> dict[str, Any]:
    step, name, reporter = ctx.step, ctx.name, ctx.reporter
    ctx.exp_dir.mkdir(parents=True, exist_ok=True)
    # the progress log of earlier steps, so that pushing it back appends rather than replaces
    ctx.pull(PROGRESS_FILE)
    t0 = time.time()
    if not primary:
        return fn(ctx) or {}
    if ctx.shard is not None:
        done = shards.fresh_shard_marker(ctx)
        if done is not None:  # this shard finished before (a retried pod): maybe the others have too
            log.info("%s: %s already done; checking the other shards", step, ctx.shard)
            return shards.complete(ctx, done)
    reporter.event("start", **_shard_fields(ctx))
    try:
        summary = fn(ctx) or {}
    except Exception as e:
        if isinstance(e, termination.Preempted):  # not a failure: the rerun continues from here
            reporter.event("warning", message=str(e), **_shard_fields(ctx))
        else:
            reporter.event("failed", error=str(e)[:2000], **_shard_fields(ctx))
        try:
            ctx.push_progress()
        except Exception as pe:  # noqa: BLE001 - never hide the step's own error
            log.warning("%s: could not upload %s after the failure: %s", step, PROGRESS_FILE, pe)
        raise
    summary = {"step": step, "experiment": name, "seconds": round(time.time() - t0, 3),
               "inputs_hash": ctx.inputs_hash, **summary}
    reporter.event("done", seconds=summary["seconds"], **_shard_fields(ctx))
    ctx.push_progress()
    check_current()  # a writer that lost its lease must not mark the step complete
    if ctx.shard is not None:
        return shards.finish(ctx, summary)
    ctx.storage.write_bytes(marker_key(name, step), json.dumps(summary, indent=1, default=str).encode())
    return summary


def _shard_fields(ctx: StepContext) -> dict[str, int]:
    return {"shard": ctx.shard.index, "shards": ctx.shard.count} if ctx.shard is not None else {}


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


def run_shard(exp: Experiment, step: str, shard: Shard) -> dict[str, Any]:
    """`rvc-pipeline <step> --shard I/N`: shard I of N of a data step (steps.shards). Shards run N at
    once by design, so they do not take the experiment's writer lease; they write disjoint files, and
    only shard 0 deletes anything (steps.shards). Do not run a sharded and an unsharded run of the same
    experiment at the same time."""
    log.info("== %s: %s (%s)", exp.name, step, shard)
    summary = run_step(exp, step, step_function(step), check_inputs=True, shard=shard)
    state = ("skipped (already complete)" if summary.get("skipped") else
             "step complete" if summary.get("complete") else "shard done, others still running")
    log.info("== %s: %s %s: %s", exp.name, step, shard, state)
    return summary


# ------------------------------------------------------------------------------------- per-file steps
PUSH_EVERY_SECONDS = 120.0
"""On remote storage, finished outputs are pushed this often while a per-file step runs: a pod that dies
without warning loses at most this much work (a SIGTERM'd one pushes everything done first)."""
PROGRESS_PUSH_SECONDS = 30.0
"""On remote storage, the progress log is pushed this often while a per-file step runs (the operator's
estimate of the time left reads it)."""


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
    """Progress of a per-file step (f0, features, preprocess): events (files done of total, audio
    seconds); on remote storage the progress log pushed every PROGRESS_PUSH_SECONDS (the operator's
    ETA) and the finished outputs (`out_dirs`, in that order) every PUSH_EVERY_SECONDS; and the
    graceful stop: after a SIGTERM inside `termination.graceful()`, `advance` raises `Preempted`
    (the step pushes what is done on the way out)."""

    ctx: StepContext
    out_dirs: tuple[str, ...]
    total: int
    done: int
    progress_every: float = 1.0
    report_seconds: bool = False
    before_push: Callable[[], None] | None = None  # a check before outputs are pushed (shards)
    seconds: float = 0.0
    _last_event: float = 0.0
    _last_push: float = field(default_factory=time.time)
    _last_progress_push: float = field(default_factory=time.time)

    def event(self) -> None:
        extra = {"audio_seconds": round(self.seconds, 3)} if self.report_seconds else {}
        if self.ctx.shard is not None:
            extra.update(shard=self.ctx.shard.index, shards=self.ctx.shard.count)
        self.ctx.reporter.event("progress", files_done=self.done, files_total=self.total, **extra)
        self._last_event = time.time()

    def advance(self, files: int, seconds: float = 0.0) -> None:
        """`files` more inputs have their outputs (`seconds` of audio)."""
        self.done += files
        self.seconds += seconds
        now = time.time()
        if now - self._last_event >= self.progress_every or self.done >= self.total:
            self.event()
        if self.ctx.remote and now - self._last_push > PUSH_EVERY_SECONDS:
            self.push_outputs()  # checkpoint progress: a pod that dies loses little
        elif self.ctx.remote and now - self._last_progress_push > PROGRESS_PUSH_SECONDS:
            self.ctx.push_progress()  # the operator's estimate of the time left
            self._last_progress_push = time.time()
        self.stop_if_requested()

    def push_outputs(self) -> None:
        if self.before_push is not None:
            self.before_push()
        self.ctx.push(*self.out_dirs)
        self.ctx.push_progress()
        self._last_push = self._last_progress_push = time.time()

    def stop_if_requested(self) -> None:
        """Raise Preempted once SIGTERM asked for a graceful stop (the files done so far are whole)."""
        if termination.requested():
            raise termination.Preempted(f"{self.ctx.step}: stopped by SIGTERM after {self.done} of "
                                        f"{self.total} files; what is done is saved, rerun to continue")

    def bar(self, items: Iterable[T], total: int, desc: str, unit: str = "file") -> Iterator[T]:
        return self.ctx.reporter.bar(items, total=total, desc=desc, unit=unit)


@dataclass
class PerFileRun(Generic[T]):
    """What `per_file_step` did: its inputs (a shard's: only those it owns), those computed now, the
    process result, compute seconds."""

    inputs: list[Path]
    todo: list[Path]
    result: T
    seconds: float

    @property
    def resumed(self) -> int:
        return len(self.inputs) - len(self.todo)


def partial_target(name: str) -> str | None:
    """The file a `.<pid>.<random>.<name>.partial` temporary (core.fileio.atomic_write) was for."""
    if not (name.startswith(".") and name.endswith(".partial")):
        return None
    parts = name[1:-len(".partial")].split(".", 2)
    return parts[2] if len(parts) == 3 else None


def _remove_partials(ctx: StepContext, pf: PerFile, inputs: list[Path] | None) -> None:
    """Remove the partial files left by an interrupted run: all of them (`inputs` None), or only those of
    the outputs of `inputs` (a shard: with local storage the folder is shared by the shards beside it)."""
    own = None if inputs is None else {p.name for w in inputs for p in pf.outputs(w)}
    for d in pf.out_dirs:
        folder = ctx.exp_dir / d
        if own is None:
            stepio.remove_owned_local(folder, ("*.partial",))
        elif stepio.safe_folder(folder):
            for p in folder.glob(".*.partial"):
                if partial_target(p.name) in own:
                    p.unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)


def _start_or_resume(ctx: StepContext, pf: PerFile, params: dict[str, Any], inputs: list[Path],
                     mine: set[str] | None) -> None:
    """Remove partial files; and every output when they were made another way (or by an unknown one);
    then record how this run makes them (before any output is written). Shards: `shards.begin_generation`
    (only shard 0 deletes; the others wait for its record)."""

    def clear() -> None:
        for d in pf.out_dirs:
            stepio.remove_owned_local(ctx.exp_dir / d, stepio.owned_patterns(d))
            if ctx.remote:
                stepio.remove_owned(ctx.storage, ctx.name, d)

    shards.begin_generation(ctx, pf.params_file, params, clear)
    _remove_partials(ctx, pf, None if mine is None else inputs)


def _input_names(ctx: StepContext, pf: PerFile) -> list[str]:
    """Sorted names of the step's inputs in storage (one listing; local storage: the folder)."""
    base = f"{ctx.exp_key}/{pf.in_dir}"
    names = (o.key[len(base) + 1:] for o in ctx.storage.list(base) if under(o.key, base))
    return sorted(n for n in names if "/" not in n and n.endswith(".wav") and pf.select(Path(n)))


def _shard_inputs(ctx: StepContext, pf: PerFile) -> set[str] | None:
    """The input names this shard owns (None: unsharded, every input)."""
    if ctx.shard is None:
        return None
    names = _input_names(ctx, pf)
    if not names:
        raise StepFailed(f"{ctx.step}: no input files in {pf.in_dir}/ of {ctx.exp_key} (no .wav files; "
                         "run the preprocess step first)")
    mine = {n for i, n in enumerate(names) if ctx.shard.owns(i)}
    log.info("%s: %s owns %d of %d input files", ctx.step, ctx.shard, len(mine), len(names))
    return mine


def _inputs(ctx: StepContext, pf: PerFile, mine: set[str] | None = None) -> list[Path]:
    in_dir = ctx.exp_dir / pf.in_dir
    wavs = sorted(p for p in in_dir.glob("*.wav") if p.is_file() and pf.select(p)) if in_dir.is_dir() else []
    if not wavs:
        raise StepFailed(f"{ctx.step}: no input files in {pf.in_dir}/ of {ctx.exp_key} (no .wav files; "
                         "run the preprocess step first)")
    return wavs if mine is None else [w for w in wavs if w.name in mine]


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


def _pull_inputs(ctx: StepContext, pf: PerFile, mine: set[str] | None) -> list[Path]:
    """Pull the inputs (a shard: its own) and the params record; return the inputs."""
    ctx.pull(pf.in_dir, only=None if mine is None else mine.__contains__)
    ctx.pull(pf.params_file, *pf.pull)
    return _inputs(ctx, pf, mine)


def _pull_outputs(ctx: StepContext, pf: PerFile, inputs: list[Path], mine: set[str] | None) -> None:
    """The outputs stored by an earlier (partial) run, to resume from (a shard: of its inputs only)."""
    if mine is None:
        ctx.pull(*pf.out_dirs)
        return
    want = {p.relative_to(ctx.exp_dir).as_posix() for w in inputs for p in pf.outputs(w)}
    for d in pf.out_dirs:
        names = {k[len(d) + 1:] for k in want if k.startswith(d + "/")}
        ctx.pull(d, only=names.__contains__)


def per_file_step(ctx: StepContext, pf: PerFile,
                  process: Callable[[list[Path], list[Path], FileProgress], T]) -> PerFileRun[T]:
    """The skeleton of a per-file resumable step: pull the inputs (a shard: those it owns, see
    `stepio.Shard`), start over or resume (`PerFile.params`), pull the earlier (partial) outputs,
    `process(inputs, todo, progress)` the inputs whose outputs are not done (it writes each output
    atomically and calls `progress.advance`), check that every input has its outputs (StepFailed naming
    those without), push them. `process` is called even when nothing is left to do (todo empty), so it
    can inspect every input. A SIGTERM stops it after the current file(s) (`FileProgress`): the outputs
    done are pushed and `termination.Preempted` is raised."""
    mine = _shard_inputs(ctx, pf)
    inputs = _pull_inputs(ctx, pf, mine)
    params = pf.params()
    _start_or_resume(ctx, pf, params, inputs, mine)
    _pull_outputs(ctx, pf, inputs, mine)
    todo = [w for w in inputs if not pf.is_done(w)]
    if len(todo) < len(inputs):
        log.info("%s: %d of %d files already done, resuming", ctx.step, len(inputs) - len(todo), len(inputs))
    progress = FileProgress(ctx, pf.out_dirs, len(inputs), len(inputs) - len(todo), pf.progress_every,
                            pf.report_seconds, lambda: shards.check_generation(ctx, params))
    progress.event()
    t0 = time.time()
    try:
        with termination.graceful():
            result = process(inputs, todo, progress)
    except BaseException:
        if ctx.remote:
            _push_outputs_after_failure(ctx, pf)
        raise
    seconds = time.time() - t0
    _check_outputs(ctx, pf, inputs)
    shards.check_generation(ctx, params)
    ctx.push(*pf.out_dirs)
    return PerFileRun(inputs, todo, result, seconds)
