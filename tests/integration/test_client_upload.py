"""`submit`'s upload against a real S3 API (moto server): only the audio files directly inside the folder,
never sub-folders; identical files are not sent again (counted PUTs, unchanged LastModified); a changed
file is; non-audio, hidden files and links pointing outside are skipped with a reason."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from rvc_pipeline.client import upload
from rvc_pipeline.core.errors import EXIT_BAD_INPUT, StepFailed, classify
from rvc_pipeline.core.storage import S3Storage, open_storage

from tests.s3server import S3Endpoint

PREFIX = "models/datasets/alice"


def _folder(tmp_path: Path) -> Path:
    d = tmp_path / "voices"
    (d / "sub").mkdir(parents=True)
    (d / "a.wav").write_bytes(b"RIFF" + os.urandom(2000))
    (d / "b.FLAC").write_bytes(b"fLaC" + os.urandom(3000))
    (d / "c.mp3").write_bytes(os.urandom(500))
    (d / "notes.txt").write_text("session notes")
    (d / ".hidden.wav").write_bytes(b"x")
    (d / "sub" / "deep.wav").write_bytes(b"RIFF" + os.urandom(100))
    outside = tmp_path / "elsewhere.wav"
    outside.write_bytes(b"RIFF secret")
    (d / "link_out.wav").symlink_to(outside)
    (d / "link_in.wav").symlink_to(d / "a.wav")
    (d / "dangling.wav").symlink_to(tmp_path / "nothing.wav")
    return d


class _CountPuts:
    """Counts the objects S3Storage sends (PutObject and multipart uploads), by key."""

    def __init__(self, store: S3Storage):
        self.keys: list[str] = []
        store.client.meta.events.register("before-call.s3.PutObject", self._seen)
        store.client.meta.events.register("before-call.s3.CreateMultipartUpload", self._seen)

    def _seen(self, params: dict[str, Any], **_: Any) -> None:
        self.keys.append(params["url_path"].rsplit("/", 1)[-1])


def _store(s3: S3Endpoint) -> S3Storage:
    st = open_storage(s3.uri(PREFIX), endpoint=s3.url)
    assert isinstance(st, S3Storage)
    return st


def _objects(s3: S3Endpoint) -> dict[str, Any]:
    res = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="models/")
    return {o["Key"].removeprefix(PREFIX + "/"): o["LastModified"] for o in res.get("Contents", [])}


def test_plan_takes_only_audio_directly_inside(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    p = upload.plan(d)
    assert [f.name for f in p.files] == ["a.wav", "b.FLAC", "c.mp3", "link_in.wav"]
    why = {s.path.name: s.why for s in p.skipped}
    assert why["sub"].startswith("a sub-folder") and why["notes.txt"].startswith("not an audio file")
    assert why["link_out.wav"] == "a link to outside the folder" and why[".hidden.wav"] == "a hidden file"
    assert why["dangling.wav"] == "a link to outside the folder"
    assert p.total_bytes == sum(f.stat().st_size for f in p.files)


def test_upload_then_skip_identical_then_resend_a_changed_file(tmp_path: Path, s3: S3Endpoint) -> None:
    d = _folder(tmp_path)
    store = _store(s3)
    puts = _CountPuts(store)
    seen: list[tuple[str, bool]] = []
    rep = upload.upload(upload.plan(d), store, lambda p, size, sent: seen.append((p.name, sent)))
    assert sorted(puts.keys) == ["a.wav", "b.FLAC", "c.mp3", "link_in.wav"]
    assert rep.uploaded == ["a.wav", "b.FLAC", "c.mp3", "link_in.wav"] and rep.unchanged == []
    assert seen == [("a.wav", True), ("b.FLAC", True), ("c.mp3", True), ("link_in.wav", True)]
    first = _objects(s3)
    assert sorted(first) == ["a.wav", "b.FLAC", "c.mp3", "link_in.wav"]  # no sub/, no link_out, no txt
    assert s3.client().get_object(Bucket=s3.bucket, Key=f"{PREFIX}/a.wav")["Body"].read() == \
        (d / "a.wav").read_bytes()

    puts.keys.clear()
    rep = upload.upload(upload.plan(d), store)
    assert puts.keys == [] and rep.uploaded == [] and len(rep.unchanged) == 4
    assert _objects(s3) == first

    (d / "c.mp3").write_bytes(os.urandom(500))  # same size, new content: the ETag tells
    rep = upload.upload(upload.plan(d), store)
    assert puts.keys == ["c.mp3"] and rep.uploaded == ["c.mp3"]
    after = _objects(s3)
    assert after["a.wav"] == first["a.wav"] and after["c.mp3"] >= first["c.mp3"]
    assert s3.client().get_object(Bucket=s3.bucket, Key=f"{PREFIX}/c.mp3")["Body"].read() == \
        (d / "c.mp3").read_bytes()


def test_multipart_file_is_recognised_as_identical(tmp_path: Path, s3: S3Endpoint) -> None:
    d = tmp_path / "big"
    d.mkdir()
    (d / "long.wav").write_bytes(os.urandom(9 * 1024 * 1024))  # above the 8 MiB multipart threshold
    store = _store(s3)
    upload.upload(upload.plan(d), store)
    puts = _CountPuts(store)
    rep = upload.upload(upload.plan(d), store)
    assert puts.keys == [] and rep.unchanged == ["long.wav"]


def test_objects_not_in_the_folder_are_reported_and_kept(tmp_path: Path, s3: S3Endpoint) -> None:
    s3.client().put_object(Bucket=s3.bucket, Key=f"{PREFIX}/old.wav", Body=b"RIFF old")
    rep = upload.upload(upload.plan(_folder(tmp_path)), _store(s3))
    assert rep.extra == ["old.wav"] and "old.wav" in _objects(s3)


@pytest.mark.parametrize("case", ["missing", "file", "no-audio"])
def test_a_folder_without_recordings_is_a_bad_input(tmp_path: Path, case: str) -> None:
    target = tmp_path / "x"
    if case == "file":
        target.write_text("x")
    elif case == "no-audio":
        target.mkdir()
        (target / "a.txt").write_text("x")
    with pytest.raises(StepFailed) as e:
        upload.plan(target)
    assert classify(e.value).code == EXIT_BAD_INPUT and str(target) in str(e.value)


def test_rvc_pipeline_submit_uploads_then_creates_and_a_bad_override_sends_nothing(
        tmp_path: Path, s3: S3Endpoint, capsys: pytest.CaptureFixture[str]) -> None:
    from rvc_pipeline.cli import main

    from tests.support.fake_apiserver import fake_apiserver

    d = _folder(tmp_path)
    base = "/apis/rvc-operator.dev/v1alpha1/namespaces/voice/rvcexperiments"
    with fake_apiserver() as api:
        cfg = api.kubeconfig(tmp_path / "kubeconfig")
        api.routes[("POST", base)] = (201, {"metadata": {"name": "alice", "namespace": "voice"}})
        args = ["submit", str(d), "--name", "alice", "--storage", s3.uri("models"), "--endpoint", s3.url,
                "--kubeconfig", str(cfg), "--detach"]
        assert main([*args, "--set", "train.epochs=many"]) == EXIT_BAD_INPUT
        assert "spec.train.epochs: Input should be a valid integer" in capsys.readouterr().err
        assert api.seen == [] and _objects(s3) == {}
        assert main([*args, "--set", "train.epochs=3"]) == 0
    assert sorted(_objects(s3)) == ["a.wav", "b.FLAC", "c.mp3", "link_in.wav"]
    assert [(s.method, s.path) for s in api.seen] == [("GET", f"{base}/alice"), ("GET", f"{base}/alice"),
                                                      ("POST", base)]
    sent = api.seen[-1].body
    assert sent["metadata"] == {"name": "alice", "namespace": "voice"}
    assert sent["spec"] == {"storage": {"uri": s3.uri("models")}, "train": {"epochs": 3},
                            "dataset": {"source": s3.uri("models") + "/datasets/alice/"}}
    out = capsys.readouterr()
    assert "rvcexperiment voice/alice created" in out.out and "skipped" in out.err
