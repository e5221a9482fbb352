"""Read training progress and artifacts from the experiment's storage (no torch, no cluster).

The pipeline appends typed events (rvc_pipeline.core.events) to logs/<exp>/progress.jsonl and pushes the
file after every epoch. The operator reads the tail of that file and turns the last training events
(train_start, train_step, epoch, done) into status.progress. Lines it cannot read (torn, another
version's kinds) are skipped.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Any, TypeVar

from rvc_pipeline.core import layout
from rvc_pipeline.core.errors import StorageError
from rvc_pipeline.core.events import (
    EpochEnd,
    Evaluated,
    Event,
    FilesProgress,
    Losses,
    StepDone,
    StepStart,
    TrainStart,
    TrainStep,
)
from rvc_pipeline.core.events import parse_events as parse_event_lines
from rvc_pipeline.core.storage import Storage

from .api import DatasetStatus, EvaluationStatus, ProgressStatus, TrainingStatus
from .jobs import SHARDED_STEPS

log = logging.getLogger("rvc_operator")

TAIL_BYTES = 256 * 1024
E = TypeVar("E")


def read_tail(storage: Storage, key: str, nbytes: int = TAIL_BYTES) -> bytes | None:
    """The last `nbytes` of an object (ranged GET on S3, seek locally); None if it does not exist."""
    client = getattr(storage, "client", None)
    bucket = getattr(storage, "bucket", None)
    try:
        if client is not None and bucket is not None:
            full = storage._k(key)  # type: ignore[attr-defined]
            try:
                resp = client.get_object(Bucket=bucket, Key=full, Range=f"bytes=-{nbytes}")
            except Exception as e:  # noqa: BLE001 - classify below
                code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
                if code in ("NoSuchKey", "404", "NotFound"):
                    return None
                if code == "InvalidRange":  # empty object
                    return b""
                raise
            return resp["Body"].read()
        local = storage.local_path()
        if local is not None:
            p = local / key
            if not p.is_file():
                return None
            with open(p, "rb") as f:
                size = p.stat().st_size
                f.seek(max(0, size - nbytes))
                return f.read()
        if not storage.exists(key):
            return None
        return storage.read_bytes(key)[-nbytes:]
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - normalised
        raise StorageError(f"{storage.uri}/{key}: {e}") from None


def parse_events(data: bytes) -> list[Event]:
    """The typed events of a progress.jsonl tail (a torn first and last line are skipped)."""
    return parse_event_lines(data)


def _last(train: Sequence[Event], kind: type[E]) -> E | None:
    return next((e for e in reversed(train) if isinstance(e, kind)), None)


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _epoch_fields(last_epoch: EpochEnd | None, start: TrainStart | StepStart | None, done: StepDone | None,
                  total_epochs: int | None) -> dict[str, object]:
    """epoch, epochs, epochText, percent: the last summary's epoch of the total the run reported."""
    reported = [e.epochs for e in (last_epoch, start) if isinstance(e, EpochEnd | TrainStart)]
    epochs = next((n for n in reported if n is not None), total_epochs)
    epoch = last_epoch.epoch if last_epoch is not None else None
    if epoch is None and done is not None and epochs is not None:
        epoch = epochs
    n = int(epoch or 0)
    if not epochs:
        return {"epoch": n, "epoch_text": str(n)}
    return {"epoch": n, "epochs": int(epochs), "epoch_text": f"{n}/{int(epochs)}",
            "percent": round(100.0 * min(1.0, n / float(epochs)), 1)}


def _loss_fields(last_epoch: EpochEnd | None, last_step: TrainStep | None) -> dict[str, object]:
    """Losses of the newer of the last step and the last epoch summary (the other fills gaps)."""
    step_newer = last_step is not None and (last_epoch is None or last_step.time >= last_epoch.time)
    reports = [r.losses() for r in ((last_step, last_epoch) if step_newer else (last_epoch, last_step))
               if r is not None]
    out: dict[str, object] = {}
    for field in Losses.model_fields:
        v = next((x for x in (_finite(getattr(r, field)) for r in reports) if x is not None), None)
        if v is not None:
            out[field] = round(v, 6)
    return out


