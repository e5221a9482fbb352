"""Audio I/O: ffmpeg decoding (whole and streamed), errors, high-pass, float32 WAVs, resampling, voices."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from rvc_pipeline.audio import (
    WAV_F32_HEADER_BYTES,
    AudioError,
    AudioStream,
    HighPassStream,
    high_pass,
    hp_coefficients,
    load_audio,
    probe_duration,
    resample,
    write_wav_f32,
)
from rvc_pipeline.demo.voices import harmonic_tone, make_tone, make_voice_set
from scipy.io import wavfile
from scipy.signal import butter, lfilter


@pytest.fixture(scope="module")
def speech(voice_dir: Path) -> Path:
    return sorted(voice_dir.glob("*.wav"))[0]


def test_load_audio_at_native_rate_equals_pcm16_over_32768(speech: Path) -> None:
    pcm, sr = sf.read(str(speech), dtype="int16")
    x = load_audio(speech, sr)
    assert x.dtype == np.float32 and x.ndim == 1
    assert len(x) == len(pcm)
    np.testing.assert_array_equal(x, pcm.astype(np.float32) / 32768.0)


def test_load_audio_resamples_and_downmixes(tmp_path: Path, speech: Path) -> None:
    info = sf.info(str(speech))
    x = load_audio(speech, 40000)
    assert abs(len(x) - info.frames * 40000 / info.samplerate) <= 2
    # a stereo file is down-mixed to mono by ffmpeg, which mixes (L+R)/sqrt(2) (as in RVC)
    mono, sr = sf.read(str(speech), dtype="float32")
    st = tmp_path / "stereo.wav"
    sf.write(str(st), np.stack([mono, mono * 0.5], axis=1), sr, subtype="FLOAT")
    y = load_audio(st, sr)
    np.testing.assert_allclose(y, mono * 1.5 / np.sqrt(2), atol=1e-6)


def test_bad_files_raise_audio_error_naming_the_file(tmp_path: Path, speech: Path) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("this is not audio\n")
    head = tmp_path / "header_only.wav"
    head.write_bytes(speech.read_bytes()[:30])
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    for p in (txt, head, empty):
        with pytest.raises(AudioError) as ei:
            load_audio(p, 16000)
        assert str(p) in str(ei.value) and "Invalid data" in str(ei.value)
        assert isinstance(ei.value, ValueError)
        with pytest.raises(AudioError, match=p.name):
            list(AudioStream(p, 16000))
    with pytest.raises(AudioError, match="nothing-here.wav"):
        load_audio(tmp_path / "nothing-here.wav", 16000)


def test_stream_chunks_equal_whole_decode(speech: Path) -> None:
    whole = load_audio(speech, 40000)
    st = AudioStream(speech, 40000, chunk_samples=10007)
    chunks = list(st)
    assert all(len(c) == 10007 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 10007
    np.testing.assert_array_equal(np.concatenate(chunks), whole)
    assert st.samples == len(whole) and st.seconds == pytest.approx(len(whole) / 40000)
    assert st.warnings == []


def test_truncated_data_decodes_with_a_warning(tmp_path: Path, speech: Path) -> None:
    cut = tmp_path / "cut.wav"
    cut.write_bytes(speech.read_bytes()[:100001])  # odd size: half a sample at the end
    st = AudioStream(cut, 32000)
    n = sum(len(c) for c in st)
    assert n == (100001 - 44) // 2
    assert any("corrupt" in w for w in st.warnings)


def test_probe_duration(speech: Path) -> None:
    assert probe_duration(speech) == pytest.approx(sf.info(str(speech)).duration, abs=0.01)
    with pytest.raises(AudioError):
        probe_duration(Path(__file__))


def test_high_pass_is_rvc_butterworth() -> None:
    b, a = hp_coefficients(40000)
    b2, a2 = butter(N=5, Wn=48, btype="high", fs=40000)
    np.testing.assert_array_equal(b, b2)
    np.testing.assert_array_equal(a, a2)
    t = np.arange(40000 * 2) / 40000
    low = np.sin(2 * np.pi * 15 * t)
    mid = np.sin(2 * np.pi * 1000 * t)
    for mode in ("lfilter", "filtfilt"):
        assert np.abs(high_pass(low, 40000, mode)[40000:]).max() < 0.01  # 15 Hz: -40 dB or more
        assert np.abs(high_pass(mid, 40000, mode)[40000:60000]).max() == pytest.approx(1.0, abs=0.01)
    np.testing.assert_array_equal(high_pass(low, 40000, "lfilter"), lfilter(b2, a2, low))
    assert high_pass(low.astype(np.float32), 40000, "none").dtype == np.float64
    with pytest.raises(ValueError, match="allowed values"):
        high_pass(low, 40000, "butter")


def test_high_pass_stream_equals_whole_file_filter() -> None:
    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    hp = HighPassStream(40000, "lfilter")
    parts = [hp(x[i: i + 7777]) for i in range(0, len(x), 7777)]
    np.testing.assert_allclose(np.concatenate(parts), high_pass(x, 40000, "lfilter"), rtol=0, atol=1e-12)


def test_write_wav_f32_is_scipy_float32_and_atomic(tmp_path: Path) -> None:
    x = np.linspace(-1, 1, 1001)
    p = tmp_path / "a.wav"
    write_wav_f32(p, x, 40000)
    buf = io.BytesIO()
    wavfile.write(buf, 40000, x.astype(np.float32))
    assert p.read_bytes() == buf.getvalue()
    assert p.stat().st_size == WAV_F32_HEADER_BYTES + 4 * 1001
    sr, y = wavfile.read(p)
    assert sr == 40000 and y.dtype == np.float32
    assert list(tmp_path.iterdir()) == [p]


@pytest.mark.parametrize("n", [148000, 40001, 12345, 7])
def test_resample_equals_librosa_default(n: int) -> None:
    import librosa

    x = np.random.default_rng(n).standard_normal(n) * 0.3
    y = resample(x, 40000, 16000)
    ref = librosa.resample(x, orig_sr=40000, target_sr=16000)
    assert len(y) == len(ref) == math.ceil(n * 16000 / 40000)
    np.testing.assert_array_equal(y, ref)
    assert y.dtype == np.float64
    np.testing.assert_array_equal(resample(x, 16000, 16000), x)


def test_tone_has_its_pitch(tmp_path: Path) -> None:
    p = make_tone(tmp_path / "t.wav", 220.0, 1.0, 16000)
    x, sr = sf.read(str(p))
    assert sr == 16000 and len(x) == 16000
    spec = np.abs(np.fft.rfft(x))
    assert np.fft.rfftfreq(len(x), 1 / sr)[spec.argmax()] == pytest.approx(220.0, abs=1.0)
    assert np.abs(x).max() == pytest.approx(0.5, abs=1e-3)
    assert harmonic_tone(7000.0, 0.1, 16000).size == 1600  # harmonics above Nyquist are left out


def test_voice_set_is_deterministic_speech(tmp_path: Path) -> None:
    a = make_voice_set(tmp_path / "a", n_files=2, seconds_each=4.0, seed=7)
    b = make_voice_set(tmp_path / "b", n_files=2, seconds_each=4.0, seed=7)
    assert [p.name for p in a] == [p.name for p in b]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    for p in a:
        x, sr = sf.read(str(p))
        assert sr == 32000 and 3.0 <= len(x) / sr <= 9.0
        assert 0.4 < np.abs(x).max() <= 0.91
        # real speech: energy in speech frames, near-silence in the pauses
        frames = x[: len(x) // 480 * 480].reshape(-1, 480)
        rms = np.sqrt((frames ** 2).mean(axis=1))
        assert (rms > 0.02).mean() > 0.3 and (rms < 1e-3).mean() > 0.05
