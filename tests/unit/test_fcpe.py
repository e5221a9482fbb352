"""FCPE with the real weights of the torchfcpe wheel: against torchfcpe itself, tones of known pitch, real
speech against the other methods, batching, frame counts, and files it must refuse."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from rvc_pipeline import safeload
from rvc_pipeline.components.pitch import fcpe
from rvc_pipeline.steps.f0 import compute_f0, compute_f0_batch

SR = 16000


def _have_weights() -> bool:
    try:
        return fcpe.asset_path().is_file()
    except fcpe.FCPEError:
        return False


pytestmark = pytest.mark.skipif(not _have_weights(), reason="no FCPE weights (pip install torchfcpe)")


def tone(hz: float, seconds: float, harmonics: int = 6) -> np.ndarray:
    """Harmonic tone (amplitudes 1/k) of known pitch, peak 0.5."""
    t = np.arange(int(seconds * SR)) / SR
    x = sum(np.sin(2 * np.pi * k * hz * t) / k for k in range(1, harmonics + 1))
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def cents(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray(1200.0 * np.log2(a / b))


@pytest.fixture(scope="module")
def model() -> fcpe.FCPE:
    return fcpe.get_fcpe()


@pytest.fixture(scope="module")
def speech(arctic_wav: Path) -> np.ndarray:
    x, sr = sf.read(str(arctic_wav), dtype="float32")
    assert sr == SR and x.ndim == 1
    return np.asarray(x)


@pytest.fixture(scope="module")
def speech_f0(speech: np.ndarray, model: fcpe.FCPE) -> np.ndarray:
    return compute_f0(speech, "fcpe", fcpe=model)


# -- the same numbers as torchfcpe ------------------------------------------------------------------


@pytest.fixture()
def torchfcpe_module() -> Iterator[Any]:
    """torchfcpe itself, imported with stand-ins for what the bundled conv-only model never runs:
    torchaudio (resampling), local_attention and einops (the attention variant)."""
    stand_ins = {"torchaudio": {}, "torchaudio.transforms": {"Resample": object},
                 "local_attention": {"LocalAttention": object}, "einops": {"rearrange": None, "repeat": None}}
    saved = {k: sys.modules.get(k) for k in stand_ins}
    for name, attrs in stand_ins.items():
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
    try:
        import torchfcpe
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"torchfcpe does not import even with stand-ins: {e}")
    yield torchfcpe
    for name, old in saved.items():
        if old is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = old
    for name in [m for m in sys.modules if m == "torchfcpe" or m.startswith("torchfcpe.")]:
        del sys.modules[name]


def test_matches_torchfcpe_on_real_speech(torchfcpe_module: Any, speech: np.ndarray,
                                          model: fcpe.FCPE) -> None:
    ref_model = torchfcpe_module.spawn_bundled_infer_model("cpu")
    wav = torch.from_numpy(speech)[None, :, None]
    ref = ref_model.infer(wav, sr=SR, decoder_mode="local_argmax", threshold=0.006)[0, :, 0].double().numpy()
    ours = model.f0([speech])[0]
    assert len(ours) == len(ref) == len(speech) // 160 + 1
    np.testing.assert_array_equal(ours > 0, ref > 0)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-3)  # measured: at most 8e-5 Hz apart
    mel_ref = ref_model.wav2mel(wav, SR)[0]
    torch.testing.assert_close(model.mel(torch.from_numpy(speech)[None])[0], mel_ref, rtol=1e-4, atol=1e-4)


# -- known pitch ------------------------------------------------------------------------------------


@pytest.mark.parametrize("hz", [80.0, 110.0, 220.0, 440.0, 880.0])
def test_tone_pitch(model: fcpe.FCPE, hz: float) -> None:
    x = tone(hz, 0.6)
    f0 = compute_f0(x, "fcpe", fcpe=model)
    assert len(f0) == len(x) // 160 and f0.dtype == np.float64
    inner = f0[6:-6]
    assert (inner > 0).all(), "unvoiced frames inside a steady tone"
    assert np.abs(cents(inner, hz)).max() < 12  # measured: 9.2 cents at 80 Hz, <= 3.7 above


def test_glide_is_tracked(model: fcpe.FCPE) -> None:
    """A tone gliding 150 -> 300 Hz: each frame within 25 cents of the instantaneous pitch."""
    t = np.arange(SR) / SR
    hz = 150.0 * 2.0 ** t  # one octave in one second
    phase = 2 * np.pi * np.cumsum(hz) / SR
    x = (0.4 * sum(np.sin(k * phase) / k for k in range(1, 5))).astype(np.float32)
    f0 = compute_f0(x, "fcpe", fcpe=model)
    frames = np.arange(len(f0)) * 160 + 80  # FCPE's frame i is centred half a hop late
    inner = slice(6, -6)
    assert np.median(np.abs(cents(f0[inner], hz[frames[inner]]))) < 10
    assert np.abs(cents(f0[inner], hz[frames[inner]])).max() < 25


def test_silence_is_unvoiced_and_range_is_rvcs(model: fcpe.FCPE) -> None:
    assert not compute_f0(np.zeros(SR, np.float32), "fcpe", fcpe=model).any()
    raw = np.array([0.0, 20.0, 49.9, 50.0, 300.0, 1500.0])
    assert fcpe.to_rvc_range(raw, 5).tolist() == [0.0, 0.0, 0.0, 50.0, 300.0]
    assert fcpe.to_rvc_range(raw[:2], 4).tolist() == [0.0, 0.0, 0.0, 0.0]
    assert fcpe.to_rvc_range(np.array([1500.0]), 1).tolist() == [1100.0]


# -- real speech against the other methods ------------------------------------------------------------


@pytest.mark.parametrize(("method", "bound"), [("pm", 20.0), ("harvest", 25.0), ("dio", 25.0)])
def test_speech_agrees_with_other_methods(speech: np.ndarray, speech_f0: np.ndarray, method: str,
                                          bound: float) -> None:
    """On frames both call voiced, the median |difference| is small (measured on arctic_a0007: pm 10.9,
    harvest 16.5, dio 12.6, crepe full 13.0 cents), and no octave errors dominate."""
    other = compute_f0(speech, method)
    both = (speech_f0 > 0) & (other > 0)
    assert both.mean() > 0.35
    diff = np.abs(cents(speech_f0[both], other[both]))
    assert np.median(diff) < bound
    assert (diff > 600).mean() < 0.05


def test_speech_voicing(speech: np.ndarray, speech_f0: np.ndarray) -> None:
    """Loud frames are voiced; the pitch is a plausible male voice (arctic_a0007: a US male speaker)."""
    n = len(speech_f0) * 160
    rms = np.sqrt((speech[:n].reshape(-1, 160).astype(np.float64) ** 2).mean(axis=1))
    assert (speech_f0[rms > 0.25 * rms.max()] > 0).mean() > 0.9
    v = speech_f0[speech_f0 > 0]
    assert 70 < np.median(v) < 200
    assert ((v >= 50) & (v <= 1100)).all()


# -- batching and frame counts ------------------------------------------------------------------------


def test_batch_equals_one_by_one(model: fcpe.FCPE, speech: np.ndarray) -> None:
    clips = [speech[:16000], tone(200.0, 1.0), speech[8000:24000], speech[:12345], tone(300.0, 0.05)]
    batch = compute_f0_batch(clips, "fcpe", fcpe=model)
    for clip, f in zip(clips, batch, strict=True):
        assert len(f) == len(clip) // 160
        np.testing.assert_allclose(f, compute_f0(clip, "fcpe", fcpe=model), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n", [160, 161, 500, 1024, 1500, 4000, 16159])
def test_frame_count_short_and_odd_lengths(model: fcpe.FCPE, n: int) -> None:
    x = tone(220.0, 1.0)[:n]
    f0 = compute_f0(x, "fcpe", fcpe=model)
    assert f0.shape == (n // 160,) and np.isfinite(f0).all()
    assert model.f0([x])[0].shape == (n // 160 + 1,)


def test_bad_audio_is_refused_naming_the_problem(model: fcpe.FCPE) -> None:
    with pytest.raises(ValueError, match="NaN"):
        compute_f0(np.array([0.1, np.nan] * 800, np.float32), "fcpe", fcpe=model)
    with pytest.raises(ValueError, match="1-D"):
        compute_f0(np.zeros((2, 1600), np.float32), "fcpe", fcpe=model)
    assert compute_f0(np.zeros(100, np.float32), "fcpe", fcpe=model).shape == (0,)


# -- files it must refuse -----------------------------------------------------------------------------


def test_missing_weights_say_where_to_put_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RVC_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr(fcpe.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(fcpe.FCPEError, match=r"pip install --no-deps torchfcpe.*fcpe/fcpe_c_v001\.pt"):
        fcpe.asset_path()
    (tmp_path / "fcpe").mkdir()
    (tmp_path / "fcpe" / fcpe.ASSET).write_bytes(b"x")
    assert fcpe.asset_path() == tmp_path / "fcpe" / fcpe.ASSET


def _bundled() -> dict[str, Any]:
    ckpt = safeload.load(fcpe.asset_path())
    assert isinstance(ckpt, dict)
    return ckpt


@pytest.mark.parametrize("damage", ["junk", "empty", "no model", "other mel", "attention variant",
                                     "missing key", "wrong shape", "no weight_g", "weight_v not a tensor",
                                     "weight_v wrong shape", "config not a dict", "mel a list"])
def test_damaged_weights_are_refused_naming_the_file(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "bad.pt"
    ckpt = _bundled()
    model, config = dict(ckpt["model"]), {k: dict(v) for k, v in ckpt["config_dict"].items()
                                         if isinstance(v, dict)}
    if damage == "junk":
        path.write_bytes(b"not a torch file at all")
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        if damage == "other mel":
            config["mel"]["hop_size"] = 512
        elif damage == "attention variant":
            config["model"]["conv_only"] = False
        elif damage == "missing key":
            del model["norm.weight"]
        elif damage == "wrong shape":
            model["norm.weight"] = torch.zeros(7)
        elif damage == "no weight_g":
            del model["output_proj.weight_g"]
        elif damage == "weight_v not a tensor":
            model["output_proj.weight_v"] = 3
        elif damage == "weight_v wrong shape":
            model["output_proj.weight_v"] = torch.zeros(360, 5)
        elif damage == "mel a list":
            config["mel"] = [1, 2]  # type: ignore[assignment]
        torch.save({"model": None if damage == "no model" else model,
                    "config_dict": "x" if damage == "config not a dict" else config}, path)
    with pytest.raises(fcpe.FCPEError, match=r"fcpe: .*bad\.pt") as err:
        fcpe.FCPE(weights=path)
    assert "\n" not in str(err.value)
