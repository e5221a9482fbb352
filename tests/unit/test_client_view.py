"""The client's views rendered from recorded status snapshots, how a run's end maps to an exit code, and
the commands against an in-memory KubeAPI (tests/support/fake_kube.py)."""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rvc_pipeline.client import cli, commands, view
from rvc_pipeline.client.overrides import SubmitOptions
from rvc_pipeline.core.layout import exported_model, preview_name
from rvc_pipeline.core.storage import LocalStorage

from tests.support import client_snapshots as snaps
from tests.support.fake_kube import FakeKube


def _text(renderable: Any) -> str:
    c = Console(record=True, width=100)
    c.print(renderable)
    return c.export_text()


# ------------------------------------------------------------------------------ views
def test_pending_before_the_operator_sees_it() -> None:
    out = _text(view.render_watch(snaps.pending(), [], snaps.NOW))
    assert "alice  (voice)  Pending" in out
    assert "waiting for the operator to pick the experiment up" in out
    for step in ("preprocess", "f0", "features", "train", "index"):
        assert f"  {step}" in out
    assert "convert" not in out  # not in spec.steps
    assert view.outcome(snaps.pending()) is None


def test_running_data_step_shows_its_eta() -> None:
    out = _text(view.render_watch(snaps.running_features(), [], snaps.NOW))
    assert "Running · features" in out
    assert "▶ features    Running        1  ETA 1m35s  attempt 1 running" in out
    assert "  f0          Succeeded      1  2m45s      completed" in out
    assert "epoch" not in out  # nothing from training yet


def test_running_train_shows_epoch_losses_best_eta_and_last_event() -> None:
    out = _text(view.render_watch(snaps.running_train(), snaps.EVENTS, snaps.NOW))
    assert "▶ train       Running        2  1h20m  attempt 2 running" in out
    assert "37/200  (18.5%)" in out
    assert "G 31.20  D 4.10  mel 19.80   41.3 s/epoch, step 4440" in out
    assert "best    epoch 35  score 0.812  dnsmos_ovrl 3.1  mel_l1 0.41  speaker_sim 0.84" in out
    # etaSeconds 6732 as of 12:29:00, rendered at 12:30:00: 6672 s left
    assert "ETA     1h51m" in out
    assert "event    CheckpointEvaluated: epoch 35: score 0.812 (best)  (2m30s ago)" in out
    later = _text(view.render_watch(snaps.running_train(), [], snaps.NOW + timedelta(hours=3)))
    assert "ETA     0s" in later  # never below zero


def test_failed_shows_the_reason_and_the_exit_code() -> None:
    out = _text(view.render_watch(snaps.failed(), [], snaps.NOW))
    assert "alice  (voice)  Failed" in out
    assert "f0          Failed         1  25s    exit 2: spec.f0.rmvpeCheckpoint:" in out
    assert "message  step f0 failed (exit 2, permanent)" in out
    assert "▶" not in out and "ETA" not in out


@pytest.mark.parametrize(("exit_code", "expected"), [(2, 2), (3, 3), (1, 1), (137, 1), (None, 1)])
def test_failed_exit_code_is_the_steps_permanent_code_else_1(exit_code: int | None, expected: int) -> None:
    obj = snaps.failed()
    obj["status"]["steps"]["f0"]["exitCode"] = exit_code
    got = view.outcome(obj)
    assert got is not None and got.code == expected
    assert got.message.startswith("alice failed in step f0 (PermanentError): spec.f0.rmvpeCheckpoint")


def test_failed_without_a_failed_step_exits_1_with_the_message() -> None:
    obj = snaps.failed()
    obj["status"]["steps"]["f0"]["phase"] = "Pending"
    got = view.outcome(obj)
    assert got is not None and got.code == 1 and "step f0 failed (exit 2, permanent)" in got.message


