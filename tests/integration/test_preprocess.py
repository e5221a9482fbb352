"""Step 2a (preprocess): RVC's segmentation and normalisation, and the step on real speech and bad inputs."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rvc_pipeline.audio import load_audio, resample
from rvc_pipeline.core.errors import StepFailed
from rvc_pipeline.core.spec import Experiment, parse_manifest
from rvc_pipeline.progress import read_events
from rvc_pipeline.steps import preprocess as pp
from rvc_pipeline.steps.runner import run_step
from scipy.io import wavfile

from tests.support import rvc_port

SR = 40000


def _exp(source: Path | str, store: Path, name: str = "pp", workers: int = 2, **pre: Any) -> Experiment:
    spec: dict[str, Any] = {
        "dataset": {"source": str(source)},
        "storage": {"uri": str(store)},
        "model": {"sampleRate": "40k"},
        "resources": {"device": "cpu", "parallelism": workers},
    }
    if pre:
        spec["preprocess"] = pre
    return parse_manifest({"apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment",
                           "metadata": {"name": name}, "spec": spec})


def _copy_voices(voice_dir: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for p in sorted(voice_dir.glob("*.wav")):
        shutil.copy2(p, dest / p.name)
    return dest


def _pieces(exp_dir: Path, sub: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((exp_dir / sub).glob("*.wav"))}


# -------------------------------------------------------------------------------- pure functions


def test_segments_lengths_hop_and_tail() -> None:
    x = np.arange(int(11.5 * SR), dtype=np.float64)
    seg = pp.Segmenter(SR, 3.7, 0.3)
    out = seg.segments(x)
    hop = int(SR * (3.7 - 0.3))
    # 11.5 s: pieces start at 0, 3.4, 6.8 s; the rest at 6.8 s (4.7 s) > 4.0 s, so one more full
    # piece, then the tail from 10.2 s (1.3 s)
    assert [int(s[0]) for _, s in out] == [0, hop, int(SR * 3.4 * 2), int(SR * 3.4 * 3)]
    assert [len(s) for _, s in out[:-1]] == [int(3.7 * SR)] * 3
    assert len(out[-1][1]) == len(x) - int(SR * 3.4 * 3)
    # 0.3 s overlap between consecutive pieces
    assert out[0][1][-1] - out[1][1][0] + 1 == int(0.3 * SR)
    # numbering quirk: full pieces 0, 1, 2, then the tail after one more increment
    assert [i for i, _ in out] == [0, 1, 2, 4]


def test_numbering_quirk_and_rvc_overwrite_fix() -> None:
    short, long_ = np.ones(2 * SR), np.ones(int(5.0 * SR))
    # a short chunk is written as _1; the next short chunk as _2
    seg = pp.Segmenter(SR)
    assert [i for i, _ in seg.segments(short)] == [1]
    assert [i for i, _ in seg.segments(short)] == [2]
    # RVC: chunk [full, tail] -> 0, 2; the next chunk's first full piece also gets 2 (RVC overwrites)
    rvc = pp.Segmenter(SR, fix_overwrite=False)
    ids = [i for c in (long_, long_) for i, _ in rvc.segments(c)]
    assert ids == [0, 2, 2, 4] and rvc.collisions == 1
    fixed = pp.Segmenter(SR)
    ids = [i for c in (long_, long_) for i, _ in fixed.segments(c)]
    assert ids == [0, 2, 3, 5] and fixed.collisions == 1 and len(set(ids)) == 4
    # exactly 4.0 s (= per + overlap) is not longer than the tail: one piece
    assert [len(s) for _, s in pp.Segmenter(SR).segments(np.ones(4 * SR))] == [4 * SR]


def test_normalisation_formula_and_peak_skip() -> None:
    x = np.sin(np.linspace(0, 20, 1000)) * 0.3
    m = np.abs(x).max()
    y = pp.normalize(x)
    np.testing.assert_allclose(y, 0.675 * x / m + 0.25 * x, rtol=1e-12)
    assert np.abs(y).max() == pytest.approx(0.675 + 0.25 * m)
    assert pp.normalize(x * 2.5 / m) is not None  # exactly 2.5 is kept
    assert pp.normalize(x * 2.51 / m) is None
    assert pp.normalize(np.zeros(100)) is None  # RVC would write NaNs


def test_min_train_samples_matches_rvc_sampler() -> None:
    for sr in (32000, 40000, 48000):
        n = pp.min_train_samples(sr)
        hop = sr // 100
        size = lambda k: 58 + 4 * k  # noqa: E731 - file bytes of a float32 WAV from scipy
        assert size(n) // (3 * hop) > 100 and size(n - 1) // (3 * hop) <= 100
        assert 0.75 < n / sr < 0.76


def test_preprocess_audio_peak_filter_keeps_numbering(voice_dir: Path) -> None:
    x = load_audio(sorted(voice_dir.glob("*.wav"))[2], SR)
    ref = pp.preprocess_audio(x, SR)
    loud = pp.preprocess_audio(x * 20.0, SR)  # float audio far beyond full scale: every piece filtered
    assert ref and loud == []
    for idx1, piece in ref:
        assert piece.dtype == np.float64
        assert 0.675 < np.abs(piece).max() <= 0.925
        assert len(piece) <= int(4.0 * SR) + 1
        assert idx1 >= 0


def test_streamed_blocks_equal_whole_file_when_short(tmp_path: Path, voice_dir: Path) -> None:
    src = sorted(voice_dir.glob("*.wav"))[1]
    for sub in (pp.GT_DIR, pp.WAV16_DIR):
        (tmp_path / sub).mkdir()
    rep = pp.process_file(pp.FileJob(3, src.name, str(src), str(tmp_path), pp.Params(SR, drop_short=False)))
    ref = pp.preprocess_audio(load_audio(src, SR), SR)
    got = _pieces(tmp_path, pp.GT_DIR)
    assert sorted(got) == sorted(f"3_{i}.wav" for i, _ in ref)
    assert rep.pieces == len(ref)
    for i, piece in ref:
        sr, y = wavfile.read(tmp_path / pp.GT_DIR / f"3_{i}.wav")
        assert sr == SR
        np.testing.assert_array_equal(y, piece.astype(np.float32))


def test_blocks_are_cut_in_silences(tmp_path: Path, voice_dir: Path) -> None:
    # about 60 s of speech in 5 s blocks: nothing lost, cuts land in pauses
    files = sorted(voice_dir.glob("*.wav"))
    x = np.concatenate([load_audio(p, SR) for p in files * 2]).astype(np.float64)
    sl = pp.Slicer(SR)
    blocks = list(pp.blocks_at_silences((x[i: i + 30000] for i in range(0, len(x), 30000)), sl, 5 * SR))
    assert len(blocks) >= 5
    assert sum(len(b) for b in blocks) == len(x)
    assert all(len(b) <= 5 * SR for b in blocks)
    pos = 0
    for b in blocks[:-1]:
        pos += len(b)
        around = x[pos - 300: pos + 300]
        if len(b) < 5 * SR:  # cut at a silence, not at the block limit
            assert np.sqrt(np.mean(around ** 2)) < sl.threshold


# -------------------------------------------------------------------------------- the step


def test_run_on_real_speech_rerun_and_force(tmp_path: Path, voice_dir: Path) -> None:
    data = _copy_voices(voice_dir, tmp_path / "data")
    (data / "nested").mkdir()
    shutil.copy2(sorted(voice_dir.glob("*.wav"))[0], data / "nested" / "zz_ignored.wav")
    store = tmp_path / "store"
    exp = _exp(data, store)
    summary = run_step(exp, "preprocess", pp.run)
    exp_dir = store / "logs" / "pp"
    gt, w16 = _pieces(exp_dir, pp.GT_DIR), _pieces(exp_dir, pp.WAV16_DIR)
    report = json.loads((exp_dir / pp.REPORT).read_text())
    assert report["files_total"] == 4 and report["files_used"] == 4 and report["skipped_files"] == []
    assert summary["pieces"] == report["pieces"] == len(gt) == len(w16) >= 6
    assert set(gt) == set(w16)
    assert {n.split("_")[0] for n in gt} == {"0", "1", "2", "3"}  # the nested file got no index
    names = sorted(p.name for p in data.iterdir() if p.is_file())
    assert [f["name"] for f in report["files"]] == names
    total = 0.0
    for name in sorted(gt):
        sr, y = wavfile.read(exp_dir / pp.GT_DIR / name)
        sr16, z = wavfile.read(exp_dir / pp.WAV16_DIR / name)
        assert (sr, sr16) == (SR, 16000) and y.dtype == z.dtype == np.float32
        assert pp.min_train_samples(SR) <= len(y) <= 4 * SR
        assert 0.67 < np.abs(y).max() < 0.93
        assert len(z) == math.ceil(len(y) * 16000 / SR)
        np.testing.assert_allclose(z, resample(y.astype(np.float64), SR, 16000), atol=2e-6)
        total += len(y) / SR
    assert report["piece_seconds"] == pytest.approx(total, abs=0.01)
    per_file = {f["name"]: f for f in report["files"]}
    for p in data.glob("*.wav"):
        assert per_file[p.name]["duration_s"] == pytest.approx(len(load_audio(p, SR)) / SR, abs=1e-3)
    events = read_events(exp_dir / "progress.jsonl", "preprocess")
    prog = [e for e in events if e["event"] == "progress"]
    assert [e["files_done"] for e in prog] == [1, 2, 3, 4] and prog[-1]["files_total"] == 4
    assert prog[-1]["audio_seconds"] == pytest.approx(report["input_seconds"], abs=0.01)
    log = (exp_dir / pp.LOGFILE).read_text()
    assert log.count("-> Success") == 4

    # rerun: skipped thanks to the marker, nothing rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in (exp_dir / pp.GT_DIR).iterdir()}
    again = run_step(exp, "preprocess", pp.run)
    assert again.get("skipped") is True
    assert {p.name: p.stat().st_mtime_ns for p in (exp_dir / pp.GT_DIR).iterdir()} == mtimes

    # forced rerun with one process and a stale piece lying around: identical files, stale one gone
    (exp_dir / pp.GT_DIR / "9_99.wav").write_bytes(b"stale")
    forced = run_step(_exp(data, store, workers=1), "preprocess", pp.run, force=True)
    assert "skipped" not in forced
    assert _pieces(exp_dir, pp.GT_DIR) == gt and _pieces(exp_dir, pp.WAV16_DIR) == w16


def test_bad_inputs_are_skipped_and_reported(tmp_path: Path, voice_dir: Path) -> None:
    data = _copy_voices(voice_dir, tmp_path / "data")
    good = sorted(voice_dir.glob("*.wav"))[0].read_bytes()
    (data / "a_readme.txt").write_text("not audio at all\n")
    (data / "b_broken.wav").write_bytes(good[:30])
    wavfile.write(data / "c_silence.wav", 32000, np.zeros(32000 * 3, dtype=np.int16))
    x = load_audio(sorted(voice_dir.glob("*.wav"))[0], 32000)
    loud = np.flatnonzero(np.abs(x) > 0.05)
    wavfile.write(data / "d_short.wav", 32000, x[loud[0]: loud[0] + 16000])  # 0.5 s of speech
    (data / "sub").mkdir()
    (data / "sub" / "e.txt").write_text("sub-folders are ignored")
    store = tmp_path / "store"
    run_step(_exp(data, store), "preprocess", pp.run)
    exp_dir = store / "logs" / "pp"
    report = json.loads((exp_dir / pp.REPORT).read_text())
    names = sorted(p.name for p in data.iterdir() if p.is_file())
    assert report["files_total"] == len(names) == 8 and report["files_used"] == 4
    reasons = {s["name"]: s["reason"] for s in report["skipped_files"]}
    assert set(reasons) == {"a_readme.txt", "b_broken.wav", "c_silence.wav", "d_short.wav"}
    assert reasons["a_readme.txt"].startswith("not audio or corrupt")
    assert "Invalid data" in reasons["a_readme.txt"]
    assert reasons["b_broken.wav"].startswith("not audio or corrupt")
    assert reasons["c_silence.wav"].startswith("all silence")
    assert reasons["d_short.wav"].startswith("too short to train on")
    # idx0 is the position in the sorted file listing: the speech files (00_..03_) are 0..3
    gt = _pieces(exp_dir, pp.GT_DIR)
    assert {n.split("_")[0] for n in gt} == {"0", "1", "2", "3"}
    assert [f["index"] for f in report["files"]] == list(range(8))
    assert [f["name"] for f in report["files"]] == names
    log = (exp_dir / pp.LOGFILE).read_text()
    assert "a_readme.txt\t-> skipped: not audio" in log and log.count("-> Success") == 4


def test_nothing_usable_fails_naming_every_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.txt").write_text("hello")
    wavfile.write(data / "y.wav", 16000, np.zeros(16000, dtype=np.float32))
    with pytest.raises(StepFailed) as ei:
        run_step(_exp(data, tmp_path / "store"), "preprocess", pp.run)
    msg = str(ei.value)
    assert "x.txt: not audio or corrupt" in msg and "y.wav: all silence" in msg
    assert not (tmp_path / "store" / "logs" / "pp" / ".rvc" / "preprocess.done.json").exists()


def test_empty_and_missing_dataset(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "only-a-subfolder").mkdir(parents=True)
    with pytest.raises(StepFailed, match=f"dataset {empty}: no files"):
        run_step(_exp(empty, tmp_path / "store"), "preprocess", pp.run)
    with pytest.raises(StepFailed, match="no such folder"):
        run_step(_exp(tmp_path / "nope", tmp_path / "store"), "preprocess", pp.run)


def _rvc_cases(voice_dir: Path, dest: Path) -> Path:
    """Real speech laid out so that RVC's loop meets each of its quirks: a.wav, 79 s (longer than one
    60 s block), has chunks whose last piece RVC overwrites with the next chunk's first piece and a
    chunk with a tail under 0.76 s; b.wav is 0.5 s of speech (one short piece, named _1); c.wav is 50
    samples of digital silence (RVC's slicer returns it whole, RVC writes a piece of NaNs at the model
    rate, then its resampler raises: no 16 kHz piece, the file is logged as failed)."""
    dest.mkdir(parents=True)
    v = [wavfile.read(q)[1] for q in sorted(voice_dir.glob("*.wav"))]  # 32 kHz int16
    rng = np.random.default_rng(1)
    cropped = v[1][: int(3.8 * 32000)]  # its chunk is 4.07 s long: a 0.67 s tail
    parts = []
    for x in [v[1], v[1], cropped, v[2], v[3], v[0], v[1], v[2], v[3], v[0], cropped, v[1]]:
        parts += [x, (rng.standard_normal(int(1.2 * 32000)) * 3).astype(np.int16)]
    wavfile.write(dest / "a.wav", 32000, np.concatenate(parts))
    loud = np.flatnonzero(np.abs(v[0]) > 1500)
    wavfile.write(dest / "b.wav", 32000, v[0][loud[0]: loud[0] + 16000])
    wavfile.write(dest / "c.wav", 32000, np.zeros(50, dtype=np.int16))
    return dest


def test_rvc_compatible_writes_rvcs_pieces_byte_for_byte(tmp_path: Path, voice_dir: Path) -> None:
    from collections import Counter

    data = _rvc_cases(voice_dir, tmp_path / "data")
    rvc_log = rvc_port.preprocess_dataset(data, SR, tmp_path / "rvc")
    writes = Counter(rvc_log.writes)
    rvc_gt, rvc_16k = _pieces(tmp_path / "rvc", pp.GT_DIR), _pieces(tmp_path / "rvc", pp.WAV16_DIR)
    nan = {n for n, b in rvc_gt.items() if np.isnan(np.frombuffer(b[58:], np.float32)).any()}
    short = {n for n, b in rvc_gt.items() if (len(b) - 58) // 4 < pp.min_train_samples(SR)} - nan
    # the data meets every case: overwritten names, short pieces inside the long file and alone, NaNs
    assert sum(k > 1 for k in writes.values()) >= 3
    assert {n.split("_")[0] for n in short} == {"0", "1"} and "1_1.wav" in short and nan == {"2_1.wav"}
    assert rvc_log.failed == ["c.wav"] and set(rvc_16k) == set(rvc_gt) - nan

    store = tmp_path / "store"
    summary = run_step(_exp(data, store, rvcCompatible=True), "preprocess", pp.run)
    exp_dir = store / "logs" / "pp"
    assert _pieces(exp_dir, pp.GT_DIR) == {n: b for n, b in rvc_gt.items() if n not in nan}
    assert _pieces(exp_dir, pp.WAV16_DIR) == {n: b for n, b in rvc_16k.items() if n not in nan}
    report = json.loads((exp_dir / pp.REPORT).read_text())
    assert report["rvc_compatible"] is True and report["deviations"] == ["no-nan"]
    assert report["pieces_overwritten"] == sum(k - 1 for k in writes.values())
    assert report["rvc_overwrites_avoided"] == report["short_pieces_dropped"] == 0
    assert summary["pieces"] == len(rvc_gt) - len(nan) and report["silent_pieces_dropped"] == 1
    assert "deviations from RVC: no-nan" in (exp_dir / pp.LOGFILE).read_text()

    # the default keeps its deviations on the same data: no piece lost to a reused name, none too short
    default = run_step(_exp(data, tmp_path / "store2"), "preprocess", pp.run)
    report = json.loads((tmp_path / "store2" / "logs" / "pp" / pp.REPORT).read_text())
    assert report["rvc_compatible"] is False and report["deviations"] == ["renumber", "drop-short", "blocks",
                                                                          "no-nan"]
    assert report["rvc_overwrites_avoided"] >= 3 and report["pieces_overwritten"] == 0
    assert report["short_pieces_dropped"] == len(short)
    gt = _pieces(tmp_path / "store2" / "logs" / "pp", pp.GT_DIR)
    assert default["pieces"] == len(gt) == len(rvc_log.writes) - len(short)  # all kept but the short
    assert min((len(b) - 58) // 4 for b in gt.values()) >= pp.min_train_samples(SR)


def test_damaged_previous_manifest_entries_are_ignored() -> None:
    ds = pp.Dataset("/data", [pp.DatasetFile("a.wav", 1, "sha256:x"), pp.DatasetFile("b.wav", 2, "sha256:y")])
    changed_a = {"name": "a.wav", "size": 1, "digest": "sha256:z"}
    old = {"files": [{"size": 1}, {"name": 3}, "junk", None, changed_a]}
    assert pp.dataset_changes(old, ds) == {"added": ["b.wav"], "removed": [], "changed": ["a.wav"]}
    assert pp.dataset_changes({"files": "nope"}, ds) is None
    assert pp.dataset_changes([], ds) is None  # type: ignore[arg-type]


def test_rvc_compatible_spec_switches_every_deviation() -> None:
    exp = _exp("/data", Path("/store"), rvcCompatible=True)
    p = pp.Params.from_spec(exp.spec)
    assert (p.fix_overwrite, p.drop_short, p.block_seconds, p.block_samples()) == (False, False, None, None)
    assert p == p.rvc_exact() and p.deviations == ["no-nan"]
    default = pp.Params.from_spec(_exp("/data", Path("/store")).spec)
    assert default.deviations == [d.name for d in pp.DEVIATIONS]
    assert default.rvc_exact() == p
    # every switch names a Params field, and the table's RVC value differs from the default
    for d in pp.DEVIATIONS:
        if d.switch is not None:
            assert getattr(default, d.switch) != d.rvc
    # other preprocess settings keep their meaning beside it
    seg3 = pp.Params.from_spec(_exp("/data", Path("/store"), rvcCompatible=True, segmentSeconds=3.0).spec)
    assert seg3.per == 3.0 and seg3.deviations == ["no-nan"]


_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from rvc_pipeline.steps import preprocess as pp
    from rvc_pipeline.core.spec import parse_manifest
    from rvc_pipeline.steps.runner import run_step
    import numpy, scipy.signal, soxr  # noqa: F401 - counted in the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    exp = parse_manifest({"metadata": {"name": "huge"}, "spec": {
        "dataset": {"source": sys.argv[1]}, "storage": {"uri": sys.argv[2]},
        "resources": {"device": "cpu", "parallelism": 1}}})
    s = run_step(exp, "preprocess", pp.run)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"base_kb": base, "peak_kb": peak, "pieces": s["pieces"],
                      "input_seconds": s["input_seconds"]}))
""")


def test_huge_file_memory_is_bounded(tmp_path: Path, voice_dir: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    src = sorted(voice_dir.glob("*.wav"))[3]
    minutes = 20
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-stream_loop", "-1", "-i", str(src), "-t",
                    str(minutes * 60), "-c:a", "pcm_s16le", str(data / "long.wav")], check=True)
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(data), str(tmp_path / "store")],
                         check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["input_seconds"] == pytest.approx(minutes * 60, abs=0.1)
    assert r["pieces"] > minutes * 60 / 4.5
    grown_mb = (r["peak_kb"] - r["base_kb"]) / 1024
    whole_file_mb = minutes * 60 * SR * 4 / 2**20  # float32 at 40 kHz: 183 MB, float64 twice that
    assert grown_mb < 130, f"peak RSS grew by {grown_mb:.0f} MB"
    assert grown_mb < whole_file_mb * 0.7
