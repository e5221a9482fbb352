"""The thin I/O shell around every step.

A step is `run(ctx: StepContext) -> dict` (a JSON-able summary). The shell:
1. checks the step's inputs (`INPUT_CHECKS`: the dataset for preprocess, the prerequisites' markers and
   outputs for the others) when asked to (`check_inputs=True`, as the CLI and the operator's Jobs do);
   nothing is invalidated or deleted before this check has passed;
2. deletes the step's completion marker (and those of later steps), so half-written output is never
   taken as complete, then the stale per-file outputs of later steps: only files the steps own, by name,
   inside logs/<experiment>/, never through a symlink (`OWNED_OUTPUTS`);
3. pulls the inputs the step needs from storage into local scratch (`ctx.pull`);
4. runs the step on local files under `ctx.exp_dir` (= <scratch>/logs/<experiment>/);
5. pushes the outputs (`ctx.push`), then writes the completion marker last.
A rerun skips a step whose marker exists (unless forced, or the spec fields it depends on or the
inputs its check fingerprints, such as the dataset manifest, changed since).

With local storage the experiment folder in storage *is* the working folder: nothing is copied.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rvc_pipeline.core.spec import STEP_ORDER, Experiment, step_hashes
from rvc_pipeline.core.storage import Storage, StorageError, open_storage, same_content, scratch_dir
from rvc_pipeline.lease import check_current
from rvc_pipeline.progress import PROGRESS_FILE, Reporter
from rvc_pipeline.steps.runner import is_primary

log = logging.getLogger("rvc_pipeline")

MARKER_DIR = ".rvc"


class StepFailed(RuntimeError):
    """A step that cannot produce its outputs (bad data, no output). Permanent: retrying will not help."""


def marker_key(experiment: str, step: str) -> str:
    return f"logs/{experiment}/{MARKER_DIR}/{step}.done.json"


def under(key: str, base: str) -> bool:
    """True when storage key `key` is `base` itself or lies below the folder `base` (S3 prefixes also
    match `base_old/...`: listings are filtered with this)."""
    return key == base or key.startswith(base.rstrip("/") + "/")


@dataclass
class CheckedInputs:
    """What a step's input check found. `fingerprint` values are recorded in the step's marker by the
    step and compared on a rerun (a changed value reruns the step); `data` is handed to the step."""

    fingerprint: dict[str, str] = field(default_factory=dict)
    data: Any = None


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
        check_current()
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
    """The stored summary of a completed step; None when missing or unreadable (not a JSON object).
    Storage that cannot be reached raises (a transient error is not "not completed")."""
    try:
        data = json.loads(storage.read_bytes(marker_key(experiment, step)))
    except StorageError as e:
        if not getattr(e, "permanent", True):
            raise
        return None
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def invalidate_from(storage: Storage, experiment: str, step: str) -> None:
    """Delete the markers of `step` and every later step (their outputs depend on it)."""
    check_current()
    for s in STEP_ORDER[STEP_ORDER.index(step):]:
        storage.delete(marker_key(experiment, s))


# The files each step owns: folder (in logs/<exp>/) -> name patterns. A step deletes nothing else.
OWNED_OUTPUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "preprocess": {"0_gt_wavs": ("*.wav", "*.wav.partial"), "1_16k_wavs": ("*.wav", "*.wav.partial")},
    "f0": {"2a_f0": ("*.npy", "*.npy.partial"), "2b-f0nsf": ("*.npy", "*.npy.partial")},
    "features": {"3_feature256": ("*.npy", "*.npy.partial"), "3_feature768": ("*.npy", "*.npy.partial")},
}

# Per-file outputs that f0 and features resume from (they skip files whose outputs exist).
RESUMABLE_OUTPUTS: dict[str, tuple[str, ...]] = {s: tuple(OWNED_OUTPUTS[s]) for s in ("f0", "features")}


def owned_patterns(folder: str) -> tuple[str, ...]:
    """The name patterns of the files some step owns in `folder` (empty: nobody owns files there)."""
    return next((pats for outs in OWNED_OUTPUTS.values() for f, pats in outs.items() if f == folder), ())


def _is_owned(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def safe_folder(path: Path) -> bool:
    """True when `path` is a real folder, False when it does not exist; StepFailed when it is a symlink
    or not a folder (a step never deletes or writes through a link to somewhere else)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise StepFailed(f"{path}: is a symbolic link (to {os.readlink(path)}); a step writes and deletes "
                         "only inside the experiment folder. Replace the link with a real folder")
    if not stat.S_ISDIR(st.st_mode):
        raise StepFailed(f"{path}: exists but is not a folder; move it away")
    return True


