"""`rvc-pipeline demo`: one-click training on a generated voice set, locally, on CPU, in a few minutes.

It writes a small set of real (synthesised) speech recordings to data/demo-voice/, an experiment
manifest to data/demo-experiment.yaml, runs every step of the recipe with tiny settings into
logs/<name>/, and converts one sample with the result. No weights are available offline, so when
HuBERT or the pretrained G/D cannot be found it uses RANDOM weights and says so everywhere: the
pipeline runs end to end, the voice is not meaningful.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import yaml

from rvc_pipeline.core.layout import exported_model
from rvc_pipeline.core.spec import API_GROUP, API_VERSION, KIND, parse_manifest
from rvc_pipeline.steps.runner import run_steps

log = logging.getLogger("rvc_pipeline")


def demo_manifest(name: str, dataset: Path, storage: Path, epochs: int) -> dict:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": name},
        "spec": {
            "dataset": {"source": str(dataset)},
            "storage": {"uri": str(storage)},
            "model": {"version": "v2", "sampleRate": "40k", "pitchGuidance": True},
            "f0": {"method": "pm"},
            "features": {"embedder": "hubert_base.pt"},
            "train": {"batchSize": 4, "epochs": epochs, "saveEveryEpoch": 1, "maxStepsPerEpoch": 3,
                      "dataWorkers": 0},
            "resources": {"device": "cpu"},
            "demoRandomWeights": True,
        },
    }


def _print_evaluation(summaries: list[dict], exp_dir: Path) -> None:
    """The best evaluated epoch, its metrics and where the report is (evaluation/judge.py)."""
    from rvc_pipeline.core.layout import EVAL_FILE, REPORT_FILE

    train = next((s for s in summaries if s.get("step") == "train"), {})
    best = train.get("best")
    if not best:
        print("  evaluation: none (see the log: too few pieces held out, or spec.eval.enabled false)")
        return
    metrics = ", ".join(f"{k} {v:.3g}" for k, v in best["metrics"].items())
    print(f"  best     : epoch {best['epoch']} of {train.get('evaluations', '?')} evaluated (score "
          f"{best['score']:.3f}: {metrics})")
    print(f"  report   : {exp_dir / REPORT_FILE}  (history: {exp_dir / EVAL_FILE})")


def main_demo(args: argparse.Namespace) -> int:
    from rvc_pipeline.demo.voices import make_voice_set

    t0 = time.time()
    work = Path(args.workdir).resolve()
    data = work / "data" / "demo-voice"
    if not any(data.glob("*.wav")):
        log.info("demo: generating a small voice set in %s", data)
        make_voice_set(data, n_files=6, seed=0)
    manifest = demo_manifest(args.name, data, work, args.epochs)
    mpath = work / "data" / "demo-experiment.yaml"
    mpath.write_text(yaml.safe_dump(manifest, sort_keys=False))
    exp = parse_manifest(manifest)
    summaries = run_steps(exp)
    exp_dir = work / "logs" / exp.name
    model = exp_dir / exported_model(exp.name)
    index = sorted(exp_dir.glob("added_*.index"))
    sample = sorted(data.glob("*.wav"))[0]
    out = exp_dir / "demo-converted.wav"
    from rvc_pipeline.infer import convert_file

    info = convert_file(model=model, input_path=sample, output=out, index=index[0] if index else None,
                        embedder="hubert_base.pt", spec=exp.spec, demo_random_weights=True)
    print()
    print(f"demo finished in {time.time() - t0:.0f} s")
    for s in summaries:
        print(f"  {s['step']:>10}: {s.get('seconds', 0):.1f} s")
    print(f"  manifest : {mpath}")
    print(f"  model    : {model}")
    print(f"  index    : {index[0] if index else '(none)'}")
    print(f"  converted: {out} ({info.get('output_seconds', 0):.1f} s at {info.get('sr')} Hz)")
    _print_evaluation(summaries, exp_dir)
    if any(s.get("random_weights") for s in summaries):
        print("\n  WARNING: no HuBERT / pretrained weights were found, so RANDOM weights were used.")
        print("  The pipeline ran end to end, but the voice is NOT meaningful. See docs/weights.md.")
    return 0
