"""fcpe: FCPE (fast context-based pitch estimation) with the weights that ship inside the torchfcpe wheel.

`import torchfcpe` imports torchaudio (for resampling only), which does not load beside the CPU torch
build, so this file builds the network itself, with parameter names identical to torchfcpe 0.0.4's
`CFNaiveMelPE`, and loads `torchfcpe/assets/fcpe_c_v001.pt` (found without importing the package; else
<weights cache>/fcpe/fcpe_c_v001.pt) through safeload. That file holds the conv-only variant:

* log-mel of 16 kHz audio: 128 Slaney mels 0-8000 Hz, n_fft = window = 1024 (periodic Hann), hop 160,
  not centred: 432 samples of reflect padding on the left and max(432, 1024 - N - 432) on the right
  (zeros when that is not shorter than the signal), magnitude sqrt(re^2 + im^2 + 1e-9),
  log(max(., 1e-5)); N//160 + 1 frames (the last repeated, or extra ones cut);
* input stack Conv1d(128->512, 3) -> GroupNorm(4) -> LeakyReLU -> Conv1d(512->512, 3); six residual
  conformer convolution modules (LayerNorm -> 1x1 conv to 2048 -> GLU -> depthwise conv 31 -> SiLU ->
  1x1 conv to 512); LayerNorm; Linear(512->360) (stored weight-normed: weight_g / weight_v, turned into
  one weight at load); sigmoid;
* decoding ("local_argmax", threshold 0.006 as RVC and Applio call it): the activation-weighted mean of
  the cents of the 9 bins around the arg-max (cent table from the file, 32.70-1975.5 Hz); a frame whose
  largest activation is <= the threshold is unvoiced; f0 = 10 * 2^(cents/1200).

On top, as the other methods: f0 below 50 Hz is unvoiced, above 1100 Hz clamped to 1100 (RVC's range),
and the N//160 + 1 frames are cut to p_len = N//160. FCPE's frame i is centred on sample 160 i + 80 (half
a hop later than the other methods), as in RVC. GroupNorm normalises over time, so clips are batched only
with clips of the same length (which gives exactly the result of running each alone).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rvc_pipeline.components.pitch.base import F0_MAX, F0_MIN, HOP, SR, PitchMethod, cached, register

# speed: bench/bench_f0.py --methods fcpe --seconds 30 --procs 1 (2 cores): 23.8 s of audio per second
CATALOG = {"fcpe": {"needs_gpu": True, "weights": ["fcpe/fcpe_c_v001.pt"], "speed": 20.0}}

ASSET = "fcpe_c_v001.pt"
N_FFT = 1024
N_MELS = 128
MEL_FMAX = 8000.0
N_BINS = 360
HIDDEN = 512
N_LAYERS = 6
THRESHOLD = 0.006
_EXPECTED = {"sr": SR, "num_mels": N_MELS, "n_fft": N_FFT, "win_size": N_FFT, "hop_size": HOP}


class FCPEError(ValueError):
    """FCPE weights that cannot be used (a ValueError of ours: permanent, exit 2, no traceback)."""


class _Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class _DepthWise(nn.Module):
    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel, padding=kernel // 2, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _ConvModule(nn.Module):
    """Conformer convolution module; the indices of `net` are those of the file (1, 7: transposes)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), _Transpose(), nn.Conv1d(dim, 4 * dim, 1), nn.GLU(dim=1),
            _DepthWise(2 * dim, 31), nn.SiLU(), nn.Conv1d(2 * dim, dim, 1), _Transpose(),
        )


class _Layer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conformer = _ConvModule(dim)
        self.norm = nn.LayerNorm(dim)  # in the file; used only by the attention variant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conformer.net(x)


