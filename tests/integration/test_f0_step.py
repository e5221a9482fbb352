"""The f0 step through the I/O shell: RVC's file names and dtypes, parallel workers, resume, settings
changes, failures that name their cause, rmvpe weights, and S3 storage (moto server)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from rvc_pipeline.core.errors import StepFailed, WeightsNotFound
from rvc_pipeline.core.spec import Experiment, SpecError, parse_manifest
from rvc_pipeline.demo import voices
from rvc_pipeline.progress import read_events
from rvc_pipeline.steps import f0 as f0step
from rvc_pipeline.steps.runner import run_step

pytestmark = [
    pytest.mark.skipif(
        not (shutil.which("espeak-ng") and shutil.which("ffmpeg")), reason="needs espeak-ng and ffmpeg"
    ),
    pytest.mark.usefixtures("offline_weights"),
]

SR = 16000
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Pitch is measured every ten milliseconds.",
    "Hello there, how are you today?",
]


def speak(text: str, dest: Path, voice: str = "en") -> Path:
    return voices.speak(text, dest, voice=voice)


def tone(hz: float, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    x = sum(np.sin(2 * np.pi * k * hz * t) / k for k in range(1, 6))
    return (0.4 * x / np.abs(x).max()).astype(np.float32)


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A hand-made 1_16k_wavs: three spoken sentences and a 200 Hz tone, float32 16 kHz WAVs."""
    d = tmp_path_factory.mktemp("slices")
    out = {f"0_{i}.wav": speak(t, d / f"0_{i}.wav", voice=v)
           for i, (t, v) in enumerate(zip(SENTENCES, ["en", "en+f3", "en-us"]))}
    sf.write(d / "1_0.wav", tone(200.0, 2.3), SR, subtype="FLOAT")
    out["1_0.wav"] = d / "1_0.wav"
    return out


def experiment(root: Path, uri: str | None = None, **spec: Any) -> Experiment:
    data: dict[str, Any] = {
        "dataset": {"source": str(root / "data")},
        "storage": {"uri": uri or str(root / "store")},
        "resources": {"device": "cpu", "parallelism": 2},
    }
    for k, v in spec.items():
        if isinstance(v, dict):
            data.setdefault(k, {}).update(v)
        else:
            data[k] = v
    return parse_manifest({"metadata": {"name": "x"}, "spec": data})


def put(exp_dir: Path, files: dict[str, Path]) -> Path:
    d = exp_dir / "1_16k_wavs"
    d.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        shutil.copy(src, d / name)
    return d


