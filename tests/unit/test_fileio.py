"""core.fileio: whole files or none (errors, kills, races, links, odd targets), the one 16 kHz reader
against ffmpeg on real speech, and the one device rule."""

from __future__ import annotations

import fnmatch
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from rvc_pipeline.audio import AudioError, load_audio
from rvc_pipeline.core.errors import EXIT_BAD_INPUT, StepFailed, classify
from rvc_pipeline.core.fileio import (
    SR_16K,
    atomic_path,
    atomic_write,
    pick_device,
    read_16k,
    save_npy_atomic,
    temp_glob,
    temp_path,
    write_bytes_atomic,
)
from rvc_pipeline.core.storage import LocalStorage


def _names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------- atomic writes


def test_a_failed_or_killed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    p = tmp_path / "x.npy"
    save_npy_atomic(p, np.arange(4))
    before = p.read_bytes()
    for exc in (RuntimeError("disk went away"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), atomic_write(p) as f:
            f.write(b"\x93NUMPY half")
            raise exc
        assert p.read_bytes() == before and _names(tmp_path) == ["x.npy"]
    np.testing.assert_array_equal(np.load(p), np.arange(4))


def test_a_block_that_writes_nothing_changes_nothing(tmp_path: Path) -> None:
    p = tmp_path / "x.bin"
    p.write_bytes(b"old")
    with pytest.raises(FileNotFoundError), atomic_path(p):
        pass  # e.g. a library that failed silently: no file at the temporary path
    assert p.read_bytes() == b"old" and _names(tmp_path) == ["x.bin"]


def test_temporary_names_are_hidden_unique_and_matched_by_the_clean_up_patterns(tmp_path: Path) -> None:
    p = tmp_path / "0_1.wav.npy"
    names = {temp_path(p).name for _ in range(200)}
    assert len(names) == 200
    for n in names:
        assert n.startswith(".") and n.endswith(".partial")
        assert fnmatch.fnmatch(n, "*.npy.partial") and fnmatch.fnmatch(n, "*.partial")
        assert not fnmatch.fnmatch(n, "*.npy")  # never mistaken for an output
    # a write in progress is invisible to the storage listing (and so to uploads)
    st = LocalStorage(tmp_path)
    with atomic_write(p) as f:
        f.write(b"x" * 10)
        assert st.list() == []
    assert [o.key for o in st.list()] == ["0_1.wav.npy"]


KILLED_WRITER = """
import sys, time
from rvc_pipeline.core.fileio import atomic_write
with atomic_write(sys.argv[1]) as f:
    f.write(b"half a checkpoint"); f.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


def test_a_writer_killed_with_sigkill_leaves_the_old_file_and_a_findable_temporary(tmp_path: Path) -> None:
    p = tmp_path / "G_10.pth"
    p.write_bytes(b"complete")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(p)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert p.read_bytes() == b"complete"
    left = [q.name for q in tmp_path.glob(temp_glob("[GD]_*.pth"))]  # what train's clean-up removes
    assert len(left) == 1 and _names(tmp_path) == sorted(["G_10.pth", *left])
    assert [o.key for o in LocalStorage(tmp_path).list()] == ["G_10.pth"]  # never listed nor uploaded


def test_fsync_of_the_file_and_folder_as_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    for kwargs, want in (({}, ["file"]), ({"sync_dir": True}, ["file", "dir"]), ({"fsync": False}, [])):
        synced.clear()
        with atomic_write(tmp_path / "x.bin", **kwargs) as f:
            f.write(b"x")
        assert synced == want, kwargs
    assert _names(tmp_path) == ["x.bin"]


def test_exclusive_create_refuses_an_existing_file(tmp_path: Path) -> None:
    p = tmp_path / "lease.json"
    assert write_bytes_atomic(p, b"first", exclusive=True) is True
    assert write_bytes_atomic(p, b"second", exclusive=True) is False
    assert p.read_bytes() == b"first" and _names(tmp_path) == ["lease.json"]
    assert write_bytes_atomic(p, b"third") is True and p.read_bytes() == b"third"


def test_racing_writers_never_show_a_mix(tmp_path: Path) -> None:
    p = tmp_path / "record.json"
    bodies = [bytes([65 + i]) * (200_000 + i) for i in range(4)]
    write_bytes_atomic(p, bodies[0])
    seen: set[bytes] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.add(p.read_bytes())

    def write(body: bytes) -> None:
        for _ in range(25):
            write_bytes_atomic(p, body)

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(b,)) for b in bodies]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    reader.join()
    assert seen and seen <= set(bodies)  # every read is one writer's whole file
    assert _names(tmp_path) == ["record.json"]


def test_odd_targets_fail_clearly_and_leave_nothing(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    (tmp_path / "d").mkdir()
    link = tmp_path / "d" / "link.npy"
    link.symlink_to(outside)
    save_npy_atomic(link, np.zeros(3))  # replaces the link itself, never writes through it
    assert outside.read_bytes() == b"precious" and not link.is_symlink()
    folder = tmp_path / "d" / "a-folder.npy"
    folder.mkdir()
    with pytest.raises(IsADirectoryError):
        save_npy_atomic(folder, np.zeros(3))
    with pytest.raises(FileNotFoundError):
        write_bytes_atomic(tmp_path / "no-such-folder" / "x.bin", b"x")
    with pytest.raises(NotADirectoryError) as e:  # a file where the folder should be
        write_bytes_atomic(outside / "x.bin", b"x")
    assert classify(e.value).code == EXIT_BAD_INPUT and "outside.txt" in classify(e.value).message
    with pytest.raises(ValueError, match="allow_pickle=False"):
        save_npy_atomic(tmp_path / "d" / "obj.npy", np.array([{"a": 1}], dtype=object))
    assert _names(tmp_path / "d") == ["a-folder.npy", "link.npy"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_a_permanent_error(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(PermissionError) as e:
            write_bytes_atomic(ro / "x.bin", b"x")
        assert classify(e.value).code == EXIT_BAD_INPUT and str(ro) in classify(e.value).message
    finally:
        ro.chmod(0o755)


def test_files_get_the_usual_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_bytes_atomic(tmp_path / "x.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "x.bin").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------- the 16 kHz reader


@pytest.fixture(scope="module")
def speech16(tmp_path_factory: pytest.TempPathFactory, voice_dir: Path) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("speech16")
    src = sorted(voice_dir.glob("*.wav"))[0]  # real speech, 32 kHz 16-bit
    x = load_audio(src, SR_16K)[: SR_16K * 2]
    out = {"src32k": src}
    for name, subtype in (("float", "FLOAT"), ("pcm16", "PCM_16"), ("pcm24", "PCM_24"), ("pcm32", "PCM_32")):
        out[name] = d / f"{name}.wav"
        sf.write(out[name], x, SR_16K, subtype=subtype)
    out["stereo"] = d / "stereo.wav"
    sf.write(out["stereo"], np.stack([x, 0.5 * x], axis=1), SR_16K, subtype="FLOAT")
    out["ogg"] = d / "lossy.ogg"
    sf.write(out["ogg"], x, SR_16K, format="OGG", subtype="VORBIS")
    out["text"] = d / "notes.wav"
    out["text"].write_text("not audio")
    out["empty"] = d / "empty.wav"
    out["empty"].write_bytes(b"")
    return out


def test_exact_16k_files_read_as_ffmpeg_decodes_them(speech16: dict[str, Path]) -> None:
    calls: list[Path] = []

    def decode(p: Path, sr: int) -> np.ndarray:
        calls.append(p)
        return load_audio(p, sr)

    for name in ("float", "pcm16", "pcm24", "pcm32"):
        x = read_16k(speech16[name], decode=decode)
        assert x.dtype == np.float32 and x.flags.c_contiguous and len(x) == 2 * SR_16K
        np.testing.assert_array_equal(x, load_audio(speech16[name], SR_16K))  # bit-identical to ffmpeg
    assert calls == []  # no ffmpeg process for them


def test_anything_else_goes_to_the_decoder(speech16: dict[str, Path]) -> None:
    calls: list[Path] = []

    def decode(p: Path, sr: int) -> np.ndarray:
        calls.append(p)
        return load_audio(p, sr)

    for name in ("src32k", "stereo", "ogg"):
        assert read_16k(speech16[name], decode=decode).dtype == np.float32
    assert calls == [speech16[n] for n in ("src32k", "stereo", "ogg")]
    for name in ("text", "empty"):
        with pytest.raises(AudioError, match=speech16[name].name):
            read_16k(speech16[name], decode=load_audio)


def test_without_a_decoder_only_16k_is_read(speech16: dict[str, Path]) -> None:
    mono = read_16k(speech16["float"])
    np.testing.assert_allclose(read_16k(speech16["stereo"]), 0.75 * mono, atol=1e-7)  # channels averaged
    with pytest.raises(StepFailed, match=r"src32k|\.wav: sample rate 32000 Hz; 16000 Hz expected"):
        read_16k(speech16["src32k"])
    for name in ("text", "empty"):
        with pytest.raises(StepFailed, match=rf"{speech16[name].name}: cannot read audio"):
            read_16k(speech16[name])
    with pytest.raises(StepFailed, match="missing.wav: cannot read audio"):
        read_16k(speech16["float"].with_name("missing.wav"))


# ---------------------------------------------------------------- the device rule


@pytest.mark.parametrize("visible", [False, True])
def test_one_device_rule(visible: bool, monkeypatch: pytest.MonkeyPatch,
                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible)
    cuda_or_cpu = "cuda" if visible else "cpu"
    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") == pick_device("") == pick_device(None) == cuda_or_cpu
    with caplog.at_level(logging.WARNING, logger="rvc_pipeline"):
        assert pick_device("gpu", what="features") == cuda_or_cpu
    assert ("features: resources.device is gpu but no CUDA device is visible" in caplog.text) is not visible
    assert pick_device("mps") == "mps"
    if visible:
        assert pick_device("cuda:1") == "cuda:1"
    else:
        with pytest.raises(StepFailed, match=r"device 'cuda:1': no CUDA device is visible"):
            pick_device("cuda:1")
