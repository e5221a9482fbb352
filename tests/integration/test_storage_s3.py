"""Storage against a real S3 API (moto server over HTTP) and the local-folder equivalent.

The same round-trip tests run on S3Storage and LocalStorage, so both back-ends keep one behaviour.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
from rvc_pipeline.core.errors import StorageError
from rvc_pipeline.core.storage import (
    MULTIPART_THRESHOLD,
    LocalStorage,
    ObjectInfo,
    S3Storage,
    Storage,
    fetch_uri,
    open_storage,
    s3_etag,
    same_content,
    split_uri,
)

from tests.s3server import S3Endpoint, free_port, start_moto


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """The same API over a local folder and over a prefix in a fresh S3 bucket."""
    if request.param == "local":
        return open_storage(str(tmp_path / "store"))
    ep: S3Endpoint = request.getfixturevalue("s3")
    return open_storage(ep.uri("runs/exp"), endpoint=ep.url)


def _md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes(), usedforsecurity=False).hexdigest()


# ---------------------------------------------------------------- both back-ends


def test_bytes_round_trip_exists_delete(store: Storage) -> None:
    assert not store.exists("logs/a/x.json")
    data = json.dumps({"epoch": 3}).encode()
    store.write_bytes("logs/a/x.json", data)
    assert store.exists("logs/a/x.json")
    assert store.read_bytes("logs/a/x.json") == data
    store.write_bytes("logs/a/x.json", b"v2")  # overwrite
    assert store.read_bytes("logs/a/x.json") == b"v2"
    store.delete("logs/a/x.json")
    assert not store.exists("logs/a/x.json")
    store.delete("logs/a/x.json")  # deleting a missing key is not an error
    with pytest.raises(StorageError, match=r"logs/a/x\.json"):
        store.read_bytes("logs/a/x.json")


def test_file_upload_download_round_trip(store: Storage, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(100_000))
    store.upload(src, "logs/a/0_gt_wavs/0_0.wav")
    dest = tmp_path / "out" / "deep" / "0_0.wav"
    store.download("logs/a/0_gt_wavs/0_0.wav", dest)
    assert dest.read_bytes() == src.read_bytes()
    assert not list(dest.parent.glob("*.partial"))
    [info] = store.list("logs/a/0_gt_wavs")
    assert info.key == "logs/a/0_gt_wavs/0_0.wav" and info.size == 100_000
    assert same_content(src, info)
    with pytest.raises(StorageError, match=r"logs/a/missing\.wav"):
        store.download("logs/a/missing.wav", tmp_path / "m.wav")
    assert not (tmp_path / "m.wav").exists() and not (tmp_path / "m.wav.partial").exists()


def test_listing_recursive_and_not(store: Storage) -> None:
    for key, n in [("logs/a/top.txt", 1), ("logs/a/d/b.txt", 22), ("logs/a/d/e/c.txt", 333),
                   ("logs/a/dd/x.txt", 4), ("logs/a/d.txt", 5)]:
        store.write_bytes(key, b"x" * n)
    everything = store.list("")
    assert [o.key for o in everything] == sorted(["logs/a/top.txt", "logs/a/d/b.txt", "logs/a/d/e/c.txt",
                                                  "logs/a/dd/x.txt", "logs/a/d.txt"])
    rec = store.list("logs/a/d")
    assert [(o.key, o.size) for o in rec] == [("logs/a/d/b.txt", 22), ("logs/a/d/e/c.txt", 333)]
    flat = store.list("logs/a/d", recursive=False)
    assert [(o.key, o.size) for o in flat] == [("logs/a/d/b.txt", 22)]
    assert [o.key for o in store.list("logs/a", recursive=False)] == ["logs/a/d.txt", "logs/a/top.txt"]
    # a key naming one object lists that object (how ctx.pull("progress.jsonl") finds a file)
    assert [(o.key, o.size) for o in store.list("logs/a/d.txt")] == [("logs/a/d.txt", 5)]
    assert [(o.key, o.size) for o in store.list("logs/a/d.txt", recursive=False)] == [("logs/a/d.txt", 5)]
    # a partial name is not a folder: "logs/a/d/e/c" is neither an object nor a prefix of one
    assert store.list("logs/a/d/e/c") == []
    assert store.list("logs/nothing") == []
    assert store.list("logs/a/to") == []


def test_same_content_detects_changed_bytes_of_same_size(store: Storage, tmp_path: Path) -> None:
    f = tmp_path / "feat.npy"
    f.write_bytes(b"\x00" * 5000)
    store.upload(f, "k/feat.npy")
    [o] = store.list("k/feat.npy")
    assert same_content(f, o)
    f.write_bytes(b"\x01" * 5000)  # a rerun's output: same size, new values
    [o] = store.list("k/feat.npy")
    if isinstance(store, S3Storage):
        assert not same_content(f, o)  # the ETag tells them apart
    assert not same_content(tmp_path / "absent", o)


# ---------------------------------------------------------------- S3 specifics


def test_s3_keys_are_relative_to_the_prefix(s3: S3Endpoint) -> None:
    st = S3Storage(s3.uri("runs/exp"), endpoint=s3.url)
    st.write_bytes("logs/a/x.txt", b"hello")
    raw = s3.client().list_objects_v2(Bucket=s3.bucket)["Contents"]
    assert [o["Key"] for o in raw] == ["runs/exp/logs/a/x.txt"]
    [o] = st.list("")
    assert o.key == "logs/a/x.txt" and o.etag == hashlib.md5(b"hello", usedforsecurity=False).hexdigest()
    root = S3Storage(f"s3://{s3.bucket}", endpoint=s3.url)
    assert [o.key for o in root.list("")] == ["runs/exp/logs/a/x.txt"]
    assert root.read_bytes("runs/exp/logs/a/x.txt") == b"hello"


def test_s3_listing_pages_beyond_1000_keys(s3: S3Endpoint) -> None:
    c = s3.client()
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda i: c.put_object(Bucket=s3.bucket, Key=f"p/logs/x/f/{i:05d}.npy", Body=b""),
                    range(1003)))
    st = S3Storage(s3.uri("p"), endpoint=s3.url)
    keys = [o.key for o in st.list("logs/x/f")]
    assert len(keys) == 1003 and keys[0] == "logs/x/f/00000.npy" and keys[-1] == "logs/x/f/01002.npy"


def test_s3_multipart_object_downloads_byte_identical(s3: S3Endpoint, tmp_path: Path) -> None:
    size = MULTIPART_THRESHOLD + 1_234_567  # > 8 MiB: boto3 uploads it in 2 parts
    src = tmp_path / "G_2333333.pth"
    src.write_bytes(os.urandom(size))
    st = S3Storage(s3.uri("runs"), endpoint=s3.url)
    st.upload(src, "logs/a/G_2333333.pth")
    head = s3.client().head_object(Bucket=s3.bucket, Key="runs/logs/a/G_2333333.pth")
    assert head["ContentLength"] == size
    assert head["ETag"].strip('"').endswith("-2"), head["ETag"]  # really multipart
    [o] = st.list("logs/a/G_2333333.pth")
    assert o.etag == s3_etag(src) and same_content(src, o)
    dest = tmp_path / "back.pth"
    st.download("logs/a/G_2333333.pth", dest)
    assert dest.stat().st_size == size and _md5(dest) == _md5(src)


def test_s3_missing_bucket_is_named(s3: S3Endpoint, tmp_path: Path) -> None:
    st = S3Storage("s3://no-such-bucket-here/runs", endpoint=s3.url)
    src = tmp_path / "f"
    src.write_bytes(b"1")
    ops = {
        "list": lambda: st.list("logs"),
        "exists": lambda: st.exists("logs/x"),
        "read_bytes": lambda: st.read_bytes("logs/x"),
        "download": lambda: st.download("logs/x", tmp_path / "x"),
        "upload": lambda: st.upload(src, "logs/x"),
        "write_bytes": lambda: st.write_bytes("logs/x", b"1"),
    }
    for name, op in ops.items():
        with pytest.raises(StorageError) as ei:
            op()
        assert "s3://no-such-bucket-here: bucket does not exist" in str(ei.value), name


def test_s3_unreachable_endpoint_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A closed port: every operation fails with a StorageError that names the endpoint."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    endpoint = f"http://127.0.0.1:{free_port()}"
    st = S3Storage("s3://bkt/runs", endpoint=endpoint)
    for op in (lambda: st.list(""), lambda: st.exists("x"), lambda: st.read_bytes("x")):
        with pytest.raises(StorageError, match=f"cannot reach S3 endpoint {endpoint}"):
            op()


@pytest.fixture(scope="module")
def auth_s3() -> Iterator[tuple[str, dict[str, str]]]:
    """A second moto server that enforces credentials (moto's INITIAL_NO_AUTH_ACTION_COUNT): the first
    3 requests create an IAM user with full S3 rights and its access key; every later request must be
    signed with a key moto knows, with the right secret."""
    url, stop = start_moto(env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    try:
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1",
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        iam.create_user(UserName="trainer")
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        good = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                     aws_access_key_id=good["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=good["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket="secure")
        yield url, good
    finally:
        stop()


@pytest.mark.parametrize("which", ["unknown-key", "wrong-secret"])
def test_s3_bad_credentials_are_access_denied(
    auth_s3: tuple[str, dict[str, str]], which: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, good = auth_s3
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # the good key works: the server really checks credentials rather than refusing everything
    for k, v in good.items():
        monkeypatch.setenv(k, v)
    ok = S3Storage("s3://secure/runs", endpoint=url)
    ok.write_bytes("logs/a/x.txt", b"fine")
    assert ok.read_bytes("logs/a/x.txt") == b"fine" and ok.exists("logs/a/x.txt")

    if which == "unknown-key":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAREALKEY00000")
        code = "InvalidAccessKeyId"
    else:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        code = "SignatureDoesNotMatch"
    bad = S3Storage("s3://secure/runs", endpoint=url)
    with pytest.raises(StorageError, match=rf"s3://secure/runs/logs: access denied \({code}\); check the S3 "
                                           "credentials"):
        bad.list("logs")
    with pytest.raises(StorageError, match=rf"access denied \({code}\)"):
        bad.read_bytes("logs/a/x.txt")
    with pytest.raises(StorageError, match=r"s3://secure/runs/logs/a/x\.txt: access denied \(403\)"):
        bad.exists("logs/a/x.txt")  # HEAD responses carry no error code, only the status


def test_fetch_uri_s3_and_local(s3: S3Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blob = os.urandom(4096)
    s3.client().put_object(Bucket=s3.bucket, Key="weights/hubert_base.pt", Body=blob)
    got = fetch_uri(f"s3://{s3.bucket}/weights/hubert_base.pt", tmp_path / "cache", endpoint=s3.url)
    assert got == tmp_path / "cache" / "hubert_base.pt" and got.read_bytes() == blob
    # the endpoint may also come from AWS_ENDPOINT_URL, as for any AWS tool
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    got2 = fetch_uri(f"s3://{s3.bucket}/weights/hubert_base.pt", tmp_path / "cache2")
    assert got2.read_bytes() == blob
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    with pytest.raises(StorageError, match=rf"s3://{s3.bucket}/weights/rmvpe\.pt: no such object"):
        fetch_uri(f"s3://{s3.bucket}/weights/rmvpe.pt", tmp_path / "cache", endpoint=s3.url)
    with pytest.raises(StorageError, match="not an object URI"):
        fetch_uri(f"s3://{s3.bucket}", tmp_path / "cache", endpoint=s3.url)
    local = tmp_path / "w.pth"
    local.write_bytes(b"w")
    assert fetch_uri(str(local), tmp_path / "cache") == local
    assert fetch_uri(f"file://{local}", tmp_path / "cache") == local
    with pytest.raises(StorageError, match=r"absent\.pth: no such file"):
        fetch_uri(str(tmp_path / "absent.pth"), tmp_path / "cache")


# ---------------------------------------------------------------- local specifics and URIs


def test_local_storage_writes_atomically_and_hides_partials(tmp_path: Path) -> None:
    st = LocalStorage(tmp_path)
    st.write_bytes("logs/a/x.bin", b"abc")
    (tmp_path / "logs" / "a" / "y.bin.partial").write_bytes(b"half")
    assert [o.key for o in st.list("logs")] == ["logs/a/x.bin"]
    assert st.local_path() == tmp_path.resolve()
    assert st.list("logs/a/x.bin") == [ObjectInfo("logs/a/x.bin", 3)]


def test_open_storage_and_split_uri(tmp_path: Path) -> None:
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    with pytest.raises(StorageError, match=r"gs://b/p: unsupported storage scheme"):
        open_storage("gs://b/p")
    with pytest.raises(StorageError, match="no bucket"):
        S3Storage("s3:///prefix")
    assert split_uri("s3://b/p/q/G_10.pth") == ("s3://b/p/q", "G_10.pth")
    assert split_uri("s3://b/x.pth") == ("s3://b", "x.pth")
    assert split_uri("/data/w/x.pth") == ("/data/w", "x.pth")


# ---------------------------------------------------------------- conditional writes (both back-ends)


def test_create_exclusive_and_replace_if_match(store: Storage) -> None:
    key = "logs/a/.rvc/owner.json"
    assert store.read_versioned(key) is None
    assert store.create_exclusive(key, b"first") is True
    assert store.create_exclusive(key, b"second") is False  # exists: nothing replaced
    v = store.read_versioned(key)
    assert v is not None and v.data == b"first" and v.token and 0 <= v.age_s < 30
    assert store.replace_if_match(key, b"third", v.token) is True
    assert store.replace_if_match(key, b"fourth", v.token) is False  # stale token: compare-and-swap lost
    assert store.read_bytes(key) == b"third"
    assert store.replace_if_match("logs/a/.rvc/missing.json", b"x", v.token) is False
    assert not store.exists("logs/a/.rvc/missing.json")
    assert [o.key for o in store.list("logs/a")] == [key]  # no partial or lock file shows


@pytest.mark.parametrize("op", ["create", "replace"])
def test_racing_conditional_writers_exactly_one_wins(store: Storage, op: str) -> None:
    key = "logs/a/.rvc/lease.json"
    token = None
    if op == "replace":
        store.write_bytes(key, b"base")
        token = store.read_versioned(key).token  # type: ignore[union-attr]
    bodies = [f"writer-{i}".encode() * 50 for i in range(8)]
    with ThreadPoolExecutor(8) as ex:
        won = list(ex.map(lambda b: store.put_if(key, b, token) is not None, bodies))
    assert sum(won) == 1
    assert store.read_bytes(key) == bodies[won.index(True)]  # whole, never a mix or a partial


def test_local_conditional_write_refuses_a_folder_and_leaves_no_partials(tmp_path: Path) -> None:
    st = LocalStorage(tmp_path)
    (tmp_path / "logs" / "a" / "lease.json").mkdir(parents=True)
    assert st.create_exclusive("logs/a/lease.json", b"x") is False  # a folder is there: not replaced
    with pytest.raises(StorageError, match=r"logs/a/lease\.json: cannot read"):
        st.read_versioned("logs/a/lease.json")
    assert sorted(p.name for p in (tmp_path / "logs" / "a").iterdir()) == ["lease.json"]
