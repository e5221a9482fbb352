"""Checkpoint evaluation during training: after each save, score the generator, append to `eval.jsonl`,
export the best as `weights/<exp>.pth`, write previews and `report.html`, and say when to stop early.

Made on the primary process only. Everything it writes is pushed to storage right away, so the best model
and the history survive a preemption; on resume the history is pulled back (`PULLS`) and extended.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rvc_pipeline.components.metrics.base import Clip, Metric
from rvc_pipeline.core import layout
from rvc_pipeline.core.errors import StepFailed
from rvc_pipeline.core.spec import EvalSpec, ExperimentSpec
from rvc_pipeline.evaluation import history, report
from rvc_pipeline.evaluation.evaluate import Converter, Piece, Result, evaluate, load_metrics
from rvc_pipeline.evaluation.heldout import HeldOut

log = logging.getLogger(__name__)

PULLS = (layout.EVAL_FILE, layout.PREVIEWS_DIR)  # what a resumed run pulls back to extend


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def weights_of(cfg: EvalSpec) -> dict[str, float]:
    return dict(cfg.score) if cfg.score else dict(history.DEFAULT_WEIGHTS)


def rule_text(weights: dict[str, float]) -> str:
    terms = " + ".join(f"{w:g} x {name}" for name, w in weights.items())
    return f"{terms} (higher is better; ties go to the earlier epoch)"


def read_heldout(exp_dir: Path) -> list[str]:
    import json

    path = exp_dir / layout.HELDOUT_FILE
    return list(json.loads(path.read_text())["eval"]) if path.is_file() else []


def write_heldout(exp_dir: Path, split: HeldOut) -> Path:
    import json

    from rvc_pipeline.core.fileio import write_text_atomic

    path = exp_dir / layout.HELDOUT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"mode": split.mode, "reason": split.reason, "eval": list(split.eval),
                                        "guard": list(split.guard)}, indent=1))
    return path


class Judge:
    """Evaluates checkpoints for one training run (see the module docstring)."""

    def __init__(self, spec: ExperimentSpec, experiment: str, exp_dir: Path, pieces: Sequence[Piece],
                 convert: Converter | None, sources: Sequence[Clip], chosen: Sequence[Metric],
                 skipped: dict[str, str]) -> None:
        self.cfg, self.experiment, self.exp_dir = spec.eval, experiment, exp_dir
        self.sr, self.sid = int(spec.model.sample_rate[:2]) * 1000, spec.model.speaker_id
        self.pieces, self.convert, self.sources = list(pieces), convert, list(sources)
        self.chosen, self.skipped = list(chosen), dict(skipped)
        self.weights = weights_of(self.cfg)
        self.records = history.read_history(exp_dir / layout.EVAL_FILE)

    @property
    def best(self) -> history.EvalRecord | None:
        return history.best(self.records)

    def judge(self, net_g: Any, epoch: int, step: int, checkpoint: str) -> tuple[history.EvalRecord, bool]:
        """Evaluate; returns (the record, whether it is the new best)."""
        before = self.best
        res: Result = evaluate(net_g, self.pieces, self.sr, self.sid, self.chosen, self.convert,
                               self.sources, float(self.cfg.transpose))
        measured = {k: round(v, 6) for k, v in res.metrics.items()}
        rec = history.EvalRecord(epoch=epoch, step=step, checkpoint=checkpoint, metrics=measured,
                                 score=_round(history.score(measured, self.weights)),
                                 seconds=round(res.seconds, 3),
                                 previews=self._write_previews(epoch, res.previews),
                                 skipped={**self.skipped, **res.skipped})
        self.records.append(rec)
        history.append_record(self.exp_dir / layout.EVAL_FILE, rec)
        for name, why in rec.skipped.items():
            log.warning("evaluation: %s skipped: %s", name, why)
        now = self.best
        return rec, now is not None and now.epoch == epoch and (before is None or before.epoch != epoch)

    def _write_previews(self, epoch: int, clips: Sequence[tuple[str, np.ndarray, int]]) -> list[str]:
        import soundfile as sf

        names = []
        for i, (_label, audio, sr) in enumerate(clips):
            name = layout.preview_name(epoch, i)
            (self.exp_dir / name).parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(self.exp_dir / name), np.clip(audio, -1, 1), sr, subtype="PCM_16")
            names.append(name)
        return names

    def should_stop(self) -> bool:
        return history.should_stop(self.records, self.cfg.patience, self.cfg.min_delta)

    def write_report(self) -> Path:
        clips: dict[int, list[tuple[str, np.ndarray, int]]] = {}
        for rec in history.latest_per_epoch(self.records):
            clips[rec.epoch] = [c for c in (self._read_preview(n) for n in rec.previews) if c is not None]
        better = {k: m.higher_is_better for m in self.chosen for k in m.keys}
        page = report.render(self.experiment, self.records, clips, rule_text(self.weights), better)
        path = self.exp_dir / layout.REPORT_FILE
        report.write(path, page)
        return path

    def _read_preview(self, name: str) -> tuple[str, np.ndarray, int] | None:
        import soundfile as sf

        path = self.exp_dir / name
        if not path.is_file():
            return None
        audio, sr = sf.read(str(path), dtype="float32")
        return Path(name).stem, audio, int(sr)


def load_sources(spec: ExperimentSpec, pieces: Sequence[Piece]) -> list[Clip]:
    """The preview sources: the first files of spec.eval.reference, else the first held-out pieces."""
    from rvc_pipeline.core.fileio import read_16k

    cfg = spec.eval
    if cfg.previews == 0:
        return []
    if cfg.reference is None:
        return [Clip(read_16k(p.wav16k), 16000, name=p.stem) for p in pieces[: cfg.previews]]
    from rvc_pipeline.evaluation.sources import reference_files

    files = reference_files(cfg.reference, cfg.previews, spec.storage.endpoint, spec.storage.region)
    return [Clip(read_16k(f), 16000, name=f.stem) for f in files]


def make_judge(spec: ExperimentSpec, experiment: str, exp_dir: Path, convert: Converter | None
               ) -> Judge | None:
    """A Judge for this run, or None when evaluation is off or nothing was held out (logged)."""
    if not spec.eval.enabled:
        return None
    stems = read_heldout(exp_dir)
    if not stems:
        log.warning("evaluation: no held-out pieces (see %s); checkpoints are not evaluated",
                    layout.HELDOUT_FILE)
        return None
    version, f0 = spec.model.version, spec.model.pitch_guidance
    pieces = [Piece.of(exp_dir, s, version, f0) for s in stems]
    chosen, skipped = load_metrics(spec.eval.metrics)
    sources: list[Clip] = []
    if convert is not None:
        try:
            sources = load_sources(spec, pieces)
        except (StepFailed, OSError, ValueError) as e:  # advisory: no previews, training goes on
            skipped["previews"] = f"cannot read the preview sources: {str(e).splitlines()[0]}"
    return Judge(spec, experiment, exp_dir, pieces, convert, sources, chosen, skipped)


def make_converter(spec: ExperimentSpec, net_g: Any, device: str) -> Converter:
    """infer.convert with the run's embedder and pitch method (loaded on first use), fp32, seeded."""
    loaded: dict[str, Any] = {}
    meta = {"version": spec.model.version, "f0": spec.model.pitch_guidance,
            "sr": int(spec.model.sample_rate[:2]) * 1000}

    def convert(audio16k: np.ndarray, transpose: float) -> tuple[np.ndarray, int]:
        from rvc_pipeline import infer

        if not loaded:
            loaded["embedder"], _ = infer.resolve_embedder(spec.features.embedder, spec, device, False,
                                                           spec.demo_random_weights)
            loaded["f0"] = infer.pitch_weights(spec.f0.method, None, spec) if meta["f0"] else None
        return infer.convert(audio16k, net_g, meta, loaded["embedder"], pitch=transpose,
                             f0_method=spec.f0.method, sid=spec.model.speaker_id, device=device, half=False,
                             seed=0, f0_weights=loaded["f0"])

    return convert
