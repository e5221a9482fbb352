"""Upload a folder of recordings to the dataset prefix: the files directly inside it, never sub-folders.

The rule is the dataset step's (preprocess reads the files directly inside dataset.source) narrowed to the
audio suffixes the project reads: core.folders, shared with local conversion. Hidden files, links pointing
outside the folder, pipes and devices are skipped with a reason. An object with the same size and ETag
(core.storage.same_content) is not sent again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rvc_pipeline.core.errors import StepFailed
from rvc_pipeline.core.folders import AUDIO_SUFFIXES, Skipped, scan
from rvc_pipeline.core.storage import ObjectInfo, Storage, same_content


@dataclass
class Plan:
    """What a folder holds for the dataset: the files to upload (sorted) and the entries left out."""

    files: list[Path] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


@dataclass
class Report:
    """What `upload` did: names uploaded, names already there with the same content, and objects under the
    prefix that are not in the folder (kept: they are part of the dataset)."""

    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    bytes_sent: int = 0


def plan(folder: Path) -> Plan:
    """The files of `folder` to upload; StepFailed (exit 2) when it is not a folder or holds no audio."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise StepFailed(f"{folder}: " + ("not a folder" if folder.exists() else "no such folder"))
    out = Plan(*scan(folder))
    if not out.files:
        raise StepFailed(f"{folder}: no audio files ({', '.join(AUDIO_SUFFIXES)}) directly inside it")
    return out


Progress = Callable[[Path, int, bool], None]
"""Called after each file: (path, its size, True if uploaded / False if already there)."""


def upload(p: Plan, store: Storage, on_file: Progress | None = None) -> Report:
    """Upload the planned files to the root of `store` (the dataset prefix), skipping identical objects."""
    have: dict[str, ObjectInfo] = {o.key: o for o in store.list("", recursive=False) if "/" not in o.key}
    rep = Report(extra=sorted(set(have) - {f.name for f in p.files}))
    for f in p.files:
        size = f.stat().st_size
        obj = have.get(f.name)
        if obj is not None and same_content(f, obj):
            rep.unchanged.append(f.name)
            sent = False
        else:
            store.upload(f, f.name)
            rep.uploaded.append(f.name)
            rep.bytes_sent += size
            sent = True
        if on_file is not None:
            on_file(f, size, sent)
    return rep
