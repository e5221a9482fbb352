"""Preemption costs at most one training step (issue 11, item 1), on CPU with tiny models.

A REAL SIGTERM (os.kill of this process, with core.termination's handler installed as the CLI does) is
delivered in the middle of a training step; the step finishes, the state is saved (G/D: weights,
optimizer, scaler, step, position inside the epoch, partial loss sums, RNG) and the run stops with
Preempted. The rerun resumes mid-epoch and ends where an uninterrupted run ends, with the same weights.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from rvc_pipeline import checkpoints as ck
from rvc_pipeline.core import termination
from rvc_pipeline.core.errors import EXIT_PREEMPTED
from rvc_pipeline.core.spec import parse_manifest
from rvc_pipeline.data import DistributedBucketSampler
from rvc_pipeline.progress import read_events
from rvc_pipeline.steps.runner import run_step
from rvc_pipeline.steps.train import saving
from rvc_pipeline.steps.train.state import EpochPosition, _position, restore_rng, rng_state
from rvc_pipeline.steps.train.trainer import TrainHooks

from tests.integration.test_train import DRIVER, TinyD, make_experiment, manifest, speech, train_step

__all__ = ["speech"]  # the module fixture (real speech, espeak-ng)

SPE = 4  # steps per epoch (maxStepsPerEpoch)


@pytest.fixture(autouse=True)
def _setup(offline_weights: Path, one_torch_thread: None) -> Iterator[None]:
    """termination's SIGTERM handler as the CLI installs it; the previous handler and state afterwards."""
    previous = signal.getsignal(signal.SIGTERM)
    termination.reset()
    assert termination.install()
    yield
    signal.signal(signal.SIGTERM, previous)
    termination.reset()


def sigterm_at(step: int) -> TrainHooks:
    """Tiny D; SIGTERM to this process right after step `step`'s D loss (in the middle of the step)."""
    def hook(global_step: int, which: str, loss: torch.Tensor) -> torch.Tensor:
        if global_step == step and which == "d":
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    return TrainHooks(TinyD, loss_hook=hook)


def run(root: Path, name: str, hooks: TrainHooks = TrainHooks(TinyD), **kw: Any) -> dict[str, Any]:
    opts = {"batchSize": 1, "epochs": 2, "maxStepsPerEpoch": SPE, **kw}
    return run_step(parse_manifest(manifest(root, name, **opts)), "train", train_step(hooks), force=True)


def events(exp: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in read_events(exp / "progress.jsonl", "train") if e["event"] == kind]


class SaveSpy:
    """The optimizer state and weights at the moment of the preemption save (deep copies)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.state: dict[str, Any] = {}
        real = saving.save_resumable

        def spy(job: Any, ctx: Any, nets: Any, *a: Any, **kw: Any) -> Any:
            self.state = {"opt_g": copy.deepcopy(nets.optim_g.state_dict()["state"]),
                          "opt_d": copy.deepcopy(nets.optim_d.state_dict()["state"]),
                          "g": copy.deepcopy(ck.legacy_state_dict(nets.net_g))}
            return real(job, ctx, nets, *a, **kw)

        monkeypatch.setattr(saving, "save_resumable", spy)


def loaded_state(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Filled by the next resume: the optimizer states and G weights right after loading."""
    got: dict[str, Any] = {}
    real = ck.load_checkpoint

    def spy(path: Path, model: torch.nn.Module, optimizer: Any = None, **kw: Any) -> dict[str, Any]:
        info = real(path, model, optimizer, **kw)
        which = "g" if Path(path).name.startswith("G_") else "d"
        got[f"opt_{which}"] = copy.deepcopy(optimizer.state_dict()["state"])
        if which == "g":
            got["g"] = copy.deepcopy(ck.legacy_state_dict(model))
        return info

    monkeypatch.setattr(ck, "load_checkpoint", spy)
    return got


def assert_same_optimizer(a: dict[int, dict[str, torch.Tensor]],
                          b: dict[int, dict[str, torch.Tensor]]) -> None:
    assert set(a) == set(b) and a
    for k in a:
        for t in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a[k][t], b[k][t]), (k, t)


