"""Bounded waiting on S3: an endpoint that accepts connections but never answers (a moto server stopped
with SIGSTOP), one that always answers 503, a closed port, and the settings that bound them.

Each case must end with a StorageError naming the endpoint and the operation within the configured small
timeouts, with a log line per retry, never a hang.
"""

from __future__ import annotations

import http.server
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rvc_pipeline.core.errors import StorageError
from rvc_pipeline.core.storage import S3Limits, S3Storage
from rvc_pipeline.lease import LeaseLost, acquire

from tests.s3server import free_port, set_test_credentials, start_moto

BUCKET = "frozen"


def _children_listening_on(port: int) -> list[int]:
    """Our child processes whose command line names `port` (the moto server start_moto launched)."""
    me, out = os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me and str(port).encode() in cmd:
            out.append(int(d.name))
    return out


@pytest.fixture(scope="module")
def own_moto() -> Iterator[tuple[str, int]]:
    """A moto server of this module alone (it gets stopped), with its process id."""
    url, stop = start_moto()
    [pid] = _children_listening_on(int(url.rsplit(":", 1)[1]))
    try:
        yield url, pid
    finally:
        os.kill(pid, signal.SIGCONT)
        stop()


@pytest.fixture
def fast_limits(monkeypatch: pytest.MonkeyPatch) -> S3Limits:
    set_test_credentials(monkeypatch)
    monkeypatch.setenv("RVC_STORAGE_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("RVC_STORAGE_READ_TIMEOUT", "1")
    monkeypatch.setenv("RVC_STORAGE_ATTEMPTS", "3")
    monkeypatch.setenv("RVC_STORAGE_DEADLINE", "30")
    return S3Limits.from_env()


class _Frozen:
    def __init__(self, pid: int):
        self.pid = pid

    def __enter__(self) -> _Frozen:
        os.kill(self.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *_: object) -> None:
        os.kill(self.pid, signal.SIGCONT)


def _storage(url: str) -> S3Storage:
    st = S3Storage(f"s3://{BUCKET}/runs", endpoint=url)
    st.client.create_bucket(Bucket=BUCKET)  # idempotent on moto in us-east-1
    st.write_bytes("logs/x/a.json", b"{}")  # a pooled connection exists before the freeze
    return st


def test_frozen_endpoint_fails_within_the_timeouts_naming_it(
    own_moto: tuple[str, int], fast_limits: S3Limits, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    url, pid = own_moto
    st = _storage(url)
    src = tmp_path / "f.bin"
    src.write_bytes(b"1" * 1000)
    ops = {
        "list_objects_v2": lambda: st.list("logs/x"),
        "get_object": lambda: st.read_bytes("logs/x/a.json"),
        "put_object": lambda: st.put_if("logs/x/.rvc/lease.json", b"{}", None),
    }
    caplog.set_level(logging.WARNING, logger="rvc_pipeline")
    with _Frozen(pid):
        for op, call in ops.items():
            t0 = time.monotonic()
            with pytest.raises(StorageError) as ei:
                call()
            took = time.monotonic() - t0
            assert f"s3 endpoint {url} did not answer {op} for s3://{BUCKET}/runs/logs/x/" in str(ei.value)
            assert "(3 tries)" in str(ei.value)
            # 3 tries of a 1 s read timeout plus standard backoff (< 1 s, then < 2 s)
            assert 2.5 < took < 9, (op, took)
    retries = [r.getMessage() for r in caplog.records if "retrying (try" in r.getMessage()]
    assert len(retries) == 2 * len(ops) and all(url in m for m in retries)
    assert st.read_bytes("logs/x/a.json") == b"{}"  # answered again once the server runs


def test_deadline_cuts_retries_short(own_moto: tuple[str, int], fast_limits: S3Limits,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    url, pid = own_moto
    monkeypatch.setenv("RVC_STORAGE_ATTEMPTS", "10")
    monkeypatch.setenv("RVC_STORAGE_DEADLINE", "2")
    st = _storage(url)
    with _Frozen(pid):
        t0 = time.monotonic()
        with pytest.raises(StorageError, match=r"did not answer list_objects_v2 .* \((2|3) tries\)"):
            st.list("logs/x")
        assert time.monotonic() - t0 < 7  # not 10 tries


def test_lease_holder_stops_when_it_cannot_renew(own_moto: tuple[str, int], fast_limits: S3Limits) -> None:
    url, pid = own_moto
    st = _storage(url)
    lease = acquire(st, "frozen-exp", owner="holder", ttl=2)
    lease.check()
    with _Frozen(pid):
        time.sleep(2.2)
        with pytest.raises(LeaseLost, match=r"could not be renewed within its 2 s"):
            lease.check()
        t0 = time.monotonic()
        lease.release()  # leaves it to expire rather than wait on a frozen endpoint
        assert time.monotonic() - t0 < 3


class _Always503(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        body = b"<Error><Code>SlowDown</Code><Message>busy</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = _answer  # noqa: N815

    def log_message(self, *_: object) -> None:
        pass


def test_endpoint_that_always_answers_503_gives_up_after_the_tries(
    fast_limits: S3Limits, caplog: pytest.LogCaptureFixture
) -> None:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Always503)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    caplog.set_level(logging.WARNING, logger="rvc_pipeline")
    try:
        st = S3Storage("s3://busy/runs", endpoint=url)
        t0 = time.monotonic()
        want = rf"s3 endpoint {url}: get_object for s3://busy/runs/logs/x/a\.json still failing after "
        with pytest.raises(StorageError, match=want + r".* \(3 tries.*HTTP 503 SlowDown"):
            st.read_bytes("logs/x/a.json")
        assert time.monotonic() - t0 < 8
    finally:
        srv.shutdown()
        srv.server_close()
    assert sum("HTTP 503 SlowDown" in r.getMessage() for r in caplog.records) == 2


def test_closed_port_fails_fast_naming_the_endpoint(fast_limits: S3Limits) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    st = S3Storage("s3://bkt/runs", endpoint=url)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach S3 endpoint {url}"):
        st.list("logs/x")
    assert time.monotonic() - t0 < 8


def test_defaults_and_bad_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    set_test_credentials(monkeypatch)
    for v in ("RVC_STORAGE_CONNECT_TIMEOUT", "RVC_STORAGE_READ_TIMEOUT", "RVC_STORAGE_ATTEMPTS",
              "RVC_STORAGE_DEADLINE"):
        monkeypatch.delenv(v, raising=False)
    st = S3Storage("s3://bkt/runs", endpoint="http://127.0.0.1:9")
    assert st.limits == S3Limits(connect_timeout=10, read_timeout=30, attempts=3, deadline=120)
    cfg = st.client.meta.config
    assert (cfg.connect_timeout, cfg.read_timeout) == (10, 30)
    assert cfg.retries == {"total_max_attempts": 3, "mode": "standard"}
    bad = {"RVC_STORAGE_READ_TIMEOUT": ["abc", "-1", "0", "nan", "inf", "1e99", "30s"],
           "RVC_STORAGE_ATTEMPTS": ["0", "100"], "RVC_STORAGE_DEADLINE": ["0.1", "-inf"]}
    for var, values in bad.items():
        for v in values:
            monkeypatch.setenv(var, v)
            with pytest.raises(StorageError, match=rf"^{var}=.*: expected a number of (seconds|tries)") as ei:
                S3Storage("s3://bkt/runs", endpoint="http://127.0.0.1:9")
            assert ei.value.permanent, (var, v)
        monkeypatch.delenv(var)
