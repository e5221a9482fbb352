"""core/events.py: typed progress events, written by the Reporter and read by the operator's progress reader.
The JSON-lines format is the contract between a pod of one version and an operator of another."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from rvc_operator.progress_reader import parse_events, progress_from_events
from rvc_pipeline.core import events
from rvc_pipeline.core.layout import PROGRESS_FILE
from rvc_pipeline.progress import Reporter, read_events

# What each step writes (the fields of every reporter.event call in the pipeline).
WRITTEN: list[tuple[str, str, dict]] = [
    ("preprocess", "start", {}),
    ("preprocess", "progress", {"files_done": 1, "files_total": 4, "audio_seconds": 3.5}),
    ("features", "warning", {"message": "DEMO: random HuBERT"}),
    ("index", "loaded", {"vectors": 1200, "files": 7}),
    ("index", "kmeans", {"vectors": 10000, "seconds": 1.25}),
    ("index", "trained", {"n_ivf": 87, "seconds": 0.5}),
    ("train", "train_start", {"start_epoch": 1, "epochs": 20, "global_step": 0, "steps_per_epoch": 6,
                              "batch_size": 4, "world_size": 1, "precision": "fp32", "device": "cpu",
                              "init": "pretrained", "pretrained_g": "f0G40k.pth", "pretrained_d": None}),
    ("train", "train_step", {"epoch": 1, "global_step": 1, "loss_g": 31.5, "loss_d": 4.25, "loss_mel": 21.0,
                             "loss_kl": 9.0, "loss_fm": None, "lr": 1e-4, "grad_norm_g": 3.0,
                             "grad_norm_d": 1.5}),
    ("train", "nonfinite_step", {"epoch": 1, "global_step": 2, "streak": 1}),
    ("train", "epoch", {"epoch": 1, "epochs": 20, "seconds": 12.5, "steps": 6, "global_step": 6, "lr": 1e-4,
                        "avg_loss_g": 30.0, "avg_loss_d": 4.0, "avg_loss_mel": 20.0, "avg_loss_kl": 8.0,
                        "avg_loss_fm": 2.0, "ema_loss_mel": 20.0, "ema_loss_g": 30.0}),
    ("train", "checkpoint", {"epoch": 1, "global_step": 6, "files": ["G_6.pth", "D_6.pth"]}),
    ("train", "preempted", {"epoch": 2, "global_step": 8, "epoch_step": 2, "steps_per_epoch": 6,
                            "seconds_to_step_end": 0.5, "seconds_to_checkpoint": 1.5,
                            "seconds_to_upload": 4.25,
                            "files": ["G_8.pth", "D_8.pth"]}),
    ("train", "checkpoint_corrupt", {"file": "G_6.pth", "error": "truncated"}),
    ("train", "eval", {"epoch": 5, "global_step": 40, "checkpoint": "G_40.pth", "score": 0.81,
                       "metrics": {"speaker_sim": 0.8, "mel_l1": 1.2}, "best_epoch": 5, "best_score": 0.81,
                       "best_checkpoint": "G_40.pth", "best_metrics": {"speaker_sim": 0.8}, "stop": False}),
    ("train", "failed", {"error": "boom"}),
    ("train", "done", {"seconds": 80.5}),
]


def _write_all(tmp_path: Path) -> Path:
    for step, kind, fields in WRITTEN:
        Reporter(tmp_path, "alice", step).event(kind, **fields)
    return tmp_path / PROGRESS_FILE


def test_every_kind_the_pipeline_writes_reads_back_typed(tmp_path: Path) -> None:
    assert {kind for _, kind, _ in WRITTEN} == events.KINDS
    got = parse_events(_write_all(tmp_path).read_bytes())
    assert [(e.step, e.event) for e in got] == [(s, k) for s, k, _ in WRITTEN]
    for ev, (_, _, fields) in zip(got, WRITTEN):
        assert ev.experiment == "alice" and ev.time > 1.7e9
        assert ev.model_dump(include=set(fields)) == fields
    start = next(e for e in got if isinstance(e, events.TrainStart))
    assert start.model_extra == {"init": "pretrained", "pretrained_g": "f0G40k.pth", "pretrained_d": None}


def test_a_line_holds_the_header_first_then_only_the_fields_given(tmp_path: Path) -> None:
    Reporter(tmp_path, "bob", "train").event("epoch", epoch=1)
    line = (tmp_path / PROGRESS_FILE).read_text()
    rec = json.loads(line)
    assert list(rec) == ["time", "experiment", "step", "event", "epoch"]
    assert rec["experiment"] == "bob" and rec["event"] == "epoch" and line.endswith("}\n")
    assert read_events(tmp_path / PROGRESS_FILE) == [rec]


@pytest.mark.parametrize(("kind", "fields", "match"), [
    ("epochs", {"epoch": 1}, "unknown progress event kind 'epochs'"),
    ("progress", {"files_done": 1}, "files_total: Field required"),
    ("progress", {"files_done": "1", "files_total": 2}, "files_done"),
    ("epoch", {"epoch": True}, "epoch"),
    ("epoch", {"epoch": 1.5}, "epoch"),
    ("checkpoint", {"files": "G_1.pth"}, "files"),
])
def test_the_writer_refuses_an_event_that_does_not_fit_its_kind(tmp_path: Path, kind: str, fields: dict,
                                                                match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Reporter(tmp_path, "a", "train").event(kind, **fields)
    assert not (tmp_path / PROGRESS_FILE).exists()


def test_lines_of_the_previous_version_still_parse() -> None:
    """Verbatim lines as the pipeline wrote them before the events were typed (a pod still running it)."""
    old = (
        b'{"time": 1764650000.0, "experiment": "alice", "step": "train", "event": "start"}\n'
        b'{"time": 1764650001.5, "experiment": "alice", "step": "train", "event": "train_start", '
        b'"start_epoch": 3, "epochs": 20, "global_step": 12, "steps_per_epoch": 6, "batch_size": 4, '
        b'"world_size": 1, "precision": "bf16", "device": "cuda:0", "init": "resume", '
        b'"resumed_from": "/w/logs/alice/G_12.pth", "resumed_epoch": 2}\n'
        b'{"time": 1764650010.0, "experiment": "alice", "step": "train", "event": "train_step", "epoch": 3, '
        b'"global_step": 13, "loss_g": 29.1, "loss_d": 4.4, "loss_mel": 19.9, "loss_kl": null, '
        b'"loss_fm": 2.5, "lr": 9.9e-05, "grad_norm_g": 12.0, "grad_norm_d": 3.0}\n'
        b'{"time": 1764650020.0, "experiment": "alice", "step": "train", "event": "epoch", "epoch": 3, '
        b'"epochs": 20, "seconds": 18.25, "steps": 6, "global_step": 18, "lr": 9.9e-05, "avg_loss_g": 28.0, '
        b'"avg_loss_d": 4.3, "avg_loss_mel": 19.0, "avg_loss_kl": 1.0, "avg_loss_fm": 2.0, '
        b'"ema_loss_mel": 19.5, "ema_loss_g": 28.5}\n'
    )
    got = parse_events(old)
    assert [type(e) for e in got] == [events.StepStart, events.TrainStart, events.TrainStep, events.EpochEnd]
    p = progress_from_events(got)
    assert p is not None
    assert (p.epoch, p.epochs, p.epoch_text, p.percent, p.global_step) == (3, 20, "3/20", 15.0, 18)
    assert (p.loss_g, p.loss_d, p.loss_mel, p.seconds_per_epoch) == (28.0, 4.3, 19.0, 18.25)
    assert p.updated == "2025-12-02T04:33:40Z"


def test_the_reader_skips_what_it_cannot_read() -> None:
    good = {"time": 5.0, "experiment": "a", "step": "train", "event": "epoch", "epoch": 2, "epochs": 4}
    hostile = [
        b'ain", "event": "epoch", "epoch": 1}',  # torn first line of a ranged read
        b"[1, 2, 3]", b"42", b'"text"', b"null", b"", b"   ",  # JSON, but no object
        b'{"time": 1, "step": "train", "event": "reticulate"}',  # a kind of a newer version
        b'{"time": 1, "step": "train", "event": null}', b'{"time": 1, "step": "train"}',
        b'{"time": 1, "step": "train", "event": "epoch", "epoch": true}',
        b'{"time": 1, "step": "train", "event": "epoch", "epoch": "7"}',
        b'{"time": 1, "step": "train", "event": "epoch", "epoch": 1e400}',
        b'{"time": "yesterday", "step": "train", "event": "epoch", "epoch": 3}',
        b'{"time": 1, "step": ["train"], "event": "epoch", "epoch": 3}',
        b'{"time": 1, "step": "train", "event": "checkpoint", "files": {"a": 1}}',
        b"\xff\xfe{not utf-8",
        json.dumps(good).encode(),
        b'{"time": 9, "step": "train", "event": "epoch", "epoch": 3, "epochs"',  # torn last line
    ]
    got = parse_events(b"\n".join(hostile))
    assert [e.model_dump(exclude_unset=True) for e in got] == [good]


def test_progress_shows_the_newer_losses_and_never_a_non_finite_number() -> None:
    base = {"experiment": "a", "step": "train"}
    lines = [
        {**base, "time": 1.0, "event": "train_start", "epochs": 10},
        {**base, "time": 2.0, "event": "epoch", "epoch": 1, "epochs": 10, "avg_loss_g": 30.0,
         "avg_loss_d": 4.0, "avg_loss_mel": float("nan"), "seconds": float("inf"), "global_step": 6},
        {**base, "time": 3.0, "event": "train_step", "epoch": 2, "global_step": 7, "loss_g": 29.0,
         "loss_d": None, "loss_mel": 18.0},
        {**base, "step": "index", "time": 4.0, "event": "done"},  # another step's events do not count
    ]
    p = progress_from_events(parse_events("\n".join(json.dumps(x) for x in lines).encode()))
    assert p is not None
    # the step is newer: its losses, the epoch summary fills the gap (loss_d); NaN/inf are left out
    assert (p.loss_g, p.loss_d, p.loss_mel) == (29.0, 4.0, 18.0)
    assert p.seconds_per_epoch is None and (p.epoch, p.epoch_text, p.global_step) == (1, "1/10", 6)
    dumped = json.dumps(p.model_dump(by_alias=True, exclude_none=True), allow_nan=False)  # valid JSON
    assert "secondsPerEpoch" not in dumped
    assert all(math.isfinite(v) for v in p.model_dump().values() if isinstance(v, float))


def test_progress_before_the_first_epoch_and_after_done() -> None:
    start = [{"time": 1.0, "step": "train", "event": "start"}]
    p = progress_from_events(parse_events(json.dumps(start[0]).encode()), total_epochs=8)
    assert p is not None and (p.epoch, p.epoch_text, p.percent) == (0, "0/8", 0.0)
    assert progress_from_events(parse_events(b""), total_epochs=8) is None
    done = [*start, {"time": 2.0, "step": "train", "event": "train_start", "epochs": 5},
            {"time": 9.0, "step": "train", "event": "done", "seconds": 8.0}]
    p = progress_from_events(parse_events("\n".join(json.dumps(x) for x in done).encode()), total_epochs=8)
    assert p is not None and (p.epoch, p.epochs, p.percent) == (5, 5, 100.0)  # what the run reported wins