# --------------------------------------------------------------------------------------------- tests
def test_sigterm_mid_step_saves_then_resumes_mid_epoch_like_an_uninterrupted_run(
        tmp_path: Path, speech: list[np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    ref_exp = make_experiment(tmp_path, "runa", speech)
    ref = run(tmp_path, "runa")
    assert ref["global_step"] == 2 * SPE

    exp = make_experiment(tmp_path, "runb", speech)  # same length name: the same random features
    at_save = SaveSpy(monkeypatch)
    with pytest.raises(termination.Preempted, match="epoch 2 at step 6"):
        run(tmp_path, "runb", hooks=sigterm_at(SPE + 2))  # SIGTERM inside step 2 of epoch 2
    assert termination.requested()
    # the epoch-1 pair and the preemption pair (global step 6: the newest number)
    assert sorted(p.name for p in exp.glob("[GD]_*.pth")) == ["D_4.pth", "D_6.pth", "G_4.pth", "G_6.pth"]
    g6 = torch.load(exp / "G_6.pth", weights_only=True)
    assert g6["iteration"] == 1 and g6["global_step"] == 6  # RVC's own loader re-runs epoch 2
    d6 = torch.load(exp / "D_6.pth", weights_only=True)
    for obj in (g6, d6):  # what RVC's utils.load_checkpoint reads
        assert {"model", "iteration", "optimizer", "learning_rate"} <= set(obj) and obj["optimizer"]["state"]
    assert g6["epoch_position"]["epoch"] == 2 and g6["epoch_position"]["epoch_step"] == 2
    assert g6["epoch_position"]["ok_steps"] == 2 and g6["epoch_position"]["sums"]["loss_mel"] > 0
    assert g6["history"]["epoch"] == [1] and g6["rng_state"]["cpu"].dtype == torch.uint8
    (pre,) = events(exp, "preempted")
    assert (pre["epoch"], pre["global_step"], pre["epoch_step"], pre["steps_per_epoch"]) == (2, 6, 2, SPE)
    assert 0 < pre["seconds_to_step_end"] <= pre["seconds_to_checkpoint"] <= pre["seconds_to_upload"] < 30
    assert pre["files"] == ["G_6.pth", "D_6.pth"]
    assert not (exp / ".rvc" / "train.done.json").exists()
    assert [e["global_step"] for e in events(exp, "train_step")] == list(range(1, 7))

    # resume: the same epoch, after its 2 done steps; optimizer, weights exactly as at the save
    termination.reset()
    after_load = loaded_state(monkeypatch)
    s = run(tmp_path, "runb")
    for k in ("opt_g", "opt_d"):
        assert_same_optimizer(at_save.state[k], after_load[k])
    assert all(torch.equal(at_save.state["g"][k], v) for k, v in after_load["g"].items())
    (start,) = events(exp, "train_start")[1:]
    assert (start["start_epoch"], start["start_epoch_step"], start["global_step"]) == (2, 2, 6)
    assert s["start_epoch"] == 2 and s["last_epoch"] == 2 and s["global_step"] == ref["global_step"]
    steps = events(exp, "train_step")
    assert [e["global_step"] for e in steps] == list(range(1, 9))  # no step trained twice
    lrs = {e["global_step"]: e["lr"] for e in steps}
    assert lrs[7] == lrs[8] == lrs[5] == pytest.approx(1e-4 * 0.999875)  # epoch 2's LR, stepped once
    epoch2 = events(exp, "epoch")[-1]
    assert epoch2["epoch"] == 2 and epoch2["steps"] == SPE and epoch2["global_step"] == 8
    mel = [e["loss_mel"] for e in steps[SPE:]]
    assert epoch2["avg_loss_mel"] == pytest.approx(sum(mel) / len(mel), rel=1e-5)  # the whole epoch's
    g8 = torch.load(exp / "G_8.pth", weights_only=True)
    assert g8["iteration"] == 2 and "epoch_position" not in g8 and g8["history"]["epoch"] == [1, 2]
    assert json.loads((exp / "train_summary.json").read_text())["history"]["epoch"] == [1, 2]
    assert (exp / "weights" / "runb.pth").is_file() and (exp / ".rvc" / "train.done.json").is_file()
    # the preemption pair was removed once the epoch's own save superseded it
    assert sorted(p.name for p in exp.glob("[GD]_*.pth")) == ["D_4.pth", "D_8.pth", "G_4.pth", "G_8.pth"]
    # the same weights as the run that was never interrupted (same data, seed, RNG restored)
    ref_g = torch.load(ref_exp / "G_8.pth", weights_only=True)["model"]
    for k, v in g8["model"].items():
        torch.testing.assert_close(v, ref_g[k], rtol=1e-5, atol=1e-6)


def test_sigterm_at_an_epoch_end_without_a_due_save_and_latest_only(tmp_path: Path,
                                                                    speech: list[np.ndarray]) -> None:
    ref_exp = make_experiment(tmp_path, "edgf", speech[:3])
    run(tmp_path, "edgf", epochs=3, saveEveryEpoch=2, saveLatestOnly=True)
    exp = make_experiment(tmp_path, "edge", speech[:3])
    with pytest.raises(termination.Preempted):
        run(tmp_path, "edge", hooks=sigterm_at(SPE), epochs=3, saveEveryEpoch=2, saveLatestOnly=True)
    assert sorted(p.name for p in exp.glob("[GD]_*.pth")) == ["D_2333333.pth", "G_2333333.pth"]
    g = torch.load(exp / "G_2333333.pth", weights_only=True)
    assert g["iteration"] == 1 and g["global_step"] == SPE and "epoch_position" not in g
    (pre,) = events(exp, "preempted")
    assert (pre["epoch"], pre["epoch_step"], pre["global_step"]) == (2, 0, SPE)
    termination.reset()
    s = run(tmp_path, "edge", epochs=3, saveEveryEpoch=2, saveLatestOnly=True)
    assert s["start_epoch"] == 2 and s["global_step"] == 3 * SPE
    assert events(exp, "train_start")[-1]["start_epoch_step"] == 0
    g = torch.load(exp / "G_2333333.pth", weights_only=True)
    ref_g = torch.load(ref_exp / "G_2333333.pth", weights_only=True)
    assert g["iteration"] == ref_g["iteration"] == 3 and "rng_state" not in g
    for k, v in g["model"].items():  # as if never interrupted (the RNG state restored at the epoch start)
        torch.testing.assert_close(v, ref_g["model"][k], rtol=1e-5, atol=1e-6)


def test_sigterm_outside_graceful_still_exits_at_once(tmp_path: Path, speech: list[np.ndarray]) -> None:
    """Before and after training's graceful block (also after a Preempted unwound it) SIGTERM is an exit."""
    with pytest.raises(SystemExit) as e:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs before this returns
    assert e.value.code == EXIT_PREEMPTED
    make_experiment(tmp_path, "out", speech[:2])
    with pytest.raises(termination.Preempted):
        run(tmp_path, "out", hooks=sigterm_at(1), epochs=1)
    with pytest.raises(SystemExit) as e:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert e.value.code == EXIT_PREEMPTED


def test_positions_that_do_not_add_up_start_the_epoch_over(caplog: pytest.LogCaptureFixture) -> None:
    good = {"epoch": 3, "epoch_step": 2, "steps_per_epoch": 5, "ok_steps": 1, "sums": {"loss_g": 1.5},
            "seconds": 2.0}
    assert EpochPosition.parse(good) == EpochPosition(3, 2, 5, 1, {"loss_g": 1.5}, 2.0)
    bad: list[Any] = [
        "garbage", 7, [], {"epoch": 3}, {**good, "epoch_step": 5}, {**good, "epoch_step": 0},
        {**good, "epoch_step": -1}, {**good, "ok_steps": 3}, {**good, "sums": {"loss_g": "x"}},
        {**good, "sums": None}, {**good, "epoch": 0}, {**good, "epoch_step": "two"},
    ]
    for obj in bad:
        assert EpochPosition.parse(obj) is None, obj
    assert EpochPosition.parse(None) is None
    # a position of another epoch or another epoch length (data or batch size changed since)
    assert _position({"epoch_position": good}, 3, 5) is not None
    assert _position({"epoch_position": good}, 4, 5) is None
    assert _position({"epoch_position": good}, 3, 6) is None
    assert "data or batch size changed" in caplog.text
    # RNG states that do not fit are skipped with a warning, the process' RNG untouched
    cpu = torch.device("cpu")
    before = torch.get_rng_state()
    for rng in (None, "x", {}, {"cpu": "x"}, {"cpu": torch.zeros(3, dtype=torch.uint8)},
                {"cpu": torch.zeros(5056)}):
        assert restore_rng(rng, cpu) is False
    assert torch.equal(torch.get_rng_state(), before)
    assert restore_rng(rng_state(cpu), cpu) is True


def test_sampler_start_skips_the_first_batches_of_the_same_order() -> None:
    lengths = [100 + 37 * i % 900 for i in range(40)]
    s = DistributedBucketSampler(lengths, 3, boundaries=[0, 300, 600, 1000])
    s.set_epoch(5)
    full = list(s)
    s.set_epoch(5, 4)
    assert list(s) == full[4:] and len(s) == len(full)
    s.set_epoch(6)
    assert list(s) != full and len(list(s)) == len(full)  # the start applies to that epoch only
    with pytest.raises(ValueError, match="start must be >= 0"):
        s.set_epoch(5, -1)


def test_cli_train_sigterm_exits_143_with_the_checkpoint(tmp_path: Path, speech: list[np.ndarray]) -> None:
    """`rvc-pipeline train --spec F` in a subprocess, SIGTERM once it trains: exit 143, state saved."""
    exp = make_experiment(tmp_path, "cli", speech[:3])
    mpath = tmp_path / "m.yaml"
    mpath.write_text(yaml.safe_dump(manifest(tmp_path, "cli", epochs=50, maxStepsPerEpoch=SPE, batchSize=1)))
    env = {**os.environ, "RVC_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    code = DRIVER.format(test=str(Path(__file__).parent.parent / "integration" / "test_train.py"),
                         manifest=str(mpath))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not events(exp, "train_step"):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    (pre,) = events(exp, "preempted")
    assert (exp / pre["files"][0]).is_file() and pre["global_step"] < 50 * SPE
    assert "preempted (SIGTERM) in epoch" in err  # the command's one-line message
