"""KubeClient over the official kubernetes client, against a recording HTTP stand-in of the API server:
kubeconfig, context and namespace as kubectl picks them; the requests each KubeAPI method sends; API
errors as one-line ClusterErrors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from rvc_pipeline.client.kube import ClusterError, Conflict, KubeClient, NotFound, Target, connect

from tests.support.fake_apiserver import FakeAPIServer, fake_apiserver

BASE = "/apis/rvc-operator.dev/v1alpha1/namespaces/voice/rvcexperiments"


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeAPIServer, KubeClient]]:
    with fake_apiserver() as fake:
        monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig(tmp_path / "config")))
        client, ns = connect(Target())
        assert ns == "voice"  # the current context's namespace
        yield fake, client


def test_namespace_from_flag_context_or_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with fake_apiserver() as fake:
        cfg = fake.kubeconfig(tmp_path / "config")
        monkeypatch.delenv("KUBECONFIG", raising=False)
        assert connect(Target(kubeconfig=str(cfg)))[1] == "voice"
        assert connect(Target(kubeconfig=str(cfg), context="other"))[1] == "default"
        assert connect(Target(kubeconfig=str(cfg), namespace="team"))[1] == "team"
        with pytest.raises(ClusterError, match="no usable kubeconfig"):
            connect(Target(kubeconfig=str(cfg), context="nope"))


def test_get_create_replace_patch_delete(api: tuple[FakeAPIServer, KubeClient]) -> None:
    fake, client = api
    assert client.get_experiment("voice", "alice") is None  # 404: no such experiment
    obj = {"apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment",
           "metadata": {"name": "alice", "namespace": "voice"}, "spec": {"train": {"epochs": 5}}}
    fake.routes[("POST", BASE)] = (201, obj)
    fake.routes[("PUT", f"{BASE}/alice")] = (200, obj)
    fake.routes[("PATCH", f"{BASE}/alice")] = (200, obj)
    fake.routes[("DELETE", f"{BASE}/alice")] = (200, {"kind": "Status"})
    fake.routes[("GET", f"{BASE}/alice")] = (200, obj)
    assert client.create_experiment(obj) == obj and client.replace_experiment(obj) == obj
    client.patch_experiment("voice", "alice", {"spec": {"suspend": True}})
    client.delete_experiment("voice", "alice")
    assert client.get_experiment("voice", "alice") == obj
    got = [(s.method, s.path) for s in fake.seen]
    assert got == [("GET", f"{BASE}/alice"), ("POST", BASE), ("PUT", f"{BASE}/alice"),
                   ("PATCH", f"{BASE}/alice"), ("DELETE", f"{BASE}/alice"), ("GET", f"{BASE}/alice")]
    assert fake.seen[1].body == obj and fake.seen[3].body == {"spec": {"suspend": True}}
    assert fake.seen[3].content_type == "application/merge-patch+json"
    assert fake.seen[4].query["propagationPolicy"] == ["Background"]


def test_lists_events_pods_and_logs(api: tuple[FakeAPIServer, KubeClient]) -> None:
    fake, client = api
    fake.routes[("GET", "/apis/rvc-operator.dev/v1alpha1/rvcexperiments")] = (200, {"items": [{"a": 1}]})
    fake.routes[("GET", BASE)] = (200, {"items": [{"b": 2}]})
    fake.routes[("GET", "/api/v1/namespaces/voice/events")] = (
        200, {"kind": "EventList", "items": [{"metadata": {"name": "e1"}, "reason": "StepStarted",
                                                "involvedObject": {"name": "alice"}}]})
    fake.routes[("GET", "/api/v1/namespaces/voice/pods")] = (
        200, {"kind": "PodList", "items": [{"metadata": {"name": "p1", "labels": {"x": "y"}}}]})
    fake.routes[("GET", "/api/v1/namespaces/voice/pods/p1/log")] = (200, "line one\nline two\nlast")
    assert client.list_experiments(None) == [{"a": 1}] and client.list_experiments("voice") == [{"b": 2}]
    assert client.list_events("voice", "alice")[0]["reason"] == "StepStarted"
    assert fake.seen[-1].query["fieldSelector"] == [
        "involvedObject.name=alice,involvedObject.kind=RVCExperiment"]
    assert client.list_pods("voice", "a=b,c=d")[0]["metadata"]["name"] == "p1"
    assert fake.seen[-1].query["labelSelector"] == ["a=b,c=d"]
    assert list(client.pod_log("voice", "p1", "step", True, 50)) == ["line one", "line two", "last"]
    q = fake.seen[-1].query
    # (the client writes True; the API server's ParseBool takes it)
    assert q["container"] == ["step"] and q["follow"][0].lower() == "true" and q["tailLines"] == ["50"]


@pytest.mark.parametrize(("status", "kind", "text"), [
    (403, ClusterError, "forbidden"), (409, Conflict, "changed meanwhile"), (422, ClusterError, "bad spec"),
    (500, ClusterError, "HTTP 500: bad spec"), (404, NotFound, "is the RVCExperiment CRD installed"),
])
def test_api_errors_become_one_line(api: tuple[FakeAPIServer, KubeClient], status: int, kind: type,
                                    text: str) -> None:
    fake, client = api
    answer = {"kind": "Status", "message": "bad spec", "code": status}
    fake.routes[("PUT", f"{BASE}/alice")] = (status, answer)
    with pytest.raises(kind, match=text):
        client.replace_experiment({"metadata": {"name": "alice", "namespace": "voice"}})


def test_unreachable_api_server(tmp_path: Path) -> None:
    with fake_apiserver() as fake:
        cfg = fake.kubeconfig(tmp_path / "config")
    client, _ = connect(Target(kubeconfig=str(cfg)))  # the server is gone now
    client.api_client.configuration.retries = 0
    with pytest.raises(ClusterError, match="cannot reach the Kubernetes API"):
        client.list_experiments("voice")
