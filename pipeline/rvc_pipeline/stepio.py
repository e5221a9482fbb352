"""What a step finds and leaves in storage: completion markers, the files each step owns, input checks.

The step runner (rvc_pipeline.steps.runner: run_step, StepContext) uses these; so does the operator
(markers) and preprocess (its dataset check). Nothing here runs a step:
* markers: `is_complete`, `read_marker`, `invalidate_from` (a step's marker and those of later steps);
* ownership: `OWNED_OUTPUTS` (folder -> name patterns per step), `remove_owned` (only owned files, by
  name, inside logs/<experiment>/, never through a symlink), `clear_stale_outputs` (the per-file
  outputs that a run of a step makes stale);
* input checks: `INPUT_CHECKS` (the dataset for preprocess, the prerequisites' markers and outputs for
  the others), run by `run_step(check_inputs=True)` before anything is invalidated or deleted.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rvc_pipeline.core.errors import StepFailed, StorageError
from rvc_pipeline.core.layout import (
    CONVERT_FORMATS,
    CONVERTED_DIR,
    F0_COARSE_DIR,
    F0_NSF_DIR,
    FEATURE_DIRS,
    GT_WAVS_DIR,
    MAX_SHARDS,
    WAVS_16K_DIR,
    feature_dir,
    marker_key,
    shard_of_marker,
)
from rvc_pipeline.core.spec import STEP_ORDER, Experiment, step_hashes
from rvc_pipeline.core.storage import Storage, open_storage
from rvc_pipeline.lease import check_current

log = logging.getLogger("rvc_pipeline")


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


def parallel_threads(fn: Callable[[Any], None], items: list[Any], threads: int = 8) -> None:
    if not items:
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as ex:
        for _ in ex.map(fn, items):
            pass


def is_complete(storage: Storage, experiment: str, step: str) -> bool:
    return storage.exists(marker_key(experiment, step))


def read_marker(storage: Storage, experiment: str, step: str) -> dict[str, Any] | None:
    """The stored summary of a completed step; None when missing or unreadable (not a JSON object).
    Storage that cannot be reached raises (a transient error is not "not completed")."""
    return read_json_object(storage, marker_key(experiment, step))


def read_json_object(storage: Storage, key: str) -> dict[str, Any] | None:
    """A stored JSON object; None when missing or not a JSON object. Unreachable storage raises."""
    try:
        data = json.loads(storage.read_bytes(key))
    except StorageError as e:
        if not getattr(e, "permanent", True):
            raise
        return None
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


# ------------------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class Shard:
    """Shard `index` (zero-based) of `count` of a data step: it processes the inputs whose position in the
    step's sorted input listing (preprocess: the dataset file's idx0) is `index` modulo `count`. Output
    names never depend on the shard (preprocess keeps the global idx0), so the union of the shards'
    outputs is the unsharded run's, and files done under another `count` are resumed, not redone."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`I/N` with 0 <= I < N <= MAX_SHARDS; ValueError naming --shard otherwise."""
        i, sep, n = str(text).strip().partition("/")
        if not (sep and i.isdigit() and n.isdigit()):
            raise ValueError(f"--shard {text!r}: expected I/N (shard I of N, zero-based), e.g. 0/2")
        index, count = int(i), int(n)
        if not 1 <= count <= MAX_SHARDS or index >= count:
            raise ValueError(f"--shard {text!r}: need 0 <= I < N and 1 <= N <= {MAX_SHARDS}")
        return cls(index, count)

    def owns(self, position: int) -> bool:
        return position % self.count == self.index

    @property
    def clears(self) -> bool:
        """Only shard 0 deletes shared state (see steps.runner.begin_generation)."""
        return self.index == 0

    def __str__(self) -> str:
        return f"shard {self.index}/{self.count}"


def shard_markers(storage: Storage, experiment: str, step: str, count: int) -> dict[int, dict[str, Any]]:
    """The readable shard markers of `step` for `count` shards, by shard index (one listing)."""
    found: dict[int, dict[str, Any]] = {}
    prefix = marker_key(experiment, step).rsplit("/", 1)[0]
    for o in storage.list(prefix):
        parsed = shard_of_marker(o.key.rsplit("/", 1)[-1])
        if parsed is None or parsed[0] != step or parsed[2] != count or not under(o.key, prefix):
            continue
        try:
            data = json.loads(storage.read_bytes(o.key))
        except StorageError as e:
            if not getattr(e, "permanent", True):
                raise
            continue
        except ValueError:
            continue
        if isinstance(data, dict):
            found[parsed[1]] = data
    return found


