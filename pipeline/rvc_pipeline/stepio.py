"""The thin I/O shell around every step.

A step is `run(ctx: StepContext) -> dict` (a JSON-able summary). The shell:
1. deletes the step's completion marker (and those of later steps), so half-written output is never
   taken as complete;
2. pulls the inputs the step needs from storage into local scratch (`ctx.pull`);
3. runs the step on local files under `ctx.exp_dir` (= <scratch>/logs/<experiment>/);
4. pushes the outputs (`ctx.push`), then writes the completion marker last.
A rerun skips a step whose marker exists (unless forced).

With local storage the experiment folder in storage *is* the working folder: nothing is copied.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .progress import PROGRESS_FILE, Reporter
from .spec import STEP_ORDER, Experiment, step_hashes
from .storage import Storage, StorageError, open_storage, same_content, scratch_dir

log = logging.getLogger("rvc_pipeline")

MARKER_DIR = ".rvc"


class StepFailed(RuntimeError):
    """A step that cannot produce its outputs (bad data, no output). Permanent: retrying will not help."""


def marker_key(experiment: str, step: str) -> str:
    return f"logs/{experiment}/{MARKER_DIR}/{step}.done.json"


@dataclass
class StepContext:
    experiment: Experiment
    step: str
    storage: Storage
    workdir: Path  # contains logs/<experiment>/
    reporter: Reporter
    workers: int
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
            objs = self.storage.list(f"{self.exp_key}/{sub}")
            todo = []
            for o in objs:
                dest = self.workdir / o.key
                if not same_content(dest, o):
                    todo.append((o.key, dest))
            _parallel(lambda kd: self.storage.download(kd[0], kd[1]), todo)
            self._pulled.add(sub)

    def push(self, *subpaths: str, mirror: bool = False) -> None:
        """Upload exp_dir/<sub> (files or folders) to storage; identical stored objects are skipped.

        With `mirror=True`, stored objects under a pushed *folder* that no longer exist locally are
        deleted, so a rerun that makes fewer files (preprocess with other settings) leaves no stale ones
        for the next step to pick up. Use it only for folders the step owns and writes completely.
        """
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
            have = {o.key: o for o in self.storage.list(f"{self.exp_key}/{sub}")}
            todo = []
            for p in files:
                key = p.relative_to(self.workdir).as_posix()
                o = have.get(key)
                if o is None or not same_content(p, o):
                    todo.append((p, key))
            _parallel(lambda pk: self.storage.upload(pk[0], pk[1]), todo)
            if mirror and local.is_dir():
                keep = {p.relative_to(self.workdir).as_posix() for p in files}
                _parallel(self.storage.delete, [k for k in have if k not in keep])

    def push_file(self, path: Path) -> None:
        if self.remote:
            self.storage.upload(path, Path(path).relative_to(self.workdir).as_posix())


def _parallel(fn: Callable[[Any], None], items: list[Any], threads: int = 8) -> None:
    if not items:
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as ex:
        for _ in ex.map(fn, items):
            pass


def default_workers(requested: int = 0) -> int:
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        return max(1, os.cpu_count() or 1)


def is_complete(storage: Storage, experiment: str, step: str) -> bool:
    return storage.exists(marker_key(experiment, step))


def read_marker(storage: Storage, experiment: str, step: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(marker_key(experiment, step)))
    except (StorageError, json.JSONDecodeError):
        return None


def invalidate_from(storage: Storage, experiment: str, step: str) -> None:
    """Delete the markers of `step` and every later step (their outputs depend on it)."""
    for s in STEP_ORDER[STEP_ORDER.index(step):]:
        storage.delete(marker_key(experiment, s))


# Per-file outputs that f0 and features resume from (they skip files whose outputs exist).
RESUMABLE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "f0": ("2a_f0", "2b-f0nsf"),
    "features": ("3_feature256", "3_feature768"),
}


def clear_stale_outputs(storage: Storage, experiment: str, step: str, force: bool) -> list[str]:
    """Before `step` runs, delete per-file outputs that would otherwise be resumed from wrongly: those of
    every later resumable step (they derive from what `step` is about to rewrite), and the step's own when
    forced (a forced rerun recomputes everything). Returns the folders cleared."""
    later = STEP_ORDER[STEP_ORDER.index(step) + 1:]
    folders = [f for s in later for f in RESUMABLE_OUTPUTS.get(s, ())]
    if force:
        folders += list(RESUMABLE_OUTPUTS.get(step, ()))
    cleared = []
    for folder in folders:
        objs = storage.list(f"logs/{experiment}/{folder}")
        _parallel(lambda o: storage.delete(o.key), objs)
        if objs:
            cleared.append(folder)
            log.info("%s: removed %d stale files of %s", step, len(objs), folder)
    return cleared


def open_artifacts(exp: Experiment) -> Storage:
    st = exp.spec.storage
    return open_storage(st.uri, endpoint=st.endpoint, region=st.region)


def run_step(
    exp: Experiment,
    step: str,
    fn: Callable[[StepContext], dict[str, Any]],
    *,
    force: bool = False,
    workdir: Path | None = None,
    keep_scratch: bool = False,
) -> dict[str, Any]:
    """Run one step through the I/O shell. Returns its summary (or the stored one if skipped)."""
    storage = open_artifacts(exp)
    name = exp.name
    # Under torchrun every rank runs this shell; rank 0 alone owns markers, events and uploads.
    primary = os.environ.get("RANK", "0") in ("", "0")
    inputs_hash = step_hashes(exp)[step]
    if not force and is_complete(storage, name, step):
        summary = read_marker(storage, name, step) or {}
        done_hash = summary.get("inputs_hash")
        if done_hash in (None, inputs_hash):
            summary["skipped"] = True
            log.info("%s: already complete (marker %s), skipping", step, marker_key(name, step))
            return summary
        # the spec fields this step depends on changed since it ran: recompute everything it makes
        log.info("%s: the spec changed since this step ran (inputs %s -> %s); running it again",
                 step, done_hash, inputs_hash)
        force = True
    if primary:
        invalidate_from(storage, name, step)
        clear_stale_outputs(storage, name, step, force)
    local = storage.local_path()
    own_scratch = False
    if local is not None:
        wd = local
    elif workdir is not None:
        wd = Path(workdir)
    else:
        wd = scratch_dir(f"rvc-{name}-{step}-")
        own_scratch = True
    exp_dir = wd / "logs" / name
    try:
        exp_dir.mkdir(parents=True, exist_ok=True)
        reporter = Reporter(exp_dir, name, step, exp.spec.metrics.pushgateway)
        ctx = StepContext(exp, step, storage, wd, reporter, default_workers(exp.spec.resources.parallelism))
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
        storage.write_bytes(marker_key(name, step), json.dumps(summary, indent=1, default=str).encode())
    finally:
        if own_scratch and not keep_scratch:
            shutil.rmtree(wd, ignore_errors=True)
    return summary
