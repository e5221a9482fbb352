"""One function per client command: (Ctx, arguments) -> exit code. The cluster is a KubeAPI, S3 an
`open_storage`, the terminal two rich Consoles, time a sleep and a clock: all replaceable in tests."""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from rvc_pipeline.client import overrides, upload, view
from rvc_pipeline.client.kube import ClusterError, Conflict, KubeAPI
from rvc_pipeline.core.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK, EXIT_TRANSIENT
from rvc_pipeline.core.layout import (
    PREVIEWS_DIR,
    REPORT_FILE,
    WEIGHTS_DIR,
    exp_key,
    exported_model,
    index_name_pattern,
    is_added_index,
    preview_name,
)
from rvc_pipeline.core.spec import Experiment, ExperimentSpec, SpecError, parse_manifest
from rvc_pipeline.core.storage import ObjectInfo, Storage, open_storage, same_content

WATCH_INTERVAL = 2.0  # seconds between two reads of the experiment while watching
CANCEL_HOW = ("cancel: say how: --suspend (stop gracefully and keep everything; resumable) or --delete "
              "(remove the experiment and its Jobs)")


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Ctx:
    """What a command works with."""

    api: KubeAPI
    namespace: str
    console: Console = field(default_factory=Console)
    err: Console = field(default_factory=lambda: Console(stderr=True))
    out: TextIO = field(default_factory=lambda: sys.stdout)  # plain text (pod logs)
    sleep: Callable[[float], None] = time.sleep
    now: Callable[[], datetime] = _utcnow
    open_storage: Callable[..., Storage] = open_storage
    confirm: Callable[[str], str | None] = lambda prompt: None  # None: cannot ask (no terminal)
    interval: float = WATCH_INTERVAL

    def fail(self, message: str, code: int = EXIT_TRANSIENT) -> int:
        self.err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
        return code

    def get(self, name: str) -> dict[str, Any] | None:
        obj = self.api.get_experiment(self.namespace, name)
        if obj is None:
            self.fail(f"no RVCExperiment {name!r} in namespace {self.namespace!r} (rvc-pipeline list -n "
                      f"{self.namespace})")
        return obj


def reattach_hint(ctx: Ctx, name: str) -> str:
    return f"rvc-pipeline watch {name} -n {ctx.namespace}"


# ------------------------------------------------------------------------------ submit
def client_endpoint(given: str | None, spec: ExperimentSpec) -> str | None:
    """The S3 endpoint this machine uses: --endpoint, else AWS_ENDPOINT_URL(_S3) (None: the storage reads
    it), else spec.storage.endpoint (the step pods' endpoint, which may not be reachable from here)."""
    import os

    if given:
        return given
    if os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"):
        return None
    return spec.storage.endpoint


def check_update(existing: dict[str, Any] | None, built: overrides.Built) -> None:
    """OverrideError for a change the API server refuses on a running experiment (immutable fields)."""
    if existing is None:
        return
    try:
        old = parse_manifest({"metadata": existing.get("metadata"), "spec": existing.get("spec") or {}})
    except SpecError:  # an existing spec this version cannot read: the API server decides
        return
    new = built.experiment
    if old.spec.storage.uri.rstrip("/") != new.spec.storage.uri.rstrip("/"):
        raise overrides.OverrideError(
            f"spec.storage.uri: {new.spec.storage.uri!r} differs from the existing experiment's "
            f"{old.spec.storage.uri!r}, which cannot change (its artifacts live there); use another --name")
    if old.name != new.name:
        raise overrides.OverrideError(f"spec.experimentName: cannot change from {old.name!r} to {new.name!r}")


def apply(api: KubeAPI, namespace: str, manifest: dict[str, Any], tries: int = 5
          ) -> tuple[dict[str, Any], bool]:
    """Create the experiment, or replace the spec of the existing one (its metadata kept, resourceVersion
    included, so a concurrent change is a conflict and read again). (object, created)."""
    name = manifest["metadata"]["name"]
    for _ in range(tries):
        existing = api.get_experiment(namespace, name)
        try:
            if existing is None:
                body = copy.deepcopy(manifest)
                body["metadata"]["namespace"] = namespace
                return api.create_experiment(body), True
            body = copy.deepcopy(existing)
            body["spec"] = copy.deepcopy(manifest["spec"])
            body.pop("status", None)
            return api.replace_experiment(body), False
        except Conflict:
            continue
    raise ClusterError(f"RVCExperiment {namespace}/{name}: kept changing; {tries} tries failed")


def _upload(ctx: Ctx, plan: upload.Plan, store: Storage) -> upload.Report:
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=ctx.err, transient=True) as bar:
        task = bar.add_task("uploading", total=plan.total_bytes)

        def step(path: Path, size: int, sent: bool) -> None:
            bar.update(task, advance=size, description=f"{'uploaded' if sent else 'unchanged'} {path.name}")

        return upload.upload(plan, store, step)


