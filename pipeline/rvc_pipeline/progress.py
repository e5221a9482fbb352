"""Progress reporting: a JSON-lines log in the experiment folder, tqdm bars, and the Pushgateway.

Every event is one typed event of rvc_pipeline.core.events, one JSON object per line in
logs/<exp>/progress.jsonl (`time`, `experiment`, `step`, `event` first). The operator and dashboards read
training progress from it (and from the Pushgateway when one is configured). Nothing here imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from rvc_pipeline.core.events import make_event, records, to_record
from rvc_pipeline.core.layout import PROGRESS_FILE

T = TypeVar("T")
log = logging.getLogger("rvc_pipeline")


class Reporter:
    """Writes progress events for one experiment and one step."""

    def __init__(self, exp_dir: Path, experiment: str, step: str, pushgateway: str | None = None):
        self.exp_dir = Path(exp_dir)
        self.experiment = experiment
        self.step = step
        self.pushgateway = pushgateway or os.environ.get("RVC_PUSHGATEWAY") or None
        self._push_failed = False

    def event(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event of kind `event` (a core.events kind; ValueError when the fields do not fit it)."""
        ev = make_event(event, time=round(time.time(), 3), experiment=self.experiment, step=self.step,
                        **fields)
        rec = to_record(ev)
        self.exp_dir.mkdir(parents=True, exist_ok=True)
        with open(self.exp_dir / PROGRESS_FILE, "a") as f:
            f.write(json.dumps(rec, default=_jsonable) + "\n")
        numeric = {k: float(v) for k, v in fields.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numeric:
            self.push(numeric)
        return rec

    def push(self, values: dict[str, float]) -> None:
        """Push gauges rvc_<name>{experiment,step} to the Pushgateway (best effort, logged once)."""
        if not self.pushgateway or self._push_failed:
            return
        try:
            from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway

            reg = CollectorRegistry()
            values = {**values, "last_event_timestamp_seconds": time.time()}
            for k, v in values.items():
                g = Gauge(f"rvc_{_metric_name(k)}", f"RVC pipeline progress: {k}", ["experiment", "step"],
                          registry=reg)
                g.labels(self.experiment, self.step).set(v)
            # POST (pushadd): replaces only the metrics pushed now, keeps the others of this group
            pushadd_to_gateway(self.pushgateway, job=f"rvc-{self.experiment}-{self.step}", registry=reg,
                            timeout=5)
        except Exception as e:  # noqa: BLE001 - metrics must never fail a step
            self._push_failed = True
            log.warning("pushgateway %s unreachable, progress stays in %s only: %s", self.pushgateway,
                        PROGRESS_FILE, e)

    def bar(self, it: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover
            yield from it
            return
        disable = os.environ.get("RVC_NO_PROGRESS") == "1"
        yield from tqdm(it, total=total, desc=desc or self.step, unit=unit, file=sys.stderr,
                        disable=disable, mininterval=1.0, dynamic_ncols=True)


def _metric_name(k: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in k).strip("_").lower()


def _jsonable(o: Any) -> Any:
    try:
        return float(o)
    except (TypeError, ValueError):
        return str(o)


def read_events(path: Path, step: str | None = None) -> list[dict[str, Any]]:
    """The records of progress.jsonl as written (of one step, or all), skipping torn lines."""
    p = Path(path)
    if not p.exists():
        return []
    return [rec for rec in records(p.read_bytes()) if step is None or rec.get("step") == step]