def remove_owned_local(folder: Path, patterns: tuple[str, ...], keep: set[str] | None = None) -> int:
    """Delete the files directly in `folder` whose names match `patterns` (and are not in `keep`).
    Sub-folders and other files are left alone; a symlink entry is unlinked itself, never followed;
    a symlinked `folder` is refused (StepFailed). Returns the number of files deleted."""
    if not safe_folder(folder):
        return 0
    n = 0
    with os.scandir(folder) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False) or not _is_owned(e.name, patterns):
                continue
            if keep is not None and e.name in keep:
                continue
            os.unlink(e.path)
            n += 1
    return n


def remove_owned(storage: Storage, experiment: str, folder: str, keep: set[str] | None = None) -> int:
    """Delete the files owned by a step in logs/<experiment>/<folder>/ (see OWNED_OUTPUTS), by name:
    locally through `remove_owned_local`; on S3 only keys directly below that prefix."""
    patterns = owned_patterns(folder)
    if not patterns:
        raise ValueError(f"{folder}: no step owns files there")
    base = f"logs/{experiment}/{folder}"
    local = storage.local_path()
    if local is not None:
        return remove_owned_local(local / base, patterns, keep)
    doomed = []
    for o in storage.list(base):
        rest = o.key[len(base) + 1:] if o.key.startswith(base + "/") else ""
        if rest and "/" not in rest and _is_owned(rest, patterns) and (keep is None or rest not in keep):
            doomed.append(o.key)
    _parallel(storage.delete, doomed)
    return len(doomed)


def stale_folders(step: str, force: bool) -> list[str]:
    """The per-file output folders a run of `step` makes stale: those of every later resumable step
    (they derive from what `step` is about to rewrite), and the step's own when forced."""
    later = STEP_ORDER[STEP_ORDER.index(step) + 1:]
    folders = [f for s in later for f in RESUMABLE_OUTPUTS.get(s, ())]
    if force:
        folders += list(RESUMABLE_OUTPUTS.get(step, ()))
    return folders


def check_owned_folders(storage: Storage, experiment: str, folders: list[str]) -> None:
    """StepFailed naming the first of `folders` (in logs/<experiment>/) that is a symlink or a file."""
    local = storage.local_path()
    if local is None:
        return
    for f in folders:
        safe_folder(local / "logs" / experiment / f)


def clear_stale_outputs(storage: Storage, experiment: str, step: str, force: bool) -> list[str]:
    """Before `step` runs, delete the per-file outputs that would otherwise be resumed from wrongly (see
    `stale_folders`): only the owned files, by name. Every folder is checked before anything is deleted.
    Returns the folders cleared."""
    check_current()
    folders = stale_folders(step, force)
    check_owned_folders(storage, experiment, folders)
    cleared = []
    for folder in folders:
        n = remove_owned(storage, experiment, folder)
        if n:
            cleared.append(folder)
            log.info("%s: removed %d stale files of %s", step, n, folder)
    return cleared


# ------------------------------------------------------------------------------------- input checks
InputCheck = Callable[[Experiment, Storage], CheckedInputs]

# What each step makes that later steps read (folders in logs/<exp>/), as a function of the spec.
PRODUCES: dict[str, Callable[[Any], tuple[str, ...]]] = {
    "preprocess": lambda spec: ("0_gt_wavs", "1_16k_wavs"),
    "f0": lambda spec: ("2a_f0", "2b-f0nsf") if spec.model.pitch_guidance else (),
    "features": lambda spec: ("3_feature256" if spec.model.version == "v1" else "3_feature768",),
    "train": lambda spec: (),
    "index": lambda spec: (),
}

# The steps whose results a step reads, as a function of the spec (train needs f0 only with pitch).
PREREQUISITES: dict[str, Callable[[Any], tuple[str, ...]]] = {
    "preprocess": lambda spec: (),
    "f0": lambda spec: ("preprocess",),
    "features": lambda spec: ("preprocess",),
    "train": lambda spec: ("f0", "features") if spec.model.pitch_guidance else ("features",),
    "index": lambda spec: ("features",),
}


