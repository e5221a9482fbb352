"""Artifact and dataset storage: a local folder or an S3 prefix (any S3-compatible endpoint).

Keys are '/'-separated paths relative to the storage root. Credentials for S3 come from the usual
AWS environment variables (or files); the endpoint may be given explicitly or as AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class StorageError(RuntimeError):
    """Storage that cannot be reached or used; the message names the URI."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the storage root
    size: int
    etag: str | None = None  # S3 ETag without quotes (None for local files)


# boto3's default multipart threshold and part size, set explicitly so that `s3_etag` can recompute
# the ETag of a file uploaded by S3Storage (single part: MD5; multipart: MD5 of part MD5s + "-parts").
MULTIPART_THRESHOLD = 8 * 1024 * 1024
MULTIPART_CHUNKSIZE = 8 * 1024 * 1024


def s3_etag(path: Path, threshold: int = MULTIPART_THRESHOLD, chunksize: int = MULTIPART_CHUNKSIZE) -> str:
    """The ETag S3 gives `path` when uploaded by S3Storage (boto3 transfer with these part sizes)."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        if size < threshold:
            h = hashlib.md5(usedforsecurity=False)
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return h.hexdigest()
        digests = []
        for part in iter(lambda: f.read(chunksize), b""):
            digests.append(hashlib.md5(part, usedforsecurity=False).digest())
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


def same_content(local: Path, obj: ObjectInfo) -> bool:
    """True when the local file matches the stored object: same size and, for S3, same ETag.

    Size alone is not enough: features or f0 files of a rerun have the same shape (same size) but new
    values. An ETag this cannot reproduce (another multipart layout, SSE-KMS) counts as different, so
    the file is transferred again: slower, never stale.
    """
    try:
        if local.stat().st_size != obj.size:
            return False
    except OSError:
        return False
    if obj.etag is None:
        return True
    return s3_etag(local) == obj.etag


class Storage(Protocol):
    uri: str

    def list(self, prefix: str = "", recursive: bool = True) -> list[ObjectInfo]: ...
    def exists(self, key: str) -> bool: ...
    def download(self, key: str, dest: Path) -> None: ...
    def upload(self, src: Path, key: str) -> None: ...
    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def delete(self, key: str) -> None: ...
    def local_path(self) -> Path | None: ...


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class LocalStorage:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def local_path(self) -> Path | None:
        return self.root

    def _p(self, key: str) -> Path:
        return self.root / key if key else self.root

    def list(self, prefix: str = "", recursive: bool = True) -> list[ObjectInfo]:
        base = self._p(prefix)
        if base.is_file():
            return [ObjectInfo(prefix, base.stat().st_size)]
        if not base.is_dir():
            return []
        it: Iterator[Path] = base.rglob("*") if recursive else base.iterdir()
        out = []
        for p in it:
            if p.is_file() and not p.name.endswith(".partial"):
                out.append(ObjectInfo(p.relative_to(self.root).as_posix(), p.stat().st_size))
        return sorted(out, key=lambda o: o.key)

    def exists(self, key: str) -> bool:
        return self._p(key).is_file()

    def download(self, key: str, dest: Path) -> None:
        src = self._p(key)
        if not src.is_file():
            raise StorageError(f"{self.uri}/{key}: no such file")
        if src.resolve() == Path(dest).resolve():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)

    def upload(self, src: Path, key: str) -> None:
        dst = self._p(key)
        if Path(src).resolve() == dst.resolve():
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".partial")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)

    def read_bytes(self, key: str) -> bytes:
        p = self._p(key)
        if not p.is_file():
            raise StorageError(f"{self.uri}/{key}: no such file")
        return p.read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        dst = self._p(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".partial")
        tmp.write_bytes(data)
        os.replace(tmp, dst)

    def delete(self, key: str) -> None:
        p = self._p(key)
        if p.is_file():
            p.unlink()


class S3Storage:
    def __init__(self, uri: str, endpoint: str | None = None, region: str | None = None):
        import boto3
        from botocore.config import Config

        rest = uri[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StorageError(f"{uri}: no bucket in S3 URI")
        self.uri = uri.rstrip("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        cfg = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=120)
        # A session of its own: the process-wide default session caches the first credentials it
        # resolves, so a storage opened later with other AWS_* variables would silently use the old ones.
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint or None, region_name=region or os.environ.get("AWS_REGION"),
            config=cfg,
        )
        self.endpoint = endpoint
        from boto3.s3.transfer import TransferConfig

        self.transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD,
                                       multipart_chunksize=MULTIPART_CHUNKSIZE)
        self._bucket_ok = False

    def local_path(self) -> Path | None:
        return None

    def _k(self, key: str) -> str:
        return _join(self.prefix, key)

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def _check_bucket(self) -> None:
        """Raise StorageError if the bucket does not exist (HEAD on a key answers a bare 404 for both)."""
        if self._bucket_ok:
            return
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:  # noqa: BLE001
            if _code(e) in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(f"s3://{self.bucket}: bucket does not exist") from None
            raise self._wrap(e, "") from None
        self._bucket_ok = True

    def _wrap(self, err: Exception, key: str) -> StorageError:
        from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        where = f"s3://{self.bucket}/{self._k(key)}"
        if isinstance(err, StorageError):
            return err
        inner = err.__cause__ or err.__context__
        if not isinstance(err, ClientError) and isinstance(inner, ClientError):
            err = inner  # boto3's upload_file wraps the ClientError in S3UploadFailedError
        if isinstance(err, ClientError):
            code = _code(err)
            if code == "NoSuchBucket":
                return StorageError(f"s3://{self.bucket}: bucket does not exist")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
                return StorageError(f"{where}: access denied ({code}); check the S3 credentials")
            if code in ("NoSuchKey", "404"):
                try:
                    self._check_bucket()
                except StorageError as be:
                    return be
                return StorageError(f"{where}: no such object")
            return StorageError(f"{where}: {code or err}")
        if isinstance(err, NoCredentialsError):
            return StorageError(f"{where}: no S3 credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
        if isinstance(err, (BotoConnectionError, HTTPClientError)):
            return StorageError(f"{where}: cannot reach S3 endpoint {self.endpoint or 'AWS'} ({err})")
        return StorageError(f"{where}: {err}")

    def list(self, prefix: str = "", recursive: bool = True) -> list[ObjectInfo]:
        """Objects under the folder `prefix`, or the object `prefix` itself (as LocalStorage does)."""
        full = self._k(prefix)
        folder = full + "/" if full else ""
        kwargs: dict[str, str] = {"Bucket": self.bucket, "Prefix": folder}
        if not recursive:
            kwargs["Delimiter"] = "/"
        out: list[ObjectInfo] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
                for o in page.get("Contents", []):
                    if not o["Key"].endswith("/"):
                        out.append(ObjectInfo(self._rel(o["Key"]), int(o["Size"]), _etag(o.get("ETag"))))
            if not out and full:
                # not a folder: maybe one object (how ctx.pull("progress.jsonl") fetches a single file)
                try:
                    h = self.client.head_object(Bucket=self.bucket, Key=full)
                    out.append(ObjectInfo(self._rel(full), int(h["ContentLength"]), _etag(h.get("ETag"))))
                except Exception as e:  # noqa: BLE001
                    if _code(e) not in ("404", "NoSuchKey", "NotFound"):
                        raise
        except Exception as e:  # noqa: BLE001 - normalised into StorageError
            raise self._wrap(e, prefix) from None
        return sorted(out, key=lambda o: o.key)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except ClientError as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                self._check_bucket()
                return False
            raise self._wrap(e, key) from None
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, key) from None

    def download(self, key: str, dest: Path) -> None:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        try:
            self.client.download_file(self.bucket, self._k(key), str(tmp), Config=self.transfer)
        except Exception as e:  # noqa: BLE001
            tmp.unlink(missing_ok=True)
            raise self._wrap(e, key) from None
        os.replace(tmp, dest)

    def upload(self, src: Path, key: str) -> None:
        try:
            self.client.upload_file(str(src), self.bucket, self._k(key), Config=self.transfer)
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, key) from None

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, key) from None

    def write_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, key) from None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._k(key))
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, key) from None


def _etag(v: object) -> str | None:
    return str(v).strip('"') or None if v else None


def _code(err: Exception) -> str:
    resp = getattr(err, "response", None)
    return str(resp.get("Error", {}).get("Code", "")) if isinstance(resp, dict) else ""


def open_storage(uri: str, endpoint: str | None = None, region: str | None = None) -> Storage:
    """Open a local folder or an s3://bucket/prefix as Storage."""
    if uri.startswith("s3://"):
        return S3Storage(uri, endpoint=endpoint, region=region)
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported storage scheme (use a path or s3://bucket/prefix)")
    return LocalStorage(uri.removeprefix("file://"))


def split_uri(uri: str) -> tuple[str, str]:
    """Split a file URI into (parent URI, file name): s3://b/p/x.pth -> (s3://b/p, x.pth)."""
    uri = uri.rstrip("/")
    parent, _, name = uri.rpartition("/")
    if uri.startswith("s3://") and parent.count("/") < 2:
        raise StorageError(f"{uri}: not an object URI")
    return (parent or "."), name


def fetch_uri(uri: str, dest_dir: Path, endpoint: str | None = None, region: str | None = None) -> Path:
    """Download one file given by URI (path or s3://) into dest_dir; local paths are returned as is."""
    if not uri.startswith("s3://"):
        p = Path(uri.removeprefix("file://")).expanduser()
        if not p.exists():
            raise StorageError(f"{uri}: no such file")
        return p
    parent, name = split_uri(uri)
    st = open_storage(parent, endpoint=endpoint, region=region)
    dest = Path(dest_dir) / name
    if not dest.exists():
        st.download(name, dest)
    return dest


def scratch_dir(prefix: str = "rvc-") -> Path:
    base = os.environ.get("RVC_SCRATCH") or None
    if base:
        Path(base).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))
