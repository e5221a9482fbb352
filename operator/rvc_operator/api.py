"""The typed status of an RVCExperiment: what the operator writes to .status.

The state machine (status.decide) works on these models; crd.py generates the status half of the CRD
schema from them, so the API server refuses a status that does not fit them. `load_status` and
`dump_status` convert at the boundary: the stored dict in, the dict to patch out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel
from rvc_pipeline.core.spec import STEP_ORDER, Experiment, parse_manifest


# --------------------------------------------------------------------------------------------------
# status models (crd.py turns them into the CRD schema: descriptions and docstrings appear there)
# --------------------------------------------------------------------------------------------------
class _StatusModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


StepPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Skipped"]
# Suspended: spec.suspend is true (its running step was stopped; nothing runs until it is false again)
ExperimentPhase = Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"]


class RunStatus(_StatusModel):
    """What one line of Jobs reports: a whole step, or one shard of a sharded step (its own attempts,
    failures and backoff). The state machine's per-Job functions work on either."""

    phase: StepPhase = Field(description="Pending, Running, Succeeded, Failed or Skipped.")
    job: str | None = Field(default=None, description="Name of the step's current (latest) Job.")
    attempts: int = Field(default=0, ge=0, description="Jobs created for this step so far (names end -<n>).")
    failures: int = Field(
        default=0, ge=0, description="Failed attempts of the current run (retries are counted here)."
    )
    start_time: str | None = Field(default=None, description="When the current attempt's Job was created.")
    end_time: str | None = Field(default=None, description="When the step finished.")
    message: str | None = Field(default=None, description="Last state change, or the error of a failure.")
    reason: str | None = Field(default=None, description="Machine-readable reason of the last change.")
    exit_code: int | None = Field(default=None, description="Exit code of the last failed pod.")
    retry_after: str | None = Field(default=None, description="A retry waits until this time (backoff).")


class ShardStatus(RunStatus):
    """One shard of a sharded step (spec.resources.shards > 1): Job `<name>-<step>-s<index>-<attempt>`
    running `rvc-pipeline <step> --shard <index>/<shards>`."""

    index: int = Field(ge=0, description="Shard index, 0-based (the I of --shard I/N).")
    eta_seconds: float | None = Field(
        default=None, ge=0, description="Estimated seconds left of this shard while it runs (from its "
        "progress events, when the pipeline tags them with the shard)."
    )


class StepStatus(RunStatus):
    force: bool | None = Field(
        default=None, description="The next Job runs with --force (a spec change reruns this step)."
    )
    inputs_hash: str | None = Field(
        default=None, description="Hash of the spec fields this step depends on, as of its last run."
    )
    eta_seconds: float | None = Field(
        default=None, ge=0, description="Estimated seconds left while a per-file step (preprocess, f0, "
        "features) runs: its file rate from the first to the latest progress event (sharded: the "
        "slowest shard, once every unfinished shard has an estimate)."
    )
    shards: list[ShardStatus] | None = Field(
        default=None, min_length=2, max_length=64, description="A sharded step's shards, index 0..N-1 in "
        "order (N = spec.resources.shards as of the step's start, kept until the step ends); unset for a "
        "step run as one Job."
    )

    @field_validator("shards")
    @classmethod
    def _shards_in_order(cls, v: list[ShardStatus] | None) -> list[ShardStatus] | None:
        # a list with a gap or a repeated index would let the step succeed without one shard's work
        if v is not None and [sh.index for sh in v] != list(range(len(v))):
            raise ValueError(f"shards: indexes must be 0..{len(v) - 1} in order")
        return v


class StepsStatus(_StatusModel):
    preprocess: StepStatus | None = Field(default=None, description="Step 2a: slice and resample.")
    f0: StepStatus | None = Field(default=None, description="Step 2b: pitch extraction.")
    features: StepStatus | None = Field(default=None, description="Step 2b: HuBERT features.")
    train: StepStatus | None = Field(default=None, description="Step 3: training.")
    index: StepStatus | None = Field(default=None, description="Step 4: faiss index.")
    convert: StepStatus | None = Field(default=None, description="Optional: convert spec.convert.source with "
                                       "the model (Skipped unless spec.steps lists it).")


