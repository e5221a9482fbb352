"""core.folders: the one rule for a folder of recordings (submit's upload and local conversion)."""

from __future__ import annotations

import os
from pathlib import Path

from rvc_pipeline.core import folders


def _folder(tmp_path: Path) -> Path:
    d = tmp_path / "voice"
    d.mkdir()
    for name in ("a.wav", "B.FLAC", "c.opus", "notes.txt", ".hidden.wav"):
        (d / name).write_bytes(b"x")
    (d / "sub").mkdir()
    (d / "sub" / "deep.wav").write_bytes(b"x")
    (d / "folder.wav").mkdir()
    outside = tmp_path / "secret.wav"
    outside.write_bytes(b"x")
    (d / "leak.wav").symlink_to(outside)
    (d / "alias.wav").symlink_to(d / "a.wav")
    (d / "dangling.wav").symlink_to(tmp_path / "gone.wav")
    os.mkfifo(d / "pipe.wav")
    return d


def test_scan_reads_only_audio_files_directly_inside(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    files, skipped = folders.scan(d)
    assert [f.name for f in files] == ["B.FLAC", "a.wav", "alias.wav", "c.opus"]
    why = {s.path.name: s.why for s in skipped}
    assert why == {
        ".hidden.wav": "a hidden file",
        "dangling.wav": "a link to outside the folder",
        "folder.wav": "a sub-folder (only files directly inside the folder are used)",
        "leak.wav": "a link to outside the folder",
        "notes.txt": "not an audio file (.wav, .flac, .mp3, .ogg, .m4a, .opus)",
        "pipe.wav": "not a regular file (a pipe, device or dangling link)",
        "sub": "a sub-folder (only files directly inside the folder are used)",
    }


def test_dangling_link_inside_the_folder_is_not_a_regular_file(tmp_path: Path) -> None:
    d = tmp_path / "voice"
    d.mkdir()
    (d / "x.wav").symlink_to(d / "missing.wav")
    why = folders.why_skipped(d / "x.wav", d.resolve())
    assert why == "not a regular file (a pipe, device or dangling link)"


def test_looks_like_audio_and_inside() -> None:
    assert folders.looks_like_audio("Take 1.M4A") and not folders.looks_like_audio(".x.wav")
    assert not folders.looks_like_audio("readme.md")
    assert folders.inside(Path("/a/b/c"), Path("/a")) and folders.inside(Path("/a"), Path("/a"))
    assert not folders.inside(Path("/ab"), Path("/a"))