def _report_upload(ctx: Ctx, plan: upload.Plan, rep: upload.Report, uri: str) -> None:
    for s in plan.skipped:
        ctx.err.print(f"skipped {s.path}: {s.why}", highlight=False, soft_wrap=True)
    ctx.err.print(f"dataset {uri}: {len(rep.uploaded)} uploaded ({rep.bytes_sent / 1e6:.1f} MB), "
                  f"{len(rep.unchanged)} already there", highlight=False, soft_wrap=True)
    if rep.extra:
        ctx.err.print(f"[yellow]note:[/yellow] {len(rep.extra)} object(s) under {uri} are not in the folder "
                      f"and stay part of the dataset: {', '.join(rep.extra[:5])}"
                      + (" ..." if len(rep.extra) > 5 else ""), highlight=False, soft_wrap=True)


def submit(ctx: Ctx, folder: Path, opts: overrides.SubmitOptions, endpoint: str | None = None,
           detach: bool = False) -> int:
    """Validate, upload the recordings, create or update the experiment, then watch it (unless detach)."""
    built = overrides.build(opts)  # OverrideError (exit 2) before anything is read or sent
    plan = upload.plan(folder)
    check_update(ctx.api.get_experiment(ctx.namespace, opts.name), built)
    spec = built.experiment.spec
    store = ctx.open_storage(built.dataset_uri, endpoint=client_endpoint(endpoint, spec),
                             region=spec.storage.region)
    try:
        rep = _upload(ctx, plan, store)
    except KeyboardInterrupt:
        ctx.err.print("interrupted while uploading; nothing was submitted. Run submit again: files already "
                      "uploaded are skipped.")
        return EXIT_INTERRUPTED
    _report_upload(ctx, plan, rep, built.dataset_uri)
    _, created = apply(ctx.api, ctx.namespace, built.manifest)
    ctx.console.print(f"rvcexperiment {ctx.namespace}/{opts.name} {'created' if created else 'updated'}",
                      highlight=False, soft_wrap=True)
    if detach:
        ctx.console.print(f"watch it with: {reattach_hint(ctx, opts.name)}", highlight=False, soft_wrap=True)
        return EXIT_OK
    return watch(ctx, opts.name)


# ------------------------------------------------------------------------------ watch, status, list
def _events(ctx: Ctx, name: str) -> list[dict[str, Any]]:
    try:
        return ctx.api.list_events(ctx.namespace, name)
    except ClusterError:  # events are extra: no RBAC for them is no reason to stop
        return []


def _frame(view_: RenderableType) -> RenderableType:
    # an empty last line keeps the cursor off the panel's full-width border: the terminal's "^C" echo
    # would otherwise wrap to a new line and the final redraw would land one line low
    return Group(view_, Text(""))


def _watch_loop(ctx: Ctx, name: str, obj: dict[str, Any], show: Callable[[dict[str, Any]], None]
                ) -> view.Outcome:
    while True:
        show(obj)
        done = view.outcome(obj)
        if done is not None:
            return done
        ctx.sleep(ctx.interval)
        latest = ctx.api.get_experiment(ctx.namespace, name)
        if latest is None:
            return view.Outcome(EXIT_TRANSIENT, f"{name} was deleted")
        obj = latest


def _follow(ctx: Ctx, name: str, obj: dict[str, Any]) -> view.Outcome:
    """A terminal gets the live view; a pipe or file one line per change (view.summary_line)."""
    if not ctx.console.is_terminal:
        last: list[str] = []

        def line(o: dict[str, Any]) -> None:
            text = view.summary_line(o, ctx.now())
            if text not in last[-1:]:
                last.append(text)
                ctx.console.print(text, highlight=False, soft_wrap=True)

        return _watch_loop(ctx, name, obj, line)
    with Live(_frame(view.render_watch(obj, (), ctx.now())), console=ctx.console, auto_refresh=False,
              redirect_stdout=False, redirect_stderr=False) as live:
        return _watch_loop(ctx, name, obj, lambda o: live.update(
            _frame(view.render_watch(o, _events(ctx, name), ctx.now())), refresh=True))


def watch(ctx: Ctx, name: str) -> int:
    """Follow the experiment until it finishes; Ctrl-C leaves it running (exit 130)."""
    obj = ctx.get(name)
    if obj is None:
        return EXIT_TRANSIENT
    try:
        done = _follow(ctx, name, obj)
    except KeyboardInterrupt:
        ctx.err.print(f"stopped watching; {name} keeps running. Re-attach: {reattach_hint(ctx, name)}",
                      highlight=False, soft_wrap=True)
        return EXIT_INTERRUPTED
    style = "green" if done.code == EXIT_OK else "red"
    ctx.console.print(f"[{style}]{done.message}[/{style}]", highlight=False, soft_wrap=True)
    return done.code


