"""An in-memory KubeAPI (rvc_pipeline.client.kube) for the client's tests: experiments with
resourceVersion and generation as the API server keeps them, events, pods and pod logs, and a record of
every write. `script` replaces what get_experiment returns, one object per call (a watch's snapshots)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from rvc_pipeline.client.kube import Conflict, NotFound


@dataclass
class FakeKube:
    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    pods: list[dict[str, Any]] = field(default_factory=list)
    logs: dict[str, list[str]] = field(default_factory=dict)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    script: list[dict[str, Any]] = field(default_factory=list)
    conflicts: int = 0  # replace_experiment answers 409 this many times first
    _rv: int = 100

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def add(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        meta.setdefault("generation", 1)
        meta.setdefault("resourceVersion", self._next_rv())
        self.objects[(meta["namespace"], meta["name"])] = obj
        return obj

    def get_experiment(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get", name))
        if self.script:
            return copy.deepcopy(self.script.pop(0))
        got = self.objects.get((namespace, name))
        return copy.deepcopy(got) if got is not None else None

    def create_experiment(self, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("create", copy.deepcopy(body)))
        meta = body["metadata"]
        if (meta["namespace"], meta["name"]) in self.objects:
            raise Conflict("exists")
        return self.add(body)

    def replace_experiment(self, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("replace", copy.deepcopy(body)))
        meta = body["metadata"]
        have = self.objects.get((meta["namespace"], meta["name"]))
        if have is None:
            raise NotFound("gone")
        if self.conflicts > 0 or meta.get("resourceVersion") != have["metadata"]["resourceVersion"]:
            self.conflicts -= 1
            have["metadata"]["resourceVersion"] = self._next_rv()
            raise Conflict("stale")
        new = copy.deepcopy(body)
        new["status"] = have.get("status")
        if new.get("spec") != have.get("spec"):
            new["metadata"]["generation"] = have["metadata"].get("generation", 1) + 1
        new["metadata"]["resourceVersion"] = self._next_rv()
        self.objects[(meta["namespace"], meta["name"])] = new
        return copy.deepcopy(new)

    def patch_experiment(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("patch", copy.deepcopy(patch)))
        have = self.objects[(namespace, name)]
        _merge(have, patch)
        return copy.deepcopy(have)

    def delete_experiment(self, namespace: str, name: str) -> None:
        self.calls.append(("delete", name))
        self.objects.pop((namespace, name), None)

    def list_experiments(self, namespace: str | None) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for (ns, _), o in sorted(self.objects.items()) if namespace in (None, ns)]

    def list_events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if (e.get("involvedObject") or {}).get("name") == name]

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        self.calls.append(("pods", selector))
        want = dict(part.split("=", 1) for part in selector.split(","))
        return [p for p in self.pods
                if all((p["metadata"].get("labels") or {}).get(k) == v for k, v in want.items())]

    def pod_log(self, namespace: str, pod: str, container: str, follow: bool, tail: int | None
                ) -> Iterator[str]:
        self.calls.append(("log", (pod, container, follow, tail)))
        lines = self.logs.get(pod, [])
        yield from (lines[-tail:] if tail else lines)


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        elif v is None:
            target.pop(k, None)
        else:
            target[k] = v
