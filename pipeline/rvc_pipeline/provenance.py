"""What made an artifact: file digests and small JSON records kept beside a step's outputs.

A per-file output folder that a step resumes from (f0, features) is only ever the work of one set of
inputs: the step records them (method, weights digest, random or not) in `logs/<exp>/.rvc/<step>.params.json`
and, on resume, compares: any difference recomputes the whole folder, never mixes. The records live in
`.rvc/`, not in the output folders, so that RVC's and our filelist building see only the outputs.

No pydantic or torch here: preprocess worker processes import this module.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from rvc_pipeline.core.fileio import write_text_atomic

RANDOM = "random"
"""The identity recorded for randomly initialised (demo) weights."""

_CHUNK = 1 << 20
_digests: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, streamed; cached per process by (real path, size, mtime)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    hit = _digests.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    _digests[key] = h.hexdigest()
    return _digests[key]


def weight_identity(path: str | Path | None) -> str:
    """'sha256:<hex>' of a weights file (of a folder: over its files' names and digests), or 'random'
    for randomly initialised (demo) weights."""
    if path is None:
        return RANDOM
    p = Path(path)
    if not p.is_dir():
        return f"sha256:{sha256_file(p)}"
    files = sorted(q for q in p.rglob("*") if q.is_file())
    blob = "\n".join(f"{q.relative_to(p).as_posix()} {sha256_file(q)}" for q in files)
    return f"sha256-dir:{hashlib.sha256(blob.encode()).hexdigest()}"


def read_record(path: Path) -> dict[str, Any] | None:
    """A JSON record, or None when missing or unreadable (an unreadable record never matches)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=1, sort_keys=True))


def record_changes(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """Human-readable differences ('embedder: sha256:ab.. -> random'); ['no record'] when `old` is None."""
    if old is None:
        return ["no record of what made the existing outputs"]
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)} -> {new.get(k)}" for k in keys if old.get(k) != new.get(k)]
