"""Voice metrics (rvc_pipeline.components.metrics) on real speech, and careless inputs (issue 10).

Speech: synthesiser voices (flite, espeak-ng, festival; two recordings = two different sets of sentences
per voice), the voice_dir fixture and the CMU Arctic sample. Everything runs offline: the speaker encoder
and DNSMOS weights come from the resemblyzer and speechmos wheels.
"""

from __future__ import annotations

import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from rvc_pipeline.components.metrics import base
from rvc_pipeline.components.metrics.base import Clip, MetricInputError, Pair
from rvc_pipeline.demo.voices import SENTENCES, Voice, synthesize, voice_available

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOICES = (Voice("flite", "slt"), Voice("flite", "awb"), Voice("flite", "rms"),
          Voice("espeak-ng", "en-us", pitch=40, speed=160), Voice("festival", "kal_diphone"))


def noisy(x: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    n = np.random.default_rng(seed).standard_normal(len(x)).astype(np.float32)
    n *= np.sqrt(np.mean(x**2) / np.mean(n**2)) / 10 ** (snr_db / 20)
    return (x + n).astype(np.float32)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Clip, Clip]]:
    """Per voice, two recordings with no sentence in common (3 sentences each)."""
    out = {}
    for v in [v for v in VOICES if voice_available(v)]:
        clips = synthesize(v, SENTENCES[:6], tmp_path_factory.mktemp(v.label))
        sr = clips[0][1]
        a, b = (np.concatenate([c for c, _ in clips[k : k + 3]]) for k in (0, 3))
        out[v.label] = (Clip(a, sr, name=f"{v.label} A"), Clip(b, sr, name=f"{v.label} B"))
    if len(out) < 3:
        pytest.skip("fewer than 3 synthesiser voices installed")
    return out


@pytest.fixture(scope="module")
def arctic(arctic_wav: Path) -> Clip:
    x, sr = sf.read(str(arctic_wav), dtype="float32")
    return Clip(x, sr, name="arctic_a0007")


@pytest.fixture(scope="module")
def voice32k(voice_dir: Path) -> Clip:
    return Clip.from_file(sorted(voice_dir.glob("*.wav"))[0])


# --- spectral -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mel_l1", "mrstft"])
def test_spectral_distance_is_zero_for_identical_audio_and_grows_with_noise(name: str, voice32k: Clip
                                                                           ) -> None:
    m = base.get(name)
    x, sr = voice32k.audio, voice32k.sr
    values = [m.score([Pair(Clip(noisy(x, snr) if snr else x, sr), voice32k)])[name]
              for snr in (0, 40, 20, 0.1)]
    assert values[0] == 0.0
    assert values[1] > 0.05 and values[1] < values[2] < values[3], values


def test_mrstft_parts_and_pooling(voice32k: Clip) -> None:
    m = base.get("mrstft")
    y = Clip(noisy(voice32k.audio, 20), voice32k.sr)
    one = m.score([Pair(y, voice32k)])
    assert one["mrstft"] == pytest.approx(one["mrstft_sc"] + one["mrstft_mag"])
    two = m.score([Pair(y, voice32k), Pair(voice32k, voice32k)])  # equal lengths: the mean of 0 and one
    assert two["mrstft"] == pytest.approx(one["mrstft"] / 2, rel=1e-6)


def test_spectral_resamples_the_converted_clip_to_the_reference_rate(voice32k: Clip) -> None:
    from rvc_pipeline.audio import resample

    m = base.get("mel_l1")
    down = Clip(resample(voice32k.audio, voice32k.sr, 40000), 40000)
    assert m.score([Pair(down, voice32k)])["mel_l1"] < 0.5 * m.score(
        [Pair(Clip(noisy(voice32k.audio, 20), voice32k.sr), voice32k)])["mel_l1"]


def test_mel_settings_are_rvcs_own_at_its_rates() -> None:
    from rvc_pipeline.components.metrics.spectral import mel_settings

    assert mel_settings(40000) == (2048, 400, 125) and mel_settings(32000) == (1024, 320, 80)
    n_fft, hop, mels = mel_settings(44100)
    assert n_fft == 4096 and hop == 440 and mels == 80 and (n_fft - hop) % 2 == 0


# --- speaker --------------------------------------------------------------------------------------------