def test_succeeded_and_its_status_screen_with_artifacts() -> None:
    got = view.outcome(snaps.succeeded())
    assert got is not None and got.code == 0
    out = _text(view.render_status(snaps.succeeded(), [], snaps.NOW))
    assert "alice  (voice)  Succeeded   3h39m" in out
    assert "best    epoch 180  score 0.871" in out
    assert "model     s3://voices/models/logs/alice/weights/alice.pth" in out
    assert "index     s3://voices/models/logs/alice/added_IVF512_Flat_nprobe_1_alice_v2.index" in out
    assert "report    s3://voices/models/logs/alice/report.html" in out
    assert "previews  s3://voices/models/logs/alice/previews/" in out
    assert "dataset  42.5 min of audio in 57 file(s) (1 skipped), 618 pieces (38.1 min)" in out


def test_status_screen_before_export_says_so() -> None:
    out = _text(view.render_status(snaps.running_train(), [], snaps.NOW))
    assert "model     (not exported yet)" in out and "index     (not built yet)" in out
    assert "best      s3://voices/models/logs/alice/G_4200.pth (epoch 35)" in out


def test_suspended_is_shown_and_ends_a_watch_with_how_to_resume() -> None:
    out = _text(view.render_watch(snaps.suspended(), [], snaps.NOW))
    assert "alice  (voice)  Suspended" in out and "suspended (checkpoint saved)" in out
    assert "ETA" not in out
    got = view.outcome(snaps.suspended())
    assert got is not None and got.code == 1 and "rvc-pipeline resume alice -n voice" in got.message


def test_a_finished_phase_older_than_the_spec_is_not_the_end() -> None:
    obj = snaps.succeeded()
    obj["metadata"]["generation"] = 2  # updated; the operator has not seen it yet
    assert view.outcome(obj) is None
    assert "the operator has not yet seen generation 2" in _text(view.render_watch(obj, [], snaps.NOW))


def test_list_columns() -> None:
    other = snaps.failed()
    other["metadata"].update(name="bob", creationTimestamp="2026-03-01T10:00:00Z")
    out = _text(view.render_list([other, snaps.running_train()], False, snaps.NOW)).splitlines()
    assert out[0].split() == ["NAME", "PHASE", "STEP", "EPOCH", "PROGRESS", "BEST", "SCORE", "ETA", "AGE"]
    assert out[1].split() == ["alice", "Running", "train", "37/200", "18%", "35", "0.812", "1h51m", "1h30m"]
    assert out[2].split() == ["bob", "Failed", "-", "-", "-", "-", "-", "-", "2h30m"]
    wide = _text(view.render_list([snaps.running_train()], True, snaps.NOW)).splitlines()
    assert wide[0].split()[0] == "NAMESPACE" and wide[1].split()[:2] == ["voice", "alice"]


