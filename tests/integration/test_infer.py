"""`rvc-pipeline infer`: RVC's inference pipeline on real (espeak-ng) speech with random weights.

Most pipeline checks run the real pipeline (ffmpeg, filtfilt, pm f0, a small 768/256-d HuBERT, faiss)
in front of a recording stand-in for the generator (`SpyGenerator`: it keeps the features, pitch and f0
it is given and returns p_len * hop samples, as `net_g.infer` does), so the arithmetic can be checked on
45 s of audio quickly. Real generators (full-size exported v2 40k / v1 32k, small hand-written RVC and
Applio files, a G_ checkpoint) run end to end on short inputs.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
import torch
from rvc_pipeline import cli
from rvc_pipeline.audio import high_pass, load_audio
from rvc_pipeline.components.embedders.base import Embedder
from rvc_pipeline.export import export_small_model
from rvc_pipeline.infer import (
    FP32_WINDOW,
    InferError,
    Window,
    change_rms,
    convert,
    convert_file,
    cut_points,
    extract_f0,
    limit_peak,
    pitch_features,
    plan_segments,
    protect_mask,
    retrieve_features,
    to_int16,
    transpose_f0,
)
from rvc_pipeline.nn import build_generator, constructor_args, get_config
from rvc_pipeline.nn.synthesizer import SynthesizerTrn
from rvc_pipeline.steps.f0 import coarse_f0, compute_f0
from rvc_pipeline.steps.index import build_index
from scipy.io import wavfile
from scipy.signal import medfilt

from tests.support.fairseq_hubert import HubertConfig, HubertModel, save_fairseq_checkpoint, to_embedder

SMALL_CONV = [(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2  # HuBERT's strides, narrow channels
TEXT = "The quick brown fox jumps over the lazy dog."
LONG_TEXT = (
    "Voice conversion keeps what is said and changes who says it. The content features come from a "
    "self supervised speech model, the pitch comes from the source, and a neural vocoder renders the "
    "result in the target voice. A retrieval index pulls the features towards the training data, which "
    "makes the timbre closer to the target speaker. Long recordings are cut at quiet points so that "
    "each piece fits in memory, and the pieces are joined again after conversion. "
)


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Small models on a shared 2-core machine run several times faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _say(path: Path, text: str, speed: int = 165, pitch: int = 50) -> Path:
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", str(speed), "-p", str(pitch), "-w", str(path), text],
                   check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("speech")
    return {
        "short": _say(d / "short.wav", "Hello there.", speed=200),
        "medium": _say(d / "medium.wav", TEXT),
        "other": _say(d / "other.wav", "Sphinx of black quartz, judge my vow.", pitch=80),
        "long": _say(d / "long.wav", LONG_TEXT * 2, speed=150),
    }


def tiny_hubert(seed: int = 0) -> HubertModel:
    """HuBERT with the real strides and output widths (768 / final_proj 256), 2 narrow layers."""
    torch.manual_seed(seed)
    cfg = HubertConfig(conv_layers=SMALL_CONV, embed_dim=768, ffn_dim=256, heads=12, layers=2, conv_pos=16,
                       conv_pos_groups=16, final_dim=256)
    return HubertModel(cfg).eval()


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return to_embedder(tiny_hubert())


@pytest.fixture(scope="module")
def hubert_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny HuBERT in fairseq's hubert_base.pt file format."""
    return save_fairseq_checkpoint(tiny_hubert(), tmp_path_factory.mktemp("hubert") / "hubert_small.pt")


def tiny_config_list(version: str, sr: str, spk: int = 4) -> list[Any]:
    """RVC's 18 constructor arguments with narrow layers (same upsampling, so the same hop and rate)."""
    a = constructor_args(get_config(version, sr), spk_embed_dim=spk, segment_frames=32)
    a[2], a[3], a[4], a[5], a[6], a[13], a[16] = 16, 16, 32, 2, 1, 32, 16
    return a


