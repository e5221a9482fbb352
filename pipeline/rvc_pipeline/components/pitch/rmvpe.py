"""RMVPE pitch estimator (the network RVC ships as `assets/rmvpe/rmvpe.pt`) and its decoding.

`rmvpe.pt` is a plain state_dict of RVC's `E2E(n_blocks=4, n_gru=1, kernel_size=(2, 2))`. The module tree
below reproduces that network's attribute names, so the real file loads with strict key matching:

    unet.encoder.bn                                  BatchNorm2d(1) on the input log-mel
    unet.encoder.layers.{0..4}.conv.{0..3}           residual blocks, 1->16->32->64->128->256 channels,
                                                     each encoder layer followed by AvgPool2d(2, 2)
    unet.intermediate.layers.{0..3}.conv.{0..3}      residual blocks 256->512, then 512->512
    unet.decoder.layers.{0..4}.conv1.{0,1}           ConvTranspose2d(3x3, stride 2) + BatchNorm2d
    unet.decoder.layers.{0..4}.conv2.{0..3}          residual blocks (first takes the skip concat)
    cnn                                              Conv2d(16 -> 3, 3x3)
    fc.0.gru                                         bidirectional GRU(384 -> 256 x 2)
    fc.1                                             Linear(512 -> 360), then sigmoid

A residual block is `conv` = Sequential(Conv3x3 no bias, BN, ReLU, Conv3x3 no bias, BN, ReLU) plus a 1x1
`shortcut` convolution (with bias) when the channel count changes.

Input: log-mel of 16 kHz audio (128 htk mels 30-8000 Hz, n_fft = window = 1024 Hann, hop 160, centred with
reflect padding, magnitude, log(clamp(., 1e-5))) -> N//160 + 1 frames, right-padded with zeros to a
multiple of 32 frames. Output: [T, 360] salience. Decoding: 20-cent bins from 1997.3794 cents; the
salience-weighted mean of the cents of the +-4 bins around the arg-max; 0 where the frame's max salience
<= threshold (0.03); f0 = 10 * 2^(cents/1200), and 10 Hz -> 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rvc_pipeline.components.pitch.base import PitchMethod, cached, fit_length, register, weights_key
from rvc_pipeline.core.catalog import PITCH

CATALOG = {"rmvpe": {"needs_gpu": True, "weights": ["rmvpe.pt"], "speed": 1.0, "rank": 4}}
WEIGHTS = PITCH["rmvpe"].weights[0]  # its one file, as CATALOG names it

SAMPLE_RATE = 16000
HOP = 160
N_FFT = 1024
N_MELS = 128
MEL_FMIN = 30.0
MEL_FMAX = 8000.0
N_CLASS = 360
CENTS_OFFSET = 1997.3794084376191
CENTS_PER_BIN = 20.0
THRESHOLD = 0.03


class RMVPEError(RuntimeError):
    pass


def cents_mapping() -> np.ndarray:
    """Cents of the 360 bins, zero-padded by 4 on each side (368 entries)."""
    return np.pad(CENTS_PER_BIN * np.arange(N_CLASS) + CENTS_OFFSET, (4, 4))


def salience_to_cents(salience: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """Salience-weighted mean cents of the +-4 bins around the arg-max; 0 where max salience <= threshold."""
    sal = np.asarray(salience)
    if sal.ndim != 2 or sal.shape[1] != N_CLASS:
        raise RMVPEError(f"salience: expected shape [T, {N_CLASS}], got {list(sal.shape)}")
    if len(sal) == 0:
        return np.zeros(0)
    padded = np.pad(sal, ((0, 0), (4, 4)))
    centre = np.argmax(sal, axis=1) + 4
    idx = centre[:, None] + np.arange(-4, 5)[None, :]
    w = np.take_along_axis(padded, idx, axis=1).astype(np.float64)
    c = cents_mapping()[idx]
    wsum = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cents = (w * c).sum(axis=1) / wsum
    cents[padded.max(axis=1) <= threshold] = 0.0
    return np.nan_to_num(cents, nan=0.0)


def decode(salience: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """[T, 360] salience -> f0 in Hz (float64), 0 = unvoiced."""
    f0 = 10.0 * 2.0 ** (salience_to_cents(salience, threshold) / 1200.0)
    f0[f0 == 10.0] = 0.0
    return f0


def bin_to_hz(k: float) -> float:
    return float(10.0 * 2.0 ** ((CENTS_PER_BIN * k + CENTS_OFFSET) / 1200.0))


_BN_MOMENTUM = 0.01


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout, momentum=_BN_MOMENTUM),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout, momentum=_BN_MOMENTUM),
            nn.ReLU(),
        )
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + (x if self.shortcut is None else self.shortcut(x))


class Stack(nn.Module):
    """n_blocks residual blocks; with a pool kernel, also returns the pooled output."""

    def __init__(self, cin: int, cout: int, pool: tuple[int, int] | None, n_blocks: int) -> None:
        super().__init__()
        self.conv = nn.ModuleList([ResBlock(cin if i == 0 else cout, cout) for i in range(n_blocks)])
        self.pool = nn.AvgPool2d(pool) if pool is not None else None

    def forward(self, x: torch.Tensor) -> Any:
        for block in self.conv:
            x = block(x)
        return x if self.pool is None else (x, self.pool(x))


class Encoder(nn.Module):
    def __init__(self, cin: int, width: int, depth: int, kernel: tuple[int, int], n_blocks: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin, momentum=_BN_MOMENTUM)
        chans = [cin] + [width * 2**i for i in range(depth)]
        self.layers = nn.ModuleList([Stack(chans[i], chans[i + 1], kernel, n_blocks) for i in range(depth)])
        self.out_channels = chans[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        x = self.bn(x)
        for layer in self.layers:
            skip, x = layer(x)
            skips.append(skip)
        return x, skips


class Intermediate(nn.Module):
    def __init__(self, cin: int, cout: int, depth: int, n_blocks: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [Stack(cin if i == 0 else cout, cout, None, n_blocks) for i in range(depth)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: tuple[int, int], n_blocks: int) -> None:
        super().__init__()
        out_pad = (0, 1) if tuple(kernel) == (1, 2) else (1, 1)
        self.conv1 = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, 3, kernel, 1, output_padding=out_pad, bias=False),
            nn.BatchNorm2d(cout, momentum=_BN_MOMENTUM),
            nn.ReLU(),
        )
        self.conv2 = nn.ModuleList([ResBlock(2 * cout if i == 0 else cout, cout) for i in range(n_blocks)])

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = torch.cat((self.conv1(x), skip), dim=1)
        for block in self.conv2:
            x = block(x)
        return x


class Decoder(nn.Module):
    def __init__(self, cin: int, depth: int, kernel: tuple[int, int], n_blocks: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [UpBlock(cin // 2**i, cin // 2 ** (i + 1), kernel, n_blocks) for i in range(depth)]
        )

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for layer, skip in zip(self.layers, reversed(skips), strict=True):
            x = layer(x, skip)
        return x


class DeepUnet(nn.Module):
    def __init__(self, kernel: tuple[int, int], n_blocks: int, depth: int = 5, inter: int = 4, cin: int = 1,
                 width: int = 16) -> None:
        super().__init__()
        self.encoder = Encoder(cin, width, depth, kernel, n_blocks)
        bottom = self.encoder.out_channels * 2  # 512
        self.intermediate = Intermediate(self.encoder.out_channels, bottom, inter, n_blocks)
        self.decoder = Decoder(bottom, depth, kernel, n_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, skips = self.encoder(x)
        return self.decoder(self.intermediate(x), skips)


class BiGRU(nn.Module):
    def __init__(self, n_in: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.gru = nn.GRU(n_in, hidden, num_layers=layers, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gru(x)[0]


class E2E(nn.Module):
    def __init__(self, n_blocks: int = 4, n_gru: int = 1, kernel: tuple[int, int] = (2, 2)) -> None:
        super().__init__()
        self.unet = DeepUnet(kernel, n_blocks)
        self.cnn = nn.Conv2d(16, 3, 3, padding=1)
        if n_gru:
            self.fc = nn.Sequential(
                BiGRU(3 * N_MELS, 256, n_gru), nn.Linear(512, N_CLASS), nn.Dropout(0.25), nn.Sigmoid()
            )
        else:
            self.fc = nn.Sequential(nn.Linear(3 * N_MELS, N_CLASS), nn.Dropout(0.25), nn.Sigmoid())

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """[B, 128, T] log-mel (T a multiple of 32) -> [B, T, 360] salience."""
        x = mel.transpose(-1, -2).unsqueeze(1)  # [B, 1, T, 128]
        x = self.cnn(self.unet(x))  # [B, 3, T, 128]
        x = x.transpose(1, 2).flatten(-2)  # [B, T, 384]
        return self.fc(x)


def build_e2e(n_blocks: int = 4, n_gru: int = 1, kernel: tuple[int, int] = (2, 2)) -> torch.nn.Module:
    """The E2E network (randomly initialised)."""
    return E2E(n_blocks, n_gru, kernel)


class LogMel:
    """RMVPE's log-mel front end on one device."""

    def __init__(self, device: str = "cpu") -> None:
        import librosa

        basis = librosa.filters.mel(
            sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=MEL_FMIN, fmax=MEL_FMAX, htk=True
        )
        self.basis = torch.from_numpy(basis).float().to(device)
        self.window = torch.hann_window(N_FFT).to(device)
        self.device = device

    def __call__(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, N] float audio -> [B, 128, N//160 + 1] log-mel."""
        if audio.shape[-1] <= N_FFT // 2:  # reflect padding needs more samples than the pad
            audio = torch.nn.functional.pad(audio, (0, N_FFT // 2 + 1 - audio.shape[-1]))
        spec = torch.stft(
            audio, N_FFT, HOP, N_FFT, self.window, center=True, pad_mode="reflect", return_complex=True
        )
        mel = torch.matmul(self.basis, spec.abs())
        return torch.log(torch.clamp(mel, min=1e-5))


def pad_frames(n: int) -> int:
    """Frames after RMVPE's right padding to a multiple of 32."""
    return 32 * ((n - 1) // 32 + 1) if n > 0 else 32


class RMVPE:
    """A loaded RMVPE model: audio -> salience -> f0."""

    def __init__(self, weights: str | Path | dict[str, Any], device: str = "cpu", half: bool = False) -> None:
        with torch.device("meta"):  # no random initialisation: every tensor comes from the file
            net = build_e2e()
        net = net.to_empty(device="cpu")
        for name, buf in net.named_buffers():
            if name.endswith("num_batches_tracked"):
                buf.zero_()
        if isinstance(weights, dict):
            state = weights
            where = "state dict"
        else:
            where = str(weights)
            from rvc_pipeline import safeload

            try:
                state = safeload.load(weights, what="RMVPE checkpoint")
            except safeload.UnreadableFile as e:
                raise RMVPEError(f"RMVPE checkpoint {where}: cannot load: {e}") from None
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        if not isinstance(state, dict):
            raise RMVPEError(f"RMVPE checkpoint {where}: expected a state_dict, got {type(state).__name__}")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        own = net.state_dict()
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in own]
        bad_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or bad_shape:
            raise RMVPEError(
                f"RMVPE checkpoint {where}: not an RMVPE E2E(4, 1, (2, 2)) state_dict "
                f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}, "
                f"wrong shape {bad_shape[:5]})"
            )
        net.load_state_dict(state, strict=False)
        self.device = device
        self.dtype = torch.float16 if half else torch.float32
        self.net = net.eval().to(device=device, dtype=self.dtype)
        self.mel = LogMel(device)

    def salience_batch(self, audios: list[np.ndarray], max_frames: int = 8192) -> list[np.ndarray]:
        """Salience [N_i//160 + 1, 360] for each signal. The log-mel of each signal is computed alone;
        signals whose padded frame counts are equal run through the network together (at most
        `max_frames` frames per batch), which gives exactly the result of running each alone."""
        out: list[np.ndarray | None] = [None] * len(audios)
        mels: list[torch.Tensor] = []
        groups: dict[int, list[int]] = {}
        with torch.inference_mode():
            for i, a in enumerate(audios):
                x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)
                mel = self.mel(x[None])[0]
                mels.append(mel)
                groups.setdefault(pad_frames(mel.shape[-1]), []).append(i)
            for padded, idx in groups.items():
                per = max(1, max_frames // padded)
                for s in range(0, len(idx), per):
                    part = idx[s : s + per]
                    batch = torch.stack(
                        [torch.nn.functional.pad(mels[i], (0, padded - mels[i].shape[-1])) for i in part]
                    )
                    sal = self.net(batch.to(self.dtype)).float().cpu().numpy()
                    for j, i in enumerate(part):
                        out[i] = sal[j, : mels[i].shape[-1]]
        return [s for s in out if s is not None]

    def salience(self, audio: np.ndarray) -> np.ndarray:
        return self.salience_batch([audio])[0]

    def infer(self, audio: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
        """f0 (Hz, float64) of length len(audio)//160 + 1, like RVC's infer_from_audio."""
        return decode(self.salience(audio), threshold)


def get_rmvpe(checkpoint: str | Path, device: str = "cpu") -> RMVPE:
    """An RMVPE model from a local rmvpe.pt, loaded once per process."""
    return cached(("rmvpe", str(checkpoint), device), lambda: RMVPE(checkpoint, device))


@register("rmvpe")
class RmvpeMethod(PitchMethod):
    """opts: `checkpoint` (path of rmvpe.pt) or `rmvpe` (a loaded RMVPE), `device`, `threshold` (0.03)."""

    def extract(self, clips: Sequence[np.ndarray], p_lens: Sequence[int], **opts: Any) -> list[np.ndarray]:
        model = opts.get("rmvpe")
        if model is None:
            if not opts.get("checkpoint"):
                raise ValueError("rmvpe: pass checkpoint=<path of rmvpe.pt> or rmvpe=<loaded RMVPE>")
            model = get_rmvpe(opts["checkpoint"], opts.get("device", "cpu"))
        sal = model.salience_batch(list(clips))
        thr = float(opts.get("threshold", THRESHOLD))
        return [fit_length(decode(s, thr), n) for s, n in zip(sal, p_lens)]

    weights_label = "RMVPE checkpoint"

    def weight_refs(self, spec: Any) -> dict[str, str]:
        return {WEIGHTS: spec.f0.rmvpe_checkpoint or WEIGHTS}

    def weight_options(self, paths: Mapping[str, str]) -> dict[str, Any]:
        return {"checkpoint": paths[WEIGHTS]}

    def provenance(self, spec: Any, opts: dict[str, Any]) -> dict[str, Any]:
        from rvc_pipeline.provenance import weight_identity

        return {"rmvpe_checkpoint": spec.f0.rmvpe_checkpoint,
                weights_key(self.name): weight_identity(opts["checkpoint"])}
