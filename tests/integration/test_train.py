"""The train step end to end on CPU: real speech (espeak-ng), tiny models, checkpoints, resume, failures.

The models are RVC's classes built from a small `config.json` model section (RVC builds the generator
from logs/<exp>/config.json too) plus a tiny discriminator through the Trainer's test hooks
(`TrainHooks(discriminator_factory=...)`), so a step takes a fraction of a second and a checkpoint a few
hundred kB.
The full-size v2 40k models are exercised once in the slow test at the end.
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from rvc_pipeline import checkpoints as ck
from rvc_pipeline.core.errors import StepFailed, WeightsNotFound
from rvc_pipeline.core.spec import parse_manifest
from rvc_pipeline.nn import build_generator, get_config
from rvc_pipeline.nn.config import RVCConfig
from rvc_pipeline.nn.weightnorm import weight_norm
from rvc_pipeline.progress import read_events
from rvc_pipeline.steps import train
from rvc_pipeline.steps.runner import run_step
from rvc_pipeline.steps.train import TrainHooks
from scipy.signal import resample_poly

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore.",
    "A voice model needs a few minutes of clean speech.",
    "Training stops and resumes without losing progress.",
    "Every checkpoint is written safely to storage.",
]


class TinyD(torch.nn.Module):
    """A two-scale stand-in for RVC's multi-period discriminator, same forward contract."""

    def __init__(self, version: str = "v2"):
        super().__init__()
        self.discriminators = torch.nn.ModuleList(
            torch.nn.ModuleList([weight_norm(torch.nn.Conv1d(1, 4, 15, s, 7)),
                                 weight_norm(torch.nn.Conv1d(4, 1, 3, 1, 1))]) for s in (2, 4))

    def forward(self, y: torch.Tensor, y_hat: torch.Tensor) -> tuple[list, list, list, list]:
        rs: list[torch.Tensor] = []
        fs: list[torch.Tensor] = []
        rm: list[list[torch.Tensor]] = []
        fm: list[list[torch.Tensor]] = []
        for convs in self.discriminators:
            for x, outs, maps in ((y, rs, rm), (y_hat, fs, fm)):
                h = torch.nn.functional.leaky_relu(convs[0](x), 0.1)
                o = convs[1](h)
                maps.append([h, o])
                outs.append(o.flatten(1))
        return rs, fs, rm, fm


def tiny_config(version: str = "v2", sr: str = "40k") -> RVCConfig:
    j = get_config(version, sr).to_json()
    j["model"].update(inter_channels=8, hidden_channels=8, filter_channels=16, n_layers=1,
                      resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3, 5]],
                      upsample_initial_channel=16, gin_channels=8)
    return RVCConfig.from_json(j)


# Tiny D (the tiny generator comes from the experiment's config.json, which export checks against).
HOOKS = TrainHooks(discriminator_factory=TinyD)


def train_step(hooks: TrainHooks = HOOKS) -> Any:
    """The train step function with test hooks, as run_step calls it."""
    return functools.partial(train.run, hooks=hooks)


def install_hooks() -> None:
    """In a process driven through the CLI: its train step runs with HOOKS."""
    from rvc_pipeline.steps import runner

    real = runner.step_function
    runner.step_function = lambda step: train_step() if step == "train" else real(step)


@pytest.fixture(autouse=True)
def _offline(offline_weights: Path) -> None:
    return None


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    """Five real utterances (espeak-ng, 22.05 kHz float)."""
    d = tmp_path_factory.mktemp("speech")
    out = []
    for i, s in enumerate(SENTENCES):
        p = d / f"{i}.wav"
        subprocess.run(["espeak-ng", "-s", "190", "-w", str(p), s], check=True, capture_output=True)
        x, sr = sf.read(p, dtype="float32")
        assert sr == 22050
        out.append(x)
    return out


def coarse_f0(hz: np.ndarray) -> np.ndarray:
    mel = 1127 * np.log(1 + hz / 700)
    lo, hi = 1127 * np.log(1 + 50 / 700), 1127 * np.log(1 + 1100 / 700)
    c = np.where(mel > 0, (mel - lo) * 254 / (hi - lo) + 1, 1)
    return np.clip(np.rint(c), 1, 255).astype(np.int64)


