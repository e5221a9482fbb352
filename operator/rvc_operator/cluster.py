"""The cluster as the operator sees it: the ClusterAPI protocol (dicts in, dicts out, as the API returns
them) and KubeCluster, its implementation over the official kubernetes client. Tests answer the same
protocol from memory (tests/integration/test_operator_kopf.py)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Protocol

from rvc_pipeline.core.spec import API_GROUP, API_VERSION, PLURAL

from .status import Event

log = logging.getLogger("rvc_operator")

EventPoster = Callable[[dict[str, Any], Event], None]


class Conflict(Exception):
    """The object changed since it was read (HTTP 409 on a resourceVersion precondition)."""


class ClusterAPI(Protocol):
    """The cluster operations the operator uses (KubeCluster below; tests use an in-memory fake)."""

    def get_experiment(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def list_experiments(self, namespace: str | None) -> list[dict[str, Any]]: ...
    def list_jobs(self, namespace: str, selector: str) -> list[dict[str, Any]]: ...
    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]: ...
    def pod_log_tail(self, namespace: str, pod: str, container: str, lines: int) -> str | None: ...
    def create_job(self, job: dict[str, Any]) -> bool: ...  # False: it already existed
    def delete_job(self, namespace: str, name: str) -> None: ...
    def delete_experiment(self, namespace: str, name: str) -> None: ...  # its Jobs go by owner references
    def ensure_configmap(self, cm: dict[str, Any]) -> None: ...
    def delete_configmap(self, namespace: str, name: str) -> None: ...
    def patch_status(self, namespace: str, name: str, patch: dict[str, Any], resource_version: str | None
                     ) -> None: ...




def load_kube_config() -> None:
    """In-cluster credentials, else the kubeconfig (RuntimeError when there are neither)."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            # $KUBECONFIG as it is now (the client reads it once, when it is first imported)
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
        except config.ConfigException as e:
            raise RuntimeError(f"no Kubernetes credentials (in-cluster or kubeconfig): {e}") from None


class KubeCluster:
    """ClusterAPI over the official kubernetes client (dicts in, dicts out)."""

    def __init__(self) -> None:
        from kubernetes import client

        self._client = client
        self.api_client = client.ApiClient()
        self.custom = client.CustomObjectsApi(self.api_client)
        self.batch = client.BatchV1Api(self.api_client)
        self.core = client.CoreV1Api(self.api_client)

    def _dict(self, obj: Any) -> Any:
        return self.api_client.sanitize_for_serialization(obj)

    @staticmethod
    def _status(e: Exception) -> int | None:
        return getattr(e, "status", None)

    def get_experiment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
        except self._client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def list_experiments(self, namespace: str | None) -> list[dict[str, Any]]:
        if namespace:
            res = self.custom.list_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL)
        else:
            res = self.custom.list_cluster_custom_object(API_GROUP, API_VERSION, PLURAL)
        return list(res.get("items") or [])

    def list_jobs(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        res = self.batch.list_namespaced_job(namespace, label_selector=selector)
        return [self._dict(j) for j in res.items]

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        res = self.core.list_namespaced_pod(namespace, label_selector=selector)
        return [self._dict(p) for p in res.items]

    def pod_log_tail(self, namespace: str, pod: str, container: str, lines: int) -> str | None:
        try:
            return self.core.read_namespaced_pod_log(pod, namespace, container=container, tail_lines=lines)
        except self._client.ApiException:
            return None

    def create_job(self, job: dict[str, Any]) -> bool:
        try:
            self.batch.create_namespaced_job(job["metadata"]["namespace"], job)
            return True
        except self._client.ApiException as e:
            if e.status == 409:
                return False
            raise

    def delete_job(self, namespace: str, name: str) -> None:
        """Foreground: the pods get SIGTERM and their grace period (they save their work) and the Job stays
        listed with a deletionTimestamp until they are gone, so the state machine starts the step's next
        Job only then (Background would drop the Job at once while its pod still writes; orphaning
        would leave the pod running)."""
        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Foreground")
        except self._client.ApiException as e:
            if e.status != 404:
                raise

    def delete_experiment(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name,
                                                        propagation_policy="Background")
        except self._client.ApiException as e:
            if e.status != 404:
                raise

    def ensure_configmap(self, cm: dict[str, Any]) -> None:
        ns, name = cm["metadata"]["namespace"], cm["metadata"]["name"]
        try:
            self.core.create_namespaced_config_map(ns, cm)
            return
        except self._client.ApiException as e:
            if e.status != 409:
                raise
        have = self._dict(self.core.read_namespaced_config_map(name, ns))
        if have.get("data") != cm["data"] or (have.get("metadata") or {}).get("ownerReferences") != cm[
                "metadata"]["ownerReferences"]:
            self.core.patch_namespaced_config_map(name, ns, {"metadata": {
                "labels": cm["metadata"]["labels"], "annotations": cm["metadata"]["annotations"],
                "ownerReferences": cm["metadata"]["ownerReferences"]}, "data": cm["data"]})

    def delete_configmap(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_config_map(name, namespace)
        except self._client.ApiException as e:
            if e.status != 404:
                raise

    def patch_status(self, namespace: str, name: str, patch: dict[str, Any], resource_version: str | None
                     ) -> None:
        body: dict[str, Any] = {"status": patch}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            self.custom.patch_namespaced_custom_object_status(
                API_GROUP, API_VERSION, namespace, PLURAL, name, body,
                _content_type="application/merge-patch+json")
        except self._client.ApiException as e:
            if e.status == 409:
                raise Conflict(str(e)) from None
            raise

    def post_event(self, body: dict[str, Any], ev: Event) -> None:
        """A core/v1 Event on the experiment. Posted directly (not through kopf.event, which works only
        inside kopf's per-object tasks, not from the sweep thread); failures are logged, never raised."""
        meta = body.get("metadata") or {}
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name')}.",
                         "namespace": meta.get("namespace", "default")},
            "involvedObject": {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                               "name": meta.get("name"), "namespace": meta.get("namespace"),
                               "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")},
            "type": ev.type,
            "reason": ev.reason,
            "message": ev.message[:1024],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "source": {"component": "rvc-operator"},
            "reportingComponent": "rvc-operator",
            "reportingInstance": socket.gethostname(),
        }
        try:
            self.core.create_namespaced_event(meta.get("namespace", "default"), event)
        except Exception as e:  # noqa: BLE001 - events are informational
            log.warning("%s/%s: could not post event %s: %s", meta.get("namespace"), meta.get("name"),
                        ev.reason, e)

