"""RVC's silence slicer: constants, RMS, and the cut rules (checked against a literal frame loop)."""

from __future__ import annotations

import numpy as np
import pytest
from rvc_pipeline.audio import load_audio
from rvc_pipeline.demo.voices import harmonic_tone
from rvc_pipeline.slicer import Slicer, frame_rms

from tests.support.rvc_port import SlicerFrames, rms_frames, slice_audio
from tests.support.rvc_port import slicer_tags as _oracle_tags  # RVC's frame loop, as an oracle

SR = 40000


def _signal(plan: list[tuple[str, float]], sr: int = SR, seed: int = 0) -> np.ndarray:
    """'t' = tone (220 Hz harmonics, peak 0.5), 's' = silence with a -80 dB noise floor."""
    rng = np.random.default_rng(seed)
    parts = []
    for kind, sec in plan:
        n = int(round(sec * sr))
        if kind == "t":
            parts.append(harmonic_tone(220.0, sec, sr)[:n].astype(np.float64))
        else:
            parts.append(rng.standard_normal(n) * 1e-4)
    return np.concatenate(parts)


@pytest.mark.parametrize("sr,hop,win", [(32000, 480, 1920), (40000, 600, 2400), (48000, 720, 2880)])
def test_frame_constants(sr: int, hop: int, win: int) -> None:
    sl = Slicer(sr)
    assert (sl.hop, sl.win) == (hop, win)
    assert (sl.min_length, sl.min_interval, sl.max_sil_kept) == (100, 27, 33)
    assert sl.threshold == pytest.approx(0.0079433, rel=1e-4)


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError, match="min_length >= min_interval"):
        Slicer(SR, min_length_ms=300, min_interval_ms=400)
    with pytest.raises(ValueError, match="max_sil_kept"):
        Slicer(SR, max_sil_kept_ms=5)


