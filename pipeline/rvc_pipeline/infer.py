"""`rvc-pipeline infer`: voice conversion with a trained model and index, RVC's inference pipeline.

RVC's inference (`VC.vc_single` + `Pipeline.pipeline`/`Pipeline.vc`), step by step:

1. 16 kHz mono input (ffmpeg), peak-limited to 0.95; 48 Hz order-5 Butterworth high-pass with `filtfilt`.
2. Windowing constants (`Window`): fp32 (x_pad 1, x_query 6, x_center 38, x_max 41) on the CPU, fp16
   (3, 10, 60, 65) on a GPU in half precision. Inputs longer than x_max seconds are cut at the quietest
   point (160-sample moving abs-sum, argmin) within +-x_query s of every x_center-second mark.
3. The audio is reflect-padded by t_pad on both sides; f0 is computed once on the padded audio
   (any method of components/pitch, through its `infer_f0`: RVC's post-processing included), transposed by
   2^(semitones/12), and mapped to coarse bins after the transposition.
4. Each segment: HuBERT features (v1: final_proj(layer 9), 256-d; v2: layer 12, 768-d); optional index
   mixing (k = 8, weights 1/score^2 normalised per row, blended by index_rate); x2 nearest upsampling; the
   frame count p_len = min(len//160, feature frames); the protect mask (1 where f0 >= 1 Hz, else
   `protect`) mixes in the un-retrieved features; `net_g.infer`; t_pad_tgt samples trimmed from each end.
5. Concatenation, RMS envelope mix (`change_rms`), optional resampling, int16 with 0.99 peak scaling.

Deliberate differences from RVC, none of which changes a result RVC would produce:

* Index mixing guards two cases where RVC produces NaN or garbage: a zero distance (exact match) gets all
  the weight (the limit of 1/d^4), and ids of -1 (faiss returns them when nprobe = 1 finds fewer than k
  vectors) get weight 0.
* The generator's weight norm is folded into plain weights before inference (same function, faster).
* An optional `seed` makes the generator's noise reproducible.
* A G_*.pth training checkpoint is accepted when the experiment's config.json lies beside it.

`convert` is the pure pipeline (arrays in, int16 array out); `convert_file` adds file I/O and loading;
the CLI (`rvc-pipeline infer`, rvc_pipeline.cli) parses its arguments into `convert_file`'s.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rvc_pipeline.core.catalog import PITCH, PITCH_METHODS, pitch_needs_gpu
from rvc_pipeline.core.fileio import atomic_write, pick_device, read_16k
from rvc_pipeline.core.layout import CONFIG_FILE, exported_model, version_of_dim
from rvc_pipeline.core.layout import FEATURE_DIMS as PHONE_DIMS
from rvc_pipeline.core.spec import RVC_CONVERSION

if TYPE_CHECKING:
    import torch

    from rvc_pipeline.components.embedders.base import Embedder
    from rvc_pipeline.core.spec import ExperimentSpec
    from rvc_pipeline.nn.synthesizer import SynthesizerTrn

log = logging.getLogger("rvc_pipeline")

SR = 16000
WINDOW = 160  # samples per f0 frame at 16 kHz (10 ms)
INPUT_PEAK = 0.95
OUTPUT_PEAK = 0.99
INDEX_K = 8
F0_METHODS: tuple[str, ...] = PITCH_METHODS  # every file of components/pitch, through the catalog


class InferError(ValueError):
    """Bad input to inference (file, model, index or option); the message names the file or option."""


# ------------------------------------------------------------------------------------------------
# windowing


@dataclass(frozen=True)
class Window:
    """RVC's windowing constants in seconds (Config.device_config), with the derived sample counts."""

    x_pad: int
    x_query: int
    x_center: int
    x_max: int

    @property
    def t_pad(self) -> int:
        return SR * self.x_pad

    @property
    def t_query(self) -> int:
        return SR * self.x_query

    @property
    def t_center(self) -> int:
        return SR * self.x_center

    @property
    def t_max(self) -> int:
        return SR * self.x_max

    def t_pad_tgt(self, tgt_sr: int) -> int:
        return int(tgt_sr) * self.x_pad


FP32_WINDOW = Window(1, 6, 38, 41)
"""CPU / fp32 ("5 GB config"); also Applio's constants."""
FP16_WINDOW = Window(3, 10, 60, 65)
"""GPU in half precision ("6 GB config")."""
LOW_MEMORY_WINDOW = Window(1, 5, 30, 32)
"""GPUs with at most 4 GB."""


def window_for(half: bool) -> Window:
    """RVC's choice: the fp16 set when running in half precision, else the fp32 set."""
    return FP16_WINDOW if half else FP32_WINDOW


def limit_peak(x: np.ndarray, peak: float = INPUT_PEAK) -> np.ndarray:
    """Divide by max|x|/peak when that exceeds 1 (vc_single's input normalisation)."""
    x = np.asarray(x)
    m = float(np.abs(x).max()) / peak if x.size else 0.0
    return x / m if m > 1 else x