# ------------------------------------------------------------------------------ commands on a fake cluster
def _ctx(kube: FakeKube, **kw: Any) -> tuple[commands.Ctx, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    ctx = commands.Ctx(kube, "voice", console=Console(file=out, width=100), err=Console(file=err, width=100),
                       out=out, sleep=lambda s: None, now=lambda: snaps.NOW, **kw)
    return ctx, out, err


def _voices(tmp_path: Path) -> Path:
    d = tmp_path / "voices"
    d.mkdir()
    (d / "a.wav").write_bytes(b"RIFF" + b"\0" * 100)
    return d


def _local_store(root: Path) -> Any:
    def open_(uri: str, endpoint: str | None = None, region: str | None = None) -> LocalStorage:
        return LocalStorage(root / uri.removeprefix("s3://"))

    return open_


def test_submit_creates_then_updates_keeping_metadata(tmp_path: Path) -> None:
    kube = FakeKube()
    ctx, out, err = _ctx(kube, open_storage=_local_store(tmp_path / "s3"))
    folder = _voices(tmp_path)
    opts = SubmitOptions("alice", "s3://voices/models", (), ("train.epochs=50",))
    assert commands.submit(ctx, folder, opts, detach=True) == 0
    assert (tmp_path / "s3/voices/models/datasets/alice/a.wav").is_file()
    created = kube.objects[("voice", "alice")]
    assert [c[0] for c in kube.calls if c[0] != "get"] == ["create"]
    assert created["spec"]["train"] == {"epochs": 50} and created["metadata"]["namespace"] == "voice"
    assert "rvcexperiment voice/alice created" in out.getvalue()
    assert "rvc-pipeline watch alice -n voice" in out.getvalue()
    created["metadata"]["annotations"] = {"keep": "me"}
    created["status"] = {"phase": "Running"}
    kube.conflicts = 1  # someone else wrote in between: read again, replace again
    opts = SubmitOptions("alice", "s3://voices/models", (), ("train.epochs=60",))
    assert commands.submit(ctx, folder, opts, detach=True) == 0
    replaced = [c[1] for c in kube.calls if c[0] == "replace"]
    assert len(replaced) == 2 and "status" not in replaced[-1]
    now = kube.objects[("voice", "alice")]
    assert now["spec"]["train"] == {"epochs": 60} and now["metadata"]["annotations"] == {"keep": "me"}
    assert now["metadata"]["generation"] == 2 and "updated" in out.getvalue()
    assert "0 uploaded (0.0 MB), 1 already there" in err.getvalue()


def test_submit_refuses_another_storage_for_an_existing_experiment(tmp_path: Path) -> None:
    kube = FakeKube()
    kube.add(snaps.running_train())
    ctx, _, _ = _ctx(kube, open_storage=_local_store(tmp_path / "s3"))
    with pytest.raises(commands.overrides.OverrideError, match="spec.storage.uri: 's3://other/x' differs"):
        commands.submit(ctx, _voices(tmp_path), SubmitOptions("alice", "s3://other/x"), detach=True)
    assert not (tmp_path / "s3").exists()


def test_watch_follows_snapshots_to_the_end_and_maps_the_exit_code() -> None:
    kube = FakeKube()
    kube.script = snaps.watch_sequence()
    ctx, out, _ = _ctx(kube)
    assert commands.watch(ctx, "alice") == 0
    assert "alice succeeded" in out.getvalue() and kube.script == []
    lines = out.getvalue().splitlines()  # not a terminal: one line per change, no boxes
    assert lines[0] == "alice  Pending" and lines[1].startswith("alice  Running  step features")
    assert "alice  Running  step train  epoch 37/200 G 31.20 D 4.10 mel 19.80  best epoch 35 (0.812)  " \
           "ETA 1h51m  - train: attempt 2 running" in lines
    assert lines[-2].startswith("alice  Succeeded  epoch 200/200") and len(lines) == 7
    kube.script = [snaps.running_train(), snaps.failed(3)]
    ctx, out, _ = _ctx(kube)
    assert commands.watch(ctx, "alice") == 3
    assert "alice failed in step f0" in out.getvalue()


def test_watch_on_a_terminal_draws_the_live_view() -> None:
    kube = FakeKube(events=snaps.EVENTS)
    kube.script = [snaps.running_train(), snaps.succeeded()]
    ctx, out, _ = _ctx(kube)
    ctx.console = Console(file=out, width=100, force_terminal=True, color_system=None)
    assert commands.watch(ctx, "alice") == 0
    text = out.getvalue()
    assert "╭─ alice  (voice)  Running · train" in text and "37/200  (18.5%)" in text
    assert "╭─ alice  (voice)  Succeeded" in text and text.rstrip().endswith("alice succeeded")


def test_ctrl_c_leaves_the_experiment_running_and_says_how_to_reattach() -> None:
    kube = FakeKube()
    kube.add(snaps.running_train())

    def interrupt(_: float) -> None:
        raise KeyboardInterrupt

    ctx, _, err = _ctx(kube)
    ctx.sleep = interrupt
    assert commands.watch(ctx, "alice") == 130
    assert "alice keeps running. Re-attach: rvc-pipeline watch alice -n voice" in err.getvalue()
    assert [c[0] for c in kube.calls] == ["get"] and ("voice", "alice") in kube.objects


def test_watch_of_a_missing_experiment() -> None:
    ctx, _, err = _ctx(FakeKube())
    assert commands.watch(ctx, "nobody") == 1
    assert "no RVCExperiment 'nobody' in namespace 'voice'" in err.getvalue()


def test_cancel_suspend_patches_spec_suspend() -> None:
    kube = FakeKube()
    kube.add(snaps.running_train())
    ctx, out, _ = _ctx(kube)
    assert commands.cancel(ctx, "alice", suspend=True) == 0
    assert ("patch", {"spec": {"suspend": True}}) in kube.calls
    assert kube.objects[("voice", "alice")]["spec"]["suspend"] is True
    assert "Resume: rvc-pipeline resume alice -n voice" in out.getvalue()


def test_resume_unsets_suspend_and_is_a_no_op_when_not_suspended() -> None:
    kube = FakeKube()
    kube.add(snaps.running_train())
    ctx, out, _ = _ctx(kube)
    assert commands.resume(ctx, "alice") == 0 and "not suspended" in out.getvalue()
    assert not [c for c in kube.calls if c[0] == "patch"]
    assert commands.cancel(ctx, "alice", suspend=True) == 0
    assert commands.resume(ctx, "alice") == 0
    assert ("patch", {"spec": {"suspend": False}}) in kube.calls
    assert kube.objects[("voice", "alice")]["spec"]["suspend"] is False
    assert "rvc-pipeline watch alice -n voice" in out.getvalue()
    assert commands.resume(ctx, "nobody") == 1


def test_cancel_needs_a_flag_and_delete_asks_first() -> None:
    kube = FakeKube()
    kube.add(snaps.running_train())
    ctx, _, err = _ctx(kube)
    assert commands.cancel(ctx, "alice") == 2
    assert "--suspend" in err.getvalue() and "--delete" in err.getvalue()
    assert commands.cancel(ctx, "alice", suspend=True, delete=True) == 2
    assert cli.main(["cancel", "alice"]) == 2  # refused before any cluster is asked
    asked: list[str] = []
    ctx.confirm = lambda prompt: asked.append(prompt) or "no"  # type: ignore[func-returns-value]
    assert commands.cancel(ctx, "alice", delete=True) == 1 and ("voice", "alice") in kube.objects
    assert "are kept" in asked[0]
    ctx.confirm = lambda prompt: None  # no terminal
    assert commands.cancel(ctx, "alice", delete=True) == 2 and "add --yes" in err.getvalue()
    ctx.confirm = lambda prompt: "alice"
    assert commands.cancel(ctx, "alice", delete=True) == 0 and kube.objects == {}
    kube.add(snaps.running_train())
    assert commands.cancel(ctx, "alice", delete=True, yes=True) == 0 and ("delete", "alice") in kube.calls


def test_list_prints_the_table_or_says_there_is_nothing() -> None:
    kube = FakeKube()
    ctx, out, err = _ctx(kube)
    assert commands.list_(ctx) == 0 and "no RVCExperiments in namespace 'voice'" in err.getvalue()
    kube.add(snaps.running_train())
    assert commands.list_(ctx) == 0
    assert out.getvalue().splitlines()[1].split()[:3] == ["alice", "Running", "train"]


def _pod(name: str, step: str, attempt: int, shard: int | None = None) -> dict[str, Any]:
    labels = {"rvc-operator.dev/experiment": "alice", "rvc-operator.dev/step": step,
              "rvc-operator.dev/attempt": str(attempt)}
    if shard is not None:
        labels["rvc-operator.dev/shard"] = str(shard)
    created = f"2026-03-01T11:0{attempt}:00Z"
    return {"metadata": {"name": name, "labels": labels, "creationTimestamp": created}}


def test_logs_of_the_current_steps_latest_pod() -> None:
    kube = FakeKube()
    kube.add(snaps.running_train())
    kube.pods = [_pod("alice-train-1-x", "train", 1), _pod("alice-train-2-y", "train", 2),
                 _pod("alice-f0-1-z", "f0", 1)]
    kube.logs = {"alice-train-2-y": ["epoch 37", "epoch 38"], "alice-f0-1-z": ["f0 done"]}
    ctx, out, _ = _ctx(kube)
    assert commands.logs(ctx, "alice", follow=True) == 0
    assert out.getvalue() == "epoch 37\nepoch 38\n"
    assert ("pods", "rvc-operator.dev/experiment=alice,rvc-operator.dev/step=train") in kube.calls
    assert ("log", ("alice-train-2-y", "step", True, None)) in kube.calls
    ctx, out, _ = _ctx(kube)
    assert commands.logs(ctx, "alice", step="f0") == 0 and out.getvalue() == "f0 done\n"


def test_logs_of_a_failed_experiment_and_of_shards() -> None:
    kube = FakeKube()
    kube.add(snaps.failed())
    kube.pods = [_pod("alice-f0-s1-1-a", "f0", 1, 1), _pod("alice-f0-s0-1-b", "f0", 1, 0)]
    ctx, _, err = _ctx(kube)
    assert commands.logs(ctx, "alice") == 0 and "pod alice-f0-s0-1-b (step f0)" in err.getvalue()
    ctx, _, err = _ctx(kube)
    assert commands.logs(ctx, "alice", shard=1) == 0 and "pod alice-f0-s1-1-a" in err.getvalue()
    ctx, _, err = _ctx(kube)
    assert commands.logs(ctx, "alice", step="index") == 1 and "no pod of step index" in err.getvalue()


def test_download_fetches_model_index_report_and_best_previews(tmp_path: Path) -> None:
    kube = FakeKube()
    obj = snaps.succeeded()
    kube.add(obj)
    exp_dir = tmp_path / "s3/voices/models/logs/alice"
    files = {exported_model("alice"): b"model", "added_IVF512_Flat_nprobe_1_alice_v2.index": b"index",
             "trained_IVF512_Flat_nprobe_1_alice_v2.index": b"no", "report.html": b"<html>",
             preview_name(180, 0): b"best0", preview_name(180, 1): b"best1", preview_name(5, 0): b"old",
             "G_4200.pth": b"checkpoint"}
    for key, data in files.items():
        (exp_dir / key).parent.mkdir(parents=True, exist_ok=True)
        (exp_dir / key).write_bytes(data)
    ctx, out, _ = _ctx(kube, open_storage=_local_store(tmp_path / "s3"))
    dest = tmp_path / "got"
    assert commands.download(ctx, "alice", to=dest) == 0
    got = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert got == ["added_IVF512_Flat_nprobe_1_alice_v2.index", "alice.pth", preview_name(180, 0),
                   preview_name(180, 1), "report.html"]
    assert "5 downloaded, 0 already up to date" in out.getvalue()
    ctx, out, _ = _ctx(kube, open_storage=_local_store(tmp_path / "s3"))
    assert commands.download(ctx, "alice", to=dest) == 0
    assert "0 downloaded, 5 already up to date" in out.getvalue()


def test_download_before_the_model_exists(tmp_path: Path) -> None:
    kube = FakeKube()
    kube.add(snaps.running_train())
    ctx, _, err = _ctx(kube, open_storage=_local_store(tmp_path / "s3"))
    assert commands.download(ctx, "alice", to=tmp_path / "got") == 1
    assert "weights/alice.pth does not exist yet (phase Running, step train)" in err.getvalue()