def test_rms_matches_librosa() -> None:
    import librosa

    x = np.random.default_rng(1).standard_normal(SR * 2 + 123) * 0.1
    ours = frame_rms(x, 2400, 600)
    ref = librosa.feature.rms(y=x, frame_length=2400, hop_length=600, center=True, pad_mode="constant")[0]
    assert ours.shape == ref.shape == (1 + len(x) // 600,)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-12)


def test_two_clips_and_dropped_middle_silence() -> None:
    # 2 s tone, 2 s silence (> 2*max_sil_kept frames: the middle is dropped), 2 s tone
    x = _signal([("t", 2.0), ("s", 2.0), ("t", 2.0)])
    b = Slicer(SR).bounds(x)
    assert len(b) == 2
    (a0, e0), (a1, e1) = b
    assert a0 == 0 and e1 == len(x)
    # cuts keep at most max_sil_kept (0.5 s) of silence next to the speech, plus one window
    assert 2.0 * SR <= e0 <= 2.56 * SR
    assert 3.44 * SR <= a1 <= 4.0 * SR
    assert e0 % 600 == 0 and a1 % 600 == 0


def test_short_silence_is_not_cut_and_short_clip_is_not_cut() -> None:
    sl = Slicer(SR)
    # 0.25 s pause < min_interval (0.4 s): one chunk
    assert sl.bounds(_signal([("t", 2.0), ("s", 0.25), ("t", 2.0)])) == [(0, int(4.25 * SR))]
    # 0.6 s pause, but clip start to pause end is 1.2 s < min_length 1.5 s: no cut
    x = _signal([("t", 0.6), ("s", 0.6), ("t", 2.0)])
    assert sl.bounds(x) == [(0, len(x))]


def test_leading_silence_rules() -> None:
    sl = Slicer(SR)
    # leading silence of 0.3 s (<= max_sil_kept): kept in the first chunk
    x = _signal([("s", 0.3), ("t", 2.0)])
    assert sl.bounds(x) == [(0, len(x))]
    # leading silence of 1.5 s: cut, the chunk starts at most 0.5 s (+ a window) before the tone
    x = _signal([("s", 1.5), ("t", 2.0)])
    b = sl.bounds(x)
    assert len(b) == 1
    assert 1.0 * SR - 2400 <= b[0][0] <= 1.5 * SR and b[0][1] == len(x)


def test_trailing_silence_rules() -> None:
    sl = Slicer(SR)
    # trailing 0.3 s < min_interval: kept
    x = _signal([("t", 2.0), ("s", 0.3)])
    assert sl.bounds(x) == [(0, len(x))]
    # trailing 1.5 s: cut within the first max_sil_kept frames of the silence
    x = _signal([("t", 2.0), ("s", 1.5)])
    b = sl.bounds(x)
    assert len(b) == 1 and b[0][0] == 0
    assert 2.0 * SR - 2400 <= b[0][1] <= 2.5 * SR + 600


def test_all_silence_gives_no_chunk_and_tiny_input_is_returned_whole() -> None:
    sl = Slicer(SR)
    assert sl.bounds(np.zeros(SR * 3)) == []
    assert sl.slice(np.zeros(SR * 3)) == []
    assert sl.bounds(np.ones(100)) == [(0, 100)]  # RVC's early exit compares samples with frames


@pytest.mark.parametrize("seed", range(6))
def test_tags_equal_rvc_frame_loop_on_random_layouts(seed: int) -> None:
    rng = np.random.default_rng(seed)
    plan: list[tuple[str, float]] = []
    for k in range(14):
        kind = "t" if k % 2 == (seed % 2) else "s"
        plan.append((kind, float(rng.choice([0.1, 0.3, 0.45, 0.6, 0.8, 1.0, 1.6, 2.5]))))
    x = _signal(plan, seed=seed)
    sl = Slicer(SR)
    rms = frame_rms(x, sl.win, sl.hop)
    assert sl.tags(rms) == _oracle_tags(rms, sl)


def test_tags_equal_rvc_frame_loop_on_speech(voice_dir) -> None:  # noqa: ANN001
    for p in sorted(voice_dir.glob("*.wav")):
        x = load_audio(p, SR).astype(np.float64)
        sl = Slicer(SR)
        rms = frame_rms(x, sl.win, sl.hop)
        tags = sl.tags(rms)
        assert tags == _oracle_tags(rms, sl)
        chunks = sl.slice(x)
        assert 1 <= len(chunks) <= 6
        assert sum(len(c) for c in chunks) <= len(x)


def test_slicer_from_spec_uses_spec_values() -> None:
    from rvc_pipeline.core.spec import SlicerSpec

    sl = Slicer.from_spec(48000, SlicerSpec(threshold_db=-30, min_length_ms=2000, min_interval_ms=300,
                                            hop_size_ms=10, max_sil_kept_ms=200))
    assert (sl.hop, sl.win, sl.min_length, sl.min_interval, sl.max_sil_kept) == (480, 1920, 200, 30, 20)
    assert sl.threshold == pytest.approx(10 ** (-30 / 20))


@pytest.mark.parametrize("sr", [32000, 40000, 48000])
def test_chunks_equal_rvc_port_bit_for_bit_on_speech(voice_dir, sr: int) -> None:  # noqa: ANN001
    """The test-side port of RVC's Slicer (constants, RMS in RVC's frame layout, loop, chunks) gives the
    very same chunks: the frame RMS is bit-identical, so no near-tie can cut elsewhere."""
    ours, port = Slicer(sr), SlicerFrames(sr)
    assert (ours.hop, ours.win, ours.min_length, ours.min_interval, ours.max_sil_kept) == (
        port.hop, port.win, port.min_length, port.min_interval, port.max_sil_kept)
    for p in sorted(voice_dir.glob("*.wav")):
        x = load_audio(p, sr).astype(np.float64)
        np.testing.assert_array_equal(frame_rms(x, ours.win, ours.hop), rms_frames(x, port.win, port.hop))
        got, want = ours.slice(x), slice_audio(x, port)
        assert len(got) == len(want) >= 1
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
