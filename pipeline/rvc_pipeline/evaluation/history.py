"""The evaluation history (`eval.jsonl`), the score that ranks checkpoints, best and early stop.

One JSON line per evaluated checkpoint. The score (computed when the checkpoint is evaluated, with the
rule in force then) is a weighted sum of metrics (weights from
`spec.eval.score`; a metric a record lacks counts as missing, and records are compared only on the
metrics every one of them has). Default rule: speaker similarity first (it is the voice), then
naturalness (DNSMOS OVRL), then reconstruction (mel L1 on held-out pieces) as a penalty.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_WEIGHTS: dict[str, float] = {"speaker_sim": 1.0, "dnsmos_ovrl": 0.1, "mel_l1": -0.1}


class EvalRecord(BaseModel):
    """One evaluated checkpoint."""

    model_config = ConfigDict(extra="ignore")

    epoch: int = Field(ge=0)
    step: int = Field(ge=0)
    checkpoint: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    score: float | None = None
    seconds: float = 0.0
    previews: list[str] = Field(default_factory=list)
    skipped: dict[str, str] = Field(default_factory=dict)  # metric -> why it did not run


def score(metrics: Mapping[str, float], weights: Mapping[str, float]) -> float | None:
    """Weighted sum over the weighted metrics; None when one of them is missing or not finite."""
    total = 0.0
    for name, w in weights.items():
        v = metrics.get(name)
        if v is None or v != v or v in (float("inf"), float("-inf")):
            return None
        total += w * v
    return total


def read_history(path: Path) -> list[EvalRecord]:
    """Records of `eval.jsonl`; a torn last line (a killed writer) and foreign lines are skipped."""
    if not path.is_file():
        return []
    out: list[EvalRecord] = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(EvalRecord.model_validate(json.loads(line)))
        except (ValueError, ValidationError):
            continue
    return out


def append_record(path: Path, rec: EvalRecord) -> None:
    """Append one line (after a newline if a killed writer left a torn last line); the latest line of an
    epoch is the one that counts (latest_per_epoch)."""
    torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as f:
        f.write(("\n" if torn else "") + rec.model_dump_json() + "\n")


def latest_per_epoch(records: Iterable[EvalRecord]) -> list[EvalRecord]:
    """One record per epoch (the last written), in epoch order."""
    by_epoch = {r.epoch: r for r in records}
    return [by_epoch[e] for e in sorted(by_epoch)]


def best(records: Iterable[EvalRecord]) -> EvalRecord | None:
    """The highest score; ties go to the earlier epoch (less training, same voice)."""
    scored = [r for r in latest_per_epoch(records) if r.score is not None]
    return max(scored, key=lambda r: (r.score, -r.epoch), default=None)


def should_stop(records: Iterable[EvalRecord], patience: int | None, min_delta: float = 0.0) -> bool:
    """True after `patience` evaluations in a row without a score above the best before them + min_delta."""
    if not patience:
        return False
    scored = [r for r in latest_per_epoch(records) if r.score is not None]
    if len(scored) <= patience:
        return False
    before = scored[:-patience]
    top = max(r.score for r in before if r.score is not None)
    return all(r.score is not None and r.score <= top + min_delta for r in scored[-patience:])