def tiny_generator(version: str = "v2", sr: str = "40k", f0: bool = True, seed: int = 0) -> SynthesizerTrn:
    torch.manual_seed(seed)
    g = SynthesizerTrn(*tiny_config_list(version, sr), version=version, f0=f0).eval()
    g.remove_posterior_encoder()
    return g


class SpyGenerator(torch.nn.Module):
    """Stands in for net_g: records what `infer` gets, returns p_len * hop samples of a sine."""

    def __init__(self, version: str = "v2", sr: int = 40000, f0: bool = True, spk: int = 4) -> None:
        super().__init__()
        self.version, self.sr, self.use_f0, self.spk_embed_dim = version, sr, f0, spk
        self.hop_length = sr // 100
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[dict[str, Any]] = []

    def infer(self, *args: Any, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        if self.use_f0:
            phone, lengths, pitch, nsff0, sid = args
            call = {"pitch": pitch[0].numpy().copy(), "pitchf": nsff0[0].numpy().copy()}
        else:
            phone, lengths, sid = args
            call = {}
        call.update(phone=phone[0].float().numpy().copy(), n=int(lengths[0]), sid=int(sid[0]))
        self.calls.append(call)
        n = call["n"] * self.hop_length
        t = torch.arange(n, dtype=torch.float32) / self.sr
        return (0.3 * torch.sin(2 * math.pi * 220 * t)).view(1, 1, n), None


def hubert_frames(n: int) -> int:
    return (n - 400) // 320 + 1 if n >= 400 else 0


def expected_length(n_in: int, tgt_sr: int, win: Window, cuts: list[int]) -> int:
    """Output samples by RVC's segment arithmetic: each segment gives min(len//160, 2*HuBERT frames)
    frames of tgt_sr/100 samples, less t_pad_tgt at both ends."""
    t_pad, hop = 16000 * win.x_pad, tgt_sr // 100
    n_pad = n_in + 2 * t_pad
    lengths, s = [], 0
    for c in cuts:
        t = c // 160 * 160
        lengths.append(t + 2 * t_pad + 160 - s)
        s = t
    lengths.append(n_pad - s)
    return sum(min(n // 160, 2 * hubert_frames(n)) * hop - 2 * tgt_sr * win.x_pad for n in lengths)


def read_wav(path: Path) -> tuple[int, np.ndarray]:
    sr, y = wavfile.read(str(path))
    return int(sr), y


# ---- pure pieces -------------------------------------------------------------------------------


def test_cut_points_pick_the_quietest_frame_near_each_mark() -> None:
    win = Window(1, 1, 3, 4)  # cut every 3 s within +-1 s, for inputs over 4 s
    rng = np.random.default_rng(0)
    x = 0.3 * rng.standard_normal(16000 * 7 + 123)
    quiet = [16000 * 3 + 5000, 16000 * 6 - 7000]  # inside [t - 1 s, t + 1 s] of the 3 s and 6 s marks
    for q in quiet:
        x[q : q + 400] = 0.0
    cuts = cut_points(x, win)
    assert len(cuts) == 2
    for c, q in zip(cuts, quiet):
        # audio_sum[i] covers x[i-80 : i+80]: its zero run lies at q+80 .. q+400-80; the first minimum wins
        assert c == q + 80
    assert cut_points(x[: 16000 * 4 - 160], win) == []  # padded length 4 s exactly: no cut
    segs = plan_segments(len(x) + 2 * win.t_pad, cuts, win)
    assert [(s.start, s.stop) for s in segs] == [
        (0, cuts[0] // 160 * 160 + 2 * 16000 + 160),
        (cuts[0] // 160 * 160, cuts[1] // 160 * 160 + 2 * 16000 + 160),
        (cuts[1] // 160 * 160, len(x) + 2 * 16000),
    ]
    assert segs[0].f0_stop == (cuts[0] // 160 * 160 + 32000) // 160 and segs[-1].f0_stop is None


def test_pitch_transpose_doubles_f0_and_coarse_follows(speech: dict[str, Path]) -> None:
    x = high_pass(limit_peak(load_audio(speech["medium"], 16000).astype(np.float64)), 16000, "filtfilt")
    x = np.pad(x, (16000, 16000), mode="reflect")
    f0 = compute_f0(x, "pm", len(x) // 160)
    assert (f0 > 0).mean() > 0.3  # real speech is voiced
    coarse0, pf0 = pitch_features(f0, 0)
    coarse12, pf12 = pitch_features(f0, 12)
    assert pf12.dtype == np.float32 and coarse12.dtype == np.int64
    np.testing.assert_allclose(pf12, 2 * pf0, rtol=1e-6)
    np.testing.assert_array_equal(coarse12, coarse_f0(2 * f0))  # coarse mapped after transposing
    voiced = f0 > 0
    assert (coarse12[voiced] > coarse0[voiced]).all() and (coarse12[~voiced] == 1).all()
    # harvest: median filter (kernel 3) over harvest's own len//160 + 1 frames only when filter_radius > 2
    p_len = len(x) // 160
    raw = compute_f0(x, "harvest", p_len + 1)
    np.testing.assert_array_equal(extract_f0(x, p_len, "harvest", 3), medfilt(raw, 3)[:p_len])
    np.testing.assert_array_equal(extract_f0(x, p_len, "harvest", 2), raw[:p_len])
    assert not np.array_equal(medfilt(raw, 3), raw)
    with pytest.raises(InferError, match="rmvpe.pt"):
        extract_f0(x, p_len, "rmvpe")
    np.testing.assert_allclose(transpose_f0(np.array([100.0, 0.0]), -12), [50.0, 0.0])
    np.testing.assert_allclose(transpose_f0(np.array([100.0]), 7), [100 * 2 ** (7 / 12)])


def test_retrieval_weights_and_guards() -> None:
    rng = np.random.default_rng(1)
    big = rng.standard_normal((300, 16)).astype(np.float32)
    flat = faiss.IndexFlatL2(16)
    flat.add(big)
    q = rng.standard_normal((5, 16)).astype(np.float32)
    got = retrieve_features(q, flat, big)
    d = ((q[:, None, :] - big[None]) ** 2).sum(-1)
    ix = np.argsort(d, axis=1)[:, :8]
    w = 1.0 / np.take_along_axis(d, ix, 1) ** 2
    want = (big[ix] * (w / w.sum(1, keepdims=True))[..., None]).sum(1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # an exact match (distance 0) takes all the weight instead of producing NaN
    exact = retrieve_features(big[[7, 42]], flat, big)
    np.testing.assert_allclose(exact, big[[7, 42]], atol=1e-6)
    # IVF with nprobe 1 and a tiny list returns -1 ids: they get no weight
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(16), 16, 2)
    few = np.concatenate([big[:3] + 50.0, big[3:40] - 50.0]).astype(np.float32)
    ivf.train(few)
    ivf.add(few)
    ivf.nprobe = 1
    _, ids = ivf.search(few[:1], 8)
    assert (ids == -1).any()
    res = retrieve_features(few[:1] + 0.01, ivf, few)
    assert np.isfinite(res).all()
    dd = ((few[:3] - (few[0] + 0.01)) ** 2).sum(-1)
    ww = 1 / dd**2
    np.testing.assert_allclose(res[0], (few[:3] * (ww / ww.sum())[:, None]).sum(0), rtol=1e-4)


def test_protect_mask_rms_mix_and_int16() -> None:
    np.testing.assert_array_equal(protect_mask(np.array([0.0, 0.5, 1.0, 220.0]), 0.33),
                                  np.array([0.33, 0.33, 1.0, 1.0], dtype=np.float32))
    sr_in, sr_out = 16000, 40000
    t_in, t_out = np.arange(sr_in * 3) / sr_in, np.arange(sr_out * 3) / sr_out
    src = np.sin(2 * np.pi * 200 * t_in) * np.where(t_in < 1.5, 0.5, 0.05)  # loud then quiet
    out = (0.2 * np.sin(2 * np.pi * 300 * t_out)).astype(np.float32)
    keep = change_rms(src, sr_in, out.copy(), sr_out, 1.0)
    np.testing.assert_allclose(keep, out, rtol=1e-5, atol=1e-7)
    imposed = change_rms(src, sr_in, out.copy(), sr_out, 0.0)
    # 7 envelope points stretched over the output (RVC's interpolation): points 1-2 sit at 0.64 s and 1.07 s
    # (loud), points 4-5 at 1.93 s and 2.36 s (quiet)
    seg = slice(int(0.7 * sr_out), int(1.0 * sr_out)), slice(int(2.0 * sr_out), int(2.3 * sr_out))
    rms = [float(np.sqrt(np.mean(imposed[s] ** 2))) for s in seg]
    assert rms[0] == pytest.approx(0.5 / np.sqrt(2), rel=0.05)
    assert rms[1] == pytest.approx(0.05 / np.sqrt(2), rel=0.05)
    y = to_int16(np.array([0.0, 0.5, -2.0]))
    assert y.dtype == np.int16 and y[2] == -32440 and y[1] == 8110  # scaled to a 0.99 peak
    assert to_int16(np.array([0.5]))[0] == 16384  # quiet enough: unscaled


# ---- the pipeline (spy generator) ------------------------------------------------------------


def test_lengths_rates_and_pitch_through_the_pipeline(speech: dict[str, Path], embedder: Embedder) -> None:
    x = load_audio(speech["medium"], 16000)
    spy = SpyGenerator()
    y, sr = convert(x, spy, None, embedder, pitch=0, index_rate=0, protect=0.5)  # protect off: exact x2
    assert sr == 40000 and y.dtype == np.int16 and np.abs(y).max() > 1000
    assert len(y) == expected_length(len(x), 40000, FP32_WINDOW, [])
    call = spy.calls[0]
    n = call["n"]
    assert call["phone"].shape == (n, 768) and call["pitch"].shape == call["pitchf"].shape == (n,)
    np.testing.assert_array_equal(call["phone"][0::2], call["phone"][1::2])  # x2 nearest upsampling
    np.testing.assert_array_equal(call["pitch"], coarse_f0(call["pitchf"]))
    y12, _ = convert(x, spy, None, embedder, pitch=12, index_rate=0, protect=0.5)
    pf0, pf12 = spy.calls[0]["pitchf"], spy.calls[1]["pitchf"]
    assert (pf0 > 0).sum() > n // 4
    np.testing.assert_allclose(pf12, 2 * pf0, rtol=1e-6)  # +12 semitones doubles what the generator gets
    np.testing.assert_array_equal(spy.calls[1]["phone"], call["phone"])  # features do not depend on pitch
    for rate in (16000, 44100):
        yr, sr_r = convert(x, spy, None, embedder, resample_sr=rate, index_rate=0)
        assert sr_r == rate and len(yr) == math.ceil(len(y) * rate / 40000)
    assert len(convert(x, spy, None, embedder, resample_sr=40000, index_rate=0)[0]) == len(y)
    # a v1 model without f0 gets 256-d features and no pitch, at its own rate
    spy1 = SpyGenerator("v1", 32000, f0=False)
    y1, sr1 = convert(x, spy1, None, embedder, index_rate=0)
    assert sr1 == 32000 and len(y1) == expected_length(len(x), 32000, FP32_WINDOW, [])
    assert spy1.calls[0]["phone"].shape[1] == 256 and "pitchf" not in spy1.calls[0]


def test_long_input_is_cut_and_keeps_its_length(speech: dict[str, Path], embedder: Embedder) -> None:
    x = load_audio(speech["long"], 16000)
    assert len(x) > 16000 * 41, len(x) / 16000  # longer than x_max of the fp32 constants
    spy = SpyGenerator()
    info: dict[str, Any] = {}
    y, sr = convert(x, spy, None, embedder, index_rate=0, info=info)
    cuts = info["cuts"]
    hp = high_pass(limit_peak(x.astype(np.float64)), 16000, "filtfilt")
    assert cuts == cut_points(hp, FP32_WINDOW) and len(cuts) == (len(x) - 1) // (16000 * 38) >= 1
    assert info["segments"] == len(cuts) + 1 == len(spy.calls)
    for k, c in enumerate(cuts, 1):
        assert abs(c - k * 38 * 16000) <= 6 * 16000
    assert len(y) == expected_length(len(x), 40000, FP32_WINDOW, cuts)
    assert abs(len(y) / 40000 - len(x) / 16000) < 0.1
    # f0 is computed once on the whole padded input and sliced per segment
    total = np.concatenate([c["pitchf"] for c in spy.calls])
    assert (total > 0).sum() > 1000


def test_index_mixing_and_protect(speech: dict[str, Path], embedder: Embedder) -> None:
    x = load_audio(speech["medium"], 16000)
    spy = SpyGenerator()
    convert(x, spy, None, embedder, index_rate=0, protect=0.5)
    own = spy.calls[-1]["phone"][0::2].copy()  # the 20 ms features of this input
    same_index, _ = build_index(own.copy(), seed=0)
    convert(x, spy, None, embedder, same_index, index_rate=1.0, protect=0.5)
    np.testing.assert_allclose(spy.calls[-1]["phone"], spy.calls[0]["phone"], atol=1e-4)  # found itself
    # an index of another recording pulls the features towards it
    other = embedder.extract(load_audio(speech["other"], 16000), "v2")[0]
    other_index, _ = build_index(other.copy(), seed=0)
    big = other_index.reconstruct_n(0, other_index.ntotal)
    convert(x, spy, None, embedder, other_index, index_rate=1.0, protect=0.5)
    full = spy.calls[-1]["phone"]
    assert np.abs(full - spy.calls[0]["phone"]).max() > 0.1
    np.testing.assert_allclose(full[0::2], retrieve_features(own, other_index, big), atol=1e-5)
    convert(x, spy, None, embedder, other_index, big, index_rate=0.25, protect=0.5)
    np.testing.assert_allclose(spy.calls[-1]["phone"], 0.25 * full + 0.75 * spy.calls[0]["phone"], atol=1e-5)
    # protect < 0.5: unvoiced frames keep mostly the un-retrieved features, voiced ones are retrieved
    convert(x, spy, None, embedder, other_index, index_rate=1.0, protect=0.2)
    prot = spy.calls[-1]
    unvoiced = prot["pitchf"] < 1
    assert unvoiced.any() and (~unvoiced).any()
    np.testing.assert_allclose(prot["phone"][~unvoiced], full[~unvoiced], atol=1e-5)
    np.testing.assert_allclose(prot["phone"][unvoiced],
                               0.2 * full[unvoiced] + 0.8 * spy.calls[0]["phone"][unvoiced], atol=1e-5)
    with pytest.raises(InferError, match="256-d vectors"):
        v1_index, _ = build_index(embedder.extract(x, "v1")[0].copy(), seed=0)
        convert(x, spy, None, embedder, v1_index, index_rate=0.5)


# ---- real generators and files ---------------------------------------------------------------


def _run_cli(*args: str) -> int:
    return cli.main(["infer", *args])


@pytest.fixture(scope="module")
def v2_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full-size v2 40k f0 generator with random weights, exported in RVC's small-model format."""
    torch.manual_seed(0)
    g = build_generator(get_config("v2", "40k"), "v2", True)
    path = tmp_path_factory.mktemp("models") / "rand_v2_40k.pth"
    export_small_model(g.state_dict(), get_config("v2", "40k"), "v2", True, path, "1epoch")
    return path


def test_cli_converts_with_exported_v2_model_and_index(tmp_path: Path, speech: dict[str, Path],
                                                       v2_model: Path, hubert_file: Path, embedder: Embedder,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    x = load_audio(speech["short"], 16000)
    feats = embedder.extract(x, "v2")[0]
    index, _ = build_index(np.concatenate([feats, feats + 0.5]).astype(np.float32), seed=0)
    added = tmp_path / "added_IVF1_Flat_nprobe_1_demo_v2.index"
    faiss.write_index(index, str(added))
    out = tmp_path / "out" / "converted.wav"
    rc = _run_cli("--model", str(v2_model), "--input", str(speech["short"]), "--output", str(out),
                  "--index", str(tmp_path / "trained_IVF1_Flat_nprobe_1_demo_v2.index"),  # read as added_
                  "--embedder", str(hubert_file), "--device", "cpu", "--pitch", "3")
    assert rc == 0, capsys.readouterr().err
    sr, y = read_wav(out)
    assert sr == 40000 and y.dtype == np.int16 and np.abs(y).max() > 100
    assert len(y) == expected_length(len(x), 40000, FP32_WINDOW, [])
    assert "converted" in capsys.readouterr().out


def test_exported_v1_no_f0_32k_model(tmp_path: Path, speech: dict[str, Path], hubert_file: Path) -> None:
    torch.manual_seed(1)
    g = build_generator(get_config("v1", "32k"), "v1", False)
    model = tmp_path / "rand_v1_32k.pth"
    export_small_model(g.state_dict(), get_config("v1", "32k"), "v1", False, model, "1epoch")
    x = load_audio(speech["short"], 16000)
    info = convert_file(model, speech["short"], tmp_path / "o.wav", embedder=hubert_file, resample_sr=44100,
                        device="cpu", seed=0)
    assert info["f0"] is False and info["version"] == "v1" and info["model_sr"] == 32000
    sr, y = read_wav(tmp_path / "o.wav")
    n32 = expected_length(len(x), 32000, FP32_WINDOW, [])
    assert sr == 44100 and len(y) == math.ceil(n32 * 44100 / 32000) == info["samples"]
    assert np.abs(y).max() > 100


def _hand_written(path: Path, applio: bool = False, version: str = "v2", sr: str = "40k", f0: bool = True,
                  seed: int = 3) -> Path:
    """A small generator saved by hand in RVC's exact small-model layout (or Applio's variant)."""
    g = tiny_generator(version, sr, f0, seed=seed)
    ckpt: OrderedDict[str, Any] = OrderedDict()
    ckpt["weight"] = OrderedDict((k, v.half()) for k, v in g.state_dict().items() if "enc_q" not in k)
    ckpt["config"] = tiny_config_list(version, sr)
    ckpt["info"] = "20epoch"
    ckpt["sr"] = int(sr[:-1]) * 1000 if applio else sr
    ckpt["f0"] = f0 if applio else int(f0)
    ckpt["version"] = version
    if applio:
        ckpt.update(epoch=20, step=400, model_name="x", vocoder="HiFi-GAN", embedder_model="contentvec")
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def small_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _hand_written(tmp_path_factory.mktemp("small") / "small_v2_40k.pth")


def test_hand_written_rvc_file_converts_reproducibly(tmp_path: Path, speech: dict[str, Path],
                                                     embedder: Embedder, small_model_file: Path) -> None:
    x = load_audio(speech["short"], 16000)
    info = convert_file(small_model_file, speech["short"], tmp_path / "o.wav", embedder=embedder,
                        device="cpu", seed=0, index_rate=0)
    sr, y = read_wav(tmp_path / "o.wav")
    assert sr == 40000 and len(y) == expected_length(len(x), 40000, FP32_WINDOW, []) and np.abs(y).max() > 100
    assert info["version"] == "v2" and info["f0"] is True and info["samples"] == len(y)
    convert_file(small_model_file, speech["short"], tmp_path / "o2.wav", embedder=embedder, device="cpu",
                 seed=0, index_rate=0)
    np.testing.assert_array_equal(read_wav(tmp_path / "o2.wav")[1], y)  # seeded noise: reproducible


def test_applio_v1_no_f0_file_with_random_demo_embedder(tmp_path: Path, speech: dict[str, Path],
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RVC_OFFLINE", "1")
    monkeypatch.setenv("RVC_WEIGHTS_DIR", str(tmp_path / "cache"))
    model = _hand_written(tmp_path / "applio_v1_32k.pth", applio=True, version="v1", sr="32k", f0=False)
    x = load_audio(speech["short"], 16000)
    # no HuBERT anywhere: exit 3 naming the file, unless demo mode allows random weights
    rc = _run_cli("--model", str(model), "--input", str(speech["short"]), "--output", str(tmp_path / "o.wav"))
    assert rc == 3 and "hubert_base.pt" in capsys.readouterr().err and not (tmp_path / "o.wav").exists()
    info = convert_file(model, speech["short"], tmp_path / "o.wav", embedder="hubert_base.pt",
                        demo_random_weights=True, resample_sr=16000, device="cpu", seed=0)
    assert info["random_embedder"] is True and info["f0"] is False and info["version"] == "v1"
    assert info["model_sr"] == 32000 and info["sr"] == 16000
    sr, y = read_wav(tmp_path / "o.wav")
    n32 = expected_length(len(x), 32000, FP32_WINDOW, [])
    assert sr == 16000 and len(y) == n32 // 2 == info["samples"] and np.abs(y).max() > 100
    assert info["input_seconds"] == pytest.approx(len(x) / 16000, abs=1e-3)
    assert info["realtime_factor"] == pytest.approx(info["input_seconds"] / info["seconds"], rel=0.05)


def test_training_checkpoint_with_its_config_converts(tmp_path: Path, speech: dict[str, Path],
                                                      embedder: Embedder) -> None:
    cfg = get_config("v2", "40k").to_json()
    a = tiny_config_list("v2", "40k")
    cfg["model"].update(inter_channels=a[2], hidden_channels=a[3], filter_channels=a[4], n_heads=a[5],
                        n_layers=a[6], upsample_initial_channel=a[13], gin_channels=a[16])
    exp = tmp_path / "logs" / "exp"
    exp.mkdir(parents=True)
    torch.manual_seed(0)
    g = SynthesizerTrn(*a, version="v2", f0=True)
    torch.save({"model": g.state_dict(), "iteration": 3, "optimizer": {}, "learning_rate": 1e-4},
               exp / "G_30.pth")
    # without config.json: a clear message
    with pytest.raises(InferError, match="training checkpoint"):
        convert_file(exp / "G_30.pth", speech["short"], tmp_path / "o.wav", embedder=embedder)
    (exp / "config.json").write_text(json.dumps(cfg))
    info = convert_file(exp / "G_30.pth", speech["short"], tmp_path / "o.wav", embedder=embedder,
                        index_rate=0)
    assert info["sr"] == 40000 and info["samples"] > 0 and info["f0"] is True


def test_bad_inputs_give_clear_errors(tmp_path: Path, speech: dict[str, Path], small_model_file: Path,
                                      hubert_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    v2_model = small_model_file
    out = str(tmp_path / "o.wav")
    base = ["--input", str(speech["short"]), "--output", out, "--embedder", str(hubert_file)]

    def err(*args: str) -> str:
        assert _run_cli(*args) == 2
        return capsys.readouterr().err

    assert "nope.pth: model file not found" in err("--model", str(tmp_path / "nope.pth"), *base)
    junk = tmp_path / "junk.pth"
    torch.save({"foo": torch.zeros(3)}, junk)
    assert "junk.pth" in (e := err("--model", str(junk), *base)) and "weight" in e
    (tmp_path / "text.pth").write_text("hello")
    assert "text.pth" in err("--model", str(tmp_path / "text.pth"), *base)
    assert "missing.wav: input recording not found" in err(
        "--model", str(v2_model), "--input", str(tmp_path / "missing.wav"), "--output", out)
    (tmp_path / "notaudio.wav").write_text("not audio at all")
    assert "notaudio.wav" in err("--model", str(v2_model), "--input", str(tmp_path / "notaudio.wav"),
                                 "--output", out, "--embedder", str(hubert_file))
    assert "none.index: index file not found" in err("--model", str(v2_model), *base, "--index",
                                                     str(tmp_path / "none.index"))
    idx256 = faiss.IndexFlatL2(256)
    idx256.add(np.zeros((4, 256), dtype=np.float32))
    faiss.write_index(idx256, str(tmp_path / "v1.index"))
    e = err("--model", str(v2_model), *base, "--index", str(tmp_path / "v1.index"))
    assert "v1.index: 256-d vectors (v1), but the model is v2 (768-d" in e
    assert "protect must be within" in err("--model", str(v2_model), *base, "--protect", "0.7")
    assert "sid 200 out of range" in err("--model", str(v2_model), *base, "--sid", "200")
    assert not Path(out).exists()


def test_cli_converts_with_fcpe(tmp_path: Path, speech: dict[str, Path], small_model_file: Path,
                                hubert_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--f0-method fcpe (a method added as one file in components/pitch) drives the conversion."""
    from rvc_pipeline.components.pitch import fcpe

    try:
        fcpe.asset_path()
    except fcpe.FCPEError:
        pytest.skip("the torchfcpe wheel (its bundled weights) is not installed")
    x = load_audio(speech["short"], 16000)
    outs = {}
    for method in ("fcpe", "pm"):
        outs[method] = tmp_path / f"{method}.wav"
        rc = _run_cli("--model", str(small_model_file), "--input", str(speech["short"]), "--output",
                      str(outs[method]), "--embedder", str(hubert_file), "--device", "cpu",
                      "--f0-method", method)
        assert rc == 0, capsys.readouterr().err
    sr, y = read_wav(outs["fcpe"])
    assert sr == 40000 and len(y) == expected_length(len(x), 40000, FP32_WINDOW, []) and np.abs(y).max() > 100
    assert not np.array_equal(y, read_wav(outs["pm"])[1])  # another pitch track, another output
    xp = np.pad(x.astype(np.float64), (16000, 16000), mode="reflect")
    p_len = len(xp) // 160
    np.testing.assert_array_equal(extract_f0(xp, p_len, "fcpe"), compute_f0(xp, "fcpe", p_len))


def test_cli_eval_scores_a_model_on_folders(tmp_path: Path, speech: dict[str, Path], v2_model: Path,
                                            hubert_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`rvc-pipeline eval`: every source file converted and scored; a same-named target file is the truth."""
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    src.mkdir()
    tgt.mkdir()
    for name in ("short", "medium"):
        (src / f"{name}.wav").write_bytes(speech[name].read_bytes())
    (tgt / "medium.wav").write_bytes(speech["medium"].read_bytes())  # parallel recording of one source
    (tgt / "other.wav").write_bytes(speech["other"].read_bytes())
    (tgt / "notes.txt").write_text("not audio")  # skipped
    rc = cli.main(["eval", "--model", str(v2_model), "--target", str(tgt), "--source", str(src),
                   "--embedder", str(hubert_file), "--device", "cpu", "--metrics", "mel_l1,f0", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    res = json.loads(out.out)
    assert res["files"] == 2 and set(res["per_file"]) == {"short.wav", "medium.wav"}
    assert "mel_l1" in res["per_file"]["medium.wav"] and "mel_l1" not in res["per_file"]["short.wav"]
    rmse = res["metrics"]["f0_rmse_cents"]  # null when no frame is voiced in both (a random model)
    assert (rmse is None or rmse >= 0) and 0 <= res["metrics"]["voicing_error"] <= 1
    rc = cli.main(["eval", "--model", str(v2_model), "--target", str(tgt), "--source", str(src),
                   "--embedder", str(hubert_file), "--device", "cpu", "--metrics", "mel_l1"])
    table = capsys.readouterr().out
    assert rc == 0 and "all files" in table and "medium.wav" in table
    # careless input: one clear line, exit 2
    for bad in (["--source", str(tmp_path / "missing")], ["--target", str(tgt / "other.wav")],
                ["--metrics", "no_such_metric"]):
        args = {"--target": str(tgt), "--source": str(src), "--metrics": "mel_l1"}
        args.update(dict(zip(bad[::2], bad[1::2])))
        rc = cli.main(["eval", "--model", str(v2_model), "--embedder", str(hubert_file), "--device", "cpu",
                       *[x for kv in args.items() for x in kv]])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
