"""Held-out split, score, best checkpoint, early stop, history file and the HTML report (issue 10)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from rvc_pipeline.evaluation import heldout, history, report
from rvc_pipeline.evaluation.history import EvalRecord


def _stems(files: int, pieces: int) -> list[str]:
    return [f"{f}_{p}" for f in range(files) for p in range(pieces)]


def test_split_by_whole_files_when_there_are_enough() -> None:
    stems = _stems(20, 10)
    h = heldout.split(stems, share=0.1, min_files=5, max_pieces=40, seed=1)
    assert h.mode == "files" and len(h.eval) == 20 and not h.guard
    held_files = {heldout.piece_key(s)[0] for s in h.eval}
    train = [s for s in stems if s not in h.excluded]
    assert not held_files & {heldout.piece_key(s)[0] for s in train}  # no source file on both sides


def test_split_is_deterministic_and_seeded() -> None:
    stems = _stems(12, 6)
    a = heldout.split(stems, 0.1, 5, 40, seed=7)
    assert a == heldout.split(list(reversed(stems)), 0.1, 5, 40, seed=7)
    assert any(heldout.split(stems, 0.1, 5, 40, seed=s).eval != a.eval for s in range(1, 6))


def test_split_by_tail_pieces_with_a_guard_when_files_are_few() -> None:
    stems = _stems(1, 30) + _stems(2, 3)[3:]  # file 0: 30 pieces, file 1: 3 pieces
    h = heldout.split(stems, 0.1, 5, 40, seed=1)
    assert h.mode == "pieces"
    assert h.eval == tuple(f"0_{p}" for p in range(26, 30))  # numeric order: 0_26 .. 0_29, not "0_3"
    assert h.guard == ("0_25",)
    assert set(h.eval).isdisjoint(h.guard)


@pytest.mark.parametrize("stems", [[], ["0_0"], _stems(1, 9), [f"x{i}" for i in range(12)], _stems(12, 1)])
def test_split_of_tiny_or_odd_datasets_holds_out_nothing_or_keeps_training_data(stems: list[str]) -> None:
    h = heldout.split(stems, 0.1, 5, 40, seed=1)
    assert len([s for s in stems if s not in h.excluded]) >= 1 or not stems
    if h.mode == "none":
        assert h.reason and not h.eval


def test_split_caps_pieces_and_disables_at_zero() -> None:
    assert len(heldout.split(_stems(1, 400), 0.5, 5, 12, seed=1).eval) == 12
    assert heldout.split(_stems(10, 10), 0.0, 5, 12, seed=1).reason == "disabled"


def _rec(epoch: int, sim: float, mel: float = 1.0, ovrl: float = 3.0) -> EvalRecord:
    m = {"speaker_sim": sim, "mel_l1": mel, "dnsmos_ovrl": ovrl}
    return EvalRecord(epoch=epoch, step=epoch * 10, checkpoint=f"G_{epoch * 10}.pth", metrics=m,
                      score=history.score(m, history.DEFAULT_WEIGHTS))


def test_best_picks_the_right_epoch_on_a_made_up_history() -> None:
    recs = [_rec(5, 0.70), _rec(10, 0.82), _rec(15, 0.86, mel=0.9), _rec(20, 0.80, mel=0.8)]
    top = history.best(recs)
    assert top is not None and top.epoch == 15
    assert history.score({"mel_l1": float("nan"), "speaker_sim": 1, "dnsmos_ovrl": 3},
                         history.DEFAULT_WEIGHTS) is None
    assert history.best([_rec(5, 0.8), _rec(10, 0.8)]).epoch == 5  # a tie goes to less training


def test_early_stop_after_patience_evaluations_without_improvement() -> None:
    recs = [_rec(1, 0.7), _rec(2, 0.8), _rec(3, 0.79), _rec(4, 0.78)]
    assert history.should_stop(recs, patience=2)
    assert not history.should_stop(recs, patience=3)
    assert not history.should_stop(recs, patience=None)
    assert not history.should_stop(recs + [_rec(5, 0.81)], patience=2)
    assert history.should_stop(recs + [_rec(5, 0.805)], patience=3, min_delta=0.01)


def test_history_survives_a_torn_line_and_a_rewritten_epoch(tmp_path: Path) -> None:
    p = tmp_path / "eval.jsonl"
    for r in [_rec(5, 0.7), _rec(10, 0.9)]:
        history.append_record(p, r)
    with open(p, "a") as f:
        f.write('{"epoch": 15, "step": 1')  # killed mid-write
    history.append_record(p, _rec(10, 0.5))  # the epoch evaluated again after a resume
    recs = history.latest_per_epoch(history.read_history(p))
    assert [r.epoch for r in recs] == [5, 10] and recs[1].metrics["speaker_sim"] == 0.5
    assert history.read_history(tmp_path / "absent.jsonl") == []


def test_report_is_one_self_contained_page(tmp_path: Path) -> None:
    recs = [_rec(5, 0.7), _rec(10, 0.9), _rec(15, 0.8)]
    sr = 40000
    tone = 0.3 * np.sin(2 * np.pi * 220 * np.arange(sr * 10) / sr)
    clips = {e: [("held-out 0_1", tone, sr)] for e in (5, 10, 15)}
    page = report.render("demo", recs, clips, "1.0 x speaker_sim")
    assert "epoch 10" in page and "G_100.pth" in page
    assert page.count("<svg") == 4  # score + 3 metrics
    assert page.count("<audio") == 3
    assert not re.search(r'src="(?!data:)', page)  # nothing to fetch: opens from S3 or disk
    uri = re.search(r'src="data:audio/wav;base64,([^"]+)"', page)
    assert uri and len(uri.group(1)) * 3 / 4 < 16000 * 2 * report.PREVIEW_SECONDS + 100  # cut and resampled
    assert '<tr class="best"><td>10</td>' in page
    assert "&lt;script&gt;" in report.render("<script>", recs, {}, "x")  # names are escaped


def test_report_with_no_scores_yet() -> None:
    page = report.render("demo", [EvalRecord(epoch=1, step=1)], {}, "rule")
    assert "No checkpoint has a score yet" in page
    json.dumps(page)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("metrics", ["nope"], "eval.metrics"),
    ("score", {"Bad-Key": 1.0}, "eval.score"),
    ("score", {}, "eval.score"),
    ("score", {"mel_l1": float("nan")}, "eval.score"),
    ("heldOutShare", 0.9, "eval.heldOutShare"),
    ("patience", 0, "eval.patience"),
])
def test_bad_eval_spec_fields_name_the_field(field: str, value: object, match: str) -> None:
    from rvc_pipeline.core.spec import SpecError, parse_manifest

    m = {"apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment", "metadata": {"name": "a"},
         "spec": {"dataset": {"source": "/d"}, "storage": {"uri": "/s"}, "eval": {field: value}}}
    with pytest.raises(SpecError, match=re.escape(match)):
        parse_manifest(m)


def test_mel_caches_filled_in_inference_mode_still_train() -> None:
    """A metric computes a mel under inference_mode before training does (a resumed run evaluates the
    restored generator first): the cached window and filter bank must still work under autograd."""
    import torch
    from rvc_pipeline import mel

    with torch.inference_mode():
        mel.mel_spectrogram(torch.zeros(1, 4000), 1024, 80, 16000, 256, 1000, 0.0, None)
    y = torch.randn(1, 4000, requires_grad=True)
    mel.mel_spectrogram(y, 1024, 80, 16000, 256, 1000, 0.0, None).sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()
