"""The convert step (spec.convert): the recordings directly inside `spec.convert.source` converted with the
experiment's exported model `weights/<exp>.pth` (the best evaluated checkpoint when evaluation picked one,
else the last) and its added_*.index when there is one, into `converted/<stem>.<format>`.

The conversion itself is rvc_pipeline.convert's (model loaded once per worker process, formats through
ffmpeg, every output written atomically); this module adds storage, resume, shards and the summary:
* inputs: the files directly inside the source, listed as the dataset is (`steps.preprocess.scan_dataset`),
  refused when the source overlaps the experiment folder; file i (sorted by name) belongs to shard i mod N;
* resume: an output that exists is complete, so a rerun converts only the missing ones. How outputs are
  made (model, index, embedder, pitch weights, options: `_params`) is the step's generation record
  (steps.shards): a change reconverts all. A source file added after the step completed makes its marker
  stale (fingerprint), and the rerun converts that file alone; outputs whose source file is gone are
  deleted (by the unsharded run or shard 0);
* a recording that cannot be converted is reported (summary `failed`, `failed_files`) and skipped; an
  unsharded run fails only when not one recording could be converted.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rvc_pipeline import stepio
from rvc_pipeline.core import layout
from rvc_pipeline.core.errors import StepFailed
from rvc_pipeline.core.spec import ConvertSpec, Experiment, SpecError
from rvc_pipeline.core.storage import Storage, scratch_dir
from rvc_pipeline.steps.preprocess import Dataset, refuse_overlap, scan_dataset

if TYPE_CHECKING:
    from rvc_pipeline.convert import BatchOptions, Job, Outcome, Setup
    from rvc_pipeline.steps.runner import FileProgress, StepContext

log = logging.getLogger("rvc_pipeline")

OUT_DIR = layout.CONVERTED_DIR
PARAMS_FILE = layout.params_file("convert")
PARAMS_VERSION = 1
CHUNK_FILES = 32  # S3 sources: files downloaded, converted and removed from scratch at a time
MAX_LISTED_FAILURES = 50  # failed files named in the summary (the count covers all)


@dataclass(frozen=True)
class ConvertInputs:
    """What the input check found: the source listing, and the stored model and index keys."""

    source: Dataset
    model_key: str
    index_key: str | None


def options(exp: Experiment) -> ConvertSpec:
    """spec.convert; SpecError naming spec.convert.source when the manifest has none."""
    if exp.spec.convert is None:
        raise SpecError("spec.convert.source: required to run the convert step (the recordings to convert)")
    return exp.spec.convert


def _uri(exp: Experiment, key: str) -> str:
    return f"{exp.spec.storage.uri.rstrip('/')}/{key}"


def _identity(storage: Storage, key: str, etag: str | None) -> str:
    """A stored file's identity: its S3 ETag, or the sha256 of a local file."""
    if etag:
        return f"etag:{etag}"
    from rvc_pipeline.provenance import weight_identity

    local = storage.local_path()
    return weight_identity(local / key) if local is not None else "unknown"


def _index_key(storage: Storage, exp: Experiment) -> str | None:
    """The experiment's added_*.index for its model version (the newest name when several)."""
    base = layout.exp_key(exp.name)
    pattern = layout.index_name_pattern(exp.name, exp.spec.model.version)
    names = sorted(n for o in storage.list(base, recursive=False)
                   if pattern.match(n := o.key.rsplit("/", 1)[-1]) and layout.is_added_index(n))
    return f"{base}/{names[-1]}" if names else None