def make_experiment(root: Path, name: str, speech: list[np.ndarray], *, version: str = "v2", sr: str = "40k",
                    f0: bool = True, seconds: float | None = None, wav_sr: int | None = None,
                    config: bool = True) -> Path:
    """logs/<name>/ with 0_gt_wavs (real speech at the model rate), random features, plausible f0."""
    exp = root / "logs" / name
    rate = wav_sr or {"32k": 32000, "40k": 40000, "48k": 48000}[sr]
    dim = 256 if version == "v1" else 768
    rng = np.random.default_rng(len(name))
    for i, x in enumerate(speech):
        if seconds is not None:
            x = x[: int(seconds * 22050)]
        wav = resample_poly(x, rate // 50, 441).astype(np.float32)
        w16 = resample_poly(x, 320, 441).astype(np.float32)
        stem = f"0_{i}"
        (exp / "0_gt_wavs").mkdir(parents=True, exist_ok=True)
        sf.write(exp / "0_gt_wavs" / f"{stem}.wav", wav, rate, subtype="FLOAT")
        (exp / "1_16k_wavs").mkdir(exist_ok=True)
        sf.write(exp / "1_16k_wavs" / f"{stem}.wav", w16, 16000, subtype="FLOAT")
        frames = (len(w16) - 400) // 320 + 1
        (exp / f"3_feature{dim}").mkdir(exist_ok=True)
        feats = rng.standard_normal((frames, dim)).astype(np.float32)
        np.save(exp / f"3_feature{dim}" / f"{stem}.npy", feats)
        nf = len(w16) // 160 + 1
        t = np.arange(nf) / 100
        hz = 140 + 25 * np.sin(2 * np.pi * 1.5 * t)
        hz[: 5] = 0
        hz[-5:] = 0
        if f0:
            (exp / "2a_f0").mkdir(exist_ok=True)
            (exp / "2b-f0nsf").mkdir(exist_ok=True)
            np.save(exp / "2a_f0" / f"{stem}.wav.npy", coarse_f0(hz))
            np.save(exp / "2b-f0nsf" / f"{stem}.wav.npy", hz)
    if config:
        (exp / "config.json").write_text(json.dumps(tiny_config(version, sr).to_json()))
    return exp


def manifest(root: Path, name: str, *, version: str = "v2", sr: str = "40k", f0: bool = True,
             **train_opts: Any) -> dict[str, Any]:
    t = {"batchSize": 2, "epochs": 1, "saveEveryEpoch": 1, "maxStepsPerEpoch": 2, "dataWorkers": 0,
         "fromScratch": True, "learningRate": 1e-4}
    t.update(train_opts)
    return {
        "apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment", "metadata": {"name": name},
        "spec": {"dataset": {"source": str(root / "data")}, "storage": {"uri": str(root)},
                 "model": {"version": version, "sampleRate": sr, "pitchGuidance": f0},
                 "train": t, "resources": {"device": "cpu", "parallelism": 1}, "steps": ["train"]},
    }


def run_train(root: Path, name: str, hooks: TrainHooks = HOOKS, **kw: Any) -> dict[str, Any]:
    exp = parse_manifest(manifest(root, name, **kw))
    return run_step(exp, "train", train_step(hooks), force=True)


# --------------------------------------------------------------------------------------------- tests
def test_train_resume_and_truncated_fallback(tmp_path: Path, speech: list[np.ndarray],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    exp = make_experiment(tmp_path, "voice1", speech)
    s1 = run_train(tmp_path, "voice1")
    assert s1["start_epoch"] == 1 and s1["last_epoch"] == 1 and s1["global_step"] == 2
    assert s1["init"] == "scratch" and s1["nonfinite_steps"] == 0 and s1["items"] == 5
    assert s1["mute_features"] == "zeros"  # no HuBERT checkpoint in this test
    g2, d2 = exp / "G_2.pth", exp / "D_2.pth"
    for p in (g2, d2):
        obj = torch.load(p, weights_only=True)
        assert {"model", "iteration", "optimizer", "learning_rate"} <= set(obj)
        assert obj["iteration"] == 1 and obj["learning_rate"] == 1e-4 and obj["global_step"] == 2
    g_obj = torch.load(g2, weights_only=True)
    assert any(k.endswith(".weight_g") for k in g_obj["model"])
    assert any(k.startswith("enc_q.") for k in g_obj["model"])
    # exported small model, RVC's format
    m = torch.load(exp / "weights" / "voice1.pth", weights_only=True)
    assert list(m)[:6] == ["weight", "config", "info", "sr", "f0", "version"]
    assert m["info"] == "1epoch" and m["sr"] == "40k" and m["f0"] == 1 and m["version"] == "v2"
    assert not any("enc_q" in k for k in m["weight"]) and m["weight"]["emb_g.weight"].dtype == torch.float16
    assert m["config"][1] == 32 and m["config"][-1] == 40000
    # train.log: first line is the hparams dict as RVC's UI reads it
    first = (exp / "train.log").read_text().splitlines()[0]
    hp = ast.literal_eval(first.split("\t")[-1])
    assert hp["sample_rate"] == "40k" and hp["if_f0"] == 1 and hp["version"] == "v2"
    assert hp["train"]["batch_size"] == 2 and hp["data"]["training_files"].endswith("filelist.txt")
    # progress from the very first step, one epoch event
    ev = read_events(exp / "progress.jsonl", "train")
    steps = [e for e in ev if e["event"] == "train_step"]
    assert [e["global_step"] for e in steps] == [1, 2]
    assert all(np.isfinite(e["loss_mel"]) and e["loss_g"] > 0 and e["grad_norm_g"] > 0 for e in steps)
    epochs = [e for e in ev if e["event"] == "epoch"]
    assert len(epochs) == 1 and epochs[0]["steps"] == 2 and epochs[0]["avg_loss_mel"] > 0
    summary = json.loads((exp / "train_summary.json").read_text())
    assert summary["history"]["epoch"] == [1] and summary["history"]["ema_loss_mel"][0] == pytest.approx(
        summary["history"]["loss_mel"][0])
    lines = (exp / "filelist.txt").read_text().splitlines()
    assert len(lines) == 7 and sum("/mute/" in ln for ln in lines) == 2

    # resume to epoch 2: optimizer state restored, step and LR schedule continued
    saved_opt = g_obj["optimizer"]["state"]
    captured: dict[str, Any] = {}
    real_load = ck.load_checkpoint

    def spy(path: Path, model: torch.nn.Module, optimizer: Any = None, **kw: Any) -> dict[str, Any]:
        info = real_load(path, model, optimizer, **kw)
        if optimizer is not None and Path(path).name.startswith("G_"):
            captured["opt"] = copy.deepcopy(optimizer.state_dict()["state"])
        return info

    monkeypatch.setattr(ck, "load_checkpoint", spy)
    s2 = run_train(tmp_path, "voice1", epochs=2)
    assert s2["init"] == "resume" and s2["resumed_epoch"] == 1 and s2["start_epoch"] == 2
    assert s2["global_step"] == 4 and s2["optimizer_restored"] is True
    assert set(captured["opt"]) == set(saved_opt)
    for k, st in saved_opt.items():
        torch.testing.assert_close(captured["opt"][k]["exp_avg"], st["exp_avg"])
        torch.testing.assert_close(captured["opt"][k]["exp_avg_sq"], st["exp_avg_sq"])
        assert float(captured["opt"][k]["step"]) == float(st["step"]) == 2
    g4 = torch.load(exp / "G_4.pth", weights_only=True)
    assert g4["iteration"] == 2 and g4["global_step"] == 4
    assert g4["history"]["epoch"] == [1, 2]  # the loss history survives the resume
    steps2 = [e for e in read_events(exp / "progress.jsonl", "train") if e["event"] == "train_step"]
    assert [e["global_step"] for e in steps2] == [1, 2, 3, 4]
    assert steps2[-1]["epoch"] == 2 and steps2[-1]["lr"] == pytest.approx(1e-4 * 0.999875)
    assert (exp / "G_2.pth").exists()  # not latest-only: every save is kept, like RVC

    # a truncated newest checkpoint: fall back to the previous one (epoch 1) and redo epoch 2
    data = (exp / "G_4.pth").read_bytes()
    (exp / "G_4.pth").write_bytes(data[: len(data) // 3])
    s3 = run_train(tmp_path, "voice1", epochs=2)
    assert s3["resumed_from"].endswith("G_2.pth") and s3["start_epoch"] == 2 and s3["global_step"] == 4
    assert any(e["event"] == "checkpoint_corrupt" for e in read_events(exp / "progress.jsonl", "train"))
    assert torch.load(exp / "G_4.pth", weights_only=True)["iteration"] == 2  # rewritten whole


DRIVER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("ttrain", {test!r})
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
mod.install_hooks()
from rvc_pipeline.cli import main
sys.exit(main(["train", "--spec", {manifest!r}]))
"""


@pytest.mark.slow
def test_kill_mid_run_then_rerun_resumes(tmp_path: Path, speech: list[np.ndarray]) -> None:
    exp = make_experiment(tmp_path, "killed", speech)
    mpath = tmp_path / "m.yaml"
    mpath.write_text(yaml.safe_dump(manifest(tmp_path, "killed", epochs=200, maxStepsPerEpoch=1)))
    env = {**os.environ, "RVC_NO_PROGRESS": "1", "RVC_OFFLINE": "1", "RVC_WEIGHTS_DIR": str(tmp_path / "nw")}
    code = DRIVER.format(test=str(Path(__file__).resolve()), manifest=str(mpath))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (exp / "G_2.pth").exists():
            assert proc.poll() is None, "training ended before its second checkpoint"
            time.sleep(0.05)
        assert (exp / "G_2.pth").exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    newest = ck.latest_checkpoint(exp, "G_")
    done = torch.load(newest, weights_only=True)["iteration"]  # every complete file loads
    assert done >= 2
    assert not (exp / ".rvc" / "train.done.json").exists()
    mpath.write_text(yaml.safe_dump(manifest(tmp_path, "killed", epochs=done + 1, maxStepsPerEpoch=1)))
    rc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr[-3000:]
    summary = json.loads((exp / "train_summary.json").read_text())
    assert summary["init"] == "resume" and summary["start_epoch"] == done + 1
    assert summary["global_step"] == done + 1 and summary["last_epoch"] == done + 1
    assert (exp / "weights" / "killed.pth").exists() and (exp / ".rvc" / "train.done.json").exists()
    assert not list(exp.glob(".G_*.tmp"))
    assert not list(exp.glob("*.partial"))  # nor a temporary file of core.fileio


@pytest.mark.slow
def test_ddp_two_ranks_on_cpu(tmp_path: Path, speech: list[np.ndarray]) -> None:
    """Two processes as torchrun starts them (RANK/WORLD_SIZE/LOCAL_RANK set): gloo DDP, rank 0 saves."""
    from tests.s3server import free_port

    exp = make_experiment(tmp_path, "ddp", speech)
    mpath = tmp_path / "m.yaml"
    mpath.write_text(yaml.safe_dump(manifest(tmp_path, "ddp", epochs=1, maxStepsPerEpoch=2)))
    code = DRIVER.format(test=str(Path(__file__).resolve()), manifest=str(mpath))
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RVC_NO_PROGRESS": "1", "RVC_OFFLINE": "1",
               "RVC_WEIGHTS_DIR": str(tmp_path / "nw"), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    summary = json.loads((exp / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["batch_size"] == 2 and summary["global_step"] == 2
    g = torch.load(exp / "G_2.pth", weights_only=True)
    assert not any(k.startswith("module.") for k in g["model"]) and g["iteration"] == 1
    assert (exp / "weights" / "ddp.pth").exists()
    assert sum(1 for ln in (exp / "train.log").read_text().splitlines() if "'sample_rate'" in ln) == 1


def test_v1_features_with_v2_spec(tmp_path: Path, speech: list[np.ndarray]) -> None:
    make_experiment(tmp_path, "mix", speech[:2], version="v1")
    with pytest.raises(StepFailed, match=r"3_feature768.*3_feature256|3_feature256.*3_feature768"):
        run_train(tmp_path, "mix", version="v2")


def test_wrong_dims_sample_rate_and_missing_f0(tmp_path: Path, speech: list[np.ndarray]) -> None:
    exp = make_experiment(tmp_path, "bad", speech[:2])
    np.save(exp / "3_feature768" / "0_1.npy", np.zeros((50, 256), np.float32))
    with pytest.raises(StepFailed, match=r"0_1\.npy.*\(50, 256\).*768"):
        run_train(tmp_path, "bad")
    exp2 = make_experiment(tmp_path, "rate", speech[:2], wav_sr=32000)
    with pytest.raises(StepFailed, match=r"0_gt_wavs/0_0\.wav: sample rate 32000 Hz.*40k"):
        run_train(tmp_path, "rate")
    make_experiment(tmp_path, "nof0", speech[:2], f0=False)
    with pytest.raises(StepFailed, match=r"2a_f0: no pitch files.*pitchGuidance"):
        run_train(tmp_path, "nof0")
    assert exp2.exists()


def test_pretrained_loads_strictly_and_other_architecture_fails(tmp_path: Path,
                                                                speech: list[np.ndarray]) -> None:
    make_experiment(tmp_path, "pre", speech[:3])
    torch.manual_seed(3)
    g = build_generator(tiny_config(), "v2", True)
    d = TinyD()
    gp, dp = tmp_path / "f0G40k.pth", tmp_path / "f0D40k.pth"
    torch.save({"model": g.state_dict()}, gp)
    torch.save({"model": d.state_dict()}, dp)
    s = run_train(tmp_path, "pre", fromScratch=False, pretrainedG=str(gp), pretrainedD=str(dp),
                  learningRate=1e-9, maxStepsPerEpoch=1)
    assert s["init"] == "pretrained" and s["pretrained_g"] == str(gp)
    w = torch.load(tmp_path / "logs" / "pre" / "weights" / "pre.pth", weights_only=True)["weight"]
    ref = g.state_dict()
    for k in ("emb_g.weight", "dec.conv_post.weight", "enc_p.emb_phone.weight", "flow.flows.0.pre.weight"):
        torch.testing.assert_close(w[k].float(), ref[k].half().float(), atol=1e-3, rtol=1e-3)
    # a v1 generator as the pretrained file of a v2 experiment
    g1 = build_generator(tiny_config("v1"), "v1", True)
    g1p = tmp_path / "v1G.pth"
    torch.save({"model": g1.state_dict()}, g1p)
    make_experiment(tmp_path, "pre2", speech[:3])
    with pytest.raises(StepFailed, match=r"v1G\.pth.*v1.*spec says v2 40k generator with f0"):
        run_train(tmp_path, "pre2", fromScratch=False, pretrainedG=str(g1p), pretrainedD=str(dp))


def test_missing_pretrained_and_demo_random(tmp_path: Path, speech: list[np.ndarray]) -> None:
    make_experiment(tmp_path, "nopre", speech[:3])
    with pytest.raises(WeightsNotFound, match="pretrained generator.*f0G40k.pth"):
        run_train(tmp_path, "nopre", fromScratch=False)
    exp = parse_manifest({**manifest(tmp_path, "nopre", fromScratch=False, maxStepsPerEpoch=1)})
    exp.spec.demo_random_weights = True
    s = run_step(exp, "train", train_step(), force=True)
    assert s["random_weights"] is True and s["init"] == "scratch"
    m = torch.load(tmp_path / "logs" / "nopre" / "weights" / "nopre.pth", weights_only=True)
    assert m["info"].startswith("DEMO random init - not a real voice") and m["info"].endswith("1epoch")
    ev = read_events(tmp_path / "logs" / "nopre" / "progress.jsonl", "train")
    assert any(e["event"] == "warning" and "RANDOM" in e["message"] for e in ev)


def test_too_little_data(tmp_path: Path, speech: list[np.ndarray]) -> None:
    make_experiment(tmp_path, "small", speech[:1], f0=False)
    s = run_train(tmp_path, "small", f0=False, batchSize=8, maxStepsPerEpoch=1)
    assert s["batch_size"] == 3  # 1 clip + the 2 mute lines
    ev = read_events(tmp_path / "logs" / "small" / "progress.jsonl", "train")
    assert any(e["event"] == "warning" and "lowering the batch size to 3" in e["message"] for e in ev)
    make_experiment(tmp_path, "short", speech[:3], seconds=0.5)
    with pytest.raises(StepFailed, match=r"none of the 3 clips.*longer than 0.75 s"):
        run_train(tmp_path, "short")


def test_nan_steps_are_skipped_then_persistent_nan_fails(tmp_path: Path, speech: list[np.ndarray]) -> None:
    exp = make_experiment(tmp_path, "nan", speech[:4])

    def hook(step: int, which: str, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if which == "g" and step in (2, 3) else loss

    s = run_train(tmp_path, "nan", hooks=TrainHooks(TinyD, loss_hook=hook), maxStepsPerEpoch=4)
    assert s["nonfinite_steps"] == 2 and s["global_step"] == 4
    sd = torch.load(exp / "G_4.pth", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in sd.values())
    ev = read_events(exp / "progress.jsonl", "train")
    assert [e["global_step"] for e in ev if e["event"] == "nonfinite_step"] == [2, 3]
    # NaN from step 5 on (epoch 2): stop with a clear message, epoch 1's checkpoint stays the newest
    always_nan = TrainHooks(TinyD, lambda step, which, loss: loss * float("nan"), max_nonfinite_streak=3)
    with pytest.raises(StepFailed, match="3 consecutive steps with NaN.*learningRate.*fp32"):
        run_train(tmp_path, "nan", hooks=always_nan, epochs=2, maxStepsPerEpoch=4)
    assert ck.latest_checkpoint(exp).name == "G_4.pth"
    assert torch.load(exp / "G_4.pth", weights_only=True)["iteration"] == 1


def test_latest_only_and_save_every_weights(tmp_path: Path, speech: list[np.ndarray]) -> None:
    exp = make_experiment(tmp_path, "lat", speech[:3], f0=False)
    s = run_train(tmp_path, "lat", f0=False, epochs=2, maxStepsPerEpoch=1, saveLatestOnly=True,
                  saveEveryWeights=True)
    assert sorted(p.name for p in exp.glob("[GD]_*.pth")) == ["D_2333333.pth", "G_2333333.pth"]
    assert torch.load(exp / "G_2333333.pth", weights_only=True)["iteration"] == 2
    names = sorted(p.name for p in (exp / "weights").glob("*.pth"))
    assert names == ["lat.pth", "lat_e1_s1.pth", "lat_e2_s2.pth"]
    assert torch.load(exp / "weights" / "lat.pth", weights_only=True)["f0"] == 0
    assert s["checkpoints"][-1] == "weights/lat_e2_s2.pth"


def test_s3_storage_uploads_and_resumes_on_a_fresh_node(tmp_path: Path, speech: list[np.ndarray],
                                                        s3: Any) -> None:
    """Remote storage: every checkpoint is uploaded as it is written; a new pod (fresh scratch) resumes."""
    src = make_experiment(tmp_path / "src", "remote", speech[:3])
    cli = s3.client()
    for p in sorted(src.rglob("*")):
        if p.is_file():
            cli.upload_file(str(p), s3.bucket, f"store/{p.relative_to(tmp_path / 'src').as_posix()}")

    def run(**kw: Any) -> dict[str, Any]:
        m = manifest(tmp_path, "remote", **kw)
        m["spec"]["storage"] = {"uri": s3.uri("store"), "endpoint": s3.url}
        return run_step(parse_manifest(m), "train", train_step(), force=True)

    s1 = run(maxStepsPerEpoch=1)
    keys = {o["Key"] for o in cli.list_objects_v2(Bucket=s3.bucket, Prefix="store/logs/remote/")["Contents"]}
    pre = "store/logs/remote/"
    for k in ("G_1.pth", "D_1.pth", "weights/remote.pth", "progress.jsonl", "train.log", "train_summary.json",
              "filelist.txt", "config.json", ".rvc/train.done.json"):
        assert pre + k in keys, k
    assert s1["global_step"] == 1
    s2 = run(epochs=3, maxStepsPerEpoch=1)  # run_step gives it a new scratch folder: state comes from S3
    assert s2["init"] == "resume" and s2["start_epoch"] == 2 and s2["global_step"] == 3
    body = cli.get_object(Bucket=s3.bucket, Key=pre + "progress.jsonl")["Body"].read().decode()
    steps = [json.loads(ln)["global_step"] for ln in body.splitlines() if '"train_step"' in ln]
    assert steps == [1, 2, 3], body  # the first pod's events were kept
    log_lines = cli.get_object(Bucket=s3.bucket, Key=pre + "train.log")["Body"].read().decode().splitlines()
    assert ast.literal_eval(log_lines[0].split("\t")[-1])["version"] == "v2"
    assert sum("====> Epoch" in ln for ln in log_lines) == 3
    assert {pre + "G_2.pth", pre + "G_3.pth"} <= {o["Key"] for o in cli.list_objects_v2(
        Bucket=s3.bucket, Prefix=pre)["Contents"]}


def test_resume_from_other_experiment_bf16_and_workers(tmp_path: Path, speech: list[np.ndarray]) -> None:
    """spec.train.resumeFrom: G_ (and its D_ sibling) of another experiment; the epoch count continues.
    Also runs bf16 autocast on CPU and a DataLoader worker process."""
    make_experiment(tmp_path, "base", speech[:3])
    run_train(tmp_path, "base", maxStepsPerEpoch=1)
    make_experiment(tmp_path, "child", speech[:3])
    src = tmp_path / "logs" / "base" / "G_1.pth"
    s = run_train(tmp_path, "child", epochs=2, maxStepsPerEpoch=1, resumeFrom=str(src), precision="bf16",
                  dataWorkers=1)
    assert s["init"] == "resume_from" and s["resumed_epoch"] == 1 and s["start_epoch"] == 2
    assert s["global_step"] == 2 and s["precision"] == "bf16" and s["nonfinite_steps"] == 0
    assert torch.load(tmp_path / "logs" / "child" / "G_2.pth", weights_only=True)["iteration"] == 2
    make_experiment(tmp_path, "other", speech[:3])
    with pytest.raises(StepFailed, match="already at epoch 1; set spec.train.epochs above 1"):
        run_train(tmp_path, "other", epochs=1, resumeFrom=str(src))


@pytest.mark.slow
def test_full_size_v2_40k_one_step(tmp_path: Path, speech: list[np.ndarray]) -> None:
    """RVC's real architecture: 560 G / 165 D tensors in the checkpoints, export with the real checks."""
    exp = make_experiment(tmp_path, "full", speech[:2], config=False)
    s = run_train(tmp_path, "full", hooks=TrainHooks(), batchSize=1, maxStepsPerEpoch=1)
    assert s["global_step"] == 1
    assert len(torch.load(exp / "G_1.pth", weights_only=True)["model"]) == 560
    assert len(torch.load(exp / "D_1.pth", weights_only=True)["model"]) == 165
    m = torch.load(exp / "weights" / "full.pth", weights_only=True)
    assert len(m["weight"]) == 457 and m["info"] == "1epoch"
    assert json.loads((exp / "config.json").read_text())["data"]["hop_length"] == 400


# ------------------------------------------------------------------------------- checkpoint evaluation
def _eval_run(tmp_path: Path, speech: list[np.ndarray], epochs: int, **eval_opts: Any) -> dict[str, Any]:
    m = manifest(tmp_path, "ev", epochs=epochs)
    m["spec"]["eval"] = {"metrics": ["mel_l1", "mrstft", "f0"], "previews": 1, **eval_opts}
    m["spec"]["demoRandomWeights"] = True  # the previews' embedder: no HuBERT file offline
    return run_step(parse_manifest(m), "train", train_step(), force=True)


def test_training_evaluates_each_save_keeps_the_best_and_resumes_the_history(
        tmp_path: Path, speech: list[np.ndarray]) -> None:
    """A tiny CPU run with 15 pieces of one file: 2 held out (the tail) + 1 guard; evaluated at every save."""
    from rvc_pipeline.evaluation import history

    exp = make_experiment(tmp_path, "ev", speech * 3)
    summary = _eval_run(tmp_path, speech, epochs=2)
    held = json.loads((exp / ".rvc" / "heldout.json").read_text())
    assert held["mode"] == "pieces" and held["eval"] == ["0_13", "0_14"] and held["guard"] == ["0_12"]
    filelist = (exp / "filelist.txt").read_text()
    assert all(f"/{s}.wav" not in filelist for s in held["eval"] + held["guard"])
    recs = history.read_history(exp / "eval.jsonl")
    assert [r.epoch for r in recs] == [1, 2]
    assert {"mel_l1", "mrstft", "f0_rmse_cents", "voicing_error"} <= set(recs[0].metrics)
    assert all(r.score is None for r in recs)  # the default score needs speaker_sim/dnsmos: not asked for
    assert all(len(r.previews) == 1 and (exp / r.previews[0]).is_file() for r in recs)
    page = (exp / "report.html").read_text()
    assert page.count("<audio") == 2 and "mel_l1" in page
    assert "best" not in summary  # nothing scored: weights/<exp>.pth is the last epoch, as before
    # a score that only reads mel_l1: the best epoch is the lower mel_l1; resume keeps the history
    summary = _eval_run(tmp_path, speech, epochs=3, score={"mel_l1": -1.0})
    recs = history.latest_per_epoch(history.read_history(exp / "eval.jsonl"))
    assert [r.epoch for r in recs] == [1, 2, 3] and recs[-1].score == -recs[-1].metrics["mel_l1"]
    assert history.best(recs) == recs[-1] and summary["best"]["epoch"] == 3  # the only one scored
    from rvc_pipeline import safeload

    model = safeload.load(exp / "weights" / "ev.pth", what="model")
    assert model["epoch"] == 3 and "report.html" in str(list(exp.iterdir()))


def test_early_stop_after_patience_evaluations(tmp_path: Path, speech: list[np.ndarray]) -> None:
    make_experiment(tmp_path, "ev", speech * 3)
    summary = _eval_run(tmp_path, speech, epochs=5, score={"mel_l1": 0.0}, patience=1)
    assert summary["last_epoch"] == 2 and summary["best"]["epoch"] == 1  # equal scores: never better


def test_evaluation_on_s3_storage_from_a_fresh_scratch(tmp_path: Path, speech: list[np.ndarray],
                                                       s3: Any) -> None:
    """As in a pod: the experiment is in S3 only; the split, the preview sources (held-out 16 kHz pieces)
    and the evaluation's outputs travel through storage."""
    from rvc_pipeline.evaluation import history

    src = make_experiment(tmp_path / "src", "evs3", speech * 3)
    cli = s3.client()
    for p in sorted(src.rglob("*")):
        if p.is_file():
            cli.upload_file(str(p), s3.bucket, f"store/{p.relative_to(tmp_path / 'src').as_posix()}")
    m = manifest(tmp_path, "evs3", epochs=1)
    m["spec"]["storage"] = {"uri": s3.uri("store"), "endpoint": s3.url}
    m["spec"]["eval"] = {"metrics": ["mel_l1", "f0"], "previews": 2}
    m["spec"]["demoRandomWeights"] = True
    run_step(parse_manifest(m), "train", train_step(), force=True)
    pre = "store/logs/evs3/"
    keys = {o["Key"] for o in cli.list_objects_v2(Bucket=s3.bucket, Prefix=pre)["Contents"]}
    assert {pre + k for k in ("eval.jsonl", "report.html", ".rvc/heldout.json", "previews/e00001_00.wav",
                              "previews/e00001_01.wav")} <= keys
    local = tmp_path / "eval.jsonl"
    local.write_bytes(cli.get_object(Bucket=s3.bucket, Key=pre + "eval.jsonl")["Body"].read())
    (rec,) = history.read_history(local)
    assert rec.epoch == 1 and not rec.skipped and "mel_l1" in rec.metrics and len(rec.previews) == 2
