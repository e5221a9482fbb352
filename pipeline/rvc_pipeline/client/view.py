"""What the client shows, as pure functions: an RVCExperiment object (a status snapshot) -> a rich
renderable, and -> the exit code of a finished run. Tested from recorded snapshots, no cluster, no tty."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text
from rvc_operator.api import EvaluationStatus, ExperimentStatus, StepStatus, load_status
from rvc_operator.status import parse_time

from rvc_pipeline.core.errors import EXIT_OK, EXIT_TRANSIENT, PERMANENT_EXIT_CODES
from rvc_pipeline.core.layout import PREVIEWS_DIR, REPORT_FILE
from rvc_pipeline.core.spec import STEP_ORDER, ExperimentSpec

PHASE_STYLE = {"Succeeded": "bold green", "Failed": "bold red", "Running": "bold cyan", "Pending": "yellow",
               "Queued": "yellow", "Suspended": "bold magenta", "Skipped": "dim"}
FINISHED = ("Succeeded", "Failed", "Suspended")


@dataclass(frozen=True)
class Snapshot:
    """The parts of an RVCExperiment object the views read."""

    name: str
    namespace: str
    spec: Mapping[str, Any]
    status: ExperimentStatus
    generation: int | None
    created: str | None

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> Snapshot:
        meta = obj.get("metadata") or {}
        return cls(str(meta.get("name", "?")), str(meta.get("namespace", "default")), obj.get("spec") or {},
                   load_status(obj.get("status")), meta.get("generation"), meta.get("creationTimestamp"))

    @property
    def current(self) -> bool:
        """The status reflects the latest spec (the operator has seen metadata.generation)."""
        seen = self.status.observed_generation
        return self.generation is None or (seen is not None and seen >= self.generation)

    @property
    def phase(self) -> str:
        return self.status.phase or "Pending"


# ------------------------------------------------------------------------------ small formatters
def duration(seconds: float | None) -> str:
    """4s, 3m05s, 2h07m, 3d04h; '-' when unknown."""
    if seconds is None or seconds != seconds:
        return "-"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _since(start: str | None, end: str | None, now: datetime) -> float | None:
    t0 = parse_time(start)
    return None if t0 is None else ((parse_time(end) or now) - t0).total_seconds()


def _phase(phase: str | None) -> Text:
    p = phase or "Pending"
    return Text(p, style=PHASE_STYLE.get(p, ""))


def _num(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


# ------------------------------------------------------------------------------ steps
def shown_steps(snap: Snapshot) -> list[tuple[str, StepStatus]]:
    """The steps of the run in recipe order: those in spec.steps, and any the status reports as run."""
    default = ExperimentSpec.model_fields["steps"].get_default(call_default_factory=True)
    listed = set(snap.spec.get("steps") or default)
    out = []
    for step in STEP_ORDER:
        got: StepStatus | None = getattr(snap.status.steps, step, None) if snap.status.steps else None
        if step in listed or (got is not None and got.reason != "NotInSpec"):
            out.append((step, got or StepStatus(phase="Pending")))
    return out


def _step_time(st: StepStatus, now: datetime) -> str:
    if st.phase == "Running" and st.eta_seconds is not None:
        return f"ETA {duration(st.eta_seconds)}"
    took = _since(st.start_time, st.end_time, now)
    return duration(took) if took is not None else ""


def _step_note(st: StepStatus) -> str:
    note = st.message or ""
    if st.shards:
        done = sum(1 for sh in st.shards if sh.phase == "Succeeded")
        note = f"shards {done}/{len(st.shards)} done; {note}"
    if st.exit_code is not None and st.phase == "Failed":
        note = f"exit {st.exit_code}: {note}"
    return note


def steps_table(snap: Snapshot, now: datetime) -> Table:
    t = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for col in ("step", "phase"):
        t.add_column(col, no_wrap=True)
    t.add_column("tries", justify="right", no_wrap=True)
    t.add_column("time", no_wrap=True)
    t.add_column("message", overflow="fold", ratio=1)
    for step, st in shown_steps(snap):
        mark = "▶ " if step == snap.status.current_step and snap.phase not in FINISHED else "  "
        tries = str(st.attempts) if st.attempts else ""
        t.add_row(mark + step, _phase(st.phase), tries, _step_time(st, now), _step_note(st))
    return t


# ------------------------------------------------------------------------------ training
def _best_line(best: EvaluationStatus | None) -> Text:
    if best is None or best.epoch is None:
        return Text("-", style="dim")
    out = Text(f"epoch {best.epoch}", style="bold")
    if best.score is not None:
        out.append(f"  score {best.score:.3f}")
    for k, v in sorted((best.metrics or {}).items()):
        out.append(f"  {k} {v:.3g}", style="dim")
    return out


def training_eta(st: ExperimentStatus, now: datetime) -> float | None:
    """Seconds of training left: status.training.etaSeconds minus the time since the progress it was
    computed from (never below 0)."""
    eta = st.training.eta_seconds if st.training else None
    if eta is None:
        return None
    at = parse_time(st.progress.updated if st.progress else None)
    return max(0.0, eta - ((now - at).total_seconds() if at else 0.0))


def training_grid(snap: Snapshot, now: datetime) -> Table | None:
    """Epoch bar, losses, best checkpoint and ETA; None before training reports anything."""
    st = snap.status
    pr = st.progress
    if pr is None or pr.epoch is None:
        return None
    g = Table.grid(padding=(0, 2))
    g.add_column(style="bold", no_wrap=True)
    g.add_column()
    total = pr.epochs or 0
    bar = ProgressBar(total=float(total or 1), completed=float(pr.epoch), width=30)
    pct = pr.percent if pr.percent is not None else (100.0 * pr.epoch / total if total else None)
    line = Table.grid(padding=(0, 2))
    line.add_row(bar, Text(f"{pr.epoch}/{total or '?'}  ({_num(pct, '.1f')}%)"))
    g.add_row("epoch", line)
    g.add_row("losses", f"G {_num(pr.loss_g)}  D {_num(pr.loss_d)}  mel {_num(pr.loss_mel)}"
                        f"   {_num(pr.seconds_per_epoch, '.1f')} s/epoch, step {pr.global_step or '-'}")
    g.add_row("best", _best_line(st.training.best if st.training else None))
    if snap.phase not in FINISHED:
        g.add_row("ETA", duration(training_eta(st, now)))
    if st.training and st.training.stopped_early:
        g.add_row("", Text("stopped early (spec.eval.patience)", style="yellow"))
    return g


# ------------------------------------------------------------------------------ events
def _event_time(ev: Mapping[str, Any]) -> str:
    return str(ev.get("lastTimestamp") or ev.get("eventTime") or ev.get("firstTimestamp")
               or (ev.get("metadata") or {}).get("creationTimestamp") or "")


def last_event(events: Sequence[Mapping[str, Any]], now: datetime) -> Text | None:
    if not events:
        return None
    ev = max(events, key=lambda e: parse_time(_event_time(e)) or datetime.min.replace(tzinfo=timezone.utc))
    age = _since(_event_time(ev), None, now)
    style = "yellow" if ev.get("type") == "Warning" else ""
    out = Text(f"{ev.get('reason', '')}: ", style=style or "bold")
    out.append(str(ev.get("message", "")).splitlines()[0] if ev.get("message") else "")
    out.append(f"  ({duration(age)} ago)" if age is not None else "", style="dim")
    return out


# ------------------------------------------------------------------------------ the screens
def _header(snap: Snapshot, now: datetime) -> Text:
    h = Text.assemble((snap.name, "bold"), (f"  ({snap.namespace})  ", "dim"), _phase(snap.phase))
    if snap.status.current_step and snap.phase not in FINISHED:
        h.append(f" · {snap.status.current_step}")
    took = _since(snap.status.start_time, snap.status.completion_time, now)
    if took is not None:
        h.append(f"   {duration(took)}", style="dim")
    return h


def _footer(snap: Snapshot, events: Sequence[Mapping[str, Any]], now: datetime) -> list[RenderableType]:
    g = Table.grid(padding=(0, 2))
    g.add_column(style="bold", no_wrap=True)
    g.add_column(overflow="fold")
    if not snap.current and snap.status.phase is not None:
        g.add_row("note", Text(f"the operator has not yet seen generation {snap.generation} of the spec",
                               style="yellow"))
    if snap.status.message:
        g.add_row("message", Text(snap.status.message, style="red" if snap.phase == "Failed" else ""))
    ev = last_event(events, now)
    if ev is not None:
        g.add_row("event", ev)
    if snap.status.phase is None:
        g.add_row("", Text("waiting for the operator to pick the experiment up", style="dim"))
    return [g]


def render_watch(obj: Mapping[str, Any], events: Sequence[Mapping[str, Any]] = (),
                 now: datetime | None = None) -> RenderableType:
    """The live view of `watch` and `submit`: phase, steps, training, last event."""
    now = now or datetime.now(timezone.utc)
    snap = Snapshot.of(obj)
    parts: list[RenderableType] = [steps_table(snap, now)]
    grid = training_grid(snap, now)
    if grid is not None:
        parts += [Text(""), grid]
    parts += [Text(""), *_footer(snap, events, now)]
    return Panel(Group(*parts), title=_header(snap, now), title_align="left", border_style="dim")


def artifacts_grid(snap: Snapshot) -> Table:
    """Where the results are: model, index, the evaluation report and previews (layout names)."""
    art = snap.status.artifacts
    g = Table.grid(padding=(0, 2))
    g.add_column(style="bold", no_wrap=True)
    g.add_column(overflow="fold")
    logs = art.logs.rstrip("/") if art and art.logs else None
    g.add_row("model", (art.model if art else None) or Text("(not exported yet)", style="dim"))
    g.add_row("index", (art.index if art else None) or Text("(not built yet)", style="dim"))
    best = snap.status.training.best if snap.status.training else None
    if best is not None and best.checkpoint:
        g.add_row("best", f"{best.checkpoint} (epoch {best.epoch})")
    if logs:
        g.add_row("report", f"{logs}/{REPORT_FILE}")
        g.add_row("previews", f"{logs}/{PREVIEWS_DIR}/")
        g.add_row("logs", f"{logs}/")
    return g


def dataset_line(snap: Snapshot) -> str | None:
    d = snap.status.dataset
    if d is None:
        return None
    return (f"{_num(d.minutes, '.1f')} min of audio in {d.files_used or 0} file(s) "
            f"({d.files_skipped or 0} skipped), {d.pieces or 0} pieces ({_num(d.piece_minutes, '.1f')} min)")


def render_status(obj: Mapping[str, Any], events: Sequence[Mapping[str, Any]] = (),
                  now: datetime | None = None) -> RenderableType:
    """`status`: the watch view, then the dataset and the artifact URIs."""
    snap = Snapshot.of(obj)
    parts: list[RenderableType] = [render_watch(obj, events, now)]
    line = dataset_line(snap)
    if line:
        parts.append(Text.assemble(("dataset  ", "bold"), line))
    parts.append(Panel(artifacts_grid(snap), title="artifacts", title_align="left", border_style="dim"))
    return Group(*parts)


def render_list(objs: Sequence[Mapping[str, Any]], all_namespaces: bool = False,
                now: datetime | None = None) -> Table:
    """`list`: kubectl get rvcx's columns with progress and the best checkpoint."""
    now = now or datetime.now(timezone.utc)
    t = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    cols = (["NAMESPACE"] if all_namespaces else []) + ["NAME", "PHASE", "STEP", "EPOCH", "PROGRESS", "BEST",
                                                         "SCORE", "ETA", "AGE"]
    for c in cols:
        t.add_column(c, no_wrap=True)
    for obj in sorted(objs, key=lambda o: ((o.get("metadata") or {}).get("namespace", ""),
                                           (o.get("metadata") or {}).get("name", ""))):
        t.add_row(*_list_row(Snapshot.of(obj), all_namespaces, now))
    return t


