"""`rvc-pipeline convert`: many real recordings through one tiny model (RVC's small-model layout) and a
tiny HuBERT in fairseq's file format, with real ffmpeg, real files and hostile folders."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from rvc_pipeline import cli
from rvc_pipeline.audio import load_audio
from rvc_pipeline.convert import BatchOptions, Setup, run_batch
from rvc_pipeline.core.fileio import temp_path
from rvc_pipeline.core.layout import CONVERT_REPORT_FILE

from tests.support.tiny_voice import save_tiny_hubert, save_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A narrow v2 40k pitch generator saved as RVC exports it, and a small 768-d HuBERT file."""
    d = tmp_path_factory.mktemp("models")
    return {"model": save_tiny_model(d / "voice.pth"), "hubert": save_tiny_hubert(d / "hubert.pt")}


@pytest.fixture(scope="module")
def clips(voice_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three 1.2 s pieces of real speech (32 kHz WAV)."""
    d = tmp_path_factory.mktemp("clips")
    out = []
    for i, src in enumerate(sorted(voice_dir.glob("*.wav"))[:3]):
        out.append(d / f"clip{i}.wav")
        subprocess.run(["ffmpeg", "-v", "error", "-i", str(src), "-ss", "1", "-t", "1.2", str(out[-1])],
                       check=True)
    return out


def _folder(clips: list[Path], d: Path, names: list[str]) -> Path:
    d.mkdir(parents=True)
    for c, n in zip(clips, names, strict=False):
        (d / n).write_bytes(c.read_bytes())
    return d


def _cli(models: dict[str, Path], *args: str) -> int:
    return cli.main(["convert", "--model", str(models["model"]), "--embedder", str(models["hubert"]),
                     "--device", "cpu", "--workers", "1", *args])  # one process (a later --workers wins)


def _report(out: Path) -> dict[str, dict[str, Any]]:
    return {Path(f["input"]).name: f for f in json.loads((out / CONVERT_REPORT_FILE).read_text())["files"]}


def test_folder_with_bad_files_converts_the_rest_and_reports_them(
        tmp_path: Path, models: dict[str, Path], clips: list[Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    src = _folder(clips, tmp_path / "in", ["a.wav", "b.wav"])
    (src / "notaudio.wav").write_text("not audio at all")
    (src / "empty.flac").write_bytes(b"")
    sf.write(src / "tiny.wav", np.zeros(400, dtype=np.float32), 16000)  # 25 ms: too short
    (src / "notes.txt").write_text("ignored: not an audio suffix")
    (src / "outside.wav").symlink_to(clips[2])  # a link out of the folder
    (src / "inside.wav").symlink_to(src / "a.wav")  # a link within it: an ordinary input
    os.mkfifo(src / "pipe.wav")  # would block a reader forever
    (src / "sub").mkdir()
    (src / "sub" / "deep.wav").write_bytes(clips[0].read_bytes())  # sub-folders are not searched
    out = tmp_path / "out"
    rc = _cli(models, "--input", str(src), "--output", str(out))
    cap = capsys.readouterr()
    assert rc == 2, cap.err
    assert "converted 3, skipped 0 already done, failed 3" in cap.out
    rep = _report(out)
    assert {n: f["status"] for n, f in rep.items()} == {
        "a.wav": "converted", "b.wav": "converted", "inside.wav": "converted", "notaudio.wav": "failed",
        "empty.flac": "failed", "tiny.wav": "failed", "outside.wav": "ignored", "pipe.wav": "ignored"}
    assert "notaudio.wav" in rep["notaudio.wav"]["error"] and "too short" in rep["tiny.wav"]["error"]
    assert "empty.flac" in rep["empty.flac"]["error"] and "outside" in rep["outside.wav"]["error"]
    assert sorted(p.name for p in out.iterdir()) == ["a.wav", "b.wav", CONVERT_REPORT_FILE, "inside.wav"]
    y, sr = sf.read(out / "a.wav", dtype="int16")
    assert sr == 40000 and sf.info(out / "a.wav").subtype == "PCM_16" and np.abs(y).max() > 100
    assert len(y) == pytest.approx(1.2 * 40000, abs=800)
    assert rep["a.wav"]["input_seconds"] == pytest.approx(1.2, abs=0.02)


def test_rerun_skips_complete_outputs_formats_and_overwrite(
        tmp_path: Path, models: dict[str, Path], clips: list[Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    src = _folder(clips, tmp_path / "in", ["a.wav", "b.wav"])
    out = tmp_path / "out"
    assert _cli(models, "--input", str(src), "--output", str(out), "--format", "mp3", "--workers", "2") == 0
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_name,sample_rate", "-of",
                            "csv=p=0", str(out / "a.mp3")], capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "mp3,44100"  # 40 kHz is no MP3 rate: the next one up
    assert len(load_audio(out / "b.mp3", 16000)) == pytest.approx(1.2 * 16000, abs=1600)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp3")}
    (out / "b.mp3").unlink()
    stale = temp_path(out / "b.mp3")
    stale.write_bytes(b"half an mp3 from a killed run")  # never taken for a complete output
    capsys.readouterr()
    assert _cli(models, "--input", str(src), "--output", str(out), "--format", "mp3") == 0
    assert "converted 1, skipped 1 already done, failed 0" in capsys.readouterr().out
    assert (out / "a.mp3").stat().st_mtime_ns == before["a.mp3"] and (out / "b.mp3").stat().st_size > 1000
    assert not stale.exists() and _report(out)["a.wav"]["status"] == "existing"
    assert _cli(models, "--input", str(src), "--output", str(out), "--format", "ogg", "--overwrite") == 0
    assert sf.info(out / "a.ogg").format == "OGG" and sf.info(out / "a.ogg").samplerate == 40000
    assert _cli(models, "--input", str(src), "--output", str(out), "--format", "flac", "--overwrite") == 0
    assert sf.info(out / "a.flac").format == "FLAC" and (out / "a.mp3").stat().st_mtime_ns == before["a.mp3"]


def test_transpose_csv_reaches_each_file(tmp_path: Path, models: dict[str, Path], clips: list[Path]) -> None:
    src = _folder([clips[0]] * 3, tmp_path / "in", ["x.wav", "y.wav", "z.wav"])
    csv = tmp_path / "t.csv"
    csv.write_text("file,semitones\nx.wav,0\n\ny,12\n")
    setup = Setup(model=str(models["model"]), embedder=str(models["hubert"]), device="cpu", index_rate=0.0)
    files = tuple(str(src / n) for n in ("x.wav", "y.wav", "z.wav"))  # explicit files
    rep = run_batch(BatchOptions(setup, files, tmp_path / "out", transpose_csv=csv, workers=1,
                                 convert={"pitch": 0.0, "seed": 0}))
    assert [o.pitch for o in rep.outcomes] == [0.0, 12.0, 0.0] and rep.count("converted") == 3
    x, y, z = (sf.read(tmp_path / "out" / f"{n}.wav", dtype="int16")[0] for n in "xyz")
    np.testing.assert_array_equal(x, z)  # same audio, transpose and seed: the same output
    assert not np.array_equal(x, y)  # +12 semitones on y only


@pytest.mark.parametrize(("rows", "message"), [
    ("a.wav,3\nnope.wav,1\n", "t.csv line 2: 'nope.wav' is not one of the inputs"),
    ("file,semitones\na.wav,high\n", "t.csv line 2: 'high' is not a number"),
    ("a.wav,3\na,4\n", "t.csv line 2: 'a' given twice"),
    ("a.wav,3,extra\n", "t.csv line 1: expected 'file,semitones'"),
])
def test_bad_transpose_csv_is_refused_naming_the_line(
        tmp_path: Path, models: dict[str, Path], clips: list[Path], capsys: pytest.CaptureFixture[str],
        rows: str, message: str) -> None:
    src = _folder(clips, tmp_path / "in", ["a.wav"])
    (tmp_path / "t.csv").write_text(rows)
    assert _cli(models, "--input", str(src), "--output", str(tmp_path / "out"), "--transpose-csv",
                str(tmp_path / "t.csv")) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_hostile_layouts_and_a_model_that_is_not_a_model(tmp_path: Path, models: dict[str, Path],
                                                         clips: list[Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    src = _folder(clips, tmp_path / "in", ["a.wav", "b.wav"])

    def err(*args: str) -> str:
        assert _cli(models, *args) == 2
        return capsys.readouterr().err

    assert "inside the input folder" in err("--input", str(src), "--output", str(src))
    assert "inside the input folder" in err("--input", str(src), "--output", str(src / "converted"))
    assert not (src / "converted").exists()
    assert "would replace the input" in err("--input", str(src / "a.wav"), "--output", str(src), "--format",
                                            "wav")
    (src / "a.flac").write_bytes(clips[1].read_bytes())
    e = err("--input", str(src), "--output", str(tmp_path / "out"))
    assert "a.flac and" in e and "a.wav would both be written to a.wav" in e  # named before anything runs
    assert "nothing.wav: no such file or folder" in err("--input", str(tmp_path / "nothing.wav"), "--output",
                                                        str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    assert "no audio files to convert" in err("--input", str(tmp_path / "empty"), "--output",
                                              str(tmp_path / "out"))
    junk = tmp_path / "junk.pth"
    junk.write_text("hello, not a model")
    for files in ([src / "b.wav"], [src / "a.wav", src / "b.wav"]):  # in this process, then in 2 workers
        rc = cli.main(["convert", "--model", str(junk), "--input", *map(str, files), "--output",
                       str(tmp_path / "out"), "--device", "cpu", "--workers", "2"])
        assert rc == 2 and "junk.pth" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.wav"))
