"""Artifact and dataset storage: a local folder or an S3 prefix (any S3-compatible endpoint).

Keys are '/'-separated paths relative to the storage root. Credentials for S3 come from the usual
AWS environment variables (or files); the endpoint may be given explicitly or as AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import fcntl
import hashlib
import logging
import math
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rvc_pipeline.core.errors import StorageError, s3_code_is_permanent
from rvc_pipeline.core.fileio import atomic_path, write_bytes_atomic

log = logging.getLogger("rvc_pipeline")


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the storage root
    size: int
    etag: str | None = None  # S3 ETag without quotes (None for local files)


@dataclass(frozen=True)
class Versioned:
    """An object read together with the token that a conditional write (`replace_if_match`) compares."""

    data: bytes
    token: str  # S3: the ETag; local: the MD5 of the content
    age_s: float  # seconds since it was last written, by the storage's own clock (S3: the server's)


def env_seconds(name: str, default: float, lo: float, hi: float, unit: str = "seconds") -> float:
    """A number (by default a duration in seconds) from the environment variable `name`, in [lo, hi]."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        v = float(raw)
    except ValueError:
        v = math.nan
    if not (lo <= v <= hi):  # also refuses nan and inf
        raise StorageError(f"{name}={raw[:40]!r}: expected a number of {unit} between {lo:g} and {hi:g}",
                           permanent=True)
    return v


