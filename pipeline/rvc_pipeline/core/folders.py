"""A folder of recordings given by a person: which of its entries are read, and why the others are not.

One rule for `rvc-pipeline submit` (client/upload.py) and local conversion (convert.py): the audio files
directly inside the folder. Sub-folders, hidden files, links that point outside the folder, pipes, devices
and dangling links are skipped with a reason. Numpy-free: the client imports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".opus")


def inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or below it (both already resolved)."""
    return path == folder or folder in path.parents


def looks_like_audio(name: str) -> bool:
    """A visible file name with one of AUDIO_SUFFIXES: what a person means to be read."""
    return not name.startswith(".") and name.lower().endswith(AUDIO_SUFFIXES)


def why_skipped(entry: Path, real_folder: Path) -> str | None:
    """Why an entry of the folder (resolved: `real_folder`) is not read; None: read it."""
    if entry.name.startswith("."):
        return "a hidden file"
    if entry.is_symlink() and not inside(entry.resolve(), real_folder):
        return "a link to outside the folder"
    if entry.is_dir():
        return "a sub-folder (only files directly inside the folder are used)"
    if not entry.is_file():
        return "not a regular file (a pipe, device or dangling link)"
    if not entry.name.lower().endswith(AUDIO_SUFFIXES):
        return f"not an audio file ({', '.join(AUDIO_SUFFIXES)})"
    return None


@dataclass(frozen=True)
class Skipped:
    """An entry that is not read, and why."""

    path: Path
    why: str


def scan(folder: Path) -> tuple[list[Path], list[Skipped]]:
    """The audio files directly inside `folder` (sorted by name) and every other entry with its reason."""
    real = folder.resolve()
    files: list[Path] = []
    skipped: list[Skipped] = []
    for name in sorted(os.listdir(folder)):
        entry = folder / name
        why = why_skipped(entry, real)
        if why is None:
            files.append(entry)
        else:
            skipped.append(Skipped(entry, why))
    return files, skipped