def check_inputs(exp: Experiment, storage: Storage) -> stepio.CheckedInputs:
    """The step's input check (stepio.INPUT_CHECKS): prerequisites (train's marker when spec.steps lists
    it), the exported model (StepFailed naming it), the source (lists, not empty, outside the experiment
    folder). Fingerprint: the source listing, the model and the index (a change reruns the step)."""
    conv = options(exp)
    checked = stepio.check_prerequisites(exp, storage, "convert")
    model_key = f"{layout.exp_key(exp.name)}/{layout.exported_model(exp.name)}"
    model = next((o for o in storage.list(model_key) if o.key == model_key), None)
    if model is None:
        raise StepFailed(f"convert: the model {_uri(exp, model_key)} does not exist (the train step exports "
                         "it); run train first")
    source = scan_dataset(conv.source, exp.spec.storage.endpoint, exp.spec.storage.region)
    try:
        refuse_overlap(source, exp.spec.storage.uri, exp.name)
    except StepFailed as e:
        raise StepFailed(f"spec.convert.source: {e}") from None
    if not source.files:
        raise StepFailed(f"spec.convert.source {conv.source}: no files to convert")
    index_key = _index_key(storage, exp)
    index_etag = next((o.etag for o in storage.list(index_key)), None) if index_key else None
    checked.fingerprint.update({
        "source_digest": source.digest, "model": _identity(storage, model_key, model.etag),
        "index": _identity(storage, index_key, index_etag) if index_key else "none"})
    checked.data = ConvertInputs(source, model_key, index_key)
    return checked


# ------------------------------------------------------------------------------------------------ setup
def _embedder(ctx: StepContext) -> str:
    """The HuBERT file (path), or its reference when it is missing and the demo's random one is allowed."""
    from rvc_pipeline.steps.features import resolve_spec_embedder

    path = resolve_spec_embedder(ctx)
    return str(path) if path is not None else ctx.spec.features.embedder


def _setup(ctx: StepContext, inputs: ConvertInputs) -> Setup:
    from rvc_pipeline.convert import Setup
    from rvc_pipeline.core.fileio import pick_device
    from rvc_pipeline.infer import pitch_weights

    spec, conv = ctx.spec, options(ctx.experiment)
    method = conv.f0_method or spec.f0.method
    f0_weights = pitch_weights(method, None, spec) if spec.model.pitch_guidance else {}
    index = ctx.workdir / inputs.index_key if inputs.index_key else None
    return Setup(model=str(ctx.workdir / inputs.model_key), index=str(index) if index else None,
                 embedder=_embedder(ctx), demo_random_weights=spec.demo_random_weights,
                 device=pick_device("gpu" if spec.gpu else "cpu", what="convert"), f0_method=method,
                 f0_weights=tuple(sorted(f0_weights.items())), index_rate=conv.index_rate)


def _params(ctx: StepContext, setup: Setup) -> dict[str, Any]:
    """What makes the outputs (their provenance): a difference from the recorded one reconverts all."""
    from rvc_pipeline.provenance import weight_identity

    conv = options(ctx.experiment)
    embedder = Path(setup.embedder)
    return {"version": PARAMS_VERSION, "model": weight_identity(setup.model),
            "index": weight_identity(setup.index) if setup.index else None,
            "embedder": weight_identity(embedder) if embedder.exists() else "random",
            "f0_method": setup.f0_method, "f0_weights": {k: weight_identity(v) for k, v in setup.f0_weights},
            "sid": ctx.spec.model.speaker_id, **conv.model_dump(mode="json", exclude={"source", "f0_method"})}


def _batch(ctx: StepContext, setup: Setup) -> BatchOptions:
    from rvc_pipeline.convert import BatchOptions

    conv = options(ctx.experiment)
    opts = {"pitch": float(conv.transpose), "protect": conv.protect, "filter_radius": conv.filter_radius,
            "rms_mix_rate": conv.rms_mix_rate, "sid": ctx.spec.model.speaker_id}
    return BatchOptions(setup, (), ctx.exp_dir / OUT_DIR, fmt=conv.format,
                        workers=ctx.spec.resources.parallelism, convert=opts)


