"""Spectrogram/mel definitions of RVC (reference §8.4) against librosa."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import torch
from rvc_pipeline.mel import mel_basis, mel_spectrogram, num_frames, spec_to_mel, spectrogram


def _signal(n: int, sr: int = 40000, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    x = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 1330 * t) + 0.01 * rng.standard_normal(n)
    return torch.from_numpy(x.astype(np.float32))


@pytest.mark.parametrize(("sr", "n_fft", "hop", "seg", "frames"), [
    (40000, 2048, 400, 12800, 32), (48000, 2048, 480, 17280, 36), (32000, 1024, 320, 12800, 40),
])
def test_frame_counts(sr: int, n_fft: int, hop: int, seg: int, frames: int) -> None:
    s = spectrogram(_signal(seg, sr), n_fft, hop, n_fft)
    assert s.shape == (1, n_fft // 2 + 1, frames)
    assert num_frames(seg, hop) == frames
    # a batch, with [B, 1, T] input as the generator produces it
    b = spectrogram(torch.stack([_signal(seg, sr, 1), _signal(seg, sr, 2)]).unsqueeze(1), n_fft, hop, n_fft)
    assert b.shape == (2, n_fft // 2 + 1, frames)


def test_linear_matches_numpy_stft() -> None:
    n_fft, hop = 2048, 400
    y = _signal(12800)
    s = spectrogram(y, n_fft, hop, n_fft)[0].numpy()
    pad = (n_fft - hop) // 2
    yp = np.pad(y.numpy().astype(np.float64), (pad, pad), mode="reflect")
    win = np.hanning(n_fft + 1)[:-1]  # periodic Hann, as torch.hann_window
    ref = np.stack([np.abs(np.fft.rfft(yp[i * hop: i * hop + n_fft] * win)) for i in range(32)], axis=1)
    ref = np.sqrt(ref ** 2 + 1e-6)
    np.testing.assert_allclose(s, ref, rtol=1e-3, atol=1e-3)


def test_mel_matches_librosa() -> None:
    sr, n_fft, hop, n_mels = 40000, 2048, 400, 125
    y = _signal(24000)
    mel = mel_spectrogram(y, n_fft, n_mels, sr, hop, n_fft)[0].numpy()
    pad = (n_fft - hop) // 2
    yp = np.pad(y.numpy(), (pad, pad), mode="reflect")
    mag = np.abs(librosa.stft(yp, n_fft=n_fft, hop_length=hop, win_length=n_fft, window="hann", center=False))
    ref_mel = librosa.feature.melspectrogram(S=np.sqrt(mag ** 2 + 1e-6), sr=sr, n_fft=n_fft, n_mels=n_mels,
                                             power=1.0, fmin=0.0, fmax=None)
    ref = np.log(np.clip(ref_mel, 1e-5, None))
    assert mel.shape == ref.shape == (n_mels, 60)
    np.testing.assert_allclose(mel, ref, rtol=1e-3, atol=2e-3)


def test_fp32_under_autocast_and_half_input() -> None:
    y = _signal(12800).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = mel_spectrogram(y, 2048, 125, 40000, 400, 2048)
    assert m.dtype == torch.float32
    ref = mel_spectrogram(y.float(), 2048, 125, 40000, 400, 2048)
    torch.testing.assert_close(m, ref)


def test_basis_cached_and_slaney() -> None:
    a = mel_basis(40000, 2048, 125)
    b = mel_basis(40000, 2048, 125)
    assert a is b and a.shape == (125, 1025) and a.dtype == torch.float32
    np.testing.assert_allclose(a.numpy(), librosa.filters.mel(sr=40000, n_fft=2048, n_mels=125), rtol=1e-6)
    s = torch.zeros(1, 1025, 3)
    assert torch.allclose(spec_to_mel(s, 2048, 125, 40000), torch.full((1, 125, 3), float(np.log(1e-5))))
