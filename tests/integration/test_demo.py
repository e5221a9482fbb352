"""The README's main job: `rvc-pipeline demo` runs one-click training on a generated voice set, on CPU,
and converts a sample; with no weights available it says loudly that they are random."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
import yaml

pytestmark = pytest.mark.slow


def test_demo_runs_every_step_and_converts(tmp_path: Path) -> None:
    env = dict(os.environ, RVC_WEIGHTS_DIR=str(tmp_path / "no-weights"), RVC_OFFLINE="1", RVC_NO_PROGRESS="1")
    exe = Path(sys.executable).with_name("rvc-pipeline")
    r = subprocess.run([str(exe), "demo", "--workdir", str(tmp_path), "--epochs", "1"], env=env,
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "RANDOM weights were used" in r.stdout and "RANDOMLY INITIALISED" in r.stderr
    exp = tmp_path / "logs" / "demo"
    for step in ("preprocess", "f0", "features", "train", "index"):
        assert (exp / ".rvc" / f"{step}.done.json").is_file(), step
    manifest = yaml.safe_load((tmp_path / "data" / "demo-experiment.yaml").read_text())
    assert manifest["kind"] == "RVCExperiment" and manifest["spec"]["demoRandomWeights"] is True
    model = torch.load(exp / "weights" / "demo.pth", map_location="cpu", weights_only=False)
    assert "DEMO" in model["info"] and model["version"] == "v2" and model["sr"] == "40k"
    assert len(list(exp.glob("added_IVF*_Flat_nprobe_1_demo_v2.index"))) == 1
    info = sf.info(exp / "demo-converted.wav")
    assert info.samplerate == 40000 and info.duration > 1.0
    n_voices = len(list((tmp_path / "data" / "demo-voice").glob("*.wav")))
    assert n_voices >= 3
    # checkpoint evaluation: held-out pieces, the history, previews, the report, the closing summary
    held = yaml.safe_load((exp / ".rvc" / "heldout.json").read_text())
    assert held["mode"] == "files" and held["eval"]
    lines = (exp / "eval.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"speaker_sim"' in lines[0] and '"dnsmos_ovrl"' in lines[0]
    assert len(list((exp / "previews").glob("e00001_*.wav"))) == 2
    page = (exp / "report.html").read_text()
    assert page.count("<audio") == 2 and "Best: epoch 1" in page
    assert "best     : epoch 1 of 1 evaluated" in r.stdout and "report.html" in r.stdout
