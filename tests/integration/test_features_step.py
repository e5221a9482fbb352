"""The features step on real speech (espeak-ng, resampled to 16 kHz by ffmpeg) with a small random
HuBERT saved in the fairseq checkpoint format."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from rvc_pipeline.components.embedders.base import load_embedder
from rvc_pipeline.core.errors import StepFailed, WeightsNotFound
from rvc_pipeline.core.spec import Experiment, parse_spec
from rvc_pipeline.demo import voices
from rvc_pipeline.progress import read_events
from rvc_pipeline.steps import features
from rvc_pipeline.steps.runner import run_step

from tests.s3server import S3Endpoint
from tests.support.fairseq_hubert import HubertConfig, HubertModel, save_fairseq_checkpoint

pytestmark = [
    pytest.mark.skipif(
        not (shutil.which("espeak-ng") and shutil.which("ffmpeg")), reason="needs espeak-ng and ffmpeg"
    ),
    pytest.mark.usefixtures("offline_weights"),
]

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Voice conversion needs clean recordings.",
    "Hello there.",
    "Features are extracted every twenty milliseconds from the sixteen kilohertz audio.",
]


def speak(text: str, dest: Path, rate: int = 16000, channels: int = 1, voice: str = "en") -> Path:
    return voices.speak(text, dest, sr=rate, channels=channels, voice=voice)


def small_cfg(**kw: Any) -> HubertConfig:
    # 768-d output and a 256-d final_proj as RVC expects, but narrow convs and 2 layers: fast on CPU
    base: dict[str, Any] = dict(
        conv_layers=[(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2,
        embed_dim=768,
        ffn_dim=256,
        heads=12,
        layers=2,
        conv_pos=16,
        conv_pos_groups=16,
        final_dim=256,
    )
    base.update(kw)
    return HubertConfig(**base)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(11)
    return save_fairseq_checkpoint(
        HubertModel(small_cfg()), tmp_path_factory.mktemp("w") / "hubert_small.pt", fp16=True
    )


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("speech")
    out = {f"0_{i}.wav": speak(t, d / f"0_{i}.wav") for i, t in enumerate(SENTENCES[:3])}
    out["1_0.wav"] = speak(SENTENCES[3], d / "1_0.wav", channels=2)
    return out


def experiment(root: Path, **spec: Any) -> Experiment:
    data: dict[str, Any] = {
        "dataset": {"source": str(root / "data")},
        "storage": {"uri": str(root / "store")},
        "resources": {"device": "cpu", "parallelism": 2},
    }
    for k, v in spec.items():
        if isinstance(v, dict):
            data.setdefault(k, {}).update(v)
        else:
            data[k] = v
    return Experiment(metadata={"name": "exp"}, spec=parse_spec(data))


def put_wavs(exp: Experiment, root: Path, files: dict[str, Path]) -> Path:
    d = root / "store" / "logs" / exp.name / "1_16k_wavs"
    d.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        shutil.copy(src, d / name)
    return d


def test_v2_features_match_the_model_and_resume(tmp_path: Path, ckpt: Path, speech: dict[str, Path]) -> None:
    exp = experiment(tmp_path, features={"embedder": str(ckpt), "batchSeconds": 4.0})
    in_dir = put_wavs(exp, tmp_path, speech)
    summary = run_step(exp, "features", features.run)
    out_dir = in_dir.parent / "3_feature768"
    assert sorted(p.name for p in out_dir.iterdir()) == ["0_0.npy", "0_1.npy", "0_2.npy", "1_0.npy"]
    assert summary["files_written"] == 4 and summary["files_skipped"] == 0
    assert summary["random_weights"] is False and summary["device"] == "cpu" and summary["dim"] == 768
    assert summary["threads"] == 2 and summary["dtype"] == "float32"

    ref = load_embedder(ckpt, "cpu", False)
    total = 0.0
    for name in speech:
        audio, sr = sf.read(in_dir / name, dtype="float32", always_2d=True)
        assert sr == 16000
        mono = audio.mean(axis=1)
        total += len(mono) / sr
        feats = np.load(out_dir / name.replace("wav", "npy"))
        assert feats.dtype == np.float32 and feats.shape == ((len(mono) - 400) // 320 + 1, 768)
        assert feats.shape[0] > 40  # real sentences, about a second or more
        np.testing.assert_allclose(feats, ref.extract(mono, "v2")[0], atol=1e-4)
    assert audio.shape[1] == 2  # the last file was stereo and got averaged
    assert summary["audio_seconds"] == pytest.approx(total, abs=1e-3)
    stored = json.loads((in_dir.parent / "features.json").read_text())
    assert stored["random_weights"] is False and stored["files_total"] == 4
    prog = [e for e in read_events(in_dir.parent / "progress.jsonl", "features") if e["event"] == "progress"]
    assert prog[-1]["files_done"] == prog[-1]["files_total"] == 4
    assert prog[-1]["audio_seconds"] == pytest.approx(total, abs=1e-2)
    assert len(prog) >= 3  # batches of at most ~4 s: several progress events

    # resume: only the missing output is computed again; the others are not touched
    keep = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir() if p.name != "0_1.npy"}
    before = np.load(out_dir / "0_1.npy")
    (out_dir / "0_1.npy").unlink()
    (in_dir.parent / ".rvc" / "features.done.json").unlink()  # as after an interrupted run: no marker
    again = run_step(exp, "features", features.run)
    assert again["files_written"] == 1 and again["files_skipped"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir() if p.name != "0_1.npy"} == keep
    np.testing.assert_allclose(np.load(out_dir / "0_1.npy"), before, atol=1e-5)
    # finished step: the marker makes a rerun a no-op
    assert run_step(exp, "features", features.run).get("skipped") is True


def test_v1_names_and_dims(tmp_path: Path, ckpt: Path, speech: dict[str, Path]) -> None:
    exp = experiment(tmp_path, model={"version": "v1"}, features={"embedder": str(ckpt)})
    in_dir = put_wavs(exp, tmp_path, {"wavy_0.wav": speech["0_2.wav"]})
    summary = run_step(exp, "features", features.run)
    out = in_dir.parent / "3_feature256" / "npyy_0.npy"  # every "wav" becomes "npy", as RVC names it
    n = sf.info(str(in_dir / "wavy_0.wav")).frames
    assert np.load(out).shape == ((n - 400) // 320 + 1, 256)
    assert summary["feature_dir"] == "3_feature256" and summary["dim"] == 256


def test_missing_embedder_says_where_to_put_it(tmp_path: Path, speech: dict[str, Path]) -> None:
    exp = experiment(tmp_path)
    in_dir = put_wavs(exp, tmp_path, {"0_0.wav": speech["0_0.wav"]})
    with pytest.raises(WeightsNotFound, match=r"hubert_base\.pt") as e:
        run_step(exp, "features", features.run)
    assert str(tmp_path / "weights-cache") in str(e.value)
    assert not (in_dir.parent / "3_feature768").exists() or not any(
        (in_dir.parent / "3_feature768").iterdir()
    )


def test_demo_random_weights_fallback(
    tmp_path: Path, speech: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    exp = experiment(tmp_path, demo_random_weights=True)
    in_dir = put_wavs(exp, tmp_path, {"0_2.wav": speech["0_2.wav"]})
    with caplog.at_level(logging.WARNING, logger="rvc_pipeline"):
        summary = run_step(exp, "features", features.run)
    assert summary["random_weights"] is True
    assert json.loads((in_dir.parent / "features.json").read_text())["random_weights"] is True
    assert any(
        "RANDOMLY INITIALISED" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records
    )
    n = sf.info(str(in_dir / "0_2.wav")).frames
    feats = np.load(in_dir.parent / "3_feature768" / "0_2.npy")
    assert feats.shape == ((n - 400) // 320 + 1, 768) and np.isfinite(feats).all()


def test_wrong_sample_rate_fails_naming_the_file(tmp_path: Path, ckpt: Path, speech: dict[str, Path]) -> None:
    exp = experiment(tmp_path, features={"embedder": str(ckpt)})
    in_dir = put_wavs(exp, tmp_path, {"0_0.wav": speech["0_0.wav"]})
    speak("Wrong rate.", in_dir / "3_7.wav", rate=44100)
    with pytest.raises(StepFailed, match=r"3_7\.wav \(44100 Hz\)"):
        run_step(exp, "features", features.run)


def test_nan_features_are_not_saved_and_fail(tmp_path: Path, speech: dict[str, Path]) -> None:
    torch.manual_seed(2)
    m = HubertModel(small_cfg())
    with torch.no_grad():
        m.post_extract_proj.bias[3] = float("nan")
    path = save_fairseq_checkpoint(m, tmp_path / "nan.pt")
    exp = experiment(tmp_path, features={"embedder": str(path)})
    in_dir = put_wavs(exp, tmp_path, {"0_0.wav": speech["0_0.wav"], "0_1.wav": speech["0_1.wav"]})
    with pytest.raises(StepFailed, match=r"NaN .* 2 file\(s\): 0_\d\.wav, 0_\d\.wav"):
        run_step(exp, "features", features.run)
    assert list((in_dir.parent / "3_feature768").iterdir()) == []


def test_embedder_of_the_wrong_size_fails(tmp_path: Path, speech: dict[str, Path]) -> None:
    path = save_fairseq_checkpoint(HubertModel(small_cfg(embed_dim=96)), tmp_path / "h96.pt")
    exp = experiment(tmp_path, features={"embedder": str(path)})
    put_wavs(exp, tmp_path, {"0_0.wav": speech["0_0.wav"]})
    with pytest.raises(StepFailed, match="96-d v2 features; an RVC v2 model needs 768-d"):
        run_step(exp, "features", features.run)


def test_no_input_fails(tmp_path: Path, ckpt: Path) -> None:
    exp = experiment(tmp_path, features={"embedder": str(ckpt)})
    with pytest.raises(StepFailed, match="no .wav files"):
        run_step(exp, "features", features.run)


def test_s3_storage_and_resume_from_pushed_outputs(
    s3: S3Endpoint, ckpt: Path, speech: dict[str, Path]
) -> None:
    c = s3.client()
    c.upload_file(str(ckpt), s3.bucket, "weights/hubert_small.pt")
    for name, src in speech.items():
        c.upload_file(str(src), s3.bucket, f"runs/logs/exp/1_16k_wavs/{name}")
    data = {
        "dataset": {"source": s3.uri("voices")},
        "storage": {"uri": s3.uri("runs"), "endpoint": s3.url},
        "resources": {"device": "cpu", "parallelism": 1},
        "features": {"embedder": s3.uri("weights/hubert_small.pt")},
    }
    exp = Experiment(metadata={"name": "exp"}, spec=parse_spec(data))

    def outputs() -> set[str]:
        pages = c.get_paginator("list_objects_v2").paginate(
            Bucket=s3.bucket, Prefix="runs/logs/exp/3_feature768/"
        )
        return {o["Key"].rsplit("/", 1)[1] for p in pages for o in p.get("Contents", [])}

    first = run_step(exp, "features", features.run)
    assert first["files_written"] == 4 and first["threads"] == 1
    assert outputs() == {"0_0.npy", "0_1.npy", "0_2.npy", "1_0.npy"}
    stored = json.loads(c.get_object(Bucket=s3.bucket, Key="runs/logs/exp/features.json")["Body"].read())
    assert stored["files_total"] == 4
    # a later pod (fresh scratch) pulls what was already pushed and computes only the missing file
    c.delete_object(Bucket=s3.bucket, Key="runs/logs/exp/3_feature768/0_2.npy")
    c.delete_object(Bucket=s3.bucket, Key="runs/logs/exp/.rvc/features.done.json")  # pod died: no marker
    again = run_step(exp, "features", features.run)
    assert again["files_written"] == 1 and again["files_skipped"] == 3
    assert outputs() == {"0_0.npy", "0_1.npy", "0_2.npy", "1_0.npy"}


def test_keep_freed_memory_sets_glibc_malloc() -> None:
    """The malloc setting of the features and training steps is accepted by glibc's mallopt (which answers
    0 to a bad value)."""
    import platform

    from rvc_pipeline.core import heap

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert heap.MMAP_THRESHOLD == 32 << 20
    assert heap.keep_freed_memory() is True


def test_cpu_bf16_features_stay_close_to_fp32(tmp_path: Path, ckpt: Path, speech: dict[str, Path]) -> None:
    """spec.features.cpuBf16 on a CPU with native bf16: HuBERT runs in bf16 and the saved features stay within
    cosine 0.999 of fp32 per frame; without native bf16 it falls back to fp32 (the same features)."""
    from rvc_pipeline.core.fileio import cpu_bf16_supported

    exp = experiment(tmp_path, features={"embedder": str(ckpt), "cpuBf16": True})
    in_dir = put_wavs(exp, tmp_path, speech)
    summary = run_step(exp, "features", features.run)
    native = cpu_bf16_supported()
    assert summary["dtype"] == ("bfloat16" if native else "float32")
    ref = load_embedder(ckpt, "cpu", False)
    for name in speech:
        mono = sf.read(in_dir / name, dtype="float32", always_2d=True)[0].mean(axis=1)
        got, want = np.load(in_dir.parent / "3_feature768" / name.replace("wav", "npy")), ref.extract(mono)[0]
        assert got.dtype == np.float32 and got.shape == want.shape and np.isfinite(got).all()
        cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
        assert cos.min() > 0.999, (name, float(cos.min()))
        if not native:
            np.testing.assert_allclose(got, want, atol=1e-4)
    params = json.loads((in_dir.parent / features.PARAMS_FILE).read_text())
    assert params["cpu_bf16"] is True  # other provenance than fp32 outputs: switching back recomputes them


def test_half_on_cpu_without_native_bf16_is_fp32(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU without AVX512-BF16/AMX (simulated: this machine's answer replaced) keeps fp32, where bf16 would
    be emulated and slower."""
    from rvc_pipeline.core import fileio

    monkeypatch.setattr(fileio, "cpu_bf16_supported", lambda: False)
    assert load_embedder(ckpt, "cpu", True).dtype == torch.float32