class _Encoder(nn.Module):
    def __init__(self, dim: int, n_layers: int) -> None:
        super().__init__()
        self.encoder_layers = nn.ModuleList(_Layer(dim) for _ in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder_layers:
            x = layer(x)
        return x


class FCPENet(nn.Module):
    """[B, T, 128] log-mel -> [B, T, 360] activations."""

    cent_table: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.input_stack = nn.Sequential(
            nn.Conv1d(N_MELS, HIDDEN, 3, 1, 1), nn.GroupNorm(4, HIDDEN), nn.LeakyReLU(),
            nn.Conv1d(HIDDEN, HIDDEN, 3, 1, 1),
        )
        self.net = _Encoder(HIDDEN, N_LAYERS)
        self.norm = nn.LayerNorm(HIDDEN)
        self.output_proj = nn.Linear(HIDDEN, N_BINS)
        self.register_buffer("cent_table", torch.zeros(N_BINS))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.input_stack(mel.transpose(1, 2)).transpose(1, 2)
        return torch.sigmoid(self.output_proj(self.norm(self.net(x))))


def asset_path() -> Path:
    """torchfcpe's bundled assets/fcpe_c_v001.pt (found without importing torchfcpe), else
    <weights cache>/fcpe/fcpe_c_v001.pt."""
    from rvc_pipeline.weights import local_cache_dir

    spec = importlib.util.find_spec("torchfcpe")
    tried = [Path(loc) / "assets" / ASSET for loc in (spec.submodule_search_locations or [])] if spec else []
    tried.append(local_cache_dir() / "fcpe" / ASSET)
    for p in tried:
        if p.is_file():
            return p
    raise FCPEError(
        f"fcpe: no FCPE weights (tried {', '.join(map(str, tried))}). Install the torchfcpe wheel, which "
        f"carries them (pip install --no-deps torchfcpe), or copy {ASSET} to {tried[-1]}"
    )


def _section(config: object, key: str) -> dict[str, Any]:
    part = config.get(key) if isinstance(config, dict) else None
    return part if isinstance(part, dict) else {}


def _check_config(config: object, where: Path) -> None:
    mel, model = _section(config, "mel"), _section(config, "model")
    got = {k: mel.get(k) for k in _EXPECTED}
    kind = (model.get("type"), model.get("conv_only"))
    if got != _EXPECTED or kind != ("CFNaiveMelPE", True):
        raise FCPEError(f"fcpe: {where}: not a conv-only CFNaiveMelPE at 16 kHz / hop 160 (mel {got}, "
                        f"model type {kind[0]!r}, conv_only {kind[1]!r})")


def _fold_weight_norm(state: dict[str, Any], where: Path) -> dict[str, Any]:
    """output_proj.weight_g / weight_v (stored weight-normed) -> one output_proj.weight."""
    g, v = state.pop("output_proj.weight_g", None), state.pop("output_proj.weight_v", None)
    if not (isinstance(g, torch.Tensor) and isinstance(v, torch.Tensor)) or g.shape != (N_BINS, 1):
        raise FCPEError(f"fcpe: {where}: output_proj.weight_g / weight_v missing or malformed")
    if v.shape != (N_BINS, HIDDEN):
        raise FCPEError(f"fcpe: {where}: output_proj.weight_v has shape {list(v.shape)}")
    from rvc_pipeline.nn.weightnorm import compute_weight

    state["output_proj.weight"] = compute_weight(g, v)
    return state


def _state_dict(path: Path) -> dict[str, Any]:
    """The file's model weights with the weight-normed output layer folded into one weight."""
    from rvc_pipeline import safeload

    try:
        ckpt = safeload.load(path, what="FCPE weights file")
    except safeload.UnreadableFile as e:
        raise FCPEError(f"fcpe: {e}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise FCPEError(f"fcpe: {path}: expected a checkpoint with a 'model' state dict")
    _check_config(ckpt.get("config_dict"), path)
    state = {k: v for k, v in ckpt["model"].items() if k != "gaussian_blurred_cent_mask"}
    return _fold_weight_norm(state, path)


class LogMel(nn.Module):
    """FCPE's log-mel: [B, N] audio -> [B, N//160 + 1, 128]."""

    basis: torch.Tensor
    window: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        import librosa

        basis = librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=N_MELS, fmin=0.0, fmax=MEL_FMAX)
        self.register_buffer("basis", torch.from_numpy(basis).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        n = audio.shape[-1]
        left = (N_FFT - HOP) // 2
        right = max((N_FFT - HOP + 1) // 2, N_FFT - n - left)
        mode = "reflect" if right < n else "constant"
        y = nn.functional.pad(audio[:, None], (left, right), mode=mode)[:, 0]
        spec = torch.stft(y, N_FFT, HOP, N_FFT, self.window, center=False, return_complex=True)
        mag = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
        mel = torch.log(torch.clamp(self.basis @ mag, min=1e-5)).transpose(1, 2)
        want = n // HOP + 1
        if mel.shape[1] < want:
            mel = torch.cat([mel, mel[:, -1:].expand(-1, want - mel.shape[1], -1)], 1)
        return mel[:, :want]


def decode(act: torch.Tensor, cent_table: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """[B, T, 360] activations -> [B, T] f0 in Hz (0 where unvoiced), FCPE's local arg-max."""
    confident, top = act.max(dim=-1, keepdim=True)
    idx = (top + torch.arange(-4, 5, device=act.device)).clamp(0, N_BINS - 1)
    y = torch.gather(act, -1, idx)
    cents = (cent_table[idx] * y).sum(-1) / y.sum(-1)
    f0 = 10.0 * 2.0 ** (cents / 1200.0)
    return torch.where(confident[..., 0] > threshold, f0, torch.zeros_like(f0))


class FCPE:
    """A loaded FCPE model on one device."""

    def __init__(self, device: str = "cpu", weights: Path | None = None) -> None:
        path = weights or asset_path()
        net, state = FCPENet(), _state_dict(path)  # safeload's UnsafeFile passes through unchanged
        try:
            net.load_state_dict(state)
        except RuntimeError as e:  # missing / unexpected keys, wrong shapes
            raise FCPEError(f"fcpe: {path}: {str(e).splitlines()[0]}") from None
        self.device = device
        self.net = net.eval().to(device)
        self.mel = LogMel().to(device)

    def f0(self, clips: Sequence[np.ndarray], threshold: float = THRESHOLD, max_frames: int = 20000
           ) -> list[np.ndarray]:
        """Raw f0 (float64, N//160 + 1 frames) per clip; clips of equal length run as one batch."""
        out: list[np.ndarray] = [np.zeros(0)] * len(clips)
        groups: dict[int, list[int]] = {}
        for i, x in enumerate(clips):
            groups.setdefault(len(x), []).append(i)
        with torch.inference_mode():
            for n, idx in groups.items():
                per = max(1, max_frames // (n // HOP + 1))
                for s in range(0, len(idx), per):
                    part = idx[s : s + per]
                    audio = torch.from_numpy(np.stack([np.asarray(clips[i], np.float32) for i in part]))
                    act = self.net(self.mel(audio.to(self.device)))
                    f0 = decode(act, self.net.cent_table, threshold).double().cpu().numpy()
                    for j, i in enumerate(part):
                        out[i] = f0[j]
        return out


def to_rvc_range(f0: np.ndarray, p_len: int) -> np.ndarray:
    """Below 50 Hz unvoiced, above 1100 Hz clamped; cut (or zero-padded) to p_len frames."""
    f0 = np.where(f0 < F0_MIN, 0.0, np.minimum(f0, F0_MAX))[:p_len]
    return np.pad(f0, (0, p_len - len(f0)))


def get_fcpe(device: str = "cpu") -> FCPE:
    """An FCPE model, loaded once per process."""
    return cached(("fcpe", device), lambda: FCPE(device))


@register("fcpe")
class FcpeMethod(PitchMethod):
    """opts: `device`, `threshold` (0.006), `fcpe` (a loaded FCPE)."""

    def extract(self, clips: Sequence[np.ndarray], p_lens: Sequence[int], **opts: Any) -> list[np.ndarray]:
        model = opts.get("fcpe") or get_fcpe(opts.get("device", "cpu"))
        raw = model.f0(clips, float(opts.get("threshold", THRESHOLD)))
        return [to_rvc_range(f, n) for f, n in zip(raw, p_lens)]

    def required_weights(self) -> tuple[str, ...]:
        return ()  # its CATALOG file ships in the torchfcpe wheel: `asset_path` finds it

    def provenance(self, spec: Any, opts: dict[str, Any]) -> dict[str, Any]:
        from rvc_pipeline.provenance import weight_identity

        return {"fcpe_weights": weight_identity(asset_path())}