def status(ctx: Ctx, name: str) -> int:
    obj = ctx.get(name)
    if obj is None:
        return EXIT_TRANSIENT
    ctx.console.print(view.render_status(obj, _events(ctx, name), ctx.now()))
    return EXIT_OK


def list_(ctx: Ctx, all_namespaces: bool = False) -> int:
    objs = ctx.api.list_experiments(None if all_namespaces else ctx.namespace)
    if not objs:
        where = "any namespace" if all_namespaces else f"namespace {ctx.namespace!r}"
        ctx.err.print(f"no RVCExperiments in {where}", highlight=False, soft_wrap=True)
        return EXIT_OK
    ctx.console.print(view.render_list(objs, all_namespaces, ctx.now()))
    return EXIT_OK


# ------------------------------------------------------------------------------ logs
def _log_step(snap: view.Snapshot) -> str | None:
    """The step whose log to show: the current one, else the failed one, else the last that ran."""
    if snap.status.current_step:
        return snap.status.current_step
    failed = view.failed_step(snap.status)
    if failed:
        return failed[0]
    ran = [s for s, st in view.shown_steps(snap) if st.job]
    return ran[-1] if ran else None


def pick_pod(pods: list[dict[str, Any]], shard: int | None) -> dict[str, Any] | None:
    """The newest pod of the step's latest attempt (of `shard`, else of the lowest shard)."""
    from rvc_operator.jobs import LABEL_ATTEMPT, LABEL_SHARD

    def labels(p: dict[str, Any]) -> dict[str, str]:
        return (p.get("metadata") or {}).get("labels") or {}

    if shard is not None:
        pods = [p for p in pods if labels(p).get(LABEL_SHARD) == str(shard)]
    if not pods:
        return None
    low = min(int(labels(p).get(LABEL_SHARD, 0)) for p in pods)
    pods = [p for p in pods if int(labels(p).get(LABEL_SHARD, 0)) == low]
    return max(pods, key=lambda p: (int(labels(p).get(LABEL_ATTEMPT, 0)),
                                    (p.get("metadata") or {}).get("creationTimestamp") or ""))


def logs(ctx: Ctx, name: str, follow: bool = False, step: str | None = None, shard: int | None = None,
         tail: int | None = None) -> int:
    """Print (or follow) the log of the step's pod, found by the operator's experiment and step labels."""
    from rvc_operator.jobs import CONTAINER, LABEL_EXPERIMENT, LABEL_STEP, label_value

    obj = ctx.get(name)
    if obj is None:
        return EXIT_TRANSIENT
    step = step or _log_step(view.Snapshot.of(obj))
    if step is None:
        return ctx.fail(f"{name}: no step has started yet")
    pods = ctx.api.list_pods(ctx.namespace, f"{LABEL_EXPERIMENT}={label_value(name)},{LABEL_STEP}={step}")
    pod = pick_pod(pods, shard)
    if pod is None:
        return ctx.fail(f"{name}: no pod of step {step} (not started, or its Job was removed)")
    pod_name = pod["metadata"]["name"]
    ctx.err.print(f"[dim]pod {pod_name} (step {step})[/dim]", highlight=False, soft_wrap=True)
    try:
        for line in ctx.api.pod_log(ctx.namespace, pod_name, CONTAINER, follow, tail):
            ctx.out.write(line + "\n")
            ctx.out.flush()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_OK


# ------------------------------------------------------------------------------ download
def artifact_objects(store: Storage, exp: Experiment, best_epoch: int | None) -> list[ObjectInfo]:
    """The files `download` fetches from the experiment folder: the exported model, the added index, and
    where present the evaluation report and the best epoch's previews (all previews without a best)."""
    name, version = exp.name, exp.spec.model.version
    found = store.list(exported_model(name))
    root = store.list("", recursive=False)
    pattern = index_name_pattern(name, version)
    found += [o for o in root if is_added_index(o.key) and pattern.match(o.key)]
    found += [o for o in root if o.key == REPORT_FILE]
    previews = store.list(PREVIEWS_DIR)
    if best_epoch is not None:
        head = preview_name(best_epoch, 0).rsplit("_", 1)[0] + "_"  # previews/e<epoch>_
        previews = [o for o in previews if o.key.startswith(head)]
    return found + previews


