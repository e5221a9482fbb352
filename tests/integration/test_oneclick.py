"""One-click training: every step from one manifest through the local runner, with the dataset and the
artifacts on a real S3 API server (moto), then voice conversion with the result.

No HuBERT or pretrained weights exist here, so the manifest sets demoRandomWeights (as the README's
demo does); the test checks that this is recorded in the exported model.
"""

from __future__ import annotations

import io
from pathlib import Path

import faiss
import numpy as np
import pytest
import soundfile as sf
import torch
from rvc_pipeline.core.spec import DEFAULT_STEPS, parse_manifest
from rvc_pipeline.export import RVC_KEYS, load_small_model
from rvc_pipeline.infer import convert_file
from rvc_pipeline.steps.runner import run_steps

from tests.s3server import S3Endpoint

pytestmark = pytest.mark.slow


def test_one_click_on_s3_then_convert(s3: S3Endpoint, voice_dir: Path, tmp_path: Path,
                                      offline_weights: Path) -> None:
    c = s3.client()
    wavs = sorted(voice_dir.glob("*.wav"))[:3]
    for w in wavs:
        c.upload_file(str(w), s3.bucket, f"voices/{w.name}")
    c.put_object(Bucket=s3.bucket, Key="voices/old/ignored.wav", Body=wavs[0].read_bytes())  # not recursive
    exp = parse_manifest({
        "apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment", "metadata": {"name": "oneclick"},
        "spec": {
            "dataset": {"source": s3.uri("voices/")},
            "storage": {"uri": s3.uri("runs"), "endpoint": s3.url},
            "model": {"version": "v2", "sampleRate": "40k"},
            "train": {"epochs": 1, "batchSize": 2, "maxStepsPerEpoch": 1, "dataWorkers": 0},
            "resources": {"device": "cpu"},
            "demoRandomWeights": True,
        },
    })
    summaries = run_steps(exp)
    assert [s["step"] for s in summaries] == list(DEFAULT_STEPS)
    assert not any(s.get("skipped") for s in summaries)

    keys = [o["Key"] for p in c.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix="runs/")
            for o in p.get("Contents", [])]
    base = "runs/logs/oneclick/"

    def count(folder: str) -> int:
        return sum(k.startswith(base + folder + "/") for k in keys)

    pieces = summaries[0]["pieces"]
    assert pieces > 0 and summaries[0]["files_used"] == len(wavs)  # the sub-folder was not read
    assert count("0_gt_wavs") == count("1_16k_wavs") == count("2a_f0") == count("2b-f0nsf") == pieces
    assert count("3_feature768") == pieces
    assert {f"{base}.rvc/{s}.done.json" for s in DEFAULT_STEPS} <= set(keys)
    assert any(k.startswith(base + "G_") for k in keys) and any(k.startswith(base + "D_") for k in keys)
    index_keys = [k for k in keys if k.startswith(base + "added_IVF") and k.endswith("_oneclick_v2.index")]
    assert len(index_keys) == 1

    model = tmp_path / "oneclick.pth"
    c.download_file(s3.bucket, base + "weights/oneclick.pth", str(model))
    raw = torch.load(model, map_location="cpu", weights_only=False)
    assert set(RVC_KEYS) <= set(raw) and raw["sr"] == "40k" and raw["f0"] == 1 and raw["version"] == "v2"
    assert "DEMO" in raw["info"]  # random weights are said out loud in the model itself
    assert all(v.dtype == torch.float16 for v in raw["weight"].values())
    assert not any("enc_q" in k for k in raw["weight"])
    net_g, meta = load_small_model(model)
    assert meta["version"] == "v2"

    index = tmp_path / Path(index_keys[0]).name
    c.download_file(s3.bucket, index_keys[0], str(index))
    ix = faiss.read_index(str(index))
    feats = [np.load(io.BytesIO(c.get_object(Bucket=s3.bucket, Key=k)["Body"].read()))
             for k in keys if k.startswith(base + "3_feature768/")]
    assert ix.ntotal == sum(len(f) for f in feats) and ix.d == 768

    # a rerun skips every completed step
    again = run_steps(exp)
    assert all(s.get("skipped") for s in again)

    out = tmp_path / "converted.wav"
    info = convert_file(model=model, input_path=wavs[0], output=out, index=index, spec=exp.spec,
                        demo_random_weights=True, f0_method="pm", pitch=2)
    y, sr = sf.read(out, dtype="int16")
    assert sr == 40000 and y.dtype == np.int16
    seconds_in = sf.info(wavs[0]).duration
    assert abs(len(y) / sr - seconds_in) < 0.05, (len(y) / sr, seconds_in)
    assert info["sr"] == 40000