class Condition(_StatusModel):
    type: Literal["Ready", "Progressing", "Failed", "Reconciling", "Stalled", "Suspended"] = Field(
        description="Ready, Progressing, Failed, kstatus' Reconciling (steps left to run) and Stalled "
        "(failed, or cannot make progress), and Suspended (spec.suspend; present once the experiment was "
        "first suspended).")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason of the last transition.")
    message: str | None = Field(default=None, description="Human-readable detail.")
    last_transition_time: str = Field(description="When status last changed.")
    observed_generation: int | None = Field(default=None, description="metadata.generation it reflects.")


class ProgressStatus(_StatusModel):
    step: str | None = Field(default=None, description="Step the progress belongs to (train).")
    epoch: int | None = Field(default=None, description="Last completed epoch.")
    epochs: int | None = Field(default=None, description="Total epochs.")
    epoch_text: str | None = Field(default=None, description="epoch/epochs, for kubectl get.")
    global_step: int | None = Field(default=None, description="Optimizer steps so far.")
    loss_g: float | None = Field(default=None, description="Generator loss (last reported).")
    loss_d: float | None = Field(default=None, description="Discriminator loss (last reported).")
    loss_mel: float | None = Field(default=None, description="Mel reconstruction loss (last reported).")
    seconds_per_epoch: float | None = Field(default=None, description="Wall seconds of the last epoch.")
    percent: float | None = Field(default=None, description="Completed fraction of training, 0..100.")
    updated: str | None = Field(default=None, description="Time of the event this was read from.")


class EvaluationStatus(_StatusModel):
    epoch: int | None = Field(default=None, description="Epoch of the evaluated checkpoint.")
    global_step: int | None = Field(default=None, description="Optimizer step of the evaluated checkpoint.")
    score: float | None = Field(default=None, description="Score (spec.eval.score; higher is better).")
    checkpoint: str | None = Field(default=None, description="URI of the evaluated G_*.pth checkpoint.")
    metrics: dict[str, float] | None = Field(
        default=None, description="Metrics on held-out data (mel_l1, speaker_sim, dnsmos_ovrl, ...)."
    )


class TrainingStatus(_StatusModel):
    best: EvaluationStatus | None = Field(
        default=None, description="The best evaluated checkpoint, exported as status.artifacts.model."
    )
    latest: EvaluationStatus | None = Field(default=None, description="The latest evaluated checkpoint.")
    stopped_early: bool | None = Field(default=None,
                                       description="Training stopped early (spec.eval.patience).")
    eta_seconds: float | None = Field(
        default=None, ge=0, description="Estimated seconds of training left as of progress.updated: "
        "seconds per epoch times the epochs left (0 once training finished)."
    )


class DatasetStatus(_StatusModel):
    """What preprocess made of the dataset (from its completion marker)."""

    minutes: float | None = Field(default=None, ge=0, description="Minutes of audio in the dataset files.")
    piece_minutes: float | None = Field(default=None, ge=0, description="Minutes of the pieces kept.")
    files_used: int | None = Field(default=None, ge=0, description="Files that gave at least one piece.")
    files_skipped: int | None = Field(default=None, ge=0, description="Files skipped (unreadable, silent, "
                                      "too short).")
    pieces: int | None = Field(default=None, ge=0, description="Training pieces kept.")
    pieces_skipped: int | None = Field(default=None, ge=0, description="Pieces dropped (too loud, silent, "
                                       "too short).")


class ArtifactsStatus(_StatusModel):
    model: str | None = Field(default=None, description="URI of the exported RVC model (.pth).")
    index: str | None = Field(default=None, description="URI of the added_*.index retrieval index.")
    logs: str | None = Field(default=None, description="URI of the experiment folder logs/<name>/.")
    converted: str | None = Field(default=None, description="URI of the convert step's outputs "
                                  "logs/<name>/converted/.")