def _list_row(snap: Snapshot, all_namespaces: bool, now: datetime) -> list[str | Text]:
    st, pr = snap.status, snap.status.progress
    best = st.training.best if st.training else None
    eta = training_eta(st, now) if snap.phase == "Running" and st.current_step == "train" else None
    row: list[str | Text] = [snap.namespace] if all_namespaces else []
    row += [snap.name, _phase(snap.phase), st.current_step or "-",
            (pr.epoch_text or f"{pr.epoch}/{pr.epochs}") if pr and pr.epoch is not None else "-",
            f"{pr.percent:.0f}%" if pr and pr.percent is not None else "-",
            str(best.epoch) if best and best.epoch is not None else "-",
            _num(best.score if best else None, ".3f"), duration(eta) if eta is not None else "-",
            duration(_since(snap.created, None, now))]
    return row


def summary_line(obj: Mapping[str, Any], now: datetime | None = None) -> str:
    """One line of the state, for a watch whose output is not a terminal (a log, CI): printed on change."""
    now = now or datetime.now(timezone.utc)
    snap = Snapshot.of(obj)
    st, pr = snap.status, snap.status.progress
    parts = [snap.name, snap.phase]
    if st.current_step and snap.phase not in FINISHED:
        parts.append(f"step {st.current_step}")
    if pr is not None and pr.epoch is not None:
        parts.append(f"epoch {pr.epoch}/{pr.epochs or '?'} G {_num(pr.loss_g)} D {_num(pr.loss_d)} "
                     f"mel {_num(pr.loss_mel)}")
    best = st.training.best if st.training else None
    if best is not None and best.epoch is not None:
        parts.append(f"best epoch {best.epoch}" + (f" ({best.score:.3f})" if best.score is not None else ""))
    eta = training_eta(st, now) if snap.phase == "Running" and st.current_step == "train" else None
    if eta is not None:
        parts.append(f"ETA {duration(eta)}")
    if st.message:
        parts.append(f"- {st.message}")
    return "  ".join(parts)