def test_pm_step_writes_rvc_files(tmp_path: Path, slices: dict[str, Path]) -> None:
    exp = experiment(tmp_path)
    exp_dir = tmp_path / "store" / "logs" / "x"
    in_dir = put(exp_dir, slices)
    (in_dir / "0_0.spec.wav").write_bytes((in_dir / "0_0.wav").read_bytes())  # RVC skips "spec" names
    summary = run_step(exp, "f0", f0step.run)

    names = sorted(slices)
    for sub in ("2a_f0", "2b-f0nsf"):
        assert sorted(p.name for p in (exp_dir / sub).iterdir()) == [n + ".npy" for n in names]
    total_frames = voiced = 0
    for n in names:
        x, sr = sf.read(in_dir / n, dtype="float32")
        nsf = np.load(exp_dir / "2b-f0nsf" / f"{n}.npy")
        crs = np.load(exp_dir / "2a_f0" / f"{n}.npy")
        assert nsf.dtype == np.float64 and crs.dtype == np.int64
        assert nsf.shape == crs.shape == (len(x) // 160,)
        np.testing.assert_array_equal(nsf, f0step.compute_f0(x, "pm"))  # same as the pure function
        np.testing.assert_array_equal(crs, f0step.coarse_f0(nsf))
        assert crs.min() >= 1 and crs.max() <= 255 and (crs[nsf == 0] == 1).all()
        total_frames += len(nsf)
        voiced += int((nsf > 0).sum())
    tone_f0 = np.load(exp_dir / "2b-f0nsf" / "1_0.wav.npy")
    assert np.abs(tone_f0[10:-10] - 200).max() < 0.5
    assert summary["files"] == 4 and summary["computed"] == 4 and summary["resumed"] == 0
    assert summary["method"] == "pm" and summary["frames"] == total_frames
    assert summary["voiced_ratio"] == pytest.approx(voiced / total_frames, abs=1e-4)
    assert 0.3 < summary["voiced_ratio"] < 0.98
    assert summary["processes"] == 1 and summary["device"] == "cpu"  # ~11 s of audio: pm needs no pool
    assert summary["audio_seconds"] == pytest.approx(total_frames / 100, abs=0.05)
    prog = [e for e in read_events(exp_dir / "progress.jsonl", "f0") if e["event"] == "progress"]
    assert prog[0]["files_done"] == 0 and prog[-1]["files_done"] == prog[-1]["files_total"] == 4
    assert (exp_dir / ".rvc" / "f0.done.json").is_file()
    assert not list(exp_dir.rglob("*.partial"))


def test_resume_and_settings_change(tmp_path: Path, slices: dict[str, Path]) -> None:
    exp = experiment(tmp_path, f0={"method": "dio"})
    exp_dir = tmp_path / "store" / "logs" / "x"
    put(exp_dir, slices)
    run_step(exp, "f0", f0step.run)
    nsf_dir = exp_dir / "2b-f0nsf"
    before = np.load(nsf_dir / "0_1.wav.npy")
    # an interrupted run: one file has no outputs, one has only Hz, one left a temporary file
    (nsf_dir / "0_1.wav.npy").unlink()
    (exp_dir / "2a_f0" / "0_1.wav.npy").unlink()
    (exp_dir / "2a_f0" / "0_2.wav.npy").unlink()
    (nsf_dir / "1_0.wav.npy.partial").write_bytes(b"torn")
    (exp_dir / ".rvc" / "f0.done.json").unlink()  # interrupted: no completion marker
    keep = {n: (nsf_dir / n).stat().st_mtime_ns for n in ("0_0.wav.npy", "1_0.wav.npy")}
    again = run_step(exp, "f0", f0step.run)
    assert again["computed"] == 2 and again["resumed"] == 2 and again["files"] == 4
    assert {n: (nsf_dir / n).stat().st_mtime_ns for n in keep} == keep  # untouched
    np.testing.assert_array_equal(np.load(nsf_dir / "0_1.wav.npy"), before)
    assert not list(exp_dir.rglob("*.partial"))
    # the completed step is skipped through its marker
    assert run_step(exp, "f0", f0step.run).get("skipped") is True
    # another method after an interrupted run: every file is recomputed, nothing of the dio run is reused
    # (the step's own check; the shell's marker does not look at the spec)
    (exp_dir / ".rvc" / "f0.done.json").unlink()
    exp2 = experiment(tmp_path, f0={"method": "harvest"})
    s2 = run_step(exp2, "f0", f0step.run)
    assert s2["computed"] == 4 and s2["resumed"] == 0 and s2["method"] == "harvest"
    assert s2["processes"] == 2  # harvest is slow: two forked workers
    x, _ = sf.read(exp_dir / "1_16k_wavs" / "0_1.wav", dtype="float32")
    np.testing.assert_array_equal(np.load(nsf_dir / "0_1.wav.npy"), f0step.compute_f0(x, "harvest"))


def test_no_pitch_model_skips(tmp_path: Path, slices: dict[str, Path]) -> None:
    exp = experiment(tmp_path, model={"pitchGuidance": False})
    exp_dir = tmp_path / "store" / "logs" / "x"
    put(exp_dir, {"0_0.wav": slices["0_0.wav"]})
    summary = run_step(exp, "f0", f0step.run)
    assert summary["skipped_reason"] == "model without pitch"
    assert not (exp_dir / "2a_f0").exists() and not (exp_dir / "2b-f0nsf").exists()


def test_no_inputs_fails(tmp_path: Path) -> None:
    exp = experiment(tmp_path)
    (tmp_path / "store" / "logs" / "x" / "1_16k_wavs").mkdir(parents=True)
    with pytest.raises(StepFailed, match="no input files in 1_16k_wavs/"):
        run_step(exp, "f0", f0step.run)
    assert not (tmp_path / "store" / "logs" / "x" / ".rvc" / "f0.done.json").exists()


def test_unreadable_file_fails_naming_it(tmp_path: Path, slices: dict[str, Path]) -> None:
    exp = experiment(tmp_path, resources={"parallelism": 1})
    exp_dir = tmp_path / "store" / "logs" / "x"
    in_dir = put(exp_dir, {"0_0.wav": slices["0_0.wav"]})
    (in_dir / "0_9.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    with pytest.raises(StepFailed, match=r"0_9\.wav: cannot load"):
        run_step(exp, "f0", f0step.run)


def test_unknown_method_is_rejected_by_the_spec(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"spec\.f0\.method.*'yin'.*'pm'.*'harvest'.*'dio'.*'crepe'.*'rmvpe'"):
        experiment(tmp_path, f0={"method": "yin"})


def test_rmvpe_without_weights_says_where_to_put_them(tmp_path: Path, slices: dict[str, Path]) -> None:
    exp = experiment(tmp_path, f0={"method": "rmvpe"})
    exp_dir = tmp_path / "store" / "logs" / "x"
    put(exp_dir, {"0_0.wav": slices["0_0.wav"]})
    with pytest.raises(WeightsNotFound, match=r"RMVPE checkpoint: cannot find 'rmvpe\.pt'") as e:
        run_step(exp, "f0", f0step.run)
    assert f"Put the file in {tmp_path / 'weights-cache'}/" in str(e.value)
    assert not (exp_dir / "2b-f0nsf").exists()


def test_rmvpe_and_crepe_steps(tmp_path: Path, slices: dict[str, Path]) -> None:
    from tests.support.rmvpe_files import save_random_checkpoint

    short = tmp_path / "short.wav"
    sf.write(short, tone(180.0, 0.3), SR, subtype="FLOAT")  # CPU RMVPE and CREPE are slow: keep it short
    save_random_checkpoint(tmp_path / "weights-cache" / "rmvpe.pt", seed=1)
    exp = experiment(tmp_path, f0={"method": "rmvpe"}, resources={"parallelism": 1})
    exp_dir = tmp_path / "store" / "logs" / "x"
    put(exp_dir, {"0_0.wav": short})
    s = run_step(exp, "f0", f0step.run)
    assert s["method"] == "rmvpe" and s["computed"] == 1 and s["frames"] == 30
    nsf = np.load(exp_dir / "2b-f0nsf" / "0_0.wav.npy")
    assert nsf.shape == (30,) and nsf.dtype == np.float64
    np.testing.assert_array_equal(np.load(exp_dir / "2a_f0" / "0_0.wav.npy"), f0step.coarse_f0(nsf))
    # crepe on a (requested but absent) GPU: falls back to the CPU
    exp = experiment(tmp_path, f0={"method": "crepe", "crepeModel": "tiny"}, resources={"device": "gpu"})
    s = run_step(exp, "f0", f0step.run, force=True)
    assert s["method"] == "crepe" and s["computed"] == 1 and s["resumed"] == 0
    assert s["device"] == "cpu" and s["processes"] == 1
    nsf = np.load(exp_dir / "2b-f0nsf" / "0_0.wav.npy")
    assert nsf.shape == (30,) and np.abs(nsf[5:-5] / 180 - 1).max() < 0.02


@pytest.mark.slow
def test_crepe_in_spawned_workers(tmp_path: Path) -> None:
    # torch methods get one process per 4 workers (parallelism 8 -> at most 2), and about one process per
    # estimated second of work: 3.6 s of audio at crepe's ~1x real time -> 2 processes
    exp = experiment(tmp_path, f0={"method": "crepe", "crepeModel": "tiny"}, resources={"parallelism": 8})
    exp_dir = tmp_path / "store" / "logs" / "x"
    in_dir = exp_dir / "1_16k_wavs"
    in_dir.mkdir(parents=True)
    for i, hz in enumerate([130.0, 260.0, 390.0]):
        sf.write(in_dir / f"0_{i}.wav", tone(hz, 1.2), SR, subtype="FLOAT")
    s = run_step(exp, "f0", f0step.run)
    assert s["computed"] == 3 and s["processes"] == 2  # torch workers are spawned, one model each
    for i, hz in enumerate([130.0, 260.0, 390.0]):
        nsf = np.load(exp_dir / "2b-f0nsf" / f"0_{i}.wav.npy")
        assert nsf.shape == (120,) and np.abs(nsf[5:-5] / hz - 1).max() < 0.02


def test_fcpe_step_on_speech(tmp_path: Path, slices: dict[str, Path]) -> None:
    """spec.f0.method fcpe end to end: RVC's files, the pure function's numbers, the weights recorded,
    a resumed run, and a switch from pm that recomputes everything."""
    exp_dir = tmp_path / "store" / "logs" / "x"
    in_dir = put(exp_dir, {n: slices[n] for n in ("0_0.wav", "0_1.wav", "1_0.wav")})
    assert run_step(experiment(tmp_path), "f0", f0step.run)["method"] == "pm"
    (exp_dir / ".rvc" / "f0.done.json").unlink()
    exp = experiment(tmp_path, f0={"method": "fcpe"}, resources={"device": "gpu", "parallelism": 1})
    s = run_step(exp, "f0", f0step.run)
    assert s["method"] == "fcpe" and s["computed"] == 3 and s["resumed"] == 0 and s["device"] == "cpu"
    assert s["fcpe_weights"].startswith("sha256:") and 0.4 < s["voiced_ratio"] < 1.0
    for n in ("0_0.wav", "0_1.wav", "1_0.wav"):
        x, _ = sf.read(in_dir / n, dtype="float32")
        nsf = np.load(exp_dir / "2b-f0nsf" / f"{n}.npy")
        assert nsf.dtype == np.float64 and nsf.shape == (len(x) // 160,)
        np.testing.assert_allclose(nsf, f0step.compute_f0(x, "fcpe"), rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(np.load(exp_dir / "2a_f0" / f"{n}.npy"), f0step.coarse_f0(nsf))
    tone_f0 = np.load(exp_dir / "2b-f0nsf" / "1_0.wav.npy")[10:-10]
    assert (tone_f0 > 0).all() and np.abs(1200 * np.log2(tone_f0 / 200.0)).max() < 10
    # interrupted: one file lost its outputs; the rerun computes only that one
    (exp_dir / "2b-f0nsf" / "0_1.wav.npy").unlink()
    (exp_dir / ".rvc" / "f0.done.json").unlink()
    again = run_step(exp, "f0", f0step.run)
    assert again["computed"] == 1 and again["resumed"] == 2 and again["fcpe_weights"] == s["fcpe_weights"]


def test_step_on_s3(tmp_path: Path, s3: Any, slices: dict[str, Path]) -> None:
    exp = experiment(tmp_path, uri=s3.uri("artifacts"), storage={"endpoint": s3.url, "region": "us-east-1"})
    client = s3.client()
    for name in ("0_0.wav", "1_0.wav"):
        client.upload_file(str(slices[name]), s3.bucket, f"artifacts/logs/x/1_16k_wavs/{name}")
    summary = run_step(exp, "f0", f0step.run)
    assert summary["computed"] == 2
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket)["Contents"]}
    for name in ("0_0.wav", "1_0.wav"):
        for sub in ("2a_f0", "2b-f0nsf"):
            assert f"artifacts/logs/x/{sub}/{name}.npy" in keys
    assert "artifacts/logs/x/.rvc/f0.done.json" in keys and "artifacts/logs/x/.rvc/f0.params.json" in keys
    body = client.get_object(Bucket=s3.bucket, Key="artifacts/logs/x/2b-f0nsf/1_0.wav.npy")["Body"].read()
    got = tmp_path / "got.npy"
    got.write_bytes(body)
    assert np.abs(np.load(got)[10:-10] - 200).max() < 0.5
    # an interrupted run resumed on a fresh machine (new scratch) reuses the outputs already in the bucket
    client.delete_object(Bucket=s3.bucket, Key="artifacts/logs/x/.rvc/f0.done.json")
    again = run_step(exp, "f0", f0step.run)
    assert again["computed"] == 0 and again["resumed"] == 2
