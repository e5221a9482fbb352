"""What the operator may do with an experiment's storage, and what it reads there.

Storage is touched only as the experiment may (ownership.py): within the storage prefixes the administrator
allows its namespace, and only a folder whose ownership record (logs/<name>/.rvc/owner.json) names this
resource's uid; that record is written when the experiment starts.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from rvc_pipeline.core import layout
from rvc_pipeline.core.spec import STEP_ORDER, Experiment, SpecError
from rvc_pipeline.core.storage import Storage, open_storage

from . import ownership, progress_reader
from .api import DatasetStatus, ExperimentStatus, ProgressStatus, TrainingStatus
from .cluster import ClusterAPI
from .config import OperatorConfig
from .ownership import Owner, Refusal, folder_key, owner_key

log = logging.getLogger("rvc_operator")

StorageOpener = Callable[[dict[str, Any], OperatorConfig], Storage]

_storage_cache: dict[tuple[str, str | None, str | None], Storage] = {}
_storage_lock = threading.Lock()


def open_experiment_storage(manifest: dict[str, Any], cfg: OperatorConfig) -> Storage:
    """The experiment's storage, opened with the operator's own credentials (its environment)."""
    st = (manifest.get("spec") or {}).get("storage") or {}
    key = (str(st.get("uri", "")), st.get("endpoint") or cfg.s3_endpoint, st.get("region"))
    with _storage_lock:
        if key not in _storage_cache:
            storage = open_storage(key[0], endpoint=key[1], region=key[2])
            client = getattr(storage, "client", None)
            if client is not None:
                # The operator only peeks at small objects: fail fast instead of the pipeline's patient
                # retries, so an unreachable store never stalls a reconcile for minutes.
                import boto3
                from botocore.config import Config

                storage.client = boto3.client(  # type: ignore[attr-defined]
                    "s3", endpoint_url=getattr(storage, "endpoint", None) or None,
                    region_name=client.meta.region_name,
                    config=Config(connect_timeout=3, read_timeout=15,
                                  retries={"max_attempts": 2, "mode": "standard"}))
            _storage_cache[key] = storage
        return _storage_cache[key]


@dataclasses.dataclass
class StorageAccess:
    """What this reconcile may do with the experiment's storage. `storage` is set only when the folder is
    this resource's (ownership record checked or just written); `refusal` when the operator must not
    touch it; neither when storage could not be read this time (the state machine goes on without it)."""

    storage: Storage | None = None
    name: str = ""
    markers: set[str] | None = None
    refusal: Refusal | None = None


@dataclasses.dataclass(frozen=True)
class FolderState:
    markers: set[str]
    record_present: bool
    record: Owner | None


def read_folder_state(storage: Storage, name: str) -> FolderState:
    """One listing of logs/<name>/.rvc/: the step markers and the ownership record (read when small)."""
    objs = storage.list(layout.marker_prefix(name))
    markers = progress_reader.markers_in([o.key for o in objs], STEP_ORDER)
    rec = next((o for o in objs if o.key == owner_key(name)), None)
    if rec is None:
        return FolderState(markers, False, None)
    data = storage.read_bytes(rec.key) if rec.size <= ownership.MAX_RECORD_BYTES else None
    return FolderState(markers, True, ownership.parse_record(data))


def has_older_rival(api: ClusterAPI, body: dict[str, Any], exp: Experiment, cfg: OperatorConfig) -> bool:
    """Whether an older live RVCExperiment, allowed there itself, names the same endpoint and folder."""
    mine = ownership.location(exp, cfg.s3_endpoint)
    for other in api.list_experiments(cfg.watch_namespace):
        o_exp, _ = ownership.admit_storage(other, cfg.storage_allowed_prefixes, cfg.s3_endpoint)
        place = ownership.location(o_exp, cfg.s3_endpoint) if o_exp is not None else None
        if ownership.is_older_rival(body, mine, other, place):
            return True
    return False


def settle_owner(api: ClusterAPI, body: dict[str, Any], exp: Experiment, storage: Storage,
                 cfg: OperatorConfig, now: datetime, *, takeover: bool = True) -> tuple[str, set[str]]:
    """(verdict, markers): OWNED once the record names this resource (writing it when the folder is
    unowned, or `takeover` from a deleted namesake), else FOREIGN."""
    me, name = Owner.of(body, now), exp.name
    state = read_folder_state(storage, name)
    rival = not state.record_present and bool(state.markers) and has_older_rival(api, body, exp, cfg)
    verdict = ownership.verdict(state.record, state.record_present, me, bool(state.markers), rival)
    if verdict == ownership.CLAIM:
        if not storage.create_exclusive(owner_key(name), me.to_json()):
            state = read_folder_state(storage, name)  # lost a race: the winner's record decides
            won = state.record is not None and state.record.uid == me.uid
            return (ownership.OWNED if won else ownership.FOREIGN), state.markers
        log.info("%s/%s: wrote ownership record %s", me.namespace, me.name, owner_key(name))
        return ownership.OWNED, state.markers
    if verdict == ownership.TAKEOVER and takeover:
        storage.write_bytes(owner_key(name), me.to_json())
        log.info("%s/%s: took over %s from a deleted namesake", me.namespace, me.name, owner_key(name))
        return ownership.OWNED, state.markers
    return (verdict if verdict == ownership.OWNED else ownership.FOREIGN), state.markers


def storage_access(api: ClusterAPI, body: dict[str, Any], cfg: OperatorConfig, opener: StorageOpener,
                   now: datetime, parsed: Experiment | SpecError | None = None) -> StorageAccess:
    """Allow-list first (storage is not even opened when refused), then the ownership record. `parsed`:
    the manifest as the caller parsed it already (None: parsed here)."""
    exp, refusal = ownership.admit_storage(body, cfg.storage_allowed_prefixes, cfg.s3_endpoint, parsed)
    if exp is None:
        return StorageAccess(refusal=refusal)
    try:
        storage = opener(body, cfg)
        verdict, markers = settle_owner(api, body, exp, storage, cfg, now)
    except Exception as e:  # noqa: BLE001 - storage trouble must not stop the state machine
        meta = body.get("metadata") or {}
        log.warning("%s/%s: cannot read storage (%s); continuing from the cluster state only",
                    meta.get("namespace"), meta.get("name"), e)
        return StorageAccess(name=exp.name)
    if verdict != ownership.OWNED:
        return StorageAccess(name=exp.name, refusal=Refusal(
            "StorageOwnedElsewhere", ownership.OWNED_ELSEWHERE.format(name=exp.name)))
    return StorageAccess(storage=storage, name=exp.name, markers=markers)


@dataclasses.dataclass
class StorageView:
    markers: set[str] | None = None
    progress: ProgressStatus | None = None
    training: TrainingStatus | None = None
    index_file: str | None = None
    step_etas: dict[str, float] | None = None  # running per-file steps -> seconds left
    dataset: DatasetStatus | None = None


def read_storage_view(status: ExperimentStatus, total_epochs: int | None, access: StorageAccess,
                      where: str = "") -> StorageView:
    """Markers (always), training progress (while train runs or until its final epoch is shown) and the
    index file (once the index step may have finished), of an owned folder only. Storage errors leave the
    fields None; `where` (namespace/name) names the experiment in the log."""
    view = StorageView(markers=access.markers)
    storage, name = access.storage, access.name
    if storage is None or view.markers is None:
        return view
    train = status.steps.train.phase if status.steps and status.steps.train else None
    index = status.steps.index.phase if status.steps and status.steps.index else None
    final_shown = status.progress is not None and status.progress.percent == 100.0
    try:
        if train == "Running" or (train == "Succeeded" and not final_shown):
            view.progress, view.training = progress_reader.read_train_view(storage, name, total_epochs)
        if index == "Running" or "index" in view.markers:
            view.index_file = progress_reader.find_index(storage, name)
        _read_data_view(view, status, access)
    except Exception as e:  # noqa: BLE001 - storage trouble must not stop the state machine
        log.warning("%s: cannot read storage (%s); continuing from the cluster state only", where or name, e)
    return view


def _read_data_view(view: StorageView, status: ExperimentStatus, access: StorageAccess) -> None:
    """The ETAs of the running per-file steps, and status.dataset once preprocess's marker exists (read
    until the status shows it)."""
    storage, name = access.storage, access.name
    if storage is None or view.markers is None:
        return
    running = [s for s in progress_reader.FILE_STEPS
               if status.steps is not None and getattr(getattr(status.steps, s), "phase", None) == "Running"]
    if running:
        view.step_etas = progress_reader.read_file_step_etas(storage, name, running)
    if "preprocess" in view.markers and status.dataset is None:
        view.dataset = progress_reader.read_dataset(storage, name)


def delete_owned_artifacts(api: ClusterAPI, body: dict[str, Any], cfg: OperatorConfig,
                           opener: StorageOpener) -> list[str]:
    """Delete logs/<name>/ of a deleted experiment, only when allowed and owned by its uid: keys under that
    folder only, the ownership record last (not in the returned list of artifacts deleted)."""
    meta = body.get("metadata") or {}
    who = f"{meta.get('namespace', 'default')}/{meta.get('name')}"
    exp, refusal = ownership.admit_storage(body, cfg.storage_allowed_prefixes, cfg.s3_endpoint)
    if exp is None:
        log.warning("%s: artifacts kept: %s", who, refusal.message if refusal else "no usable s3:// storage")
        return []
    deleted: list[str] = []
    try:
        storage = opener(body, cfg)
        verdict, _ = settle_owner(api, body, exp, storage, cfg, datetime.now(timezone.utc), takeover=False)
        if verdict != ownership.OWNED:
            log.warning("%s: artifacts kept: %s", who, ownership.OWNED_ELSEWHERE.format(name=exp.name))
            return []
        for key in ownership.deletable_keys([o.key for o in storage.list(folder_key(exp.name))], exp.name):
            storage.delete(key)
            deleted.append(key)
        log.info("%s: deleted %d object(s) under %s/%s", who, len(deleted), exp.spec.storage.uri,
                 folder_key(exp.name))
    except Exception as e:  # noqa: BLE001
        log.error("%s: could not delete artifacts under %s: %s", who, folder_key(exp.name), e)
    return [k for k in deleted if k != owner_key(exp.name)]