class ExperimentStatus(_StatusModel):
    """status of an RVCExperiment, written by the operator."""

    phase: ExperimentPhase | None = Field(
        default=None, description="Pending, Queued, Running, Succeeded, Failed or Suspended."
    )
    current_step: str | None = Field(default=None, description="Step running or about to run.")
    message: str | None = Field(default=None, description="Human-readable state or error.")
    observed_generation: int | None = Field(
        default=None, description="metadata.generation the status reflects."
    )
    start_time: str | None = Field(default=None, description="When the first Job was created.")
    completion_time: str | None = Field(default=None, description="When the experiment finished.")
    suspend_time: str | None = Field(
        default=None, description="When the experiment was suspended (spec.suspend); unset when it is not."
    )
    suspended_seconds: int | None = Field(
        default=None, ge=0, description="Seconds spent suspended after startTime, not counted against "
        "spec.lifecycle.activeDeadlineSeconds (the current suspension is added on resume)."
    )
    steps: StepsStatus | None = Field(default=None, description="State of each step of the recipe.")
    conditions: list[Condition] | None = Field(
        default=None, description="Ready, Progressing, Failed, Reconciling, Stalled (and Suspended).")
    progress: ProgressStatus | None = Field(
        default=None, description="Training progress read from logs/<name>/progress.jsonl."
    )
    training: TrainingStatus | None = Field(
        default=None, description="Checkpoint evaluation: the best and the latest evaluated checkpoint."
    )
    artifacts: ArtifactsStatus | None = Field(default=None, description="Where the results are.")
    dataset: DatasetStatus | None = Field(default=None, description="What preprocess made of the dataset.")


assert set(StepsStatus.model_fields) == set(STEP_ORDER)


# --------------------------------------------------------------------------------------------------
# conversions at the boundary
# --------------------------------------------------------------------------------------------------
def step_of(steps: StepsStatus, step: str) -> StepStatus:
    """The status of `step` (a fresh Pending one is put in place when there is none yet)."""
    got: StepStatus | None = getattr(steps, step)
    if got is None:
        got = StepStatus(phase="Pending")
        setattr(steps, step, got)
    return got


def all_steps(st: ExperimentStatus) -> dict[str, StepStatus]:
    """Every step's status in recipe order (missing ones created Pending), the same objects as in `st`."""
    if st.steps is None:
        st.steps = StepsStatus()
    steps = st.steps
    return {s: step_of(steps, s) for s in STEP_ORDER}


def load_status(raw: Mapping[str, Any] | ExperimentStatus | None) -> ExperimentStatus:
    """The stored status as models (a copy). The API server checks every status write against the schema
    made from these models, so a stored status fits them; one that does not (written by hand, or by another
    version) loses its progress first (the operator reads that again from storage), then everything: the
    state machine then adopts the Jobs it finds, so nothing runs twice."""
    if isinstance(raw, ExperimentStatus):
        return raw.model_copy(deep=True)
    data = dict(raw or {})
    for attempt in (data, {k: v for k, v in data.items() if k != "progress"}):
        try:
            return ExperimentStatus.model_validate(attempt)
        except ValidationError:
            continue
    return ExperimentStatus()


def progress_of(progress: Mapping[str, Any] | ProgressStatus) -> ProgressStatus | None:
    """status.progress from what the progress reader found: fields the model does not know are left out
    (the CRD keeps progress open to them, the model does not); None when a known one does not fit."""
    if isinstance(progress, ProgressStatus):
        return progress
    known = {f.alias or name for name, f in ProgressStatus.model_fields.items()}
    try:
        return ProgressStatus.model_validate({k: v for k, v in progress.items() if k in known})
    except ValidationError:
        return None


def dump_status(st: ExperimentStatus) -> dict[str, Any]:
    """The status as the API stores it: camelCase, unset fields left out, currentStep kept as null once
    set (a merge patch then clears it), and no "" values (some API servers, seen on 1.20, read an empty
    string as null and refuse it for a string field)."""
    out = st.model_dump(by_alias=True, exclude_none=True)
    if "current_step" in st.model_fields_set and st.current_step is None:
        out["currentStep"] = None
    _drop_empty_strings(out)
    return out


def _drop_empty_strings(obj: Any) -> None:
    if isinstance(obj, dict):
        for k in [k for k, v in obj.items() if v == ""]:
            del obj[k]
        for v in obj.values():
            _drop_empty_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            _drop_empty_strings(v)


def parse_experiment(manifest: Mapping[str, Any]) -> Experiment:
    """The typed experiment of an RVCExperiment object (metadata name/namespace and spec only): parsed
    once per reconcile and shared by the storage check, the state machine and the Job builders.
    SpecError names the field on bad input (the experiment's folder name included)."""
    meta = manifest.get("metadata") or {}
    exp = parse_manifest({"metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
                          "spec": manifest.get("spec") or {}})
    exp.name  # noqa: B018 - raises SpecError for a bad folder name
    return exp
