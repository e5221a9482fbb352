"""One writer per experiment: the lease on local storage (a file lock) and on a real S3 API (moto server).

Two `rvc-pipeline` processes on one experiment: the second fails at once naming the holder, the first
completes, nothing is mixed. Then expiry, same-owner takeover, renewal, loss, release on exception, and
hostile or careless lease records and paths.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from rvc_pipeline.core.errors import LeaseHeld, StorageError
from rvc_pipeline.core.storage import Storage, open_storage
from rvc_pipeline.lease import (
    MAX_TTL,
    LeaseLost,
    LeaseRecord,
    acquire,
    check_current,
    default_owner,
    hold,
    lease_key,
    lease_ttl,
)

from tests.s3server import S3Endpoint

EXP = "race"
KEY = lease_key(EXP)

HOLDER = """
import sys
from rvc_pipeline.steps.runner import run_steps, writer_lease
from rvc_pipeline.core.spec import load_manifest

exp = load_manifest(sys.argv[1])
with writer_lease(exp):
    print("held", flush=True)
    sys.stdin.readline()
    summaries = run_steps(exp, ["preprocess"])  # re-enters the lease this process holds
    print("ran", summaries[0].get("pieces"), flush=True)
    sys.stdin.readline()
"""


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict]:
    """(name, spec.storage) on a local folder or a prefix of a fresh bucket on the moto server."""
    if request.param == "local":
        return "local", {"uri": str(tmp_path / "store")}
    ep: S3Endpoint = request.getfixturevalue("s3")
    return "s3", {"uri": ep.uri("runs"), "endpoint": ep.url}


def _store(storage: dict) -> Storage:
    return open_storage(storage["uri"], endpoint=storage.get("endpoint"))


def _put_record(st: Storage, data: bytes | dict) -> None:
    st.write_bytes(KEY, data if isinstance(data, bytes) else json.dumps(data).encode())


def _cli(manifest: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rvc_pipeline.cli", *args, "--spec", str(manifest)],
                          capture_output=True, text=True, timeout=300)


def test_two_writers_second_fails_fast_first_completes(
    backend: tuple[str, dict], voice_dir: Path, tmp_path: Path, offline_weights: Path
) -> None:
    kind, storage = backend
    data = tmp_path / "voices"
    data.mkdir()
    for w in sorted(voice_dir.glob("*.wav"))[:2]:
        (data / w.name).write_bytes(w.read_bytes())
    manifest = tmp_path / "exp.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment", "metadata": {"name": EXP},
        "spec": {"dataset": {"source": str(data)}, "storage": storage, "resources": {"device": "cpu"}}}))
    env = {**os.environ, "RVC_LEASE_OWNER": "team-a/race/uid-1"}
    a = subprocess.Popen([sys.executable, "-c", HOLDER, str(manifest)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert a.stdout is not None and a.stdin is not None
        assert a.stdout.readline().strip() == "held"
        holder = f"team-a/race/uid-1 (pid {a.pid} on {socket.gethostname()}) since "
        for phase in ("before A writes", "after A wrote"):
            t0 = time.monotonic()
            b = _cli(manifest, "preprocess")
            assert b.returncode == 1, (phase, b.stderr[-2000:])
            [line] = [ln for ln in b.stderr.splitlines() if ln.startswith("error:")]
            assert f"error: experiment '{EXP}' is being written by {holder}" in line
            assert line.endswith("wait for it or stop it")
            assert ("lease expires in" in line) == (kind == "s3")
            assert "Traceback" not in b.stderr
            assert time.monotonic() - t0 < 60  # fails at once (the time is the interpreter's start)
            if phase == "before A writes":
                assert not _store(storage).list(f"logs/{EXP}/0_gt_wavs")  # B wrote nothing
                a.stdin.write("go\n")
                a.stdin.flush()
                ran = a.stdout.readline().split()
                assert ran[0] == "ran", ran
        a.stdin.write("done\n")
        a.stdin.flush()
        assert a.wait(timeout=60) == 0
    finally:
        a.kill()
        a.wait()
    st = _store(storage)
    marker = json.loads(st.read_bytes(f"logs/{EXP}/.rvc/preprocess.done.json"))
    assert marker["pieces"] == int(ran[1]) == len(st.list(f"logs/{EXP}/0_gt_wavs"))  # nothing mixed
    c = _cli(manifest, "preprocess")  # the lease was released: the next writer goes ahead
    assert c.returncode == 0, c.stderr[-2000:]
    if kind == "local":
        assert not (Path(storage["uri"]) / KEY).exists()
    else:
        assert json.loads(st.read_bytes(KEY))["released"] is True


# ---------------------------------------------------------------- the S3 lease object


@pytest.fixture
def s3st(s3: S3Endpoint) -> Storage:
    return open_storage(s3.uri("runs"), endpoint=s3.url)


def test_s3_expired_lease_is_taken_over_and_a_live_one_is_not(s3st: Storage) -> None:
    _put_record(s3st, LeaseRecord.new("ghost@dead-node:7", 1.0).to_bytes())
    with pytest.raises(LeaseHeld, match=r"being written by ghost@dead-node:7 .*lease expires in \d s"):
        acquire(s3st, EXP, owner="me", ttl=5)
    time.sleep(4.2)  # ttl 1 s + 2 s grace, by the server's 1 s clock
    lease = acquire(s3st, EXP, owner="me", ttl=5)
    try:
        rec = LeaseRecord.parse(s3st.read_bytes(KEY))
        assert rec is not None and rec.owner == "me" and rec.pid == os.getpid() and not rec.released
    finally:
        lease.release()
    assert LeaseRecord.parse(s3st.read_bytes(KEY)).released  # type: ignore[union-attr]


def test_s3_same_owner_takes_over_at_once(s3st: Storage) -> None:
    """A restarted pod of the same Job (same RVC_LEASE_OWNER) does not wait for its old lease."""
    _put_record(s3st, LeaseRecord.new("ns/exp/uid-42", MAX_TTL).to_bytes())
    with pytest.raises(LeaseHeld):
        acquire(s3st, EXP, owner="ns/exp/uid-43")
    lease = acquire(s3st, EXP, owner="ns/exp/uid-42")
    lease.release()


def test_s3_replacement_pod_waits_for_a_terminating_pod(s3st: Storage, monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """Issue 11: a Job's replacement pod (same owner, another RVC_LEASE_INSTANCE) waits while the old pod
    still renews the lease (it is saving after SIGTERM) and goes on once it is released; a pod that keeps
    renewing past RVC_LEASE_HANDOVER_WAIT is reported as still running (LeaseHeld, transient)."""
    import threading

    monkeypatch.setenv("RVC_LEASE_INSTANCE", "train-1-new")
    old = acquire(s3st, EXP, owner="ns/exp/uid-42", ttl=60)
    rec = LeaseRecord.parse(s3st.read_bytes(KEY))
    assert rec is not None and rec.instance == "train-1-new"
    old.record = replace(old.record, instance="train-1-old")  # as if the old pod had written it
    old.renew()
    monkeypatch.setenv("RVC_LEASE_HANDOVER_WAIT", "1")
    t0 = time.monotonic()
    with pytest.raises(LeaseHeld, match="train-1-old .*still running"):
        acquire(s3st, EXP, owner="ns/exp/uid-42", ttl=60)
    assert time.monotonic() - t0 >= 1.0
    monkeypatch.setenv("RVC_LEASE_HANDOVER_WAIT", "60")
    threading.Timer(3.0, old.release).start()
    t0 = time.monotonic()
    new = acquire(s3st, EXP, owner="ns/exp/uid-42", ttl=60)
    waited = time.monotonic() - t0
    try:
        assert 2.5 <= waited < 20, waited
        rec = LeaseRecord.parse(s3st.read_bytes(KEY))
        assert rec is not None and rec.instance == "train-1-new" and not rec.released
    finally:
        new.release()
    # the same pod (a restarted container) and records without an instance take over at once
    monkeypatch.setenv("RVC_LEASE_INSTANCE", "train-1-old")
    _put_record(s3st, LeaseRecord.new("ns/exp/uid-42", 60, "train-1-old").to_bytes())
    t0 = time.monotonic()
    acquire(s3st, EXP, owner="ns/exp/uid-42", ttl=60).release()
    assert time.monotonic() - t0 < 2.0


def test_s3_renewal_keeps_a_long_run_and_loss_stops_the_writer(s3st: Storage, s3: S3Endpoint) -> None:
    with hold(s3st, EXP, owner="long-run", ttl=1.5) as lease:
        first = LeaseRecord.parse(s3st.read_bytes(KEY))
        time.sleep(3.2)  # more than twice the ttl: only renewal keeps it
        lease.check()
        check_current()
        now = LeaseRecord.parse(s3st.read_bytes(KEY))
        assert first and now and now.renewed > first.renewed + 0.9 and now.acquired == first.acquired
        with pytest.raises(LeaseHeld, match="being written by long-run"):
            acquire(s3st, EXP, owner="other", ttl=1.5)
        # someone overwrites the lease (a careless manual takeover): the holder notices at its next renewal
        s3.client().put_object(Bucket=s3.bucket, Key=f"runs/{KEY}",
                               Body=LeaseRecord.new("intruder", 60).to_bytes())
        time.sleep(1.0)
        with pytest.raises(LeaseLost, match="taken over by intruder"):
            check_current()
    assert LeaseRecord.parse(s3st.read_bytes(KEY)).owner == "intruder"  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_released_on_exception(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    st = open_storage(str(tmp_path)) if kind == "local" else request.getfixturevalue("s3st")
    with pytest.raises(ValueError, match="boom"), hold(st, EXP, owner="first", ttl=60):
        raise ValueError("boom")
    with hold(st, EXP, owner="second", ttl=60) as lease:
        assert lease is not None
        with hold(st, EXP, owner="second") as inner:  # re-entrant in one process
            assert inner is lease


def test_hostile_lease_records(s3st: Storage) -> None:
    far = time.time() + 10 * 365 * 86400
    # a clock-skewed (or hostile) host: renewed and expiring years ahead, ttl absurd: capped to MAX_TTL
    _put_record(s3st, {"owner": "skewed", "pid": 1, "host": "h", "acquired": far, "renewed": far,
                       "expires": far * 2, "ttl": 1e12})
    with pytest.raises(LeaseHeld) as ei:
        acquire(s3st, EXP, owner="me", ttl=5)
    left = int(str(ei.value).split("expires in ")[1].split()[0])
    assert MAX_TTL - 10 < left <= MAX_TTL + 2
    # the same record with a short ttl expires by the server's clock, whatever its timestamps say
    _put_record(s3st, {"owner": "skewed", "renewed": far, "expires": far, "ttl": 1})
    time.sleep(4.2)
    acquire(s3st, EXP, owner="me", ttl=5).release()
    # corrupt JSON: held for our own ttl after its last write, then taken over
    _put_record(s3st, b'{"owner": "half-writ')
    with pytest.raises(LeaseHeld, match=r"an unknown holder \(its lease record is unreadable\).*expires in"):
        acquire(s3st, EXP, owner="me", ttl=1)
    time.sleep(4.2)
    acquire(s3st, EXP, owner="me", ttl=1).release()
    # control characters in the owner must not reach the one-line message
    _put_record(s3st, {"owner": "evil\nerror: fake line\x1b[31m", "pid": "x", "ttl": "nan"})
    with pytest.raises(LeaseHeld) as ei:
        acquire(s3st, EXP, owner="me", ttl=5)
    msg = str(ei.value)
    assert "\n" not in msg and "\x1b" not in msg and "evil?error: fake line?[31m (pid 0" in msg


@pytest.mark.parametrize("data", [
    b"", b"null", b"[]", b'"owner"', b'{"owner": 5}', b"\xff\xfe", b'{"owner": "x"' + b" " * 70000 + b"}",
])
def test_unreadable_records_parse_as_none(data: bytes) -> None:
    assert LeaseRecord.parse(data) is None


def test_record_fields_are_checked() -> None:
    rec = LeaseRecord.parse(json.dumps({"owner": "o", "pid": True, "ttl": -5, "acquired": "yesterday",
                                        "released": "yes"}).encode())
    assert rec is not None and rec.pid == 0 and rec.ttl == 1.0 and rec.released is False
    assert rec.acquired != rec.acquired  # nan: shown as "an unknown time"


# ---------------------------------------------------------------- local specifics


def test_local_lock_paths_careless_and_hostile(tmp_path: Path) -> None:
    st = open_storage(str(tmp_path))
    rvc = tmp_path / "logs" / EXP / ".rvc"
    rvc.mkdir(parents=True)
    (rvc / "lease.json").mkdir()  # a folder where the holder's note goes: the lock still excludes
    with hold(st, EXP, owner="first"), pytest.raises(LeaseHeld, match="unknown holder"):
        _other_process_acquires(tmp_path)
    assert (rvc / "lease.json").is_dir()  # left as it was
    (rvc / "lease.json").rmdir()
    (rvc / "lease.lock").unlink()
    (rvc / "lease.lock").mkdir()
    with pytest.raises(StorageError, match=r"lease\.lock: cannot open the experiment's lock file"):
        acquire(st, EXP)
    (rvc / "lease.lock").rmdir()
    (rvc / "lease.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StorageError, match=r"lease\.lock: cannot open .*symbolic link"):
        acquire(st, EXP)
    assert not (tmp_path / "elsewhere").exists()
    (rvc / "lease.lock").unlink()
    rvc.rmdir()
    rvc.write_text("not a folder")
    with pytest.raises(StorageError, match=r"\.rvc/lease\.lock: cannot open"):
        acquire(st, EXP)


def _other_process_acquires(root: Path) -> None:
    code = ("import sys; from rvc_pipeline.lease import acquire\n"
            "from rvc_pipeline.core.errors import LeaseHeld\n"
            "from rvc_pipeline.core.storage import open_storage\n"
            "try:\n acquire(open_storage(sys.argv[1]), sys.argv[2])\n"
            "except LeaseHeld as e:\n print(e); sys.exit(7)\n")
    r = subprocess.run([sys.executable, "-c", code, str(root), EXP], capture_output=True, text=True,
                       timeout=60)
    if r.returncode == 7:
        raise LeaseHeld(r.stdout.strip())
    assert r.returncode == 0, r.stderr


@pytest.fixture
def no_rank(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for v in ("RANK", "NODE_RANK", "RVC_LEASE_OWNER", "RVC_LEASE_TTL"):
        monkeypatch.delenv(v, raising=False)
    yield monkeypatch


@pytest.mark.parametrize("var", ["RANK", "NODE_RANK"])
def test_only_rank_zero_takes_the_lease(no_rank: pytest.MonkeyPatch, tmp_path: Path, var: str) -> None:
    st = open_storage(str(tmp_path))
    with hold(st, EXP) as outer:  # rank 0 holds it ...
        no_rank.setenv(var, "1")
        with hold(open_storage(str(tmp_path / "other")), EXP) as lease:  # ... rank 1 takes none
            assert lease is None
        assert outer is not None
    assert not (tmp_path / "other" / "logs").exists()


def test_owner_and_ttl_settings(no_rank: pytest.MonkeyPatch) -> None:
    assert default_owner().endswith(f"@{socket.gethostname()}:{os.getpid()}")
    no_rank.setenv("RVC_LEASE_OWNER", "ns/name/uid-1\n")
    assert default_owner() == "ns/name/uid-1"
    assert lease_ttl() == 120
    no_rank.setenv("RVC_LEASE_TTL", "30")
    assert lease_ttl() == 30
    for bad in ("abc", "0", "-5", "nan", "inf", "1e9"):
        no_rank.setenv("RVC_LEASE_TTL", bad)
        with pytest.raises(StorageError, match=r"^RVC_LEASE_TTL=.*: expected a number of seconds") as ei:
            lease_ttl()
        assert ei.value.permanent


def test_fifo_or_device_as_lease_record_never_hangs(tmp_path: Path) -> None:
    st = open_storage(str(tmp_path))
    note = tmp_path / KEY
    with hold(st, EXP, owner="first"):
        note.unlink()
        os.mkfifo(note)  # a reader that opened it blocking would wait forever for a writer
        with pytest.raises(LeaseHeld, match="unknown holder"):
            _other_process_acquires(tmp_path)
        with pytest.raises(StorageError, match=r"lease\.json: cannot read \(not a regular file\)"):
            st.read_versioned(KEY)
        note.unlink()
        note.symlink_to("/dev/zero")  # endless content
        with pytest.raises(StorageError, match=r"cannot read \(not a regular file\)"):
            st.read_versioned(KEY)
        with pytest.raises(LeaseHeld, match="unknown holder"):
            _other_process_acquires(tmp_path)
    assert Path("/dev/zero").exists()  # released without touching the link's target