# ------------------------------------------------------------------------------------------------ running
def _jobs(ctx: StepContext, source: Dataset, local_dir: Path) -> list[Job]:
    """One job per source file (`<stem>.<format>`); InferError naming two files of one stem."""
    from rvc_pipeline.convert import plan

    conv = options(ctx.experiment)
    root = source.root if source.root is not None else local_dir
    return plan([root / f.name for f in source.files], ctx.exp_dir / OUT_DIR, conv.format,
                float(conv.transpose), {})


def _clear(ctx: StepContext) -> None:
    stepio.remove_owned_local(ctx.exp_dir / OUT_DIR, stepio.owned_patterns(OUT_DIR))
    if ctx.remote:
        stepio.remove_owned(ctx.storage, ctx.name, OUT_DIR)


def _prune(ctx: StepContext, jobs: list[Job]) -> None:
    """Delete the outputs whose source file is gone (never one another shard writes now)."""
    keep = {j.output.name for j in jobs}
    n = stepio.remove_owned_local(ctx.exp_dir / OUT_DIR, stepio.owned_patterns(OUT_DIR), keep)
    if ctx.remote:
        n = stepio.remove_owned(ctx.storage, ctx.name, OUT_DIR, keep)
    if n:
        log.info("convert: removed %d output(s) whose source file is gone", n)


def _convert(ctx: StepContext, batch: BatchOptions, todo: list[Job], progress: FileProgress) -> list[Outcome]:
    """Convert `todo` (S3 sources: downloaded CHUNK_FILES at a time into scratch, removed after)."""
    from rvc_pipeline.convert import run_jobs
    from rvc_pipeline.core.storage import open_storage

    def advance(o: Outcome) -> None:
        progress.advance(1, o.input_seconds)

    spec = ctx.spec
    if not spec.convert or not spec.convert.source.startswith("s3://"):
        return run_jobs(batch, todo, advance) if todo else []
    src = open_storage(spec.convert.source, endpoint=spec.storage.endpoint, region=spec.storage.region)
    outcomes: list[Outcome] = []
    for start in range(0, len(todo), CHUNK_FILES):
        chunk = todo[start:start + CHUNK_FILES]
        stepio.parallel_threads(lambda j: src.download(j.source.name, j.source), chunk)
        try:
            outcomes += run_jobs(batch, chunk, advance)
        finally:
            for j in chunk:
                j.source.unlink(missing_ok=True)
    return outcomes


def _failures(outcomes: list[Outcome], local_dir: Path, source: str) -> list[dict[str, str]]:
    """The failed files by source name, their errors naming the source rather than the scratch copy."""
    return [{"file": Path(o.input).name,
             "error": (o.error or "failed").replace(str(local_dir), source.rstrip("/"))}
            for o in outcomes if o.status == "failed"]


def _stored_outputs(ctx: StepContext) -> set[str]:
    """Names of the outputs in storage (S3: written whole, so one that is there is done; never
    downloaded). Local storage: none here, `is_done` looks at the folder itself."""
    if not ctx.remote:
        return set()
    base = f"{ctx.exp_key}/{OUT_DIR}"
    return {o.key[len(base) + 1:] for o in ctx.storage.list(base) if stepio.under(o.key, base) and o.size > 0}


def _process(ctx: StepContext, batch: BatchOptions, params: dict[str, Any], mine: list[Job],
             local_dir: Path) -> tuple[list[Outcome], float]:
    """Resume or convert this run's jobs; (outcomes of those converted now, wall seconds)."""
    from rvc_pipeline.convert import is_done
    from rvc_pipeline.core import termination
    from rvc_pipeline.steps.runner import FileProgress
    from rvc_pipeline.steps.shards import check_generation

    stepio.safe_folder(ctx.exp_dir / OUT_DIR)  # (never written through a link)
    (ctx.exp_dir / OUT_DIR).mkdir(parents=True, exist_ok=True)
    stored = _stored_outputs(ctx)
    todo = [j for j in mine if j.output.name not in stored and not is_done(j.output)]
    if len(todo) < len(mine):
        log.info("convert: %d of %d files already done, resuming", len(mine) - len(todo), len(mine))
    progress = FileProgress(ctx, (OUT_DIR,), len(mine), len(mine) - len(todo), 1.0, True,
                            lambda: check_generation(ctx, params))
    progress.event()
    t0 = time.time()
    try:
        with termination.graceful():
            outcomes = _convert(ctx, batch, todo, progress)
    except BaseException:
        if ctx.remote:
            _push_after_failure(ctx)
        raise
    return outcomes, time.time() - t0


