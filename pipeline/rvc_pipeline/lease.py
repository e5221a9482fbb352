"""One writer per experiment: a lease on `logs/<exp>/.rvc/lease.json`, held by every command that writes.

* Local storage: a real lock (`fcntl.flock` on `logs/<exp>/.rvc/lease.lock`), released by the kernel when
  the process dies; `lease.json` beside it only names the holder for the error message.
* S3 (any Storage without a local path): the lease object itself, created with a conditional put
  (If-None-Match) and renewed with compare-and-swap (If-Match on its ETag) by a daemon thread every ttl/3.
  Another process takes it over only after it expired, measured by the *server's* clock (its Date header
  minus the object's Last-Modified) so that clock skew between hosts does not matter, or at once when
  the owner string is its own (a restarted pod of the same Job: RVC_LEASE_OWNER = <ns>/<name>/<uid>).
  Except during a handover: when the lease of the same owner is held by another *instance*
  (RVC_LEASE_INSTANCE, the pod's name) and is still being renewed, that pod is alive, typically
  terminating after SIGTERM while it saves a checkpoint (a Job replaces a terminating pod at once on
  clusters without podReplacementPolicy: Failed, e.g. 1.20). The new pod then waits, up to
  RVC_LEASE_HANDOVER_WAIT seconds (default 600), until that lease is released or no longer renewed
  (ttl/3 + 2 s without a renewal: the old pod died), so it resumes from what the old pod saved.

A second writer fails at once with `LeaseHeld` naming the holder. A holder whose lease was taken over or
could not be renewed in time must stop writing: `check_current()` (no I/O) raises `LeaseLost` then.
Under torchrun or multi-node training only rank 0 takes the lease.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rvc_pipeline.core import layout
from rvc_pipeline.core.errors import LeaseHeld, StorageError
from rvc_pipeline.core.fileio import write_bytes_atomic
from rvc_pipeline.core.storage import Storage, env_seconds, read_regular_file
from rvc_pipeline.steps.processes import is_primary  # (leaf module: runner imports lease)

log = logging.getLogger("rvc_pipeline")

LEASE_FILE = layout.LEASE_FILE
LOCK_FILE = layout.LEASE_LOCK_FILE
DEFAULT_TTL, MIN_TTL, MAX_TTL = 120.0, 1.0, 3600.0
DEFAULT_HANDOVER_WAIT, MAX_HANDOVER_WAIT = 600.0, 7200.0
HANDOVER_POLL_S = 2.0
CLOCK_GRACE_S = 2.0  # Date and Last-Modified have 1 s resolution
MAX_RECORD_BYTES = 64 * 1024


class LeaseLost(LeaseHeld):
    """This process's lease was taken over or could not be renewed in time: it must stop writing."""


def lease_key(experiment: str) -> str:
    return layout.bookkeeping_key(experiment, LEASE_FILE)


def default_owner() -> str:
    """RVC_LEASE_OWNER (the operator sets <namespace>/<name>/<uid>), else user@host:pid."""
    env = _printable(os.environ.get("RVC_LEASE_OWNER", ""))
    if env:
        return env
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


def default_instance() -> str:
    """RVC_LEASE_INSTANCE (the operator sets the pod's name), else '' (one process, no handover)."""
    return _printable(os.environ.get("RVC_LEASE_INSTANCE", ""))


def handover_wait() -> float:
    return env_seconds("RVC_LEASE_HANDOVER_WAIT", DEFAULT_HANDOVER_WAIT, 0.0, MAX_HANDOVER_WAIT)


def lease_ttl() -> float:
    return env_seconds("RVC_LEASE_TTL", DEFAULT_TTL, MIN_TTL, MAX_TTL)


def _printable(s: str, limit: int = 200) -> str:
    """Free of control characters (a hostile lease must not inject lines or escapes into logs)."""
    return "".join(c if c.isprintable() else "?" for c in s.strip())[:limit]


@dataclass(frozen=True)
class LeaseRecord:
    owner: str
    host: str
    pid: int
    acquired: float  # unix time, holder's clock (shown only)
    renewed: float
    ttl: float
    nonce: str  # unique per write: tells our own late-answered write from another holder's
    released: bool = False
    instance: str = ""  # the pod of the holder (RVC_LEASE_INSTANCE); '' outside a cluster

    @classmethod
    def new(cls, owner: str, ttl: float, instance: str = "") -> LeaseRecord:
        now = time.time()
        return cls(owner, socket.gethostname(), os.getpid(), now, now, ttl, uuid.uuid4().hex,
                   instance=instance)

    def renewed_now(self, released: bool = False) -> LeaseRecord:
        return replace(self, renewed=time.time(), nonce=uuid.uuid4().hex, released=released)

    def to_bytes(self) -> bytes:
        return json.dumps({**asdict(self), "expires": self.renewed + self.ttl}, indent=1).encode()

    @classmethod
    def parse(cls, data: bytes) -> LeaseRecord | None:
        """The record, with every field checked and the ttl capped; None when unreadable."""
        if len(data) > MAX_RECORD_BYTES:
            return None
        try:
            d = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(d, dict) or not isinstance(d.get("owner"), str):
            return None
        return cls(owner=_printable(d["owner"]) or "?", host=_printable(str(d.get("host", "?")), 100),
                   pid=_int(d.get("pid")), acquired=_num(d.get("acquired"), math.nan),
                   renewed=_num(d.get("renewed"), math.nan),
                   ttl=min(MAX_TTL, max(MIN_TTL, _num(d.get("ttl"), DEFAULT_TTL))),
                   nonce=str(d.get("nonce", ""))[:64], released=d.get("released") is True,
                   instance=_printable(str(d.get("instance", "")), 253))


