"""Typed progress events: one model per kind, written by the steps (progress.Reporter) and read back by the
operator (rvc_operator.progress_reader). Torch-free.

On disk each event is one JSON object per line of logs/<exp>/progress.jsonl (layout.PROGRESS_FILE):

    {"time": 1764650000.123, "experiment": "alice", "step": "train", "event": "epoch", "epoch": 3, ...}

`time`, `experiment`, `step` and `event` come first, then the kind's fields, only those the writer gave.
Fields a kind does not declare are kept (extra="allow": train_start carries the resume plan's facts), so a
reader of an older or newer version still parses the line; a kind it does not know, or a line whose
declared fields do not fit, is skipped by `parse_record` rather than failing the reader.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError


def _number(v: Any) -> Any:
    """Numbers only: true/false and strings are not numbers here (pydantic would take them)."""
    if isinstance(v, bool | str):
        raise ValueError(f"expected a number, got {type(v).__name__}")
    return v


Int = Annotated[int, BeforeValidator(_number)]
Float = Annotated[float, BeforeValidator(_number)]


class _Event(BaseModel):
    model_config = ConfigDict(extra="allow")

    time: Float = 0.0
    experiment: str = ""
    step: str = ""


# ------------------------------------------------------------------------------------- every step
class StepStart(_Event):
    """The step began (after its inputs were checked)."""

    event: Literal["start"] = "start"


class StepDone(_Event):
    """The step finished; its marker is written next."""

    event: Literal["done"] = "done"
    seconds: Float | None = None


class StepFailedEvent(_Event):
    """The step raised; `error` is the start of its message."""

    event: Literal["failed"] = "failed"
    error: str = ""


class StepWarning(_Event):
    """Something the user should know; the step goes on."""

    event: Literal["warning"] = "warning"
    message: str = ""


class FilesProgress(_Event):
    """Per-file steps (preprocess, f0, features): files done of total, audio seconds so far."""

    event: Literal["progress"] = "progress"
    files_done: Int
    files_total: Int
    audio_seconds: Float | None = None


# ------------------------------------------------------------------------------------- train
class Losses(BaseModel):
    """Generator, discriminator and mel losses of one report (None where not reported or not finite)."""

    loss_g: float | None = None
    loss_d: float | None = None
    loss_mel: float | None = None


class TrainStart(_Event):
    """Training set up: where it resumes and how it runs."""

    event: Literal["train_start"] = "train_start"
    start_epoch: Int | None = None
    epochs: Int | None = None
    global_step: Int | None = None
    steps_per_epoch: Int | None = None
    batch_size: Int | None = None
    world_size: Int | None = None
    precision: str | None = None
    device: str | None = None
    start_epoch_step: Int | None = None  # steps of start_epoch already trained (a preempted run's resume)


class TrainStep(_Event):
    """One optimizer step's losses (the first steps, then every so many steps or seconds)."""

    event: Literal["train_step"] = "train_step"
    epoch: Int | None = None
    global_step: Int | None = None
    loss_g: Float | None = None
    loss_d: Float | None = None
    loss_mel: Float | None = None
    loss_kl: Float | None = None
    loss_fm: Float | None = None
    lr: Float | None = None
    grad_norm_g: Float | None = None
    grad_norm_d: Float | None = None

    def losses(self) -> Losses:
        return Losses(loss_g=self.loss_g, loss_d=self.loss_d, loss_mel=self.loss_mel)


class EpochEnd(_Event):
    """One epoch's summary: its averages, wall time and the LR it ran with."""

    event: Literal["epoch"] = "epoch"
    epoch: Int | None = None
    epochs: Int | None = None
    seconds: Float | None = None
    steps: Int | None = None
    global_step: Int | None = None
    lr: Float | None = None
    avg_loss_g: Float | None = None
    avg_loss_d: Float | None = None
    avg_loss_mel: Float | None = None
    avg_loss_kl: Float | None = None
    avg_loss_fm: Float | None = None
    ema_loss_mel: Float | None = None
    ema_loss_g: Float | None = None

    def losses(self) -> Losses:
        return Losses(loss_g=self.avg_loss_g, loss_d=self.avg_loss_d, loss_mel=self.avg_loss_mel)


class NonfiniteStep(_Event):
    """A step with NaN/inf loss or gradients was skipped (`streak` in a row)."""

    event: Literal["nonfinite_step"] = "nonfinite_step"
    epoch: Int | None = None
    global_step: Int | None = None
    streak: Int | None = None