def moving_abs_sum(audio: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """audio_sum[i] = sum_{j<window} |padded[i+j]| with padded = reflect-pad(audio, window//2): one value
    per original sample, summed in RVC's order (so ties resolve as in RVC)."""
    padded = np.abs(np.pad(np.asarray(audio, dtype=np.float64), (window // 2, window // 2), mode="reflect"))
    n = len(audio)
    out = np.zeros(n, dtype=np.float64)
    for j in range(window):
        out += padded[j : j + n]
    return out


def cut_points(audio: np.ndarray, win: Window = FP32_WINDOW) -> list[int]:
    """RVC's `opt_ts`: where a long input is cut (sample positions in the unpadded audio, not yet floored
    to a frame). Empty when the 80-sample reflect-padded audio is at most t_max samples long."""
    n = len(audio)
    if n + 2 * (WINDOW // 2) <= win.t_max:
        return []
    audio_sum = moving_abs_sum(audio)
    cuts = []
    for t in range(win.t_center, n, win.t_center):
        lo = t - win.t_query
        part = audio_sum[lo : t + win.t_query]
        cuts.append(lo + int(np.argmin(part)))
    return cuts


@dataclass(frozen=True)
class Segment:
    """One piece of the t_pad-padded audio: samples [start, stop), f0 frames [f0_start, f0_stop)."""

    start: int
    stop: int
    f0_start: int
    f0_stop: int | None


def plan_segments(n_padded: int, cuts: Sequence[int], win: Window) -> list[Segment]:
    """RVC's segment arithmetic over `audio_pad` (length n_padded) for the cuts of `cut_points`."""
    segs: list[Segment] = []
    s = 0
    t: int | None = None
    for c in cuts:
        t = c // WINDOW * WINDOW
        segs.append(Segment(s, t + 2 * win.t_pad + WINDOW, s // WINDOW, (t + 2 * win.t_pad) // WINDOW))
        s = t
    last = t if t is not None else 0
    segs.append(Segment(last, n_padded, last // WINDOW, None))
    return segs


# ------------------------------------------------------------------------------------------------
# pitch


def transpose_f0(f0: np.ndarray, semitones: float) -> np.ndarray:
    """f0 * 2^(semitones/12) (0 Hz stays unvoiced)."""
    return np.asarray(f0, dtype=np.float64) * pow(2.0, float(semitones) / 12.0)


WeightFiles = Mapping[str, str | Path]
"""A pitch method's weights: the name its CATALOG gives a file -> that file's local path."""


def extract_f0(audio_pad: np.ndarray, p_len: int, method: str,
               filter_radius: int = RVC_CONVERSION.filter_radius, *,
               device: str = "cpu", weights: WeightFiles | None = None,
               options: Mapping[str, Any] | None = None) -> np.ndarray:
    """f0 in Hz of the padded 16 kHz audio, p_len frames, as RVC's `get_f0` computes it before transposing.

    Any method of the pitch registry: `weights` hands it the files its catalog entry needs, `options` its
    own extract options (e.g. {"model": "tiny"}); a method that runs a network gets `device`."""
    from rvc_pipeline.components.pitch import base as pitch

    if method not in F0_METHODS:
        raise InferError(f"f0 method {method!r}: expected one of {', '.join(F0_METHODS)}")
    tracker = pitch.get(method)
    given = {name: str(path) for name, path in (weights or {}).items() if path}
    missing = [name for name in tracker.required_weights() if name not in given]
    if missing:
        raise InferError(f"f0 method {method} needs {', '.join(missing)} (give its path)")
    opts = {**tracker.weight_options(given), **(options or {})}
    if pitch_needs_gpu(method):
        opts["device"] = device
    return tracker.infer_f0(np.asarray(audio_pad, dtype=np.float64), p_len, filter_radius, **opts)


def pitch_features(f0: np.ndarray, semitones: float) -> tuple[np.ndarray, np.ndarray]:
    """(coarse int64 bins 1..255, pitchf float32 Hz) of the transposed f0; coarse after transposition."""
    from rvc_pipeline.steps.f0 import coarse_f0

    shifted = transpose_f0(f0, semitones)
    return coarse_f0(shifted), shifted.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# features


def retrieve_features(feats: np.ndarray, index: Any, big_npy: np.ndarray, k: int = INDEX_K) -> np.ndarray:
    """Index retrieval: for every row the weighted mean of its k nearest stored vectors, weights
    (1/score)^2 normalised per row (faiss L2 scores are squared distances, so 1/d^4).

    Guards: ids of -1 get weight 0; a zero distance takes all the weight (shared between exact matches);
    a row with no valid neighbour keeps its own features."""
    q = np.ascontiguousarray(feats, dtype=np.float32)
    score, ix = index.search(q, k)
    valid = ix >= 0
    score = np.where(valid, np.maximum(score.astype(np.float64), 0.0), np.inf)
    exact = valid & (score == 0.0)
    with np.errstate(divide="ignore"):
        w = np.where(valid & ~exact, np.square(1.0 / score), 0.0)
    has_exact = exact.any(axis=1)
    w[has_exact] = exact[has_exact].astype(np.float64)
    total = w.sum(axis=1, keepdims=True)
    ok = total[:, 0] > 0
    out = q.astype(np.float64)
    if ok.any():
        wn = w[ok] / total[ok]
        vecs = np.asarray(big_npy)[np.where(valid[ok], ix[ok], 0)]
        out[ok] = np.einsum("nk,nkd->nd", wn, vecs)
    return out.astype(np.float32)


def protect_mask(pitchf: np.ndarray, protect: float) -> np.ndarray:
    """1 for voiced frames (f0 >= 1 Hz), `protect` elsewhere (RVC: set 1 where f0 > 0, then protect
    where f0 < 1)."""
    pf = np.asarray(pitchf)
    return np.where(pf < 1, float(protect), 1.0).astype(np.float32)


def upsample2(feats: np.ndarray) -> np.ndarray:
    """x2 nearest upsampling in time (20 ms HuBERT frames -> 10 ms)."""
    return np.repeat(np.asarray(feats), 2, axis=0)


# ------------------------------------------------------------------------------------------------
# post-processing


def _linear_resize(x: np.ndarray, size: int) -> np.ndarray:
    """torch F.interpolate(mode='linear', align_corners=False) of a 1-D array to `size` points."""
    n = len(x)
    if n == 1 or size == 0:
        return np.full(size, x[0] if n else 0.0)
    src = (np.arange(size) + 0.5) * (n / size) - 0.5
    src = np.clip(src, 0.0, None)
    i0 = np.minimum(np.floor(src).astype(np.int64), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    lam = src - i0
    return x[i0] * (1.0 - lam) + x[i1] * lam


def rms_envelope(x: np.ndarray, sr: int) -> np.ndarray:
    """librosa.feature.rms with frame sr//2*2, hop sr//2 (one point per 0.5 s), centred, zero padded."""
    frame, hop = sr // 2 * 2, sr // 2
    x = np.asarray(x, dtype=np.float64)
    padded = np.pad(x, (frame // 2, frame // 2))
    n = 1 + (len(padded) - frame) // hop if len(padded) >= frame else 0
    if n <= 0:
        return np.array([np.sqrt(np.mean(np.square(padded)))]) if padded.size else np.zeros(1)
    sq = np.concatenate([[0.0], np.cumsum(np.square(padded))])
    starts = np.arange(n) * hop
    power = (sq[starts + frame] - sq[starts]) / frame
    return np.sqrt(np.maximum(power, 0.0))


def change_rms(src: np.ndarray, src_sr: int, out: np.ndarray, out_sr: int, rate: float) -> np.ndarray:
    """RVC's RMS mix: out * rms_src^(1-rate) * rms_out^(rate-1), envelopes interpolated to len(out);
    rate 1 keeps the output's envelope, 0 imposes the input's."""
    n = len(out)
    rms1 = _linear_resize(rms_envelope(src, src_sr), n)
    rms2 = np.maximum(_linear_resize(rms_envelope(out, out_sr), n), 1e-6)
    gain = np.power(rms1, 1.0 - rate) * np.power(rms2, rate - 1.0)
    return (np.asarray(out, dtype=np.float64) * gain).astype(np.float32)


def to_int16(x: np.ndarray, peak: float = OUTPUT_PEAK) -> np.ndarray:
    """scale = 32768 / max(1, max|x|/0.99), then int16 (truncation, as numpy's astype)."""
    x = np.asarray(x, dtype=np.float64)
    m = float(np.abs(x).max()) / peak if x.size else 0.0
    scale = 32768.0 / m if m > 1 else 32768.0
    return (x * scale).astype(np.int16)


# ------------------------------------------------------------------------------------------------
# the pipeline


def check_options(**opts: Any) -> None:
    """Range checks of `convert`'s options (only those given); InferError names the option."""
    method = opts.get("f0_method")
    if method is not None and method not in F0_METHODS:
        raise InferError(f"f0 method {method!r}: expected one of {', '.join(F0_METHODS)}")
    for name, lo, hi in (("index_rate", 0.0, 1.0), ("protect", 0.0, 0.5), ("rms_mix_rate", 0.0, 1.0)):
        value = opts.get(name)
        if value is not None and not lo <= float(value) <= hi:
            raise InferError(f"{name} must be within {lo}..{hi}, got {value}")
    rate = opts.get("resample_sr")
    if rate and int(rate) < SR:
        raise InferError(f"resample_sr must be 0 (the model's rate) or at least {SR} Hz, got {rate}")


def _model_meta(net_g: Any, meta: Mapping[str, Any] | None) -> tuple[str, bool, int]:
    m = dict(meta or {})
    version = str(m.get("version", getattr(net_g, "version", "v2")))
    f0 = bool(m.get("f0", getattr(net_g, "use_f0", True)))
    sr = int(m.get("tgt_sr", m.get("sr", getattr(net_g, "sr", 40000))))
    if version not in PHONE_DIMS:
        raise InferError(f"model version {version!r}: expected v1 or v2")
    return version, f0, sr


def _check_index(index: Any, version: str, where: str = "index") -> None:
    dim = int(index.d)
    want = PHONE_DIMS[version]
    if dim != want:
        other = version_of_dim(dim) or "no RVC model"
        raise InferError(f"{where}: {dim}-d vectors ({other}), but the model is {version} ({want}-d "
                         "features); use the index built for this model")
    if int(index.ntotal) == 0:
        raise InferError(f"{where}: holds no vectors (a trained_* index? use the added_* file)")


def _check_input(audio16k: np.ndarray, net_g: Any, sid: int) -> np.ndarray:
    """The audio as a 1-D array, and the speaker id, checked; InferError names what is wrong."""
    n_spk = int(getattr(net_g, "spk_embed_dim", 0) or 0)
    if n_spk and not 0 <= int(sid) < n_spk:
        raise InferError(f"sid {sid} out of range: the model has {n_spk} speaker ids (0..{n_spk - 1})")
    x = np.asarray(audio16k)
    if x.ndim != 1:
        raise InferError(f"audio: expected 1-D 16 kHz mono samples, got shape {list(x.shape)}")
    if len(x) < WINDOW * 10:
        raise InferError(f"audio: {len(x)} samples ({len(x) / SR:.3f} s) is too short; need at least 0.1 s")
    if not np.isfinite(x).all():
        raise InferError("audio: contains NaN or infinite samples")
    return x


def _place(net_g: SynthesizerTrn, device: str, half: bool
           ) -> tuple[SynthesizerTrn, torch.device, torch.dtype]:
    """The generator on `device` in fp16 or fp32 (moved only when it is elsewhere)."""
    import torch

    dtype = torch.float16 if half else torch.float32
    tdev = torch.device(device)
    params = list(net_g.parameters())
    if (params[0].device if params else torch.device("cpu")) != tdev:
        net_g = net_g.to(tdev)
    if next(net_g.parameters()).dtype != dtype:
        net_g = net_g.to(dtype)
    return net_g, tdev, dtype


def _index_vectors(index: Any, big_npy: np.ndarray | None, version: str) -> np.ndarray:
    """The index's stored vectors (given, or reconstructed), after checking it fits the model."""
    _check_index(index, version)
    if big_npy is None:
        big_npy = index.reconstruct_n(0, index.ntotal)
    return np.asarray(big_npy, dtype=np.float32)


@dataclass(frozen=True)
class _Segments:
    """What every segment of one conversion shares: the models, index mixing, pitch and placement."""

    net_g: Any
    embedder: Embedder
    version: str
    index: Any  # None: no retrieval
    big_npy: np.ndarray | None
    index_rate: float
    protect: float
    coarse: np.ndarray | None  # None: a model without pitch guidance
    pitchf: np.ndarray | None
    sid: int
    device: torch.device
    dtype: torch.dtype
    seed: int | None

    def features(self, chunk: np.ndarray, seg: Segment
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(phone features at 10 ms, coarse, pitchf) of one segment, all of one length."""
        feats = self.embedder.extract(chunk.astype(np.float32), self.version)[0]  # type: ignore[arg-type]
        feats0 = feats
        if self.index is not None:
            retrieved = retrieve_features(feats, self.index, self.big_npy)  # type: ignore[arg-type]
            feats = (retrieved * self.index_rate + (1 - self.index_rate) * feats).astype(np.float32)
        feats = upsample2(feats)
        feats = feats[: min(len(chunk) // WINDOW, feats.shape[0])]
        if self.coarse is None or self.pitchf is None:
            return feats, None, None
        coarse = self.coarse[seg.f0_start : seg.f0_stop][: len(feats)]
        pitchf = self.pitchf[seg.f0_start : seg.f0_stop][: len(feats)]
        n = len(pitchf)  # never shorter with RVC's arithmetic; keep shapes consistent anyway
        feats = feats[:n]
        if self.protect < 0.5:
            mask = protect_mask(pitchf, self.protect)[:, None]
            feats = feats * mask + upsample2(feats0)[:n] * (1 - mask)
        return feats, coarse, pitchf

    def synthesize(self, feats: np.ndarray, coarse: np.ndarray | None, pitchf: np.ndarray | None,
                   i: int) -> np.ndarray:
        """net_g.infer of segment `i` (its own seeded noise when a seed is set) -> float32 audio."""
        import torch

        dev = self.device
        gen = torch.Generator(device=dev).manual_seed(int(self.seed) + i) if self.seed is not None else None
        with torch.inference_mode():
            phone = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))[None].to(dev, self.dtype)
            lengths = torch.tensor([len(feats)], device=dev, dtype=torch.long)
            sid_t = torch.tensor([self.sid], device=dev, dtype=torch.long)
            if coarse is not None and pitchf is not None:
                pt = torch.from_numpy(np.ascontiguousarray(coarse))[None].to(dev, torch.long)
                pf = torch.from_numpy(np.ascontiguousarray(pitchf))[None].to(dev, torch.float32)
                out = self.net_g.infer(phone, lengths, pt, pf, sid_t, generator=gen)[0]
            else:
                out = self.net_g.infer(phone, lengths, sid_t, generator=gen)[0]
            return out[0, 0].float().cpu().numpy()

    def run(self, audio_pad: np.ndarray, segments: Sequence[Segment], trim: int
            ) -> tuple[np.ndarray, float, float]:
        """Every segment converted, `trim` samples cut from each end, joined; with the seconds spent on
        features and on synthesis."""
        pieces: list[np.ndarray] = []
        feat_s = synth_s = 0.0
        for i, seg in enumerate(segments):
            t1 = time.perf_counter()
            feats, coarse, pitchf = self.features(audio_pad[seg.start : seg.stop], seg)
            t2 = time.perf_counter()
            y = self.synthesize(feats, coarse, pitchf, i)
            feat_s += t2 - t1
            synth_s += time.perf_counter() - t2
            pieces.append(y[trim : len(y) - trim])
        audio_opt = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        return audio_opt, feat_s, synth_s


def _finish(audio: np.ndarray, audio_opt: np.ndarray, tgt_sr: int, rms_mix_rate: float,
            resample_sr: int) -> tuple[np.ndarray, int]:
    """RMS envelope mix, optional resampling, int16: (samples, rate)."""
    if rms_mix_rate != 1:
        audio_opt = change_rms(audio, SR, audio_opt, tgt_sr, rms_mix_rate)
    if resample_sr and resample_sr != tgt_sr and resample_sr >= SR:
        from rvc_pipeline.audio import resample

        audio_opt = resample(np.asarray(audio_opt, dtype=np.float32), tgt_sr, resample_sr)
        return to_int16(audio_opt), int(resample_sr)
    return to_int16(audio_opt), tgt_sr


def convert(audio16k: np.ndarray, net_g: SynthesizerTrn, meta: Mapping[str, Any] | None, embedder: Embedder,
            index: Any = None, big_npy: np.ndarray | None = None, *, pitch: float = 0.0,
            f0_method: str = "pm", index_rate: float = RVC_CONVERSION.index_rate,
            protect: float = RVC_CONVERSION.protect, filter_radius: int = RVC_CONVERSION.filter_radius,
            rms_mix_rate: float = RVC_CONVERSION.rms_mix_rate, resample_sr: int = 0, sid: int = 0,
            device: str = "cpu",
            half: bool | None = None, window: Window | None = None, seed: int | None = None,
            f0_weights: WeightFiles | None = None, f0_options: Mapping[str, Any] | None = None,
            info: dict[str, Any] | None = None) -> tuple[np.ndarray, int]:
    """Convert 16 kHz mono audio with a loaded generator; returns (int16 samples, sample rate).

    `meta` gives version ('v1'/'v2'), f0 (bool) and sr (the model's int rate; `load_small_model`'s meta);
    missing entries are read from `net_g`. `index` is a faiss index (used when index_rate != 0) and
    `big_npy` its vectors (default: `index.reconstruct_n(0, ntotal)`). `half` (default: on CUDA) runs
    in fp16 with the fp16 window constants; `window` overrides the constants. `seed` makes the
    generator's noise reproducible. `f0_weights` / `f0_options` go to the pitch method (`extract_f0`).
    `info`, when given, receives segment counts and timings.
    """
    version, has_f0, tgt_sr = _model_meta(net_g, meta)
    check_options(f0_method=f0_method, index_rate=index_rate, protect=protect, rms_mix_rate=rms_mix_rate,
                  resample_sr=resample_sr)
    x = _check_input(audio16k, net_g, sid)
    half = bool(device.startswith("cuda")) if half is None else bool(half)
    win = window or window_for(half)
    net_g, tdev, dtype = _place(net_g, device, half)
    use_index = index is not None and index_rate != 0
    vectors = _index_vectors(index, big_npy, version) if use_index else None
    from rvc_pipeline.audio import high_pass

    t0 = time.perf_counter()
    audio = high_pass(limit_peak(x.astype(np.float64)), SR, "filtfilt")
    cuts = cut_points(audio, win)
    audio_pad = np.pad(audio, (win.t_pad, win.t_pad), mode="reflect")
    p_len = len(audio_pad) // WINDOW
    coarse = pitchf = None
    t_f0 = time.perf_counter()
    if has_f0:
        f0 = extract_f0(audio_pad, p_len, f0_method, filter_radius, device=device, weights=f0_weights,
                        options=f0_options)
        coarse, pitchf = pitch_features(f0[:p_len], pitch)
    f0_s = time.perf_counter() - t_f0 if has_f0 else 0.0
    segments = plan_segments(len(audio_pad), cuts, win)
    job = _Segments(net_g, embedder, version, index if use_index else None, vectors, index_rate, protect,
                    coarse, pitchf, int(sid), tdev, dtype, seed)
    audio_opt, feat_s, synth_s = job.run(audio_pad, segments, win.t_pad_tgt(tgt_sr))
    result, out_sr = _finish(audio, audio_opt, tgt_sr, rms_mix_rate, resample_sr)
    if info is not None:
        info.update({"segments": len(segments), "cuts": [int(c) for c in cuts], "window": win.__dict__.copy(),
                     "half": half, "f0_seconds": round(f0_s, 3), "features_seconds": round(feat_s, 3),
                     "synthesis_seconds": round(synth_s, 3),
                     "pipeline_seconds": round(time.perf_counter() - t0, 3), "index_used": use_index})
    return result, out_sr


# ------------------------------------------------------------------------------------------------
# loading


def _minimal_spec() -> ExperimentSpec:
    from rvc_pipeline.core.spec import ExperimentSpec

    return ExperimentSpec.model_validate({"dataset": {"source": "."}, "storage": {"uri": "."}})


def resolve_embedder(embedder: Any, spec: ExperimentSpec | None, device: str, half: bool,
                     demo_random_weights: bool) -> tuple[Embedder, bool]:
    """An Embedder from an Embedder, a path (file or HF folder) or a weight name (resolve_weight).
    Returns (embedder, random_weights). `half` applies on CUDA only: RVC's inference runs HuBERT in fp32
    on a CPU (the features step's spec.features.cpuBf16 is for training data)."""
    from rvc_pipeline.components.embedders.base import Embedder, load_embedder
    from rvc_pipeline.core.errors import WeightsNotFound
    from rvc_pipeline.weights import DEMO_WARNING, resolve_weight

    gpu_half = half and device.startswith("cuda")
    if isinstance(embedder, Embedder):
        return embedder, False
    ref = str(embedder or "hubert_base.pt")
    try:
        p = Path(ref).expanduser()
        path = p if p.exists() else resolve_weight(ref, spec or _minimal_spec(), what="HuBERT embedder")
    except WeightsNotFound:
        if not demo_random_weights:
            raise
        log.warning(DEMO_WARNING.format(what=f"HuBERT embedder {ref!r}"))
        return load_embedder(None, device, gpu_half), True  # the same weights as the features step
    try:
        return load_embedder(path, device, gpu_half), False
    except (ValueError, RuntimeError, OSError) as e:
        raise InferError(f"{path}: cannot load as a HuBERT embedder ({e})") from e


def _load_training_checkpoint(path: Path, device: str) -> tuple[SynthesizerTrn, dict[str, Any]]:
    """A G_*.pth checkpoint plus the experiment's config.json beside it -> (net_g, meta)."""
    import torch

    from rvc_pipeline.nn import describe_state_dict
    from rvc_pipeline.nn.config import RVCConfig
    from rvc_pipeline.nn.synthesizer import build_generator

    cfg_path = path.parent / CONFIG_FILE
    hint = (f"{path}: this is a training checkpoint (G_*.pth), not an exported voice model; use the exported "
            f"model (logs/<experiment>/{exported_model('<experiment>')}, written by the train step)")
    if not cfg_path.is_file():
        raise InferError(hint + f", or keep the experiment's config.json beside it (not found: {cfg_path})")
    from rvc_pipeline import safeload

    try:
        ckpt = safeload.load(path, what="training checkpoint")
    except safeload.UnreadableFile as e:
        raise InferError(str(e)) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise InferError(f"{path}: not a training checkpoint (no 'model' state dict)")
    sd = {k: v for k, v in ckpt["model"].items() if isinstance(v, torch.Tensor)}
    desc = describe_state_dict(sd)
    if desc["kind"] != "generator" or desc["version"] is None:
        raise InferError(f"{path}: a training checkpoint, but not of an RVC generator (a D_*.pth?); "
                         "use the G_*.pth or the exported model")
    try:
        cfg = RVCConfig.from_json(json.loads(cfg_path.read_text()))
    except (ValueError, json.JSONDecodeError) as e:
        raise InferError(f"{cfg_path}: not an RVC config.json ({e})") from e
    spk = int(sd["emb_g.weight"].shape[0])
    net_g = build_generator(cfg, desc["version"], bool(desc["f0"]), spk_embed_dim=spk)
    net_g.remove_posterior_encoder()
    from rvc_pipeline.nn.weightnorm import to_legacy_names

    weights = {k: v.float() for k, v in to_legacy_names(sd).items() if not k.startswith("enc_q.")}
    own = {k for k in to_legacy_names(dict(net_g.state_dict()))}
    missing = sorted(own - set(weights))
    extra = sorted(set(weights) - own)
    if missing or extra:
        raise InferError(f"{path}: does not fit the model of {cfg_path} (missing {missing[:4]}, "
                         f"unexpected {extra[:4]})")
    try:
        net_g.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        raise InferError(f"{path}: does not fit the model of {cfg_path} ({e})") from e
    net_g = net_g.float().eval().to(device)
    sr = int(cfg.sampling_rate)
    meta = {"version": desc["version"], "f0": bool(desc["f0"]), "sr": sr, "tgt_sr": sr,
            "sr_name": f"{sr // 1000}k", "info": f"{ckpt.get('iteration')}epoch", "format": "checkpoint",
            "spk_embed_dim": spk}
    log.info("%s: training checkpoint loaded with %s (epoch %s)", path, cfg_path, ckpt.get("iteration"))
    return net_g, meta


def load_model(path: str | Path, device: str = "cpu") -> tuple[SynthesizerTrn, dict[str, Any]]:
    """An exported model (RVC's or Applio's small-model format) or a G_*.pth beside its config.json."""
    from rvc_pipeline.export import ModelFileError, load_small_model

    p = Path(path)
    if not p.is_file():
        raise InferError(f"{p}: model file not found" if not p.exists() else f"{p}: not a file")
    try:
        return load_small_model(p, device)
    except ModelFileError as e:
        if "training checkpoint" in str(e):
            return _load_training_checkpoint(p, device)
        raise InferError(f"{e} (is it an RVC voice model .pth?)") from e


def index_path(path: str | Path) -> Path:
    """RVC reads `added_*` indexes only: "trained" in the file name becomes "added"."""
    p = Path(str(path).strip().strip('"').strip())
    if "trained" in p.name:
        q = p.with_name(p.name.replace("trained", "added"))
        log.info("index: %s is an empty trained index; using %s as RVC does", p.name, q.name)
        return q
    return p


def load_index(path: str | Path, version: str) -> tuple[Any, np.ndarray, Path]:
    """faiss.read_index + reconstruct_n(0, ntotal), checked against the model version."""
    import faiss

    given = Path(path)
    p = index_path(given)
    if not p.is_file():
        extra = f" (rewritten from {given})" if p != given else ""
        raise InferError(f"{p}: index file not found{extra}")
    try:
        index = faiss.read_index(str(p))
    except RuntimeError as e:
        raise InferError(f"{p}: not a faiss index ({str(e).splitlines()[0][:200]})") from e
    _check_index(index, version, str(p))
    big_npy = index.reconstruct_n(0, index.ntotal)
    return index, np.asarray(big_npy, dtype=np.float32), p


def write_wav_int16(path: str | Path, x: np.ndarray, sr: int) -> None:
    """16-bit PCM WAV, written atomically."""
    from scipy.io import wavfile  # type: ignore[import-untyped]

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        wavfile.write(f, int(sr), np.asarray(x, dtype=np.int16))


def pitch_weights(method: str, given: WeightFiles | None, spec: ExperimentSpec | None) -> dict[str, str]:
    """The local files of the weights pitch `method` needs (its catalog entry): those `given`, the rest
    found like every weight (the spec's reference, its weights cache, $RVC_WEIGHTS_DIR, ...)."""
    from rvc_pipeline.components.pitch import base as pitch

    have = {name: str(path) for name, path in (given or {}).items() if path}
    if all(name in have for name in PITCH[method].weights):  # the catalog answers without importing it
        return have
    tracker = pitch.get(method)
    spec = spec or _minimal_spec()
    refs = {name: ref for name, ref in tracker.weight_refs(spec).items() if name not in have}
    return {**have, **tracker.resolve_weights(refs, spec)}


@dataclass(frozen=True)
class LoadedModel:
    """Everything a conversion needs, loaded once (`load_for_inference`) for any number of recordings
    (`convert_loaded`): the generator with its meta, the embedder, the index, the pitch weights."""

    model: Path
    net_g: Any
    meta: dict[str, Any]
    embedder: Embedder
    index: Any  # None: no retrieval
    big_npy: np.ndarray | None
    index_file: Path | None
    device: str
    half: bool
    f0_weights: WeightFiles | None
    random_embedder: bool


def load_for_inference(model: str | Path, index: str | Path | None = None, embedder: Any = "hubert_base.pt",
                       spec: ExperimentSpec | None = None, demo_random_weights: bool = False, *,
                       device: str = "auto", half: bool | None = None, f0_method: str = "pm",
                       f0_weights: WeightFiles | None = None,
                       index_rate: float = RVC_CONVERSION.index_rate) -> LoadedModel:
    """Load the model (weight norm folded), the index (only when index_rate != 0), the pitch method's
    weights (`pitch_weights`, for a model with pitch guidance) and the embedder (`resolve_embedder`)."""
    device = pick_device(str(device or "auto"), what="infer")
    half = device.startswith("cuda") if half is None else bool(half)
    net_g, meta = load_model(model, device)
    net_g.remove_weight_norm()
    faiss_index = big_npy = None
    used_index: Path | None = None
    if index not in (None, "") and index_rate != 0:
        assert index is not None
        faiss_index, big_npy, used_index = load_index(index, meta["version"])
    if meta["f0"]:
        f0_weights = pitch_weights(f0_method, f0_weights, spec)
    emb, random_weights = resolve_embedder(embedder, spec, device, half, demo_random_weights)
    return LoadedModel(Path(model), net_g, meta, emb, faiss_index, big_npy, used_index, device, half,
                       f0_weights, random_weights)


def read_input(input_path: str | Path) -> np.ndarray:
    """16 kHz mono float32 samples of a recording (any format ffmpeg reads); InferError names the file."""
    from rvc_pipeline.audio import AudioError, load_audio

    inp = Path(input_path)
    if not inp.is_file():
        raise InferError(f"{inp}: input recording not found")
    try:
        return read_16k(inp, decode=load_audio)
    except AudioError as e:
        raise InferError(str(e)) from e


def convert_loaded(loaded: LoadedModel, audio16k: np.ndarray, **opts: Any
                   ) -> tuple[np.ndarray, int, dict[str, Any]]:
    """`convert` with a loaded model: (int16 samples, rate, the timings `convert` reports). `opts` are
    `convert`'s per-recording options (pitch, f0_method, index_rate, protect, ...)."""
    details: dict[str, Any] = {}
    if loaded.f0_weights is not None:
        opts["f0_weights"] = loaded.f0_weights
    out, out_sr = convert(audio16k, loaded.net_g, loaded.meta, loaded.embedder, loaded.index, loaded.big_npy,
                          device=loaded.device, half=loaded.half, info=details, **opts)
    return out, out_sr, details


def convert_file(model: str | Path, input_path: str | Path, output: str | Path,
                 index: str | Path | None = None, embedder: Any = "hubert_base.pt",
                 spec: ExperimentSpec | None = None,
                 demo_random_weights: bool = False, **opts: Any) -> dict[str, Any]:
    """Convert a recording with an exported model (and optional index); writes a 16-bit WAV.

    `embedder`: an Embedder, a path, or a weight name resolved with `resolve_weight` (the spec's weights
    cache, $RVC_WEIGHTS_DIR, ...); with `demo_random_weights` a missing HuBERT becomes a random one (DEMO
    ONLY, logged). `opts` are `convert`'s keyword options (pitch, f0_method, index_rate, protect,
    filter_radius, rms_mix_rate, resample_sr, sid, device, half, window, seed, f0_weights, f0_options);
    weights the pitch method needs and `f0_weights` does not give are found with `pitch_weights`.
    Returns input/output seconds, the output rate, the wall time and the real-time factor.
    `load_for_inference` + `read_input` + `convert_loaded` are its pieces, for many recordings.
    """
    t0 = time.perf_counter()
    device = pick_device(str(opts.pop("device", "auto") or "auto"), what="infer")
    half = opts.pop("half", None)
    f0_weights = opts.pop("f0_weights", None)
    check_options(**opts)
    inp = Path(input_path)
    if not inp.is_file():
        raise InferError(f"{inp}: input recording not found")
    loaded = load_for_inference(model, index, embedder, spec, demo_random_weights, device=device, half=half,
                                f0_method=str(opts.get("f0_method", "pm")), f0_weights=f0_weights,
                                index_rate=float(opts.get("index_rate", RVC_CONVERSION.index_rate)))
    audio = read_input(inp)
    t_load = time.perf_counter() - t0
    out, out_sr, details = convert_loaded(loaded, audio, **opts)
    write_wav_int16(output, out, out_sr)
    wall = time.perf_counter() - t0
    in_s = len(audio) / SR
    meta = loaded.meta
    result = {
        "output": str(output), "model": str(model), "version": meta["version"], "f0": bool(meta["f0"]),
        "model_sr": int(meta.get("tgt_sr", meta["sr"])),
        "index": str(loaded.index_file) if loaded.index_file else None,
        "input_seconds": round(in_s, 3), "output_seconds": round(len(out) / out_sr, 3), "sr": int(out_sr),
        "samples": int(len(out)), "seconds": round(wall, 3), "load_seconds": round(t_load, 3),
        "realtime_factor": round(in_s / wall, 3) if wall > 0 else None, "device": loaded.device,
        "random_embedder": loaded.random_embedder, **details,
    }
    log.info("infer: %s -> %s (%.2f s in, %.2f s out at %d Hz, %.1f s, %.2fx real time)", inp, output, in_s,
             len(out) / out_sr, out_sr, wall, result["realtime_factor"] or 0)
    return result
