"""A real S3 API for tests: moto in server mode, as a subprocess on a free loopback port.

    endpoint, stop = start_moto()
    ...
    stop()

`moto_fixture()` makes a pytest fixture of it. The server speaks the real S3 REST protocol over HTTP, so
boto3 goes through its whole stack (signing, multipart transfers, paginators, error parsing).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _moto_command(port: int) -> list[str]:
    exe = Path(sys.executable).with_name("moto_server")
    if exe.exists():
        return [str(exe), "-H", "127.0.0.1", "-p", str(port)]
    found = shutil.which("moto_server")
    if found:
        return [found, "-H", "127.0.0.1", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM it when the test process dies (even by SIGKILL), so
    a killed pytest leaves no server behind. (Linux ties this to the starting *thread*: call start_moto
    from a thread that lives as long as the server, e.g. pytest's main thread.)"""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: teardown still stops the server
        pass


def start_moto(port: int = 0, env: dict[str, str] | None = None,
               timeout: float = 30.0) -> tuple[str, Callable[[], None]]:
    """Start `moto_server` on 127.0.0.1:`port` (0 = a free one); wait until it answers.

    Returns (endpoint_url, stop). `env` adds variables to the server's environment (for example
    INITIAL_NO_AUTH_ACTION_COUNT to make it enforce credentials).
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    senv = {**os.environ, **TEST_CREDENTIALS, **(env or {})}
    # the server logs every request: send that to a file, never to a pipe nobody drains (it would fill
    # up after a few hundred requests and block the server)
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop(), it outlives this function
    proc = subprocess.Popen(_moto_command(port), env=senv, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent)

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log.close()

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log.seek(0)
            err = log.read()[-4000:].decode(errors="replace")
            stop()
            raise RuntimeError(f"moto_server exited with {proc.returncode} before answering on {url}:\n{err}")
        try:
            # /moto-api/ is moto's own dashboard endpoint: it answers without credentials.
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=1) as r:
                if r.status < 500:
                    break
        except urllib.error.HTTPError as e:
            if e.code < 500:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop()
            raise RuntimeError(f"moto_server did not answer on {url} within {timeout} s")
        time.sleep(0.1)
    return url, stop


@dataclass
class S3Endpoint:
    url: str
    bucket: str  # a fresh, empty bucket for the current test

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def client(self):  # noqa: ANN201 - a boto3 S3 client
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")


def set_test_credentials(mp: pytest.MonkeyPatch) -> None:
    for k, v in TEST_CREDENTIALS.items():
        mp.setenv(k, v)
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        mp.delenv(k, raising=False)


def moto_fixture(scope: str = "session") -> Callable[..., Iterator[str]]:
    """A pytest fixture (default: session-scoped) yielding the endpoint URL of a running moto server."""

    @pytest.fixture(scope=scope)
    def _moto() -> Iterator[str]:
        url, stop = start_moto()
        try:
            yield url
        finally:
            stop()

    return _moto