def _push_after_failure(ctx: StepContext) -> None:
    try:
        ctx.push(OUT_DIR)  # what is done stays done for the rerun
    except Exception as e:  # noqa: BLE001 - never hide the step's own error
        log.warning("convert: could not push the converted files: %s", e)


def _inputs(ctx: StepContext) -> ConvertInputs:
    checked = ctx.checked.data
    return checked if isinstance(checked, ConvertInputs) else check_inputs(ctx.experiment, ctx.storage).data


def run(ctx: StepContext) -> dict[str, Any]:
    """The step, or one shard of it (the source files whose position it owns)."""
    from rvc_pipeline.steps.shards import begin_generation, check_generation

    conv = options(ctx.experiment)
    inputs = _inputs(ctx)
    ctx.pull(layout.exported_model(ctx.name), *([Path(inputs.index_key).name] if inputs.index_key else []))
    setup = _setup(ctx, inputs)
    params = _params(ctx, setup)
    local_dir = scratch_dir("rvc-convert-")
    try:
        jobs = _jobs(ctx, inputs.source, local_dir)
        mine = [j for i, j in enumerate(jobs) if ctx.shard is None or ctx.shard.owns(i)]
        begin_generation(ctx, PARAMS_FILE, params, lambda: _clear(ctx))
        if ctx.shard is None or ctx.shard.clears:
            _prune(ctx, jobs)
        outcomes, seconds = _process(ctx, _batch(ctx, setup), params, mine, local_dir)
        failed = _failures(outcomes, local_dir, conv.source)
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)
    if ctx.shard is None and len(failed) == len(mine):
        raise StepFailed(f"convert: not one of the {len(mine)} files in {conv.source} could be converted: "
                         + "; ".join(f["error"] for f in failed[:3]))
    check_generation(ctx, params)
    ctx.push(OUT_DIR)
    return _summary(ctx, setup, mine, outcomes, failed, seconds)


def _summary(ctx: StepContext, setup: Setup, mine: list[Job], outcomes: list[Outcome],
             failed: list[dict[str, str]], seconds: float) -> dict[str, Any]:
    audio_s = round(sum(o.input_seconds for o in outcomes), 3)
    converted = sum(o.status == "converted" for o in outcomes)
    for f in failed:
        log.warning("convert: %s skipped: %s", f["file"], f["error"])
    return {"files": len(mine), "converted": converted, "resumed": len(mine) - len(outcomes),
            "failed": len(failed), "failed_files": failed[:MAX_LISTED_FAILURES],
            "format": options(ctx.experiment).format, "f0_method": setup.f0_method,
            "index": Path(setup.index).name if setup.index else None, "device": setup.device,
            "audio_seconds": audio_s, "compute_seconds": round(seconds, 3),
            "realtime_factor": round(audio_s / seconds, 2) if seconds > 0 and audio_s else None,
            **ctx.checked.fingerprint}  # (compared on a rerun: a source file added reruns the step)


def merge_shards(ctx: StepContext, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The step's summary over every shard (steps.shards): counts summed, failed files listed together."""
    from rvc_pipeline.steps.shards import merge_summaries

    merged = merge_summaries(summaries)
    failed = [f for s in summaries for f in s.get("failed_files") or []]
    merged["failed_files"] = failed[:MAX_LISTED_FAILURES]
    return merged
