"""argparse for the client commands: added to `rvc-pipeline` (add_commands, run_command) and run on their own
as the kubectl plugin `kubectl-rvc` (main). Importing this module imports neither rich nor kubernetes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

COMMANDS = ("submit", "watch", "status", "logs", "download", "cancel", "resume", "list")
EXIT_USAGE = 2


def _target_args(p: argparse.ArgumentParser, suppress: bool) -> None:
    """kubectl's conventions: --kubeconfig, --context, -n/--namespace (also before the command)."""
    d: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {"default": None}
    p.add_argument("-n", "--namespace", help="namespace (default: the context's, else 'default')", **d)
    p.add_argument("--context", help="kubeconfig context (default: the current one)", **d)
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)", **d)


def _sub(sub: Any, name: str, help_: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_)
    _target_args(p, suppress=True)
    p.set_defaults(client_cmd=name)
    return p


def add_commands(sub: Any) -> None:
    """Add submit, watch, status, logs, download, cancel, resume and list to a sub-parsers object."""
    p = _sub(sub, "submit", "upload a folder of recordings and train a voice model on the cluster")
    p.add_argument("folder", type=Path, help="folder of recordings (the audio files directly inside it)")
    p.add_argument("--name", required=True, help="experiment name (metadata.name)")
    p.add_argument("--storage", help="s3://bucket/prefix for artifacts (spec.storage.uri); the recordings "
                   "go to <storage>/datasets/<name>/ unless dataset.source is set")
    p.add_argument("-f", "--values", dest="files", action="append", type=Path, default=[], metavar="FILE",
                   help="YAML of spec fields (or a whole manifest) merged over the defaults; repeatable")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a spec field by its dotted camelCase path, value as YAML, e.g. train.epochs=50; "
                   "repeatable; null restores the default")
    p.add_argument("--detach", action="store_true", help="return once submitted, without watching")
    p.add_argument("--endpoint", help="S3 endpoint URL used from this machine (default: $AWS_ENDPOINT_URL, "
                   "else spec.storage.endpoint)")
    p = _sub(sub, "watch", "follow an experiment live until it finishes (Ctrl-C leaves it running)")
    p.add_argument("name")
    p = _sub(sub, "status", "one screen: steps, training, artifact URIs")
    p.add_argument("name")
    p = _sub(sub, "logs", "the log of the current step's pod")
    p.add_argument("name")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("--step", help="another step's pod (default: the current, else the failed or last one)")
    p.add_argument("--shard", type=int, help="shard index of a sharded step (default: the lowest)")
    p.add_argument("--tail", type=int, help="only the last N lines")
    p = _sub(sub, "download", "fetch the exported model, index, report and previews")
    p.add_argument("name")
    p.add_argument("--to", type=Path, help="local folder (default: ./<name>/)")
    p.add_argument("--endpoint", help="S3 endpoint URL used from this machine")
    p = _sub(sub, "cancel", "suspend or delete an experiment (say which)")
    p.add_argument("name")
    p.add_argument("--suspend", action="store_true", help="stop gracefully and keep everything (resumable)")
    p.add_argument("--delete", action="store_true", help="delete the experiment and its Jobs")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask before --delete")
    p = _sub(sub, "resume", "resume a suspended experiment (it continues where its step saved)")
    p.add_argument("name")
    p = _sub(sub, "list", "experiments with phase, step and progress (like kubectl get rvcx)")
    p.add_argument("-A", "--all-namespaces", action="store_true")


def _confirm(prompt: str) -> str | None:
    if not sys.stdin.isatty():
        return None
    try:
        return input(prompt)
    except EOFError:
        return None


def _dispatch(ctx: Any, args: argparse.Namespace) -> int:
    from rvc_pipeline.client import commands as c

    cmd = args.client_cmd
    if cmd == "submit":
        return c.submit(ctx, args.folder, _submit_options(args), endpoint=args.endpoint, detach=args.detach)
    simple = {"watch": c.watch, "status": c.status, "resume": c.resume}
    if cmd in simple:
        return simple[cmd](ctx, args.name)
    if cmd == "logs":
        return c.logs(ctx, args.name, follow=args.follow, step=args.step, shard=args.shard, tail=args.tail)
    if cmd == "download":
        return c.download(ctx, args.name, to=args.to, endpoint=args.endpoint)
    if cmd == "cancel":
        return c.cancel(ctx, args.name, suspend=args.suspend, delete=args.delete, yes=args.yes)
    return c.list_(ctx, all_namespaces=args.all_namespaces)


def _submit_options(args: argparse.Namespace) -> Any:
    from rvc_pipeline.client.overrides import SubmitOptions

    return SubmitOptions(args.name, args.storage, tuple(args.files), tuple(args.sets))


def _precheck(args: argparse.Namespace) -> None:
    if args.client_cmd == "submit":
        from rvc_pipeline.client import overrides, upload

        overrides.build(_submit_options(args))
        upload.plan(args.folder)


def run_command(args: argparse.Namespace) -> int | None:
    """Run a client command (None: `args` is not one). Errors end as one `error:` line and an exit code:
    2 bad input (named), 1 cluster or storage trouble, 130 Ctrl-C."""
    if getattr(args, "client_cmd", None) is None:
        return None
    from rvc_pipeline.client.commands import CANCEL_HOW, Ctx
    from rvc_pipeline.client.kube import ClusterError, Target, connect
    from rvc_pipeline.core.errors import EXIT_INTERRUPTED, classify

    if args.client_cmd == "cancel" and args.suspend == args.delete:  # before connecting: a usage error
        print(f"error: {CANCEL_HOW}", file=sys.stderr)
        return EXIT_USAGE
    try:
        _precheck(args)  # bad overrides or folder: exit 2 before the cluster is asked anything
        api, ns = connect(Target(getattr(args, "kubeconfig", None), getattr(args, "context", None),
                                 getattr(args, "namespace", None)))
        return _dispatch(Ctx(api, ns, confirm=_confirm), args)
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - one line, classified exit code
        failure = classify(e)
        if not failure.expected:
            raise
        print(failure.message if failure.code == EXIT_INTERRUPTED else f"error: {failure.message}",
              file=sys.stderr)
        return failure.code


def main(argv: list[str] | None = None) -> int:
    """`kubectl-rvc`: the client commands as a kubectl plugin (`kubectl rvc submit ...`)."""
    ap = argparse.ArgumentParser(prog="kubectl rvc", description="RVC voice-model training on Kubernetes.")
    _target_args(ap, suppress=False)
    add_commands(ap.add_subparsers(dest="cmd", required=True))
    code = run_command(ap.parse_args(argv))
    return EXIT_USAGE if code is None else code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