def test_speaker_similarity_same_voice_is_clearly_higher_than_other_voices(
        recordings: dict[str, tuple[Clip, Clip]]) -> None:
    from rvc_pipeline.components.metrics import speaker

    m = base.get("speaker_sim")
    emb = {label: [speaker.embed(m.net, base.to_16k(c)) for c in rec] for label, rec in recordings.items()}
    first, (a, b) = next(iter(recordings.items()))
    assert m.score([Pair(a, b)])["speaker_sim"] == pytest.approx(float(np.dot(*emb[first])), abs=1e-6)
    for label, (ea, _) in emb.items():
        same = float(np.dot(ea, emb[label][1]))
        others = {o: float(np.dot(ea, e[1])) for o, e in emb.items() if o != label}
        assert same > 0.9, (label, same)
        assert same > max(others.values()) + 0.1, (label, same, others)


def test_speaker_network_matches_resemblyzer(arctic: Clip, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our network + mel + partials == Resemblyzer's VoiceEncoder.embed_utterance on the same audio
    (resemblyzer imported with a stand-in for webrtcvad, which only its silence trimming uses)."""
    pytest.importorskip("librosa")
    monkeypatch.setitem(sys.modules, "webrtcvad", types.ModuleType("webrtcvad"))
    for mod in [k for k in sys.modules if k.startswith("resemblyzer")]:
        monkeypatch.delitem(sys.modules, mod)
    resemblyzer = pytest.importorskip("resemblyzer")
    from rvc_pipeline.components.metrics import speaker

    wav = speaker.preprocess(arctic.audio)
    want = resemblyzer.VoiceEncoder("cpu", verbose=False).embed_utterance(wav)
    got = speaker.embed(speaker.load_encoder(), arctic.audio)
    assert got is not None and np.abs(got - want).max() < 1e-5


def test_speaker_silence(recordings: dict[str, tuple[Clip, Clip]]) -> None:
    m = base.get("speaker_sim")
    a, b = next(iter(recordings.values()))
    silence = Clip(np.zeros(32000, np.float32), a.sr, name="silent.wav")
    assert m.score([Pair(silence, b)])["speaker_sim"] == 0.0  # a silent output scores worst
    assert m.score([Pair(silence, b), Pair(a, b)])["speaker_sim"] == pytest.approx(
        m.score([Pair(a, b)])["speaker_sim"] / 2)
    with pytest.raises(MetricInputError, match=r"silent.wav: speaker_sim: the reference holds no speech"):
        m.score([Pair(a, silence)])


# --- DNSMOS ---------------------------------------------------------------------------------------------

def test_dnsmos_clean_speech_scores_higher_than_noisy(arctic: Clip, voice32k: Clip) -> None:
    m = base.get("dnsmos", hop_seconds=9.0)  # one 9 s window per clip here (the 1 s hop: see below)
    for clip in (arctic, voice32k):
        clean = m.score([Pair(clip)])
        noisy10 = m.score([Pair(Clip(noisy(clip.audio, 10), clip.sr))])
        assert 1.0 < clean["dnsmos_ovrl"] < 5.0
        assert clean["dnsmos_ovrl"] > noisy10["dnsmos_ovrl"] + 0.4, (clean, noisy10)
        assert clean["dnsmos_bak"] > noisy10["dnsmos_bak"] + 1.0, (clean, noisy10)


def test_dnsmos_matches_speechmos(arctic: Clip) -> None:
    pytest.importorskip("requests")  # imported (unused) by speechmos.dnsmos
    from speechmos import dnsmos as reference

    ten_seconds = np.tile(arctic.audio, 4)[:160000]  # one window (the model is slow on a busy CPU)
    want = reference.run(ten_seconds, 16000)
    got = base.get("dnsmos").score([Pair(Clip(ten_seconds, 16000))])
    for ours, theirs in (("dnsmos_sig", "sig_mos"), ("dnsmos_bak", "bak_mos"), ("dnsmos_ovrl", "ovrl_mos")):
        assert got[ours] == pytest.approx(float(want[theirs]), abs=1e-3)


def test_dnsmos_silence_and_loud_audio_give_defined_scores(arctic: Clip) -> None:
    m = base.get("dnsmos", hop_seconds=9.0)
    for x in (np.zeros(8000, np.float32), arctic.audio * 4, np.full(100, 0.1, np.float32)):
        got = m.score([Pair(Clip(x, 16000))])
        assert all(np.isfinite(v) and 0.5 < v < 5.5 for v in got.values()), got
    with pytest.raises(ValueError, match="hop_seconds"):
        base.get("dnsmos", hop_seconds=0)


# --- pitch ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def octave_up(arctic: Clip) -> Clip:
    """arctic_a0007 resynthesised by WORLD with f0 x 2 (+12 semitones), same timing."""
    import pyworld

    x = arctic.audio.astype(np.float64)
    f0, sp, ap = pyworld.wav2world(x, arctic.sr, frame_period=5.0)
    y = pyworld.synthesize(f0 * 2.0, sp, ap, arctic.sr, frame_period=5.0)[: len(x)]
    return Clip(y.astype(np.float32), arctic.sr, name="octave up")


def test_f0_rmse_of_a_12_semitone_transpose(arctic: Clip, octave_up: Clip) -> None:
    m = base.get("f0")
    against_transposed = m.score([Pair(octave_up, arctic, transpose=12)])
    against_input = m.score([Pair(octave_up, arctic)])
    assert against_transposed["f0_rmse_cents"] < 60, against_transposed
    assert against_transposed["voicing_error"] < 0.15
    assert 1100 < against_input["f0_rmse_cents"] < 1300, against_input
    assert m.score([Pair(arctic, arctic)]) == {"f0_rmse_cents": 0.0, "voicing_error": 0.0}


def test_f0_uses_given_tracks_exactly() -> None:
    audio = np.zeros(16000, np.float32)
    f_in = np.array([0, 100, 200, 100, 0, 0, 150, 150, 150, 150.0])
    f_out = np.array([0, 0, 200, 100, 120, 0, 150, 150, 150, 150.0]) * 2 ** (50 / 1200)
    got = base.get("f0").score([Pair(Clip(audio, 16000, f0=f_out), Clip(audio, 16000, f0=f_in), 0.0)])
    assert got["f0_rmse_cents"] == pytest.approx(50.0) and got["voicing_error"] == pytest.approx(0.2)


def test_f0_silent_output_scores_nan_rmse_and_full_voicing_error(arctic: Clip) -> None:
    got = base.get("f0").score([Pair(Clip(np.zeros_like(arctic.audio), 16000), arctic)])
    assert np.isnan(got["f0_rmse_cents"]) and got["voicing_error"] > 0.3
    with pytest.raises(ValueError, match="f0 method 'nope'"):
        base.get("f0", method="nope")


# --- registry, offline loading --------------------------------------------------------------------------

def test_registry_lists_every_metric_and_refuses_unknown_names() -> None:
    assert set(base.METRICS) == {"mel_l1", "mrstft", "speaker_sim", "dnsmos", "f0"}
    for name in base.METRICS:
        m = base.get(name)
        assert m.name == name and m.primary in m.keys
        assert m.reference in (base.REF_TRUTH, base.REF_SPEAKER, base.REF_INPUT, base.REF_NONE)
    with pytest.raises(ValueError, match="'pesq': expected one of dnsmos, f0, mel_l1, mrstft, speaker_sim"):
        base.get("pesq")
    with pytest.raises(ValueError, match=r"metric 'mel_l1': options \['n_fft'\]: got an unexpected keyword"):
        base.get("mel_l1", n_fft=1024)


def test_weights_load_from_the_wheels_with_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    from rvc_pipeline.components.metrics import dnsmos, speaker

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network used")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert "site-packages" in str(speaker.asset_path()) and "site-packages" in str(dnsmos.model_path())
    net = speaker.load_encoder()
    assert net.linear.weight.shape == (256, 256)
    assert dnsmos.load_session().get_inputs()[0].shape == ["N", dnsmos.WINDOW]


def test_missing_or_broken_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from rvc_pipeline.components.metrics import dnsmos, speaker
    from rvc_pipeline.core.errors import WeightsNotFound

    monkeypatch.setenv("RVC_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsNotFound, match="pip install --no-deps resemblyzer"):
        speaker.asset_path()
    with pytest.raises(WeightsNotFound, match="pip install speechmos"):
        dnsmos.model_path()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(dnsmos.DNSMOSError, match="bad.onnx: not a usable ONNX model"):
        dnsmos.load_session(bad)
    with pytest.raises(speaker.SpeakerEncoderError, match="bad.onnx"):
        speaker.load_encoder(bad)


# --- careless inputs ------------------------------------------------------------------------------------

CARELESS_CLIPS = {
    "empty": (lambda: Clip(np.zeros(0, np.float32), 16000, name="x.wav"), "x.wav: empty audio"),
    "nan": (lambda: Clip(np.array([0.0, np.nan] * 100), 16000, name="x.wav"), "NaN or infinite"),
    "inf": (lambda: Clip(np.array([0.0, np.inf] * 100), 16000, name="x.wav"), "NaN or infinite"),
    "stereo": (lambda: Clip(np.zeros((16000, 2)), 16000, name="x.wav"), r"mono 1-D audio, got shape \(1"),
    "text": (lambda: Clip(np.array(["a", "b"]), 16000, name="x.wav"), "numeric samples, got dtype <U1"),
    "rate 0": (lambda: Clip(np.zeros(100), 0, name="x.wav"), "sample rate 0"),
    "rate float": (lambda: Clip(np.zeros(100), 16000.5, name="x.wav"), "sample rate 16000.5"),  # type: ignore[arg-type]
    "rate bool": (lambda: Clip(np.zeros(100), True, name="x.wav"), "sample rate True"),
    "rate too low": (lambda: Clip(np.zeros(100), 4000, name="x.wav"), "from 8000 to 192000 Hz"),
    "f0 nan": (lambda: Clip(np.zeros(100), 16000, f0=np.array([np.nan]), name="x.wav"), "f0 must be finite"),
    "f0 negative": (lambda: Clip(np.zeros(100), 16000, f0=np.array([-1.0]), name="x.wav"), "f0 must be"),
    "f0 2-D": (lambda: Clip(np.zeros(100), 16000, f0=np.zeros((2, 2)), name="x.wav"), "f0 must be a 1-D"),
    "f0 text": (lambda: Clip(np.zeros(100), 16000, f0=["a"], name="x.wav"), "f0 must be numbers"),
    "transpose nan": (lambda: Pair(Clip(np.zeros(100), 16000, name="x.wav"), None, float("nan")),
                      "transpose nan: expected a finite number"),
}


@pytest.mark.parametrize("case", list(CARELESS_CLIPS))
def test_careless_clips_are_refused_with_one_line(case: str) -> None:
    make, message = CARELESS_CLIPS[case]
    with pytest.raises(MetricInputError, match=message) as err:
        make()
    assert "\n" not in str(err.value) and str(err.value).startswith("x.wav: ")


def test_integer_pcm_is_scaled_to_full_range() -> None:
    pcm = np.array([0, 16384, -32768, 32767], np.int16)
    assert np.allclose(Clip(pcm, 16000).audio, [0.0, 0.5, -1.0, 32767 / 32768])


def test_from_file_mixes_stereo_down_and_refuses_garbage(tmp_path: Path) -> None:
    t = np.arange(16000) / 16000
    left, right = np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)
    sf.write(tmp_path / "st.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    clip = Clip.from_file(tmp_path / "st.wav")
    assert clip.audio.ndim == 1 and np.allclose(clip.audio, (left + right) / 2, atol=1e-6)
    (tmp_path / "junk.wav").write_bytes(b"RIFF....junk")
    with pytest.raises(MetricInputError, match=r"junk.wav: not a readable sound file"):
        Clip.from_file(tmp_path / "junk.wav")


@pytest.mark.parametrize("name", ["mel_l1", "mrstft", "speaker_sim", "f0"])
def test_metrics_that_need_a_reference_say_so(name: str) -> None:
    clip = Clip(np.zeros(16000, np.float32), 16000, name="out.wav")
    with pytest.raises(MetricInputError, match=f"pair 0 \\(out.wav\\): {name} needs a reference clip"):
        base.get(name).score([Pair(clip)])


@pytest.mark.parametrize("name", list(base.METRICS))
def test_an_empty_batch_is_refused(name: str) -> None:
    with pytest.raises(MetricInputError, match=f"{name}: no clips to score"):
        base.get(name).score([])


@pytest.mark.parametrize("name", ["mel_l1", "mrstft", "f0"])
def test_lengths_too_different_are_refused(name: str, arctic: Clip) -> None:
    half = Clip(arctic.audio[: len(arctic.audio) // 2], arctic.sr, name="half.wav")
    with pytest.raises(MetricInputError, match=r"pair 0 \(half.wav\).*differ in length by more than 10%"):
        base.get(name).score([Pair(half, arctic)])
    slightly = Clip(arctic.audio[: int(len(arctic.audio) * 0.95)], arctic.sr)  # an RVC output a bit short
    assert np.isfinite(base.get(name).score([Pair(slightly, arctic)])[base.get(name).primary])


def test_spectral_silence_and_too_short_clips(arctic: Clip) -> None:
    silence = Clip(np.zeros(16000, np.float32), 16000)
    assert base.get("mel_l1").score([Pair(silence, silence)])["mel_l1"] == 0.0
    assert base.get("mrstft").score([Pair(silence, silence)])["mrstft"] == 0.0
    assert base.get("mrstft").score([Pair(silence, Clip(arctic.audio[:16000], 16000))])["mrstft"] > 1
    tiny = Clip(np.zeros(1000, np.float32), 16000, name="tiny.wav")
    with pytest.raises(MetricInputError, match=r"tiny.wav\): mrstft: 1000 samples is too short"):
        base.get("mrstft").score([Pair(tiny, tiny)])