def progress_from_events(events: Sequence[Event], total_epochs: int | None = None) -> ProgressStatus | None:
    """status.progress from the train events (None if training has not reported yet)."""
    train = [e for e in events if e.step == "train"]
    last_epoch, last_step, done = _last(train, EpochEnd), _last(train, TrainStep), _last(train, StepDone)
    start: TrainStart | StepStart | None = _last(train, TrainStart) or _last(train, StepStart)
    found = [e for e in (last_epoch, last_step, done, start) if e is not None]
    if not found:
        return None
    out: dict[str, object] = {"step": "train", **_epoch_fields(last_epoch, start, done, total_epochs)}
    gs = next((e.global_step for e in (last_epoch, last_step) if e is not None and e.global_step is not None),
              None)
    if gs is not None:
        out["global_step"] = int(gs)
    out.update(_loss_fields(last_epoch, last_step))
    sec = _finite(last_epoch.seconds) if last_epoch is not None else None
    if sec is not None:
        out["seconds_per_epoch"] = round(sec, 3)
    newest = max(found, key=lambda e: e.time)
    if newest.time and math.isfinite(newest.time):
        out["updated"] = datetime.fromtimestamp(newest.time, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return ProgressStatus.model_validate(out)


def _metrics(values: dict[str, float]) -> dict[str, float] | None:
    out = {k: round(v, 6) for k, v in values.items() if math.isfinite(v)}
    return out or None


def training_from_events(events: Sequence[Event]) -> TrainingStatus | None:
    """status.training from the train step's `eval` events (checkpoints relative to the experiment folder;
    the state machine makes them URIs). The best comes from the newest event, which carries it."""
    evals = [e for e in events if isinstance(e, Evaluated) and e.step == "train"]
    if not evals:
        return None
    last = evals[-1]
    latest = EvaluationStatus(epoch=last.epoch, global_step=last.global_step, score=_finite(last.score),
                              checkpoint=last.checkpoint or None, metrics=_metrics(last.metrics))
    best = None
    if last.best_epoch is not None:
        best = EvaluationStatus(epoch=last.best_epoch, global_step=last.best_global_step,
                                score=_finite(last.best_score), checkpoint=last.best_checkpoint or None,
                                metrics=_metrics(last.best_metrics))
    return TrainingStatus(best=best, latest=latest, stopped_early=True if last.stop else None)


def read_progress(storage: Storage, experiment: str, total_epochs: int | None = None
                  ) -> ProgressStatus | None:
    return read_train_view(storage, experiment, total_epochs)[0]


def read_train_view(storage: Storage, experiment: str, total_epochs: int | None = None
                    ) -> tuple[ProgressStatus | None, TrainingStatus | None]:
    """(status.progress, status.training) from one read of the progress file's tail."""
    data = read_tail(storage, layout.progress_key(experiment))
    if not data:
        return None, None
    events = parse_events(data)
    return progress_from_events(events, total_epochs), training_from_events(events)


FILE_STEPS = SHARDED_STEPS  # the per-file steps: they report files done, and run sharded when asked


def event_shard(e: Event) -> tuple[int, int] | None:
    """(I, N) of an event written by shard I of N of a sharded step: its `shard` field, "I/N" (or an int
    with a `shards` field beside it); None for an event of a step run as one pod, or a value that does
    not fit (0 <= I < N)."""
    raw, count = getattr(e, "shard", None), getattr(e, "shards", None)
    if isinstance(raw, str) and raw.count("/") == 1:
        raw, count = raw.split("/")
    try:
        index, n = int(str(raw)), int(str(count))
    except ValueError:
        return None
    return (index, n) if 0 <= index < n <= 64 else None


def shard_eta_key(step: str, index: int, count: int) -> str:
    """The key of shard I of N's ETA among file_step_etas' results (a step run as one pod: the step)."""
    return f"{step}/shard-{index}-of-{count}"


def files_eta(events: Sequence[Event], step: str, shard: tuple[int, int] | None = None) -> float | None:
    """Seconds left of a per-file step's current run (of shard (I, N) of it, when given): the file rate
    from its start (or first progress event) to its latest progress event; None before two points in
    time or when nothing moved."""
    run: list[Event] = []
    for e in events:
        if e.step != step or event_shard(e) != shard:
            continue
        if isinstance(e, StepStart):
            run = [e]
        elif isinstance(e, FilesProgress):
            run.append(e)
    marks = [(e.time, e.files_done if isinstance(e, FilesProgress) else 0, getattr(e, "files_total", None))
             for e in run]
    if len(marks) < 2 or not isinstance(run[-1], FilesProgress):
        return None
    (t0, n0, _), (t1, n1, total) = marks[0], marks[-1]
    if total is None or not (math.isfinite(t0) and math.isfinite(t1)) or t1 <= t0 or n1 <= n0:
        return None
    left = max(0, total - n1)
    return round(left * (t1 - t0) / (n1 - n0), 1)


def file_step_etas(events: Sequence[Event], steps: Sequence[str] = FILE_STEPS) -> dict[str, float]:
    """step -> files_eta, for the per-file steps that have one; and shard_eta_key(step, I, N) -> the ETA
    of shard I of N, for every shard whose events carry its `shard` (see event_shard)."""
    out = {s: files_eta(events, s) for s in steps}
    shards = {(e.step, sh) for e in events if e.step in steps and (sh := event_shard(e)) is not None}
    for s, (i, n) in shards:
        out[shard_eta_key(s, i, n)] = files_eta(events, s, (i, n))
    return {s: v for s, v in out.items() if v is not None}


def read_file_step_etas(storage: Storage, experiment: str, steps: Sequence[str]) -> dict[str, float]:
    """file_step_etas of the progress file's tail (empty when it does not exist yet)."""
    data = read_tail(storage, layout.progress_key(experiment))
    return file_step_etas(parse_events(data), steps) if data else {}


def _count(summary: Mapping[str, Any], *keys: str) -> int | None:
    total = 0
    for k in keys:
        v = summary.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            return None
        total += v
    return total


def _minutes(v: object) -> float | None:
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
        return round(float(v) / 60.0, 2)
    return None


def dataset_from_summary(summary: Mapping[str, Any] | None) -> DatasetStatus | None:
    """status.dataset from preprocess's completion marker (its report); fields it lacks or that do not
    fit stay unset; None when nothing fits."""
    if not summary:
        return None
    ds = DatasetStatus(
        minutes=_minutes(summary.get("input_seconds")), piece_minutes=_minutes(summary.get("piece_seconds")),
        files_used=_count(summary, "files_used"), files_skipped=_count(summary, "files_skipped"),
        pieces=_count(summary, "pieces"),
        pieces_skipped=_count(summary, "peak_filtered_pieces", "short_pieces_dropped",
                              "silent_pieces_dropped"),
    )
    return ds if ds.model_dump(exclude_none=True) else None


def read_dataset(storage: Storage, experiment: str) -> DatasetStatus | None:
    """dataset_from_summary of logs/<exp>/.rvc/preprocess.done.json (None when missing or unreadable)."""
    key = layout.marker_key(experiment, "preprocess")
    if not storage.exists(key):
        return None
    try:
        data = json.loads(storage.read_bytes(key))
    except ValueError:
        return None
    return dataset_from_summary(data) if isinstance(data, dict) else None


def read_markers(storage: Storage, experiment: str, steps: tuple[str, ...]) -> set[str]:
    """Steps whose completion marker logs/<exp>/.rvc/<step>.done.json exists (one listing)."""
    prefix = layout.marker_prefix(experiment).rstrip("/")
    return markers_in([o.key for o in storage.list(prefix)], steps)


def markers_in(keys: list[str], steps: tuple[str, ...]) -> set[str]:
    """Steps of `steps` whose <step>.done.json is among `keys` (a listing of logs/<exp>/.rvc/)."""
    found = (layout.step_of_marker(PurePosixPath(key).name) for key in keys)
    return {step for step in found if step in steps}


def find_index(storage: Storage, experiment: str) -> str | None:
    """Key of the newest-named added_*.index directly in logs/<exp>/ (what RVC users load)."""
    prefix = layout.exp_key(experiment)
    names = [o.key for o in storage.list(prefix, recursive=False)
             if layout.is_added_index(PurePosixPath(o.key).name)]
    if not names:  # listing is recursive on local storage, filter to the folder itself
        return None
    direct = [k for k in names if PurePosixPath(k).parent.as_posix() == prefix]
    return sorted(direct or names)[-1]