class CheckpointSaved(_Event):
    """Checkpoints (and per-epoch exports) written; `files` relative to the experiment folder."""

    event: Literal["checkpoint"] = "checkpoint"
    epoch: Int | None = None
    global_step: Int | None = None
    files: list[str] = Field(default_factory=list)


class TrainPreempted(_Event):
    """SIGTERM during training: the state after the last finished step was saved and uploaded (`files`) and
    the run stops (exit 143). The next run resumes in `epoch` after `epoch_step` of its `steps_per_epoch`
    steps (0: at the start of `epoch`), at `global_step`. Seconds are counted from the SIGTERM (to the end
    of the step it came in, to the checkpoint pair written, to its upload done)."""

    event: Literal["preempted"] = "preempted"
    epoch: Int | None = None
    global_step: Int | None = None
    epoch_step: Int | None = None
    steps_per_epoch: Int | None = None
    seconds_to_step_end: Float | None = None
    seconds_to_checkpoint: Float | None = None
    seconds_to_upload: Float | None = None
    files: list[str] = Field(default_factory=list)


class CheckpointCorrupt(_Event):
    """A checkpoint could not be loaded for resuming; an older one is tried."""

    event: Literal["checkpoint_corrupt"] = "checkpoint_corrupt"
    file: str = ""
    error: str = ""


class Evaluated(_Event):
    """A saved checkpoint was evaluated (evaluation/judge.py): its metrics, score and the best so far."""

    event: Literal["eval"] = "eval"
    epoch: Int
    global_step: Int | None = None
    checkpoint: str = ""
    metrics: dict[str, Float] = Field(default_factory=dict)
    score: Float | None = None
    seconds: Float | None = None
    best_epoch: Int | None = None
    best_score: Float | None = None
    best_global_step: Int | None = None
    best_checkpoint: str = ""
    best_metrics: dict[str, Float] = Field(default_factory=dict)
    stop: bool = False


# ------------------------------------------------------------------------------------- index
class IndexLoaded(_Event):
    event: Literal["loaded"] = "loaded"
    vectors: Int
    files: Int


class IndexKmeans(_Event):
    event: Literal["kmeans"] = "kmeans"
    vectors: Int
    seconds: Float | None = None


class IndexTrained(_Event):
    event: Literal["trained"] = "trained"
    n_ivf: Int
    seconds: Float | None = None


Event = Annotated[
    StepStart | StepDone | StepFailedEvent | StepWarning | FilesProgress | TrainStart | TrainStep | EpochEnd
    | NonfiniteStep | CheckpointSaved | TrainPreempted | CheckpointCorrupt | Evaluated | IndexLoaded
    | IndexKmeans | IndexTrained,
    Field(discriminator="event"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
KINDS: frozenset[str] = frozenset(
    m.model_fields["event"].default for m in _Event.__subclasses__()
)
"""Every event kind (the `event` value of each model)."""


def make_event(kind: str, **fields: Any) -> Event:
    """The event of `kind` with these fields (header fields included); ValueError naming what does not fit."""
    if kind not in KINDS:
        raise ValueError(f"unknown progress event kind {kind!r} (known: {sorted(KINDS)})")
    try:
        return EVENT_ADAPTER.validate_python({**fields, "event": kind})
    except ValidationError as e:
        raise ValueError(f"progress event {kind!r}: {_first_error(e)}") from None


def to_record(ev: Event) -> dict[str, Any]:
    """The JSON object of one line: header first, then only the fields that were set."""
    body = ev.model_dump(exclude_unset=True)
    head = {"time": ev.time, "experiment": ev.experiment, "step": ev.step, "event": ev.event}
    return {**head, **{k: v for k, v in body.items() if k not in head}}


def records(text: str | bytes) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSON-lines text, skipping blank, torn (a ranged read's first line, a crashed
    writer's last) and non-object lines."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            yield rec


def parse_record(rec: dict[str, Any]) -> Event | None:
    """The typed event of one line's object; None for a kind this version does not know or fields that do
    not fit (another version's line, or a damaged one)."""
    if rec.get("event") not in KINDS:
        return None
    try:
        return EVENT_ADAPTER.validate_python(rec)
    except ValidationError:
        return None


def parse_events(text: str | bytes) -> list[Event]:
    """Every event of a progress.jsonl text (or its tail) that this version can read, in file order."""
    return [ev for ev in map(parse_record, records(text)) if ev is not None]


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"][1:]) or "event"
    return f"{where}: {err['msg']}"