@dataclass(frozen=True)
class S3Limits:
    """How long S3Storage waits: per try (connect, read), how many tries, and a deadline per request.

    The deadline bounds one API request with its retries (one page of a listing, one part of a multipart
    transfer), not a whole storage operation: a multi-GB upload that keeps answering is never cut short,
    while a request that stops answering fails within min(deadline, tries x (connect + read timeout)).
    """

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    attempts: int = 3
    deadline: float = 120.0

    @classmethod
    def from_env(cls) -> S3Limits:
        return cls(
            connect_timeout=env_seconds("RVC_STORAGE_CONNECT_TIMEOUT", cls.connect_timeout, 0.1, 600),
            read_timeout=env_seconds("RVC_STORAGE_READ_TIMEOUT", cls.read_timeout, 0.1, 3600),
            attempts=int(env_seconds("RVC_STORAGE_ATTEMPTS", cls.attempts, 1, 20, unit="tries")),
            deadline=env_seconds("RVC_STORAGE_DEADLINE", cls.deadline, 0.5, 86400),
        )


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
    def read_versioned(self, key: str) -> Versioned | None: ...
    def put_if(self, key: str, data: bytes, token: str | None) -> str | None: ...
    def create_exclusive(self, key: str, data: bytes) -> bool: ...
    def replace_if_match(self, key: str, data: bytes, token: str) -> bool: ...


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
            raise StorageError(f"{self.uri}/{key}: no such file", permanent=True)
        if src.resolve() == Path(dest).resolve():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest, fsync=False) as tmp:  # a working copy: fetched again when missing
            shutil.copyfile(src, tmp)

    def upload(self, src: Path, key: str) -> None:
        dst = self._p(key)
        if Path(src).resolve() == dst.resolve():
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)

    def read_bytes(self, key: str) -> bytes:
        p = self._p(key)
        if not p.is_file():
            raise StorageError(f"{self.uri}/{key}: no such file", permanent=True)
        return p.read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        dst = self._p(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(dst, data)

    def delete(self, key: str) -> None:
        p = self._p(key)
        if p.is_file():
            p.unlink()

    # conditional writes: a file link for create (atomic, also on NFS), a lock file for compare-and-swap

    def read_versioned(self, key: str) -> Versioned | None:
        try:
            data, mtime = read_regular_file(self._p(key))
        except FileNotFoundError:
            return None
        except OSError as e:  # a folder, a FIFO or device, no permission
            raise StorageError(f"{self.uri}/{key}: cannot read ({e.strerror})") from None
        return Versioned(data, _md5(data), max(0.0, time.time() - mtime))

    def put_if(self, key: str, data: bytes, token: str | None) -> str | None:
        """Write `data` if `key` does not exist (token None) or still has `token`; the new token, or None
        when the condition did not hold. Readers never see a partial file."""
        dst = self._p(key)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            if token is None:
                return _md5(data) if write_bytes_atomic(dst, data, exclusive=True) else None
            with _flocked(dst.with_name(dst.name + ".lock.partial")):
                cur = self.read_versioned(key)
                if cur is None or cur.token != token:
                    return None
                write_bytes_atomic(dst, data)
        except OSError as e:
            raise StorageError(f"{self.uri}/{key}: cannot write ({e.strerror})") from None
        return _md5(data)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write `data` to `key` unless it exists (then False): one of several racing writers wins."""
        return self.put_if(key, data, None) is not None

    def replace_if_match(self, key: str, data: bytes, token: str) -> bool:
        """Replace `key` only if it still has `token` (from read_versioned): compare-and-swap."""
        return self.put_if(key, data, token) is not None


class S3Storage:
    def __init__(self, uri: str, endpoint: str | None = None, region: str | None = None):
        import boto3
        from botocore.config import Config

        rest = uri[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StorageError(f"{uri}: no bucket in S3 URI", permanent=True)
        self.uri = uri.rstrip("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.limits = S3Limits.from_env()
        cfg = Config(retries={"total_max_attempts": self.limits.attempts, "mode": "standard"},
                     connect_timeout=self.limits.connect_timeout, read_timeout=self.limits.read_timeout)
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
        _RequestWatch(self.client.meta.endpoint_url, self.limits).install(self.client.meta.events)

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
                raise StorageError(f"s3://{self.bucket}: bucket does not exist", permanent=True) from None
            raise self._wrap(e, "") from None
        self._bucket_ok = True

    def _wrap(self, err: Exception, key: str) -> StorageError:
        """One StorageError naming the URI, `permanent` when no retry can help (see errors.py)."""
        from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError, ParamValidationError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        where = f"s3://{self.bucket}/{self._k(key)}"
        if isinstance(err, StorageError):
            return err
        inner = err.__cause__ or err.__context__
        if not isinstance(err, ClientError) and isinstance(inner, ClientError):
            err = inner  # boto3's upload_file wraps the ClientError in S3UploadFailedError
        if isinstance(err, ClientError):
            return self._wrap_client(err, where)
        if isinstance(err, NoCredentialsError):
            return StorageError(f"{where}: no S3 credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)",
                                permanent=True)
        if isinstance(err, ParamValidationError):  # refused by botocore before sending, e.g. a bucket name
            return StorageError(f"{where}: {' '.join(str(err).split())}", permanent=True)
        if isinstance(err, (BotoConnectionError, HTTPClientError)):
            return StorageError(f"{where}: cannot reach S3 endpoint {self.endpoint or 'AWS'} ({err})")
        return StorageError(f"{where}: {err}")

    def _wrap_client(self, err: Exception, where: str) -> StorageError:
        code = _code(err)
        if code == "NoSuchBucket":
            return StorageError(f"s3://{self.bucket}: bucket does not exist", permanent=True)
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return StorageError(f"{where}: access denied ({code}); check the S3 credentials", permanent=True)
        if code in ("NoSuchKey", "404"):
            try:
                self._check_bucket()
            except StorageError as be:
                return be
            return StorageError(f"{where}: no such object", permanent=True)
        if s3_code_is_permanent(code):
            return StorageError(f"{where}: {code}", permanent=True)
        return StorageError(f"{where}: {code or err} (S3 failed; a retry may succeed)")

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
        with atomic_path(dest, fsync=False) as tmp:  # a working copy: fetched again when missing
            try:
                self.client.download_file(self.bucket, self._k(key), str(tmp), Config=self.transfer)
            except Exception as e:  # noqa: BLE001
                raise self._wrap(e, key) from None

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

    # conditional writes: PutObject with If-None-Match: * (create) or If-Match: <ETag> (compare-and-swap)

    def read_versioned(self, key: str) -> Versioned | None:
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self._k(key))
            data = r["Body"].read()
        except Exception as e:  # noqa: BLE001
            if _code(e) in ("NoSuchKey", "404"):
                self._check_bucket()
                return None
            raise self._wrap(e, key) from None
        return Versioned(data, _etag(r.get("ETag")) or "", _server_age(r))

    def put_if(self, key: str, data: bytes, token: str | None) -> str | None:
        """Write `data` if `key` does not exist (token None) or still has ETag `token`; the new ETag, or
        None when the condition did not hold (412, 409 for a concurrent conditional write, or 404)."""
        cond = {"IfNoneMatch": "*"} if token is None else {"IfMatch": f'"{token}"'}
        try:
            r = self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, **cond)
        except Exception as e:  # noqa: BLE001
            lost = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
            if _code(e) in lost or (token is not None and _code(e) in ("NoSuchKey", "404")):
                return None
            raise self._wrap(e, key) from None
        return _etag(r.get("ETag")) or ""

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write `data` to `key` unless it exists (then False): one of several racing writers wins."""
        return self.put_if(key, data, None) is not None

    def replace_if_match(self, key: str, data: bytes, token: str) -> bool:
        """Replace `key` only if its ETag is still `token` (from read_versioned): compare-and-swap."""
        return self.put_if(key, data, token) is not None


class _RequestWatch:
    """botocore event hooks that bound the wait for one S3 request: its start is stamped, every failed
    try is logged, and once the tries or the deadline are used up it fails with a StorageError that names
    the endpoint, the operation and the key (rather than botocore's bare timeout)."""

    def __init__(self, endpoint: str, limits: S3Limits):
        self.endpoint, self.limits = endpoint, limits

    def install(self, events: Any) -> None:
        events.register("before-parameter-build.s3", self.stamp)
        events.register_first("needs-retry.s3", self.after_try)

    def stamp(self, params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        what = params.get("Key", params.get("Prefix", ""))
        context["rvc_request"] = (time.monotonic(), f"s3://{params.get('Bucket', '')}/{what}")

    def after_try(self, attempts: int, operation: Any, caught_exception: Exception | None = None,
                  response: Any = None, request_dict: dict[str, Any] | None = None, **_: Any) -> None:
        failure = _try_failure(caught_exception, response)
        stamp = ((request_dict or {}).get("context") or {}).get("rvc_request")
        if failure is None or stamp is None:
            return
        from botocore import xform_name

        waited, what = time.monotonic() - stamp[0], stamp[1]
        op, lim = xform_name(operation.name), self.limits
        if _is_timeout(caught_exception) and (attempts >= lim.attempts or waited >= lim.deadline):
            raise StorageError(f"s3 endpoint {self.endpoint} did not answer {op} for {what} within "
                               f"{waited:.1f} s ({attempts} tries)")
        refused = caught_exception is not None  # left to _wrap: "cannot reach S3 endpoint ..."
        if waited >= lim.deadline or (attempts >= lim.attempts and not refused):
            raise StorageError(f"s3 endpoint {self.endpoint}: {op} for {what} still failing after "
                               f"{waited:.1f} s ({attempts} tries, deadline {lim.deadline:g} s): {failure}")
        if attempts < lim.attempts:
            log.warning("s3 endpoint %s: %s for %s failed after %.1f s (%s); retrying (try %d of %d)",
                        self.endpoint, op, what, waited, failure, attempts + 1, lim.attempts)


def _try_failure(err: Exception | None, response: Any) -> str | None:
    """Why one try failed in a way worth retrying (no answer, 5xx, throttled), or None."""
    if err is not None:
        return f"{type(err).__name__}: {str(err)[:200]}"
    if not isinstance(response, tuple) or len(response) < 2:
        return None
    status = getattr(response[0], "status_code", 200)
    code = str((response[1] or {}).get("Error", {}).get("Code", "")) if isinstance(response[1], dict) else ""
    if status >= 500 or status == 429 or "Throttl" in code or code == "SlowDown":
        return f"HTTP {status} {code}".strip()
    return None


def _is_timeout(err: Exception | None) -> bool:
    from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError

    return isinstance(err, (ConnectTimeoutError, ReadTimeoutError))


def _server_age(r: dict[str, Any]) -> float:
    """Seconds since the object was written, by the server's clock (its Date header minus the object's
    Last-Modified), so that a client with a skewed clock neither expires a lease early nor keeps it late."""
    modified = r.get("LastModified")
    if modified is None:
        return 0.0
    now = time.time()
    date = (r.get("ResponseMetadata", {}).get("HTTPHeaders") or {}).get("date")
    with contextlib.suppress(TypeError, ValueError):
        if date:
            now = email.utils.parsedate_to_datetime(date).timestamp()
    return max(0.0, now - modified.timestamp())


def read_regular_file(path: Path, limit: int | None = None) -> tuple[bytes, float]:
    """(content, mtime) of a regular file, at most `limit` bytes; a FIFO or device is refused with
    OSError rather than read (it could block forever or never end)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL,
                          "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file")
        return (f.read() if limit is None else f.read(limit)), st.st_mtime


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@contextlib.contextmanager
def _flocked(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `lock` (created if needed, never through a symbolic link)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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
        raise StorageError(f"{uri}: unsupported storage scheme (use a path or s3://bucket/prefix)",
                           permanent=True)
    return LocalStorage(uri.removeprefix("file://"))


def split_uri(uri: str) -> tuple[str, str]:
    """Split a file URI into (parent URI, file name): s3://b/p/x.pth -> (s3://b/p, x.pth)."""
    uri = uri.rstrip("/")
    parent, _, name = uri.rpartition("/")
    if uri.startswith("s3://") and parent.count("/") < 2:
        raise StorageError(f"{uri}: not an object URI", permanent=True)
    return (parent or "."), name


def fetch_uri(uri: str, dest_dir: Path, endpoint: str | None = None, region: str | None = None) -> Path:
    """Download one file given by URI (path or s3://) into dest_dir; local paths are returned as is."""
    if not uri.startswith("s3://"):
        p = Path(uri.removeprefix("file://")).expanduser()
        if not p.exists():
            raise StorageError(f"{uri}: no such file", permanent=True)
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
