"""Sharded data steps: `rvc-pipeline <step> --spec F --shard I/N` runs shard I of N of preprocess, f0 or
features, N processes (pods) at once, each on a disjoint, deterministic part of the inputs
(`stepio.Shard.owns`: position in the sorted input listing modulo N; preprocess: the dataset file's idx0).

Output names never depend on the shard, so the union of the N shards' outputs is the unsharded run's, and
a rerun with another N resumes from the files already done (the per-file resume of `per_file_step` and
of preprocess's per-file records).

Completion. A shard that finished writes `logs/<exp>/.rvc/<step>.shard-<I>-of-<N>.done.json` (its
summary, the step's inputs hash), then lists the step's shard markers: when all N exist for the same
inputs hash, it writes the normal step marker `<step>.done.json` (the merged summary: the step's
`merge_shards(ctx, summaries)` when it has one, else `merge_summaries`). Each shard writes its own
marker *before* it lists, so the last one to finish always sees all N; two that finish together both
write the same merged content (it is computed from the shard markers and per-file records only), with an
atomic put. A shard marker of another inputs hash (an older spec) never counts; one of a finished shard
makes a retried pod of that shard finish at once (`fresh_shard_marker`).

Who deletes what (`begin_generation`). Concurrent shards must never delete each other's fresh files, so:
* only shard 0 deletes shared state: the markers of the step and of later steps, later steps' outputs
  (run_step's `_invalidate`), and, when the step's *generation record* (`.rvc/<step>.generation.json`:
  how the outputs are made, `params`, and the step's inputs hash) differs from its own, every output of
  the step and the step's shard markers; it then writes the record;
* shards I > 0 delete nothing in storage: they wait until the stored record equals their own before
  they write anything (RVC_SHARD_WAIT seconds at most, then a transient failure; the Job retries);
* `--force` is refused with `--shard`, and a stale step marker does not force a shard (the generation
  record, which carries the inputs hash, decides instead).
Shard 0 clears only while the record differs, and no other shard writes before the record is equal, so a
deletion can never hit a file made for the current generation. A shard re-reads the record before it
writes its marker and stops (transient) when a newer run changed it meanwhile.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rvc_pipeline import stepio
from rvc_pipeline.core.errors import StorageError
from rvc_pipeline.core.layout import generation_file, marker_key, shard_marker_key
from rvc_pipeline.core.storage import env_seconds
from rvc_pipeline.lease import check_current
from rvc_pipeline.provenance import read_record, record_changes, write_record

if TYPE_CHECKING:
    from rvc_pipeline.steps.runner import StepContext

log = logging.getLogger("rvc_pipeline")

WAIT_SECONDS = 900.0
"""How long a shard I > 0 waits for shard 0 to record the current generation (RVC_SHARD_WAIT)."""
POLL_SECONDS = 0.5


# ------------------------------------------------------------------------------------- generations
def _generation(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    gen = {"inputs_hash": ctx.inputs_hash, "params": params}
    return json.loads(json.dumps(gen, default=str))  # as read back from storage (tuples -> lists)


def _stored(ctx: StepContext, record_file: str) -> dict[str, Any] | None:
    return stepio.read_json_object(ctx.storage, f"{ctx.exp_key}/{record_file}")


def begin_generation(ctx: StepContext, params_file: str, params: dict[str, Any],
                     clear: Callable[[], None]) -> None:
    """Start or resume the step's outputs made by `params` (the module docstring's rules).

    Unsharded or shard 0: when forced, or the params record `params_file` differs from `params`, or the
    generation record (layout.generation_file: params and the step's inputs hash) from this run's,
    `clear()` every output of the step (local and stored), delete the step's shard markers, then write
    and push both records (the generation record last). A missing generation record with equal params
    (outputs of an older version) is adopted. Shard I > 0: wait until the stored generation record is
    this run's; delete nothing."""
    gen = _generation(ctx, params)
    gen_file = generation_file(ctx.step)
    shard = ctx.shard
    if shard is not None and not shard.clears:
        _await_generation(ctx, gen_file, gen)
        return
    ctx.pull(params_file, gen_file)
    old, old_gen = read_record(ctx.exp_dir / params_file), read_record(ctx.exp_dir / gen_file)
    if ctx.force or old != params or old_gen not in (None, gen):
        if old is not None:
            log.info("%s: existing outputs were made another way (%s); recomputing all", ctx.step,
                     "; ".join(record_changes(old_gen or {"params": old}, gen)))
        clear()
        stepio.delete_shard_markers(ctx.storage, ctx.name, [ctx.step])
        write_record(ctx.exp_dir / params_file, params)
    write_record(ctx.exp_dir / gen_file, gen)
    ctx.push(params_file, gen_file)


def _await_generation(ctx: StepContext, gen_file: str, gen: dict[str, Any]) -> None:
    limit = env_seconds("RVC_SHARD_WAIT", WAIT_SECONDS, 0.0, 86400.0)
    deadline = time.monotonic() + limit
    logged = False
    while _stored(ctx, gen_file) != gen:
        if time.monotonic() >= deadline:
            raise StorageError(f"{ctx.step}: {ctx.shard} waited {limit:g} s for shard 0 to start this run "
                               f"(record {ctx.exp_key}/{gen_file}); is shard 0 running? (RVC_SHARD_WAIT)")
        if not logged:
            log.info("%s: %s waits for shard 0 to start this run (%s)", ctx.step, ctx.shard, gen_file)
            logged = True
        time.sleep(POLL_SECONDS)


def check_generation(ctx: StepContext, params: dict[str, Any]) -> None:
    """Transient failure when a shard's generation record is no longer this run's (a newer run of the
    step took over): it must not push more outputs or mark itself done."""
    if ctx.shard is not None and _stored(ctx, generation_file(ctx.step)) != _generation(ctx, params):
        raise StorageError(f"{ctx.step}: {generation_file(ctx.step)} changed while {ctx.shard} ran (a newer "
                           "run of the step took over); stopping without marking this shard done")


# ------------------------------------------------------------------------------------- completion
def _fresh(ctx: StepContext, marker: dict[str, Any]) -> bool:
    if marker.get("inputs_hash") != ctx.inputs_hash:
        return False
    return all(marker.get(k) == v for k, v in ctx.checked.fingerprint.items())


def fresh_shard_marker(ctx: StepContext) -> dict[str, Any] | None:
    """This shard's stored marker when it is for the current inputs (None: run the shard)."""
    assert ctx.shard is not None
    mine = stepio.shard_markers(ctx.storage, ctx.name, ctx.step, ctx.shard.count).get(ctx.shard.index)
    return mine if mine is not None and _fresh(ctx, mine) else None


def finish(ctx: StepContext, summary: dict[str, Any]) -> dict[str, Any]:
    """Write this shard's marker, then `complete` the step if every shard is done."""
    assert ctx.shard is not None
    marker = {**summary, **ctx.checked.fingerprint, "shard": ctx.shard.index, "shards": ctx.shard.count}
    check_current()
    key = shard_marker_key(ctx.name, ctx.step, ctx.shard.index, ctx.shard.count)
    ctx.storage.write_bytes(key, json.dumps(marker, indent=1, default=str).encode())
    return complete(ctx, marker)


def complete(ctx: StepContext, own: dict[str, Any]) -> dict[str, Any]:
    """When all N shard markers exist for the current inputs, write the step marker (the merged
    summary) and return it; else return this shard's summary with `complete: False`."""
    assert ctx.shard is not None
    n = ctx.shard.count
    markers = stepio.shard_markers(ctx.storage, ctx.name, ctx.step, n)
    fresh = {i: m for i, m in markers.items() if _fresh(ctx, m)}
    missing = [i for i in range(n) if i not in fresh]
    if missing:
        log.info("%s: %s done; shard(s) %s of %d not done yet", ctx.step, ctx.shard,
                 ", ".join(map(str, missing)), n)
        return {**own, "complete": False}
    summaries = [fresh[i] for i in range(n)]
    merged = {"step": ctx.step, "experiment": ctx.name, "inputs_hash": ctx.inputs_hash,
              **_merge(ctx, summaries), "shards": n,
              "seconds": max(float(s.get("seconds") or 0.0) for s in summaries)}
    merged.pop("shard", None)
    check_current()
    key = marker_key(ctx.name, ctx.step)
    ctx.storage.write_bytes(key, json.dumps(merged, indent=1, default=str).encode())
    log.info("%s: all %d shards done; step complete (%s)", ctx.step, n, key)
    return {**merged, "complete": True}


def _merge(ctx: StepContext, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    from rvc_pipeline.steps.runner import step_module

    hook = getattr(step_module(ctx.step), "merge_shards", None)
    return hook(ctx, summaries) if hook is not None else merge_summaries(summaries)


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def merge_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The shards' summaries as one: counts (ints) and `*seconds` summed, values equal in every shard
    kept, the rest (ratios, per-shard facts) left out."""
    out: dict[str, Any] = {}
    for k in summaries[0]:
        vals: list[Any] = [s.get(k) for s in summaries]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            out[k] = sum(vals)
        elif k.endswith("seconds") and all(_number(v) for v in vals):
            out[k] = round(sum(vals), 3)
        elif all(v == vals[0] for v in vals):
            out[k] = vals[0]
    return out
