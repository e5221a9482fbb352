"""Which storage an experiment may make the operator touch, and which experiment owns a folder (pure).

The operator reads markers and progress and, on request, deletes artifacts with its *own* credentials.
Two checks keep it from doing that for an experiment that names someone else's storage:

1. The allow-list (`RVC_STORAGE_ALLOWED_PREFIXES`, chart value `storage.allowedPrefixes`): per namespace,
   the s3:// prefixes its experiments' folders (`<spec.storage.uri>/logs/<name>/`) must lie in; key "*"
   covers namespaces without an entry of their own. Outside: refused before storage is opened. With an
   allow-list, `spec.storage.endpoint` must be unset or the operator's own `RVC_S3_ENDPOINT`: the
   prefixes name buckets on that endpoint.
2. The ownership record `logs/<name>/.rvc/owner.json` (namespace, name, uid, created), written with a
   conditional create when the operator first starts the experiment. Another uid there: refused, the
   folder is never read into this status and never deleted.

See docs/operator.md ("Storage access and ownership") for the upgrade rules `verdict` implements.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from rvc_pipeline.core import layout
from rvc_pipeline.core.spec import Experiment, SpecError

from .api import parse_experiment

MAX_RECORD_BYTES = 4096  # a record is ~200 bytes; anything bigger is not one of ours
ANY_NAMESPACE = "*"

# verdicts
OWNED = "owned"  # the record names this resource
CLAIM = "claim"  # no record and nobody older names the folder: create the record
TAKEOVER = "takeover"  # the record names this namespace/name with an older uid: a deleted predecessor
FOREIGN = "foreign"  # someone else's (or an unreadable record): hands off

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

OWNED_ELSEWHERE = ("storage logs/{name}/ belongs to another RVCExperiment; choose another experimentName "
                   "or storage.uri")


class PrefixError(ValueError):
    """An s3:// URI or prefix that cannot be compared safely; the message says why."""


@dataclass(frozen=True)
class Refusal:
    """Why the operator will not touch an experiment's storage (phase Failed, Warning event)."""

    reason: str  # CamelCase, for the condition and the event
    message: str


@dataclass(frozen=True)
class Owner:
    namespace: str
    name: str
    uid: str
    created: str = ""

    def to_json(self) -> bytes:
        return json.dumps({"namespace": self.namespace, "name": self.name, "uid": self.uid,
                           "created": self.created}, sort_keys=True).encode()

    @classmethod
    def of(cls, manifest: Mapping[str, Any], now: datetime | None = None) -> Owner:
        meta = manifest.get("metadata") or {}
        when = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return cls(str(meta.get("namespace") or "default"), str(meta.get("name") or ""),
                   str(meta.get("uid") or ""), when)


def parse_record(data: bytes | None) -> Owner | None:
    """The record's owner; None for anything that is not a well-formed record (treated as foreign)."""
    if data is None or len(data) > MAX_RECORD_BYTES:
        return None
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    fields = [doc.get(k) for k in ("namespace", "name", "uid")]
    strings = [v for v in fields if isinstance(v, str) and v and not _CONTROL.search(v)]
    if len(strings) != len(fields):
        return None
    created = doc.get("created")
    return Owner(strings[0], strings[1], strings[2], created if isinstance(created, str) else "")


def owner_key(experiment: str) -> str:
    return layout.bookkeeping_key(experiment, layout.OWNER_FILE)


def folder_key(experiment: str) -> str:
    return f"{layout.exp_key(experiment)}/"


# ---------------------------------------------------------------------------------------------------
# allow-list
# ---------------------------------------------------------------------------------------------------
def canonical_prefix(uri: str) -> str:
    """`s3://bucket/a/b/` for s3://bucket/a/b (a trailing "/" so that s3://b/team-a never admits
    s3://b/team-ab). PrefixError for other schemes, no bucket, control characters, and empty, "." or ".."
    path segments (some S3-compatible servers normalise those)."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise PrefixError(f"{uri!r} is not an s3:// URI")
    if _CONTROL.search(uri) or "\\" in uri:
        raise PrefixError(f"{uri!r} contains control characters or a backslash")
    bucket, _, path = uri[len("s3://"):].partition("/")
    if not bucket:
        raise PrefixError(f"{uri!r} names no bucket")
    parts = [p for p in path.rstrip("/").split("/")] if path.rstrip("/") else []
    if any(p in ("", ".", "..") for p in parts):
        raise PrefixError(f"{uri!r} has an empty, '.' or '..' path segment")
    return "/".join([f"s3://{bucket}", *parts]) + "/"


def experiment_folder(exp: Experiment) -> str:
    """The canonical s3:// URI of the experiment's folder <storage.uri>/logs/<name>/."""
    return canonical_prefix(str(exp.spec.storage.uri).rstrip("/") + "/" + folder_key(exp.name))


def prefixes_for(namespace: str, table: Mapping[str, tuple[str, ...]] | None) -> tuple[str, ...] | None:
    """The namespace's allowed prefixes (its own entry, else "*"); None = no allow-list configured."""
    if table is None:
        return None
    if namespace in table:
        return table[namespace]
    return table.get(ANY_NAMESPACE, ())