def _num(v: Any, default: float) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else default


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t)) if math.isfinite(t) else "an unknown time"


def _holder_text(experiment: str, rec: LeaseRecord | None, tail: str) -> str:
    if rec is None:
        who = "an unknown holder (its lease record is unreadable)"
    else:
        who = f"{rec.owner} (pid {rec.pid} on {rec.host}) since {_when(rec.acquired)}"
    return f"experiment '{experiment}' is being written by {who}{tail}; wait for it or stop it"


# ---------------------------------------------------------------- local storage: a file lock


class LocalLease:
    def __init__(self, root: Path, experiment: str, owner: str):
        self.experiment = experiment
        self.folder = root / layout.exp_key(experiment) / layout.MARKER_DIR
        self._fd = _open_lock(self.folder / LOCK_FILE)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            rec = _read_local_record(self.folder / LEASE_FILE)
            raise LeaseHeld(_holder_text(experiment, rec, f" (lock {self.folder / LOCK_FILE})")) from None
        self._note(LeaseRecord.new(owner, 0.0).to_bytes())

    def _note(self, data: bytes) -> None:
        """Name the holder in lease.json (for the message only: the lock is what excludes)."""
        try:
            write_bytes_atomic(self.folder / LEASE_FILE, data)
        except OSError as e:
            log.warning("lease: cannot write %s (%s); the lock still holds", self.folder / LEASE_FILE, e)

    def check(self) -> None:
        """A kernel lock cannot be lost while the process lives."""

    def release(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            (self.folder / LEASE_FILE).unlink()  # only when a file: a folder there stays as it was
        os.close(self._fd)  # drops the lock; the lock file stays (deleting it would let two hold one)
        self._fd = -1


def _open_lock(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        why = "a symbolic link" if e.strerror and "symbolic" in e.strerror.lower() else e.strerror
        raise StorageError(f"{path}: cannot open the experiment's lock file ({why})") from None


def _read_local_record(path: Path) -> LeaseRecord | None:
    try:
        return LeaseRecord.parse(read_regular_file(path, MAX_RECORD_BYTES + 1)[0])
    except OSError:  # missing, a folder, a FIFO: the holder is unknown
        return None


# ---------------------------------------------------------------- object storage: a renewed lease object


class ObjectLease:
    def __init__(self, storage: Storage, experiment: str, record: LeaseRecord, token: str, since: float):
        self.storage, self.experiment, self.key = storage, experiment, lease_key(experiment)
        self.record, self.token = record, token
        self._valid_until = since + record.ttl - min(5.0, record.ttl / 10)
        self._lost: str | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name=f"rvc-lease-{experiment}", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise LeaseLost when this process may no longer write (cheap: no I/O)."""
        if self._lost:
            raise LeaseLost(self._lost)
        if time.monotonic() > self._valid_until:
            raise LeaseLost(f"experiment '{self.experiment}': the lease {self.storage.uri}/{self.key} could "
                            f"not be renewed within its {self.record.ttl:g} s; stopped writing, since "
                            "another process may have taken it over")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.record.ttl / 3):
            try:
                self.renew()
            except LeaseLost as e:
                self._lost = str(e)
                log.error("%s", e)
                return
            except Exception as e:  # noqa: BLE001 - transient: the next tick tries again, check() bounds it
                log.warning("lease: renewing %s failed (%s); trying again in %.0f s", self.key, e,
                            self.record.ttl / 3)

    def renew(self) -> None:
        with self._mutex:
            t0 = time.monotonic()
            rec = self.record.renewed_now()
            token = _put(self.storage, self.key, rec, self.token)
            if token is None:
                cur = self.storage.read_versioned(self.key)
                holder = LeaseRecord.parse(cur.data) if cur else None
                who = f"{holder.owner} (pid {holder.pid} on {holder.host})" if holder else "another process"
                raise LeaseLost(f"experiment '{self.experiment}': the lease was taken over by {who}; "
                                "stopped writing")
            self.record, self.token = rec, token
            self._valid_until = t0 + rec.ttl - min(5.0, rec.ttl / 10)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=min(5.0, self.record.ttl))
        if self._lost:
            return
        if self._thread.is_alive():  # a renewal still waits on storage: releasing would wait as long
            log.warning("lease: storage does not answer; %s is left to expire (%g s)", self.key,
                        self.record.ttl)
            return
        with self._mutex:
            try:
                if _put(self.storage, self.key, self.record.renewed_now(released=True), self.token) is None:
                    log.warning("lease: %s was no longer ours when releasing it", self.key)
            except Exception as e:  # noqa: BLE001 - never hide the command's own result or error
                log.warning("lease: could not release %s (%s); it expires in %g s", self.key, e,
                            self.record.ttl)


def _put(storage: Storage, key: str, rec: LeaseRecord, token: str | None) -> str | None:
    """Conditional write of `rec`; a write that failed its condition only because a retried request had
    already landed (the nonce tells) counts as done."""
    data = rec.to_bytes()
    new = storage.put_if(key, data, token)
    if new is not None:
        return new
    cur = storage.read_versioned(key)
    return cur.token if cur is not None and cur.data == data else None


class _StillRenewed(Exception):  # noqa: N818 - control flow of _acquire_object
    """Our owner's lease is held by another instance that still renews it (a handover in progress)."""


def _alive_elsewhere(holder: LeaseRecord | None, age_s: float, owner: str, instance: str) -> bool:
    """The same owner's lease, held by another pod that renewed it within its renewal interval."""
    return (holder is not None and holder.owner == owner and not holder.released
            and holder.instance != instance and age_s < holder.ttl / 3 + 2 * CLOCK_GRACE_S)


def _try_acquire(storage: Storage, experiment: str, owner: str, ttl: float, instance: str) -> ObjectLease:
    key = lease_key(experiment)
    for _ in range(3):  # a lost race re-reads once or twice, never waits
        since = time.monotonic()
        rec = LeaseRecord.new(owner, ttl, instance)
        cur = storage.read_versioned(key)
        if cur is not None:
            holder = LeaseRecord.parse(cur.data)
            if _alive_elsewhere(holder, cur.age_s, owner, instance):
                raise _StillRenewed(holder.instance if holder else "?")
            left = _seconds_left(holder, cur.age_s, owner, ttl)
            if left > 0:
                raise LeaseHeld(_holder_text(experiment, holder, f", lease expires in {left:.0f} s"))
            if holder is not None and not holder.released:
                why = "same owner" if holder.owner == owner else f"expired {cur.age_s:.0f} s after renewal"
                log.warning("lease: taking over %s from %s (%s)", key, holder.owner, why)
        token = _put(storage, key, rec, cur.token if cur else None)
        if token is not None:
            return ObjectLease(storage, experiment, rec, token, since)
    raise LeaseHeld(f"experiment '{experiment}': another process took the lease {key} at the same moment; "
                    "wait for it or stop it")


def _acquire_object(storage: Storage, experiment: str, owner: str, ttl: float) -> ObjectLease:
    """Take the lease; during a handover (see the module docstring) wait for the other pod first."""
    instance, deadline, waiting = default_instance(), time.monotonic() + handover_wait(), False
    while True:
        try:
            return _try_acquire(storage, experiment, owner, ttl, instance)
        except _StillRenewed as e:
            if time.monotonic() >= deadline:
                raise LeaseHeld(f"experiment '{experiment}': pod {e} of this experiment still holds and "
                                f"renews the lease after {handover_wait():.0f} s "
                                "(RVC_LEASE_HANDOVER_WAIT); it is still running") from None
            if not waiting:
                log.info("lease: pod %s of this experiment is still stopping; waiting for it to save and "
                         "release the lease", e)
                waiting = True
            time.sleep(HANDOVER_POLL_S)


def _seconds_left(holder: LeaseRecord | None, age_s: float, owner: str, ttl: float) -> float:
    """How long the current lease still binds us (<= 0: free to take)."""
    if holder is None:  # unreadable: it binds for our own ttl after its last write
        return ttl + CLOCK_GRACE_S - age_s
    if holder.released or holder.owner == owner:
        return 0.0
    return holder.ttl + CLOCK_GRACE_S - age_s


# ---------------------------------------------------------------- holding it

_held: list[tuple[str, str, LocalLease | ObjectLease]] = []


def acquire(storage: Storage, experiment: str, owner: str | None = None,
            ttl: float | None = None) -> LocalLease | ObjectLease:
    owner = owner or default_owner()
    root = storage.local_path()
    if root is not None:
        return LocalLease(root, experiment, owner)
    return _acquire_object(storage, experiment, owner, ttl if ttl is not None else lease_ttl())


@contextlib.contextmanager
def hold(storage: Storage, experiment: str, owner: str | None = None,
         ttl: float | None = None) -> Iterator[LocalLease | ObjectLease | None]:
    """Hold the experiment's lease for the block (rank 0 only; re-entrant within one process)."""
    ident = (storage.uri, experiment)
    mine = [lease for u, e, lease in _held if (u, e) == ident]
    if not is_primary() or mine:
        yield mine[0] if mine else None
        return
    lease = acquire(storage, experiment, owner, ttl)
    _held.append((*ident, lease))
    try:
        yield lease
    finally:
        _held.remove((*ident, lease))
        lease.release()


def check_current() -> None:
    """Raise LeaseLost if a lease this process holds was lost. Call before every write to storage."""
    for _, _, lease in _held:
        lease.check()
