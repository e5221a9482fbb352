"""The cluster as the client sees it: the KubeAPI protocol (dicts in, dicts out, as the API returns them)
and KubeClient, its implementation over the official kubernetes client. Tests answer the same protocol
from memory (tests/support/fake_kube.py).

Kubeconfig as kubectl reads it: --kubeconfig, else $KUBECONFIG (paths joined with ':'), else
~/.kube/config; --context, else the current context; -n/--namespace, else the context's namespace, else
"default". Inside a pod without a kubeconfig: the service account.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rvc_pipeline.core.spec import API_GROUP, API_VERSION, KIND, PLURAL

_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class ClusterError(RuntimeError):
    """A Kubernetes API call that failed; the message says what to check (exit 1)."""


class NotFound(ClusterError):
    """No such experiment."""


class Conflict(ClusterError):
    """The object changed since it was read (HTTP 409)."""


class KubeAPI(Protocol):
    """The cluster operations the client uses (KubeClient below; tests use an in-memory fake)."""

    def get_experiment(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def create_experiment(self, body: dict[str, Any]) -> dict[str, Any]: ...
    def replace_experiment(self, body: dict[str, Any]) -> dict[str, Any]: ...  # Conflict on a stale version
    def patch_experiment(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]: ...
    def delete_experiment(self, namespace: str, name: str) -> None: ...
    def list_experiments(self, namespace: str | None) -> list[dict[str, Any]]: ...  # None: all namespaces
    def list_events(self, namespace: str, name: str) -> list[dict[str, Any]]: ...  # of the experiment
    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]: ...
    def pod_log(self, namespace: str, pod: str, container: str, follow: bool, tail: int | None
                ) -> Iterator[str]: ...  # lines without their newline


@dataclass(frozen=True)
class Target:
    """Where commands go: the kubeconfig file(s), context and namespace as given (None: kubectl's default)."""

    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None


def _explain(e: Exception, what: str) -> ClusterError:
    status = getattr(e, "status", None)
    if status == 404:
        return NotFound(f"{what}: not found (is the RVCExperiment CRD installed? kubectl get crd "
                        f"{PLURAL}.{API_GROUP})")
    if status in (401, 403):
        return ClusterError(f"{what}: {'forbidden' if status == 403 else 'unauthorized'} "
                            f"({getattr(e, 'reason', '')}); check the kubeconfig user's RBAC")
    if status == 409:
        return Conflict(f"{what}: changed meanwhile (409)")
    if status == 422:
        return ClusterError(f"{what}: refused by the API server: {_message(e)}")
    if status is None:
        return ClusterError(f"{what}: cannot reach the Kubernetes API ({type(e).__name__}: {str(e)[:300]})")
    return ClusterError(f"{what}: HTTP {status}: {_message(e)}")


def _message(e: Exception) -> str:
    import json

    body = getattr(e, "body", None)
    try:
        return str(json.loads(body or "")["message"])[:1000]
    except (TypeError, ValueError, KeyError):
        return str(body or e)[:1000]


class KubeClient:
    """KubeAPI over the official kubernetes client, with a client of its own (no global configuration)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self._client = client
        self.api_client = api_client
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._client.ApiException as e:
            raise _explain(e, what) from None
        except OSError as e:  # urllib3's MaxRetryError and friends are not ApiExceptions
            raise _explain(e, what) from None
        except Exception as e:
            if type(e).__module__.startswith("urllib3"):
                raise _explain(e, what) from None
            raise

    def get_experiment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call(f"{KIND} {namespace}/{name}", self.custom.get_namespaced_custom_object,
                              API_GROUP, API_VERSION, namespace, PLURAL, name)
        except NotFound:
            return None

    def create_experiment(self, body: dict[str, Any]) -> dict[str, Any]:
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        return self._call(f"create {KIND} {ns}/{name}", self.custom.create_namespaced_custom_object,
                          API_GROUP, API_VERSION, ns, PLURAL, body)

    def replace_experiment(self, body: dict[str, Any]) -> dict[str, Any]:
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        return self._call(f"update {KIND} {ns}/{name}", self.custom.replace_namespaced_custom_object,
                          API_GROUP, API_VERSION, ns, PLURAL, name, body)

    def patch_experiment(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self._call(f"patch {KIND} {namespace}/{name}", self.custom.patch_namespaced_custom_object,
                          API_GROUP, API_VERSION, namespace, PLURAL, name, patch,
                          _content_type="application/merge-patch+json")

    def delete_experiment(self, namespace: str, name: str) -> None:
        self._call(f"delete {KIND} {namespace}/{name}", self.custom.delete_namespaced_custom_object,
                   API_GROUP, API_VERSION, namespace, PLURAL, name, propagation_policy="Background")

    def list_experiments(self, namespace: str | None) -> list[dict[str, Any]]:
        if namespace:
            res = self._call(f"list {PLURAL} in {namespace}", self.custom.list_namespaced_custom_object,
                             API_GROUP, API_VERSION, namespace, PLURAL)
        else:
            res = self._call(f"list {PLURAL}", self.custom.list_cluster_custom_object,
                             API_GROUP, API_VERSION, PLURAL)
        return list(res.get("items") or [])

    def list_events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        res = self._call(f"events of {namespace}/{name}", self.core.list_namespaced_event, namespace,
                         field_selector=f"involvedObject.name={name},involvedObject.kind={KIND}")
        return [self.api_client.sanitize_for_serialization(e) for e in res.items]

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        res = self._call(f"pods {selector} in {namespace}", self.core.list_namespaced_pod, namespace,
                         label_selector=selector)
        return [self.api_client.sanitize_for_serialization(p) for p in res.items]

    def pod_log(self, namespace: str, pod: str, container: str, follow: bool, tail: int | None
                ) -> Iterator[str]:
        kwargs: dict[str, Any] = {"container": container, "follow": follow, "_preload_content": False}
        if tail is not None:
            kwargs["tail_lines"] = tail
        resp = self._call(f"log of pod {namespace}/{pod}", self.core.read_namespaced_pod_log, pod, namespace,
                          **kwargs)
        try:
            pending = b""
            for chunk in resp.stream(amt=64 * 1024):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                yield from (ln.decode("utf-8", "replace") for ln in lines)
            if pending:
                yield pending.decode("utf-8", "replace")
        finally:
            resp.release_conn()


def connect(target: Target) -> tuple[KubeClient, str]:
    """A KubeClient for the target and the namespace to use; ClusterError when there is no configuration."""
    from kubernetes import client, config

    files = target.kubeconfig or os.environ.get("KUBECONFIG") or None
    try:
        api_client = config.new_client_from_config(config_file=files, context=target.context)
        ns = target.namespace or _context_namespace(files, target.context)
    except config.ConfigException as e:
        if target.context or target.kubeconfig or not _SA_NAMESPACE.exists():
            raise ClusterError(f"no usable kubeconfig ({e}); set KUBECONFIG or --kubeconfig, or --context"
                               ) from None
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        api_client = client.ApiClient(cfg)
        ns = target.namespace or _SA_NAMESPACE.read_text().strip() or "default"
    return KubeClient(api_client), ns


def _context_namespace(files: str | None, context: str | None) -> str:
    from kubernetes import config

    contexts, active = config.list_kube_config_contexts(config_file=files)
    chosen = next((c for c in contexts if c["name"] == context), None) if context else active
    return str(((chosen or {}).get("context") or {}).get("namespace") or "default")
