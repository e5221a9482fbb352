"""Linear and mel spectrograms exactly as RVC's training computes them.

* Linear: reflect-pad both sides by (n_fft - hop) / 2, `torch.stft(center=False, onesided)` with a
  Hann window of `win_length`, magnitude sqrt(re^2 + im^2 + 1e-6). A segment of T samples gives
  T / hop frames (32 frames for 12800 samples at 40k).
* Mel: librosa's Slaney filter bank `mel(sr, n_fft, n_mels, fmin=0, fmax=None)`, then
  log(clamp(basis @ spec, min=1e-5)).

Everything is computed in fp32, whatever the input dtype or an enclosing autocast region; the
window and filter bank are cached per (device, parameters).
"""

from __future__ import annotations

import threading

import torch

_LOCK = threading.Lock()
_WINDOWS: dict[tuple[str, int], torch.Tensor] = {}
_BASES: dict[tuple[str, int, int, int, float, float | None], torch.Tensor] = {}


def _window(win_length: int, device: torch.device) -> torch.Tensor:
    key = (str(device), win_length)
    w = _WINDOWS.get(key)
    if w is None:
        with torch.inference_mode(False):  # cached for training too: never an inference-mode tensor
            w = torch.hann_window(win_length, dtype=torch.float32, device=device)
        with _LOCK:
            _WINDOWS[key] = w
    return w


def mel_basis(
    sampling_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """librosa's mel filter bank [n_mels, n_fft/2+1] (Slaney scale and norm), fp32, cached."""
    device = torch.device(device)
    key = (str(device), sampling_rate, n_fft, n_mels, float(fmin), None if fmax is None else float(fmax))
    b = _BASES.get(key)
    if b is None:
        import librosa

        m = librosa.filters.mel(sr=sampling_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
        with torch.inference_mode(False):  # cached for training too: never an inference-mode tensor
            b = torch.from_numpy(m).to(device=device, dtype=torch.float32)
        with _LOCK:
            _BASES[key] = b
    return b


def spectrogram(y: torch.Tensor, n_fft: int, hop_size: int, win_size: int) -> torch.Tensor:
    """Linear magnitude spectrogram. y: [T] or [B, T] (or [B, 1, T]) -> [B, n_fft/2+1, frames]."""
    if y.dim() == 3:
        y = y.squeeze(1)
    if y.dim() == 1:
        y = y.unsqueeze(0)
    if (n_fft - hop_size) % 2:
        raise ValueError(f"n_fft - hop must be even for RVC's symmetric padding (n_fft={n_fft}, "
                         f"hop={hop_size})")
    pad = (n_fft - hop_size) // 2
    with torch.autocast(device_type=y.device.type, enabled=False):
        y = y.float()
        if y.shape[-1] <= pad:
            raise ValueError(f"signal of {y.shape[-1]} samples is too short for reflect padding of {pad}")
        y = torch.nn.functional.pad(y.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
        spec = torch.stft(
            y, n_fft, hop_length=hop_size, win_length=win_size, window=_window(win_size, y.device),
            center=False, pad_mode="reflect", normalized=False, onesided=True, return_complex=True,
        )
        spec = torch.view_as_real(spec)
        return torch.sqrt(spec.pow(2).sum(-1) + 1e-6)


def spec_to_mel(
    spec: torch.Tensor, n_fft: int, num_mels: int, sampling_rate: int, fmin: float = 0.0,
    fmax: float | None = None,
) -> torch.Tensor:
    """Linear spectrogram [B, n_fft/2+1, T] -> log mel [B, num_mels, T] (fp32)."""
    with torch.autocast(device_type=spec.device.type, enabled=False):
        basis = mel_basis(sampling_rate, n_fft, num_mels, fmin, fmax, spec.device)
        mel = torch.matmul(basis, spec.float())
        return torch.log(torch.clamp(mel, min=1e-5))


def mel_spectrogram(
    y: torch.Tensor, n_fft: int, num_mels: int, sampling_rate: int, hop_size: int, win_size: int,
    fmin: float = 0.0, fmax: float | None = None,
) -> torch.Tensor:
    """Waveform -> log mel spectrogram (RVC's `mel_spectrogram_torch`), always fp32."""
    return spec_to_mel(spectrogram(y, n_fft, hop_size, win_size), n_fft, num_mels, sampling_rate, fmin, fmax)


def num_frames(n_samples: int, hop_size: int) -> int:
    """Frames of `spectrogram` for n_samples (padding makes it n_samples // hop)."""
    return n_samples // hop_size