def check_prerequisites(exp: Experiment, storage: Storage, step: str) -> CheckedInputs:
    """StepFailed unless every prerequisite of `step` has completed for the current spec (its marker
    exists with the current inputs hash) and left its outputs. A prerequisite the spec's `steps` leaves
    out (outputs made elsewhere) needs no marker, only its outputs."""
    name = exp.name
    hashes = step_hashes(exp)
    for pre in PREREQUISITES[step](exp.spec):
        if pre in exp.spec.steps:
            marker = read_marker(storage, name, pre)
            if marker is None:
                raise StepFailed(f"{step}: {pre} has not completed for experiment {name} (no marker "
                                 f"{marker_key(name, pre)}); run it first")
            if marker.get("inputs_hash") not in (None, hashes[pre]):
                raise StepFailed(f"{step}: {pre} is out of date for experiment {name} (the spec changed "
                                 f"since it ran, marker {marker_key(name, pre)}); run it again first")
        for folder in PRODUCES[pre](exp.spec):
            base = f"logs/{name}/{folder}"
            if not any(under(o.key, base) for o in storage.list(base)):
                raise StepFailed(f"{step}: {base}/ is missing or empty (made by {pre}); run {pre} first")
    return CheckedInputs()


def _with_weights(step: str, key: str, ref_of: Callable[[Any], str | None], what: str) -> InputCheck:
    """`step`'s prerequisites check, plus the identity (sha256) of the weights file `ref_of(spec)` names
    as the fingerprint `key`: finished work made with other weights (demo random ones, another file)
    is stale. Only a file found now (offline) is compared: a missing one never makes work look stale."""

    def check(exp: Experiment, storage: Storage) -> CheckedInputs:
        from rvc_pipeline.provenance import weight_identity
        from rvc_pipeline.weights import WeightsNotFound, resolve_weight

        checked = check_prerequisites(exp, storage, step)
        ref = ref_of(exp.spec)
        if ref:
            try:
                path = resolve_weight(ref, exp.spec, what=what, allow_online=False)
            except WeightsNotFound:
                return checked
            checked.fingerprint[key] = weight_identity(path)
        return checked

    return check


def _rmvpe_ref(spec: Any) -> str | None:
    if spec.model.pitch_guidance and spec.f0.method == "rmvpe":
        return spec.f0.rmvpe_checkpoint or "rmvpe.pt"
    return None


def _check_dataset(exp: Experiment, storage: Storage) -> CheckedInputs:
    from rvc_pipeline.steps.preprocess import check_inputs

    return check_inputs(exp, storage)


INPUT_CHECKS: dict[str, InputCheck] = {
    "preprocess": _check_dataset,
    "f0": _with_weights("f0", "rmvpe_weights", _rmvpe_ref, "RMVPE checkpoint"),
    "features": _with_weights("features", "embedder_weights", lambda spec: spec.features.embedder,
                              "HuBERT embedder"),
    "train": lambda exp, st: check_prerequisites(exp, st, "train"),
    "index": lambda exp, st: check_prerequisites(exp, st, "index"),
}


def open_artifacts(exp: Experiment) -> Storage:
    st = exp.spec.storage
    return open_storage(st.uri, endpoint=st.endpoint, region=st.region)


def _fresh_marker(storage: Storage, name: str, step: str, inputs_hash: str,
                  checked: CheckedInputs) -> tuple[dict[str, Any] | None, str | None]:
    """(stored summary, None) when the step completed for these inputs; (None, why) when it completed
    for other ones (rerun it from scratch); (None, None) when it has not completed."""
    if not is_complete(storage, name, step):
        return None, None
    summary = read_marker(storage, name, step)
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


def run_step(
    exp: Experiment,
    step: str,
    fn: Callable[[StepContext], dict[str, Any]],
    *,
    force: bool = False,
    workdir: Path | None = None,
    keep_scratch: bool = False,
    check_inputs: bool = False,
) -> dict[str, Any]:
    """Run one step through the I/O shell. Returns its summary (or the stored one if skipped).

    With `check_inputs` the step's input check (INPUT_CHECKS) runs first: a step whose inputs are
    missing, empty or unfinished fails (StepFailed) before any marker or output is touched."""
    storage = open_artifacts(exp)
    name = exp.name
    # Under torchrun (and on every node of multi-node training) each process runs this shell; the primary
    # one alone owns markers, events and uploads.
    primary = is_primary()
    inputs_hash = step_hashes(exp)[step]
    checked = INPUT_CHECKS[step](exp, storage) if check_inputs else CheckedInputs()
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
        own = list(OWNED_OUTPUTS.get(step, ()))
        check_owned_folders(storage, name, stale_folders(step, force) + own)
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
    try:
        ctx_args = (storage, wd, default_workers(exp.spec.resources.parallelism))
        return _execute(exp, step, fn, ctx_args, checked, primary, inputs_hash)
    finally:
        if own_scratch and not keep_scratch:
            shutil.rmtree(wd, ignore_errors=True)


def _execute(exp: Experiment, step: str, fn: Callable[[StepContext], dict[str, Any]],
             ctx_args: tuple[Storage, Path, int], checked: CheckedInputs, primary: bool,
             inputs_hash: str) -> dict[str, Any]:
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