def _same_endpoint(a: str | None, b: str | None) -> bool:
    return (a or "").rstrip("/") == (b or "").rstrip("/")


def check_allowed(exp: Experiment, table: Mapping[str, tuple[str, ...]] | None,
                  default_endpoint: str | None) -> Refusal | None:
    """None when the operator may open the experiment's storage; else the refusal naming the field."""
    allowed = prefixes_for(exp.namespace, table)
    if allowed is None:
        return None
    shown = ", ".join(allowed) or "none"
    endpoint = exp.spec.storage.endpoint
    if endpoint and not _same_endpoint(endpoint, default_endpoint):
        return Refusal("StorageNotAllowed", f"spec.storage.endpoint: {endpoint!r} is not the operator's S3 "
                       f"endpoint; namespace {exp.namespace} may use only {shown} there (leave "
                       "spec.storage.endpoint unset)")
    try:
        folder = experiment_folder(exp)
    except PrefixError as e:
        return Refusal("StorageNotAllowed", f"spec.storage.uri: {e}; allowed prefixes for namespace "
                       f"{exp.namespace}: {shown}")
    if any(folder.startswith(p) for p in allowed):
        return None
    return Refusal("StorageNotAllowed", f"spec.storage.uri: {folder} is outside the storage prefixes allowed "
                   f"for namespace {exp.namespace}: {shown}")


def admit_storage(manifest: Mapping[str, Any], table: Mapping[str, tuple[str, ...]] | None,
                  default_endpoint: str | None, parsed: Experiment | SpecError | None = None
                  ) -> tuple[Experiment | None, Refusal | None]:
    """(experiment, None) when the operator may open the experiment's storage; (None, refusal) when the
    allow-list refuses it; (None, None) when the spec does not parse or names no s3:// storage (the state
    machine reports those as an invalid spec; the operator never opens a local path). `parsed`: the
    manifest as the caller parsed it already (api.parse_experiment), None: parsed here."""
    if isinstance(parsed, SpecError):
        return None, None
    try:
        exp = parsed if parsed is not None else parse_experiment(manifest)
    except SpecError:
        return None, None
    if not str(exp.spec.storage.uri).startswith("s3://"):
        return None, None
    refusal = check_allowed(exp, table, default_endpoint)
    return (None, refusal) if refusal else (exp, None)


def location(exp: Experiment, default_endpoint: str | None) -> str | None:
    """Endpoint and folder of an experiment, to compare two experiments; None when not comparable."""
    try:
        folder = experiment_folder(exp)
    except PrefixError:
        return None
    return f"{(exp.spec.storage.endpoint or default_endpoint or '').rstrip('/')} {folder}"


# ---------------------------------------------------------------------------------------------------
# ownership
# ---------------------------------------------------------------------------------------------------
def verdict(record: Owner | None, record_present: bool, me: Owner, has_markers: bool,
            older_rival: bool) -> str:
    """Who owns the folder, from what storage holds.

    record present: ours (OWNED); same namespace/name but another uid (TAKEOVER: the resource was deleted
    and created again, and (namespace, name) is unique in a cluster); else FOREIGN (also for a record that
    does not parse). No record: CLAIM, unless the folder already holds step markers and an older live
    RVCExperiment names the same folder (an experiment started before ownership records existed): FOREIGN.
    """
    if record_present:
        if record is None:
            return FOREIGN
        if record.uid == me.uid:
            return OWNED
        if (record.namespace, record.name) == (me.namespace, me.name):
            return TAKEOVER
        return FOREIGN
    if has_markers and older_rival:
        return FOREIGN
    return CLAIM


def _age_key(manifest: Mapping[str, Any]) -> tuple[str, str, str]:
    m = manifest.get("metadata") or {}
    return (str(m.get("creationTimestamp") or ""), str(m.get("namespace") or ""), str(m.get("name") or ""))


def is_older_rival(me: Mapping[str, Any], my_place: str | None, other: Mapping[str, Any],
                   other_place: str | None) -> bool:
    """`other` is a live, different RVCExperiment created before `me` naming the same place (`location`)."""
    meta = other.get("metadata") or {}
    if my_place is None or other_place != my_place or meta.get("deletionTimestamp"):
        return False
    if meta.get("uid") == (me.get("metadata") or {}).get("uid"):
        return False
    return _age_key(other) < _age_key(me)


def deletable_keys(keys: list[str], experiment: str) -> list[str]:
    """Keys the operator may delete for `experiment`: strictly under logs/<name>/, no empty, "." or ".."
    segment, no control character; the ownership record last (so an interrupted delete stays owned)."""
    prefix = folder_key(experiment)
    record = owner_key(experiment)
    out = []
    for k in keys:
        rest = k[len(prefix):] if k.startswith(prefix) else ""
        if not rest or _CONTROL.search(k) or any(p in ("", ".", "..") for p in rest.split("/")):
            continue
        out.append(k)
    return sorted(k for k in out if k != record) + ([record] if record in out else [])
