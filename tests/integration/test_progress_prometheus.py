"""Progress events reach a real Pushgateway and a real Prometheus scraping it."""

from __future__ import annotations

import json

import pytest
from rvc_pipeline.core.layout import PROGRESS_FILE
from rvc_pipeline.progress import Reporter, read_events

from tests.promstack import available, start_prom_stack

pytestmark = pytest.mark.skipif(not available(), reason="prometheus binaries missing: run scripts/setup.sh")


@pytest.fixture(scope="module")
def prom(tmp_path_factory):
    stack = start_prom_stack(tmp_path_factory.mktemp("prom"))
    yield stack
    stack.stop()


def test_events_go_to_jsonl_and_prometheus(prom, tmp_path):
    rep = Reporter(tmp_path, "alice", "train", pushgateway=prom.pushgateway)
    rep.event("epoch", epoch=3, epochs=20, loss_g=12.5, loss_d=3.25, note="text fields stay in the log")
    res = prom.wait_for('rvc_loss_g{experiment="alice",step="train"}')
    assert float(res[0]["value"][1]) == pytest.approx(12.5)
    res = prom.wait_for('rvc_epoch{experiment="alice"}')
    assert float(res[0]["value"][1]) == 3
    events = read_events(tmp_path / PROGRESS_FILE, step="train")
    assert [e["event"] for e in events] == ["epoch"]
    assert events[0]["loss_d"] == 3.25 and events[0]["note"].startswith("text")


def test_checkpoint_evaluation_reaches_prometheus_and_the_operator_reader(prom, tmp_path):
    """What training publishes after judging a checkpoint: the dashboard's gauges and status.training."""
    from rvc_operator.progress_reader import parse_events, training_from_events
    from rvc_pipeline.evaluation.history import EvalRecord
    from rvc_pipeline.steps.train.judging import publish

    rep = Reporter(tmp_path, "erin", "train", pushgateway=prom.pushgateway)
    best = EvalRecord(epoch=5, step=50, checkpoint="G_50.pth", metrics={"speaker_sim": 0.81}, score=0.81)
    rec = EvalRecord(epoch=10, step=100, checkpoint="G_100.pth", score=0.62,
                     metrics={"speaker_sim": 0.7, "mel_l1": 1.25, "dnsmos_ovrl": 2.9})
    publish(rep, rec, best, stop=False)
    expected = {"rvc_eval_mel_l1": 1.25, "rvc_score": 0.62, "rvc_best_epoch": 5, "rvc_eval_speaker_sim": 0.7}
    for metric, value in expected.items():
        query = f'{metric}{{experiment="erin"}}'
        assert float(prom.wait_for(query)[0]["value"][1]) == pytest.approx(value), metric
    training = training_from_events(parse_events((tmp_path / PROGRESS_FILE).read_bytes()))
    assert training is not None and training.best is not None and training.latest is not None
    assert training.latest.metrics is not None
    got = (training.best.epoch, training.best.checkpoint, training.latest.metrics["mel_l1"])
    assert got == (5, "G_50.pth", 1.25)


def test_unreachable_pushgateway_never_fails_a_step(tmp_path, caplog):
    rep = Reporter(tmp_path, "bob", "f0", pushgateway="http://127.0.0.1:9")
    rep.event("progress", files_done=1, files_total=2)
    rep.event("progress", files_done=2, files_total=2)
    lines = (tmp_path / PROGRESS_FILE).read_text().splitlines()
    assert [json.loads(x)["files_done"] for x in lines] == [1, 2]
    assert sum("pushgateway" in r.message for r in caplog.records) == 1  # warned once, not per event


def test_torn_last_line_is_ignored(tmp_path):
    rep = Reporter(tmp_path, "c", "train")
    rep.event("epoch", epoch=1)
    with open(tmp_path / PROGRESS_FILE, "a") as f:
        f.write('{"event": "epo')
    assert [e["epoch"] for e in read_events(tmp_path / PROGRESS_FILE)] == [1]
