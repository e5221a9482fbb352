"""Scaffolding of the pure state-machine tests (operator/rvc_operator/status.decide): the clock, Job
summaries named as the operator names them, and one reconcile step whose status is validated."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from rvc_operator.api import ExperimentStatus
from rvc_operator.observe import JobSummary
from rvc_operator.status import Decision, decide

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


def job(step: str, attempt: int, state: str = "Running", **kw: Any) -> JobSummary:
    """The Job of experiment 'alice' for `step`, attempt `attempt` (unsharded)."""
    return JobSummary(name=f"alice-{step}-{attempt}", step=step, attempt=attempt, state=state, **kw)


def run(m: dict[str, Any], status: dict[str, Any] | None, jobs: Sequence[JobSummary] = (),
        markers: set[str] | None = None, now: datetime = T0, **kw: Any) -> Decision:
    """decide() on copies of its inputs; every status it writes must fit the CRD's status schema."""
    d = decide(m, copy.deepcopy(status), list(jobs), set() if markers is None else markers, now, **kw)
    ExperimentStatus.model_validate(d.status)
    return d
