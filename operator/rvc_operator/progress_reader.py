"""Read training progress and artifacts from the experiment's storage (no torch, no cluster).

The pipeline appends JSON lines to logs/<exp>/progress.jsonl and pushes the file after every epoch. The
operator reads the tail of that file and turns the last training events into status.progress:

    {"event": "train_start", "step": "train", "epochs": 20, "start_epoch": 1, ...}
    {"event": "train_step", "step": "train", "epoch": 3, "global_step": 120, "loss_g": .., "loss_d": ..,
     "loss_mel": ..}
    {"event": "epoch", "step": "train", "epoch": 3, "epochs": 20, "seconds": 41.2, "global_step": 130,
     "avg_loss_g": .., "avg_loss_d": .., "avg_loss_mel": ..}

Field names are matched loosely (lossG / loss_g / loss_gen, seconds / epoch_seconds, ...), so small changes
on the pipeline side do not blank the status.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Any

from rvc_pipeline.core.storage import Storage, StorageError
from rvc_pipeline.progress import PROGRESS_FILE
from rvc_pipeline.stepio import MARKER_DIR

log = logging.getLogger("rvc_operator")

TAIL_BYTES = 256 * 1024

_ALIASES: dict[str, tuple[str, ...]] = {
    "epoch": ("epoch",),
    "epochs": ("epochs", "total_epochs", "totalEpochs"),
    "global_step": ("global_step", "globalStep", "step_count", "iteration"),
    "loss_g": ("loss_g", "lossG", "avg_loss_g", "loss_gen", "g_loss"),
    "loss_d": ("loss_d", "lossD", "avg_loss_d", "loss_disc", "d_loss"),
    "loss_mel": ("loss_mel", "lossMel", "avg_loss_mel", "mel_loss"),
    "seconds_per_epoch": ("seconds_per_epoch", "secondsPerEpoch", "epoch_seconds", "seconds"),
}


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


def parse_events(data: bytes) -> list[dict[str, Any]]:
    """JSON lines, skipping a torn first line (from the ranged read) and a torn last line."""
    out = []
    for line in data.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _pick(rec: dict[str, Any], field: str) -> Any:
    for k in _ALIASES[field]:
        if k in rec and isinstance(rec[k], (int, float)) and not isinstance(rec[k], bool):
            return rec[k]
    return None


def _last(train: list[dict[str, Any]], *kinds: str) -> dict[str, Any] | None:
    return next((e for e in reversed(train) if e.get("event") in kinds), None)


def _first(recs: tuple[dict[str, Any] | None, ...], field: str) -> Any:
    """The first value of `field` among the records that exist (None: none has it)."""
    return next((v for v in (_pick(r, field) for r in recs if r is not None) if v is not None), None)


def _epoch_fields(last_epoch: dict[str, Any] | None, last_step: dict[str, Any] | None,
                  start: dict[str, Any] | None, done: dict[str, Any] | None, total_epochs: int | None
                  ) -> dict[str, Any]:
    epochs = _first((last_epoch, last_step, start), "epochs")
    epochs = epochs if epochs is not None else total_epochs
    epoch = _pick(last_epoch, "epoch") if last_epoch is not None else None
    if epoch is None and done is not None and epochs is not None:
        epoch = epochs
    out: dict[str, Any] = {"epoch": int(epoch or 0)}
    if epochs:
        out["epochs"] = int(epochs)
        out["epochText"] = f"{int(epoch or 0)}/{int(epochs)}"
        out["percent"] = round(100.0 * min(1.0, float(epoch or 0) / float(epochs)), 1)
    else:
        out["epochText"] = str(int(epoch or 0))
    return out


def _loss_fields(last_epoch: dict[str, Any] | None, last_step: dict[str, Any] | None) -> dict[str, Any]:
    """Losses of the newer of the last step and the last epoch summary (the other fills gaps)."""
    step_newer = last_step is not None and (
        last_epoch is None or float(last_step.get("time", 0)) >= float(last_epoch.get("time", 0)))
    losses = last_step if step_newer else last_epoch
    out: dict[str, Any] = {}
    for field, key in (("loss_g", "lossG"), ("loss_d", "lossD"), ("loss_mel", "lossMel")):
        v = _first((losses, last_epoch, last_step), field)
        if v is not None:
            out[key] = round(float(v), 6)
    return out


def progress_from_events(events: list[dict[str, Any]], total_epochs: int | None = None
                         ) -> dict[str, Any] | None:
    """status.progress from the train events (None if training has not reported yet)."""
    train = [e for e in events if e.get("step") == "train"]
    last_epoch, last_step = _last(train, "epoch"), _last(train, "train_step", "step")
    done = _last(train, "done")
    start = _last(train, "train_start") or _last(train, "start")
    found = [e for e in (last_epoch, last_step, done, start) if e is not None]
    if not found:
        return None
    out: dict[str, Any] = {"step": "train", **_epoch_fields(last_epoch, last_step, start, done, total_epochs)}
    gs = _first((last_epoch, last_step), "global_step")
    if gs is not None:
        out["globalStep"] = int(gs)
    out.update(_loss_fields(last_epoch, last_step))
    sec = _pick(last_epoch, "seconds_per_epoch") if last_epoch is not None else None
    if sec is not None:
        out["secondsPerEpoch"] = round(float(sec), 3)
    newest = max(found, key=lambda e: float(e.get("time", 0) or 0))
    if newest.get("time"):
        out["updated"] = datetime.fromtimestamp(float(newest["time"]), timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
    return out


def read_progress(storage: Storage, experiment: str, total_epochs: int | None = None
                  ) -> dict[str, Any] | None:
    data = read_tail(storage, f"logs/{experiment}/{PROGRESS_FILE}")
    if not data:
        return None
    return progress_from_events(parse_events(data), total_epochs)


def read_markers(storage: Storage, experiment: str, steps: tuple[str, ...]) -> set[str]:
    """Steps whose completion marker logs/<exp>/.rvc/<step>.done.json exists (one listing)."""
    prefix = f"logs/{experiment}/{MARKER_DIR}"
    return markers_in([o.key for o in storage.list(prefix)], steps)


def markers_in(keys: list[str], steps: tuple[str, ...]) -> set[str]:
    """Steps of `steps` whose <step>.done.json is among `keys` (a listing of logs/<exp>/.rvc/)."""
    found = set()
    for key in keys:
        name = PurePosixPath(key).name
        if name.endswith(".done.json"):
            step = name[: -len(".done.json")]
            if step in steps:
                found.add(step)
    return found


def find_index(storage: Storage, experiment: str) -> str | None:
    """Key of the newest-named added_*.index directly in logs/<exp>/ (what RVC users load)."""
    prefix = f"logs/{experiment}"
    names = [o.key for o in storage.list(prefix, recursive=False)
             if PurePosixPath(o.key).name.startswith("added_") and o.key.endswith(".index")]
    if not names:  # listing is recursive on local storage, filter to the folder itself
        return None
    direct = [k for k in names if PurePosixPath(k).parent.as_posix() == prefix]
    return sorted(direct or names)[-1]