# ------------------------------------------------------------------------------ how a run ended
@dataclass(frozen=True)
class Outcome:
    """How `watch` ends: its exit code and the line it prints."""

    code: int
    message: str


def failed_step(st: ExperimentStatus) -> tuple[str, StepStatus] | None:
    for step in STEP_ORDER:
        got = getattr(st.steps, step, None) if st.steps else None
        if got is not None and got.phase == "Failed":
            return step, got
    return None


def outcome(obj: Mapping[str, Any]) -> Outcome | None:
    """None while the run goes on (or the status is older than the spec); else how it ended: 0 Succeeded;
    Failed: the failed step's exit code when it is a permanent pipeline code (2, 3), else 1; Suspended: 1."""
    snap = Snapshot.of(obj)
    if snap.phase not in FINISHED or not snap.current:
        return None
    if snap.phase == "Succeeded":
        return Outcome(EXIT_OK, f"{snap.name} succeeded")
    if snap.phase == "Suspended":
        return Outcome(EXIT_TRANSIENT, f"{snap.name} is suspended (spec.suspend: true); nothing runs until "
                                       f"it is resumed: rvc-pipeline resume {snap.name} -n {snap.namespace}")
    failed = failed_step(snap.status)
    reason = snap.status.message or "failed"
    if failed is None:
        return Outcome(EXIT_TRANSIENT, f"{snap.name} failed: {reason}")
    step, st = failed
    code = st.exit_code if st.exit_code in PERMANENT_EXIT_CODES else EXIT_TRANSIENT
    detail = st.message or reason
    why = f" ({st.reason})" if st.reason else ""
    return Outcome(int(code or EXIT_TRANSIENT), f"{snap.name} failed in step {step}{why}: {detail}")
