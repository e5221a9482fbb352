"""`rvc-pipeline`: one sub-command per step, `run` (every step of the manifest, locally), `infer`, `demo`.

Argument parsing only: steps run through rvc_pipeline.steps.runner (run_steps), inference through
rvc_pipeline.infer, the demo through rvc_pipeline.demo (which imports the runner, never this module).

Exit codes (rvc_pipeline.core.errors): 0 success, 1 transient or unexpected (may be retried), 2 bad spec or
bad input (permanent), 3 missing weights (permanent), 130 interrupted. The operator uses them to decide
whether to retry. A foreseeable failure prints one `error:` line; only an unexpected one a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from rvc_pipeline.client.cli import add_commands, run_command
from rvc_pipeline.core import termination
from rvc_pipeline.core.catalog import PITCH, PITCH_METHODS
from rvc_pipeline.core.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_NO_WEIGHTS,
    EXIT_OK,
    EXIT_TRANSIENT,
    classify,
)
from rvc_pipeline.core.layout import SHARDED_STEPS
from rvc_pipeline.core.spec import RVC_CONVERSION, STEP_ORDER, SpecError, load_manifest
from rvc_pipeline.stepio import Shard
from rvc_pipeline.steps.runner import run_shard, run_steps

log = logging.getLogger("rvc_pipeline")

EXIT_ERROR = EXIT_TRANSIENT  # the former name
__all__ = ["EXIT_BAD_INPUT", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_NO_WEIGHTS", "EXIT_OK", "main"]


def _print_summary(summaries: list[dict[str, Any]]) -> None:
    for s in summaries:
        keys = [k for k in s if k not in ("step", "experiment", "files", "skipped_files", "per_file")]
        short = {k: s[k] for k in keys if not isinstance(s[k], (list, dict))}
        print(f"{s.get('step', '?'):>10}: " + ", ".join(f"{k}={v}" for k, v in short.items()))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rvc-pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for s in (s for s in STEP_ORDER if s != "convert"):  # convert: its own parser (step or local batch)
        p = sub.add_parser(s, help=f"run step '{s}' of the manifest")
        p.add_argument("--spec", required=True, help="RVCExperiment manifest (YAML)")
        p.add_argument("--force", action="store_true", help="rerun even if already complete")
        p.add_argument("--json", action="store_true", help="print the summary as JSON")
        p.add_argument("--shard", metavar="I/N", help="run shard I of N (zero-based) of preprocess, f0 or "
                       "features: the files whose position modulo N is I; the shard that finds every shard "
                       "done completes the step")
    p = sub.add_parser("run", help="run every step of the manifest in order (one-click training)")
    p.add_argument("--spec", required=True)
    p.add_argument("--force", action="store_true")
    p.add_argument("--steps", help="comma-separated subset of steps")
    p.add_argument("--json", action="store_true")
    p.add_argument("--shard", help=argparse.SUPPRESS)  # refused with a message naming the sharded steps
    p = sub.add_parser("validate", help="check a manifest and print the resolved spec")
    p.add_argument("--spec", required=True)
    p = sub.add_parser("infer", help="convert a recording with a trained model")
    _add_infer_args(p)
    p = sub.add_parser("convert", help="convert many recordings with a model loaded once (--model), or run "
                       "the manifest's convert step (--spec)")
    _add_convert_args(p)
    p = sub.add_parser("demo", help="generate a small voice set and run one-click training on CPU")
    p.add_argument("--workdir", default=".", help="checkout folder; artifacts go to <workdir>/logs/")
    p.add_argument("--name", default="demo")
    p.add_argument("--epochs", type=int, default=2)
    p = sub.add_parser("eval", help="score any RVC model on folders of recordings (speaker, DNSMOS, pitch)")
    _add_eval_args(p)
    add_commands(sub)  # submit, watch, status, logs, download, cancel, list (rvc_pipeline.client)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    termination.install()  # SIGTERM: exit, or a graceful stop inside termination.graceful()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        client_code = run_command(args)
        if client_code is not None:
            return client_code
        if args.cmd == "validate":
            exp = load_manifest(args.spec)
            print(json.dumps({"name": exp.name, "spec": exp.spec.model_dump(by_alias=True)}, indent=2))
            return EXIT_OK
        handler = {"infer": _infer, "convert": _convert, "eval": _eval}.get(args.cmd)
        if handler is not None:
            return handler(args)
        if args.cmd == "demo":
            from rvc_pipeline.demo.run import main_demo

            return main_demo(args)
        shard = _shard(args)
        exp = load_manifest(args.spec)
        if shard is not None:
            return _print_summaries([run_shard(exp, args.cmd, shard)], args.json)
        steps = [args.cmd] if args.cmd in STEP_ORDER else (args.steps.split(",") if args.steps else None)
        if steps:
            bad = [s for s in steps if s not in STEP_ORDER]
            if bad:
                raise SpecError(f"--steps: unknown step(s) {bad}; allowed values: {list(STEP_ORDER)}")
        return _print_summaries(run_steps(exp, steps, force=args.force), args.json)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - top-level: one line, classified exit code
        failure = classify(e)
        if args.verbose or not failure.expected:
            log.error("failed", exc_info=e)
        print(f"error: {failure.message}" if failure.code != EXIT_INTERRUPTED else failure.message,
              file=sys.stderr)
        return failure.code


def _print_summaries(summaries: list[dict[str, Any]], as_json: bool) -> int:
    if as_json:
        print(json.dumps(summaries, indent=1, default=str))
    else:
        _print_summary(summaries)
    return EXIT_OK


def _shard(args: argparse.Namespace) -> Shard | None:
    """--shard I/N (steps preprocess, f0, features only, never with --force); SpecError naming --shard."""
    text = getattr(args, "shard", None)
    if text is None:
        return None
    if args.cmd not in SHARDED_STEPS:
        raise SpecError(f"--shard: step '{args.cmd}' cannot be sharded (only {', '.join(SHARDED_STEPS)})")
    if args.force:
        raise SpecError("--shard cannot be combined with --force (a forced shard would delete the outputs of "
                        "the shards running beside it); run the step unsharded with --force")
    try:
        return Shard.parse(text)
    except ValueError as e:
        raise SpecError(str(e)) from None


def _add_infer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="exported model .pth (RVC small-model format)")
    p.add_argument("--input", required=True, help="recording to convert (any format ffmpeg reads)")
    p.add_argument("--output", required=True, help="output WAV")
    _add_conversion_args(p)


def _add_conversion_args(p: argparse.ArgumentParser) -> None:
    """The options `infer` and `convert` share (model aside)."""
    p.add_argument("--index", help="added_*.index file (optional)")
    p.add_argument("--embedder", default="hubert_base.pt", help="HuBERT checkpoint (path, s3:// or name)")
    p.add_argument("--pitch", type=float, default=0.0, help="transpose in semitones")
    p.add_argument("--f0-method", default="pm", choices=PITCH_METHODS)
    p.add_argument("--rmvpe", help="rmvpe.pt for --f0-method rmvpe")
    p.add_argument("--index-rate", type=float, default=RVC_CONVERSION.index_rate)
    p.add_argument("--protect", type=float, default=RVC_CONVERSION.protect)
    p.add_argument("--filter-radius", type=int, default=RVC_CONVERSION.filter_radius)
    p.add_argument("--rms-mix-rate", type=float, default=RVC_CONVERSION.rms_mix_rate)
    p.add_argument("--resample-sr", type=int, default=0, help="output sample rate (0 = model's)")
    p.add_argument("--sid", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--demo-random-weights", action="store_true",
                   help="DEMO ONLY: random HuBERT if the embedder is missing")


def _infer(args: argparse.Namespace) -> int:
    """`rvc-pipeline infer`: the arguments to `convert_file`; a failure ends through `classify` (2: bad
    input, named; 3: missing weights)."""
    from rvc_pipeline.infer import convert_file

    opts = _conversion_opts(args)
    info = convert_file(args.model, args.input, args.output, index=args.index or None, embedder=args.embedder,
                        demo_random_weights=bool(args.demo_random_weights), **opts)
    print(f"converted {args.input} -> {info['output']}: {info['input_seconds']:.2f} s in, "
          f"{info['output_seconds']:.2f} s out at {info['sr']} Hz, {info['seconds']:.1f} s "
          f"({info['realtime_factor']}x real time)")
    if info.get("random_embedder"):
        print("WARNING: HuBERT was not found and RANDOM weights were used; the voice is NOT meaningful.")
    return EXIT_OK


def _conversion_opts(args: argparse.Namespace) -> dict[str, Any]:
    """`infer.convert_file`'s keyword options from `_add_conversion_args`'s arguments."""
    opts: dict[str, Any] = {
        "pitch": float(args.pitch), "f0_method": args.f0_method, "index_rate": float(args.index_rate),
        "protect": float(args.protect), "filter_radius": int(args.filter_radius),
        "rms_mix_rate": float(args.rms_mix_rate), "resample_sr": int(args.resample_sr or 0),
        "sid": int(args.sid), "device": args.device,
    }
    if args.rmvpe:
        opts["f0_weights"] = dict.fromkeys(PITCH["rmvpe"].weights, args.rmvpe)
    return opts


def _add_convert_args(p: argparse.ArgumentParser) -> None:
    from rvc_pipeline.convert import FORMATS

    p.add_argument("--spec", help="RVCExperiment manifest: run its convert step (spec.convert) instead")
    p.add_argument("--shard", metavar="I/N", help="with --spec: run shard I of N (zero-based) of the step")
    p.add_argument("--force", action="store_true", help="with --spec: convert every file again")
    p.add_argument("--json", action="store_true", help="with --spec: print the summary as JSON")
    p.add_argument("--model", help="exported model .pth (RVC small-model format)")
    p.add_argument("--input", nargs="+", help="folders (the audio files directly inside) "
                   "and/or recordings to convert")
    p.add_argument("--output", help="output folder (not inside an input folder)")
    p.add_argument("--format", default="wav", choices=FORMATS, help="output format (default wav)")
    p.add_argument("--transpose-csv", help="CSV of 'file,semitones' rows: per-file transpose (else --pitch)")
    p.add_argument("--overwrite", action="store_true", help="convert again even where an output exists")
    p.add_argument("--workers", type=int, default=0, help="CPU processes (0: the measured default; CUDA: 1)")
    _add_conversion_args(p)


def _convert_step(args: argparse.Namespace) -> int | None:
    """`rvc-pipeline convert --spec M [--shard I/N] [--force]`: the manifest's convert step (None: the
    local batch converter was asked for); SpecError naming the options that do not go together."""
    if args.spec is None:
        if args.model is None or not args.input or args.output is None:
            raise SpecError("convert: give --spec MANIFEST (the convert step) or --model M --input ... "
                            "--output DIR (local files)")
        if args.shard is not None or args.force or args.json:
            raise SpecError("--shard, --force and --json go with --spec (the convert step); "
                            "with --model use --overwrite")
        return None
    if args.model is not None:
        raise SpecError("--spec and --model: give one (--spec runs the manifest's convert step with the "
                        "experiment's model; --model converts local files)")
    if args.input or args.output is not None:
        raise SpecError("--input and --output go with --model; the convert step reads spec.convert.source "
                        "and writes logs/<experiment>/converted/")
    shard = _shard(args)
    exp = load_manifest(args.spec)
    if shard is not None:
        return _print_summaries([run_shard(exp, "convert", shard)], args.json)
    return _print_summaries(run_steps(exp, ["convert"], force=args.force), args.json)


def _convert(args: argparse.Namespace) -> int:
    """`rvc-pipeline convert`: the convert step with --spec, else rvc_pipeline.convert.run_batch (exit 2
    when any input failed)."""
    from pathlib import Path

    from rvc_pipeline.convert import BatchOptions, Setup, run_batch
    from rvc_pipeline.core.layout import CONVERT_REPORT_FILE

    step = _convert_step(args)
    if step is not None:
        return step
    opts = _conversion_opts(args)
    setup = Setup(model=args.model, index=args.index or None, embedder=args.embedder,
                  demo_random_weights=bool(args.demo_random_weights), device=opts.pop("device"),
                  f0_method=opts.pop("f0_method"), index_rate=opts.pop("index_rate"),
                  f0_weights=tuple(sorted(opts.pop("f0_weights", {}).items())))
    report = run_batch(BatchOptions(setup, tuple(args.input), Path(args.output), fmt=args.format,
                                    transpose_csv=Path(args.transpose_csv) if args.transpose_csv else None,
                                    overwrite=bool(args.overwrite), workers=max(0, int(args.workers)),
                                    convert=opts))
    print(report.summary())
    if report.count("failed"):
        where = Path(args.output) / CONVERT_REPORT_FILE
        print(f"error: {report.count('failed')} input(s) failed; see {where}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="RVC model .pth (ours, RVC WebUI's or Applio's)")
    p.add_argument("--target", required=True, help="folder of the target speaker's recordings")
    p.add_argument("--source", required=True, help="folder of recordings to convert")
    p.add_argument("--index", help="added_*.index file (optional)")
    p.add_argument("--index-rate", type=float, default=RVC_CONVERSION.index_rate)
    p.add_argument("--embedder", default="hubert_base.pt", help="HuBERT checkpoint (path, s3:// or name)")
    p.add_argument("--pitch", type=float, default=0.0, help="transpose in semitones")
    p.add_argument("--f0-method", default="pm", choices=PITCH_METHODS)
    p.add_argument("--metrics", help="comma-separated metric names (default: all that run here)")
    p.add_argument("--limit", type=int, default=50, help="at most this many files per folder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _eval(args: argparse.Namespace) -> int:
    """`rvc-pipeline eval`: convert --source with --model and score it (rvc_pipeline.evaluation.folder)."""
    from pathlib import Path

    from rvc_pipeline.evaluation.folder import EvalOptions, score_folder, table

    opts = EvalOptions(model=Path(args.model), target=Path(args.target), source=Path(args.source),
                       index=Path(args.index) if args.index else None, transpose=float(args.pitch),
                       f0_method=args.f0_method, index_rate=float(args.index_rate),
                       metrics=tuple(m.strip() for m in args.metrics.split(",")) if args.metrics else None,
                       device=args.device, embedder=args.embedder, limit=max(1, int(args.limit)))
    res = score_folder(opts)
    if args.json:  # a metric with nothing to measure (nan) is null: strict JSON
        def clean(m: dict[str, float]) -> dict[str, float | None]:
            return {k: (v if v == v and abs(v) != float("inf") else None) for k, v in m.items()}

        print(json.dumps({"files": res.files, "metrics": clean(res.overall.metrics),
                          "per_file": {f: clean(m) for f, m in res.per_file.items()},
                          "skipped": res.overall.skipped}, indent=1, allow_nan=False))
    else:
        print(table(res))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