def download(ctx: Ctx, name: str, to: Path | None = None, endpoint: str | None = None) -> int:
    """Fetch the model, index, report and previews to `to` (default ./<name>/), skipping identical files."""
    from rvc_operator.api import parse_experiment

    obj = ctx.get(name)
    if obj is None:
        return EXIT_TRANSIENT
    exp = parse_experiment(obj)
    st = exp.spec.storage
    store = ctx.open_storage(f"{st.uri.rstrip('/')}/{exp_key(exp.name)}",
                             endpoint=client_endpoint(endpoint, exp.spec), region=st.region)
    snap = view.Snapshot.of(obj)
    best = snap.status.training.best.epoch if snap.status.training and snap.status.training.best else None
    objs = artifact_objects(store, exp, best)
    if not any(o.key == exported_model(exp.name) for o in objs):
        return ctx.fail(f"{name}: {store.uri}/{exported_model(exp.name)} does not exist yet (phase "
                        f"{snap.phase}, step {snap.status.current_step or '-'})")
    dest = Path(to) if to is not None else Path(name)
    got, same = _fetch(ctx, store, objs, dest)
    ctx.console.print(f"{dest}/: {got} downloaded, {same} already up to date", highlight=False,
                      soft_wrap=True)
    for o in objs:
        ctx.console.print(f"  {_local_name(o.key)}", highlight=False, soft_wrap=True)
    return EXIT_OK


def _local_name(key: str) -> str:
    return key.removeprefix(f"{WEIGHTS_DIR}/")


def _fetch(ctx: Ctx, store: Storage, objs: list[ObjectInfo], dest: Path) -> tuple[int, int]:
    got = same = 0
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=ctx.err, transient=True) as bar:
        task = bar.add_task("downloading", total=sum(o.size for o in objs))
        for o in objs:
            local = dest / _local_name(o.key)
            if local.is_file() and same_content(local, o):
                same += 1
            else:
                store.download(o.key, local)
                got += 1
            bar.update(task, advance=o.size, description=_local_name(o.key))
    return got, same


# ------------------------------------------------------------------------------ cancel
def cancel(ctx: Ctx, name: str, suspend: bool = False, delete: bool = False, yes: bool = False) -> int:
    """--suspend: spec.suspend=true (the step saves its work; resumable). --delete: the experiment and its
    Jobs (artifacts as spec.lifecycle.artifactsOnDeletion says), after a confirmation unless yes."""
    if suspend == delete:
        return ctx.fail(CANCEL_HOW, EXIT_BAD_INPUT)
    obj = ctx.get(name)
    if obj is None:
        return EXIT_TRANSIENT
    if suspend:
        ctx.api.patch_experiment(ctx.namespace, name, {"spec": {"suspend": True}})
        ctx.console.print(f"{name}: suspended; the running step saves its work and stops. Resume: "
                          f"rvc-pipeline resume {name} -n {ctx.namespace}", highlight=False, soft_wrap=True)
        return EXIT_OK
    keep = _artifacts_on_deletion(obj)
    if not yes:
        answer = ctx.confirm(f"Delete RVCExperiment {ctx.namespace}/{name} and its Jobs ({keep})? "
                             f"Type the name to confirm: ")
        if answer is None:
            return ctx.fail("--delete asks for confirmation on a terminal; add --yes", EXIT_BAD_INPUT)
        if answer.strip() != name:
            return ctx.fail("not deleted (the answer was not the name)")
    ctx.api.delete_experiment(ctx.namespace, name)
    ctx.console.print(f"{name}: deleted ({keep})", highlight=False, soft_wrap=True)
    return EXIT_OK


def resume(ctx: Ctx, name: str) -> int:
    """spec.suspend=false: the stopped step starts again where it saved (a no-op when not suspended)."""
    obj = ctx.get(name)
    if obj is None:
        return EXIT_TRANSIENT
    if not (obj.get("spec") or {}).get("suspend"):
        ctx.console.print(f"{name}: not suspended; nothing to resume", highlight=False, soft_wrap=True)
        return EXIT_OK
    ctx.api.patch_experiment(ctx.namespace, name, {"spec": {"suspend": False}})
    ctx.console.print(f"{name}: resumed. Follow it: {reattach_hint(ctx, name)}", highlight=False,
                      soft_wrap=True)
    return EXIT_OK


def _artifacts_on_deletion(obj: dict[str, Any]) -> str:
    from rvc_operator.api import parse_experiment
    from rvc_operator.jobs import ANN_DELETE_ARTIFACTS

    exp = parse_experiment(obj)
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    logs = f"{exp.spec.storage.uri.rstrip('/')}/{exp_key(exp.name)}/"
    by_annotation = annotations.get(ANN_DELETE_ARTIFACTS) == "true"
    if exp.spec.lifecycle.artifacts_on_deletion == "Delete" or by_annotation:
        return f"its artifacts in {logs} are deleted too"
    return f"its artifacts in {logs} are kept"