def delete_shard_markers(storage: Storage, experiment: str, steps: tuple[str, ...] | list[str]) -> int:
    """Delete every shard marker (any count) of `steps`; returns how many."""
    check_current()
    prefix = marker_key(experiment, "x").rsplit("/", 1)[0]
    doomed = [o.key for o in storage.list(prefix) if under(o.key, prefix)
              and (p := shard_of_marker(o.key.rsplit("/", 1)[-1])) is not None and p[0] in steps]
    parallel_threads(storage.delete, doomed)
    return len(doomed)


def invalidate_from(storage: Storage, experiment: str, step: str) -> None:
    """Delete the markers of `step` and every later step (their outputs depend on it)."""
    check_current()
    for s in STEP_ORDER[STEP_ORDER.index(step):]:
        storage.delete(marker_key(experiment, s))


# The files each step owns: folder (in logs/<exp>/) -> name patterns. A step deletes nothing else.
OWNED_OUTPUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "preprocess": {d: ("*.wav", "*.wav.partial") for d in (GT_WAVS_DIR, WAVS_16K_DIR)},
    "f0": {d: ("*.npy", "*.npy.partial") for d in (F0_COARSE_DIR, F0_NSF_DIR)},
    "features": {d: ("*.npy", "*.npy.partial") for d in FEATURE_DIRS},
    # (no partial pattern: the step prunes outputs whose source is gone while other shards write there)
    "convert": {CONVERTED_DIR: tuple(f"*.{f}" for f in CONVERT_FORMATS)},
}

# Per-file outputs that f0 and features resume from (they skip files whose outputs exist). (preprocess
# resumes too, from its per-file records; a forced preprocess clears its pieces itself, after its own
# dataset check: steps.shards.begin_generation.)
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
            try:
                os.unlink(e.path)
            except FileNotFoundError:  # removed meanwhile (two shards completing a step at once)
                continue
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
    parallel_threads(storage.delete, doomed)
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
    "preprocess": lambda spec: (GT_WAVS_DIR, WAVS_16K_DIR),
    "f0": lambda spec: (F0_COARSE_DIR, F0_NSF_DIR) if spec.model.pitch_guidance else (),
    "features": lambda spec: (feature_dir(spec.model.version),),
    "train": lambda spec: (),
    "index": lambda spec: (),
    "convert": lambda spec: (CONVERTED_DIR,),
}

# The steps whose results a step reads, as a function of the spec (train needs f0 only with pitch).
PREREQUISITES: dict[str, Callable[[Any], tuple[str, ...]]] = {
    "preprocess": lambda spec: (),
    "f0": lambda spec: ("preprocess",),
    "features": lambda spec: ("preprocess",),
    "train": lambda spec: ("f0", "features") if spec.model.pitch_guidance else ("features",),
    "index": lambda spec: ("features",),
    "convert": lambda spec: ("train", "index") if "index" in spec.steps else ("train",),
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
        from rvc_pipeline.core.errors import WeightsNotFound
        from rvc_pipeline.provenance import weight_identity
        from rvc_pipeline.weights import resolve_weight

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


def _check_f0(exp: Experiment, storage: Storage) -> CheckedInputs:
    """f0's check: the weights its pitch method needs (catalog; the method reads the spec's reference)."""
    from rvc_pipeline.components.pitch.base import needed_weights, weights_key

    spec = exp.spec
    ref = next(iter(needed_weights(spec).values()), None) if spec.model.pitch_guidance else None
    return _with_weights("f0", weights_key(spec.f0.method), lambda _: ref, "pitch weights")(exp, storage)


def _check_convert(exp: Experiment, storage: Storage) -> CheckedInputs:
    from rvc_pipeline.steps.convert import check_inputs

    return check_inputs(exp, storage)


def _check_dataset(exp: Experiment, storage: Storage) -> CheckedInputs:
    from rvc_pipeline.steps.preprocess import check_inputs

    return check_inputs(exp, storage)


INPUT_CHECKS: dict[str, InputCheck] = {
    "preprocess": _check_dataset,
    "f0": _check_f0,
    "features": _with_weights("features", "embedder_weights", lambda spec: spec.features.embedder,
                              "HuBERT embedder"),
    "train": lambda exp, st: check_prerequisites(exp, st, "train"),
    "index": lambda exp, st: check_prerequisites(exp, st, "index"),
    "convert": _check_convert,
}


def open_artifacts(exp: Experiment) -> Storage:
    st = exp.spec.storage
    return open_storage(st.uri, endpoint=st.endpoint, region=st.region)
