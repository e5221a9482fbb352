"""The held-out split: which preprocessed pieces the model never trains on.

Pieces are named `<file>_<piece>` (preprocess). Pieces of one source file overlap (segment overlap) and
share a recording session, so the split is by source file wherever there are enough files: whole files
are held out, chosen by a seeded hash so the choice is stable across runs and resumes. With fewer files
the last pieces of the longest file are held out, and the piece just before them (which overlaps the
first held-out piece) is a guard: in neither set.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass, field

MIN_PIECES = 10  # fewer pieces than this: none can be spared for evaluation


@dataclass(frozen=True)
class HeldOut:
    """The split: `eval` pieces (held out), `guard` pieces (dropped from both), how it was made."""

    eval: tuple[str, ...] = ()
    guard: tuple[str, ...] = ()
    mode: str = "none"  # "files" | "pieces" | "none"
    reason: str = ""
    excluded: frozenset[str] = field(default=frozenset())

    @classmethod
    def make(cls, eval_: list[str], guard: list[str], mode: str, reason: str = "") -> HeldOut:
        return cls(tuple(sorted(eval_, key=piece_key)), tuple(sorted(guard, key=piece_key)), mode, reason,
                   frozenset(eval_) | frozenset(guard))


def piece_key(stem: str) -> tuple[str, int, str]:
    """Sort key: source file, then piece number (numerically), then the raw stem."""
    file, _, piece = stem.rpartition("_")
    return (file, int(piece), stem) if file and piece.isdigit() else (stem, -1, stem)


def _by_file(stems: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for s in sorted(stems, key=piece_key):
        groups[piece_key(s)[0]].append(s)
    return dict(groups)


def _rank(name: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def _whole_files(groups: dict[str, list[str]], want: int, seed: int) -> list[str]:
    chosen: list[str] = []
    for name in sorted(groups, key=lambda g: _rank(g, seed)):
        if len(chosen) >= want:
            break
        chosen += groups[name]
    return chosen


def _tail_pieces(groups: dict[str, list[str]], want: int) -> tuple[list[str], list[str]]:
    longest = max(groups.values(), key=len)
    take = min(want, len(longest) - 2)  # keep at least one training piece and the guard
    if take < 1:
        return [], []
    return longest[-take:], [longest[-take - 1]]


def split(stems: list[str], share: float, min_files: int, max_pieces: int, seed: int) -> HeldOut:
    """Hold out about `share` of the pieces (at least 1, at most `max_pieces`); see the module docstring."""
    n = len(stems)
    want = min(max_pieces, max(1, math.ceil(share * n)))
    if share <= 0 or n < MIN_PIECES:
        return HeldOut(reason=f"{n} pieces (< {MIN_PIECES}): too few to hold any out" if share > 0
                       else "disabled")
    groups = _by_file(stems)
    if len(groups) >= min_files:
        chosen = _whole_files(groups, want, seed)
        if len(chosen) <= n // 2:
            return HeldOut.make(chosen, [], "files")
    held, guard = _tail_pieces(groups, want)
    if not held:
        return HeldOut(reason="every source file is too short to hold pieces out")
    return HeldOut.make(held, guard, "pieces")
