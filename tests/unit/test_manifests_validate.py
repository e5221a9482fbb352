"""Every manifest the project generates passes the API schemas of current Kubernetes releases.

The only cluster that runs here is v1.20, so the CRD (both variants), the RBAC file, every object the chart
renders (default values and the values the chart tests use) and every Job and ConfigMap the operator
builds are checked offline with `kubernetes-validate` in strict mode (unknown fields are errors), for
every release from 1.33 to the newest the package carries.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions
from rvc_operator import crd, jobs
from rvc_operator.config import OperatorConfig
from rvc_pipeline.core.spec import STEP_ORDER

from tests.tools import tool

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "rvc-operator"
VERSIONS = sorted({v for v in all_versions() if tuple(map(int, v.split(".")[:2])) >= (1, 33)},
                  key=lambda v: tuple(map(int, v.split("."))))
# kinds of optional add-ons (Prometheus operator) whose schemas are CRDs, not part of Kubernetes
FOREIGN_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}

CHART_VALUE_SETS: dict[str, list[str]] = {
    "default": [],
    "values": ["--set-json", 'gpu.nodeSelector={"pool":"gpu-l4"}', "--set", "s3.credentialsSecret=s3creds",
               "--set", "s3.endpoint=http://minio:9000", "--set", "maxConcurrentExperiments=3",
               "--set", "pushgateway=http://pg:9091", "--set", "jobs.backoffLimit=5",
               "--set", "pipeline.defaultDevice=cpu"],
    "monitoring": ["--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.podMonitor.enabled=true",
                   "--set", "metrics.prometheusRule.enabled=true",
                   "--set", "metrics.grafanaDashboard.enabled=true"],
    "secret": ["--set", "s3.createSecret=true", "--set", "s3.accessKeyId=a", "--set", "s3.secretAccessKey=b"],
    "allow-list": ["--set-json", 'storage.allowedPrefixes={"team-a":["s3://bucket-a"],"*":[]}'],
    "crd-1.20": ["--set", "crd.templated=true", "--kube-version", "1.20.0"],
    "crd-1.35": ["--set", "crd.templated=true", "--kube-version", "1.35.0"],
}

CFGS = {
    "default": OperatorConfig(),
    "full": OperatorConfig(
        pipeline_image="reg/rvc-pipeline:1.0", cpu_image="reg/rvc-pipeline-cpu:1.0",
        gpu_node_selector={"pool": "gpu"},
        gpu_tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        cpu_node_selector={"pool": "cpu"}, host_network=True, service_account="rvc-steps",
        scratch_size_limit="50Gi", job_ttl_seconds=3600, s3_endpoint="http://s3:9000",
        s3_credentials_secret="rvc-s3", pushgateway="http://pgw:9091", weights_cache="s3://weights/",
        priority_class="batch-low"),
}

EXPERIMENTS: dict[str, dict[str, Any]] = {
    "gpu": {},
    "cpu": {"resources": {"device": "cpu", "cpu": "2", "memory": "4Gi", "parallelism": 2}},
    "scheduled": {"experimentName": "alice-v2", "resources": {
        "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
        "tolerations": [{"key": "spot", "operator": "Equal", "value": "yes", "effect": "NoExecute",
                         "tolerationSeconds": 30}, {"operator": "Exists"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "In",
                                                         "values": ["a100"]}]}]}}},
        "priorityClassName": "rvc-high", "queueName": "team-a", "image": "mine:dev", "memory": "16Gi"},
        "train": {"gpus": 2}, "f0": {"method": "rmvpe"}},
    "own-storage": {"storage": {"uri": "s3://m/r", "endpoint": "http://minio:9000",
                                "credentialsSecret": "mine", "region": "eu-west-1"},
                    "metrics": {"pushgateway": "http://other:9091"}},
    "convert": {"steps": ["train", "index", "convert"], "resources": {"shards": 3},
                "convert": {"source": "s3://voices/todo/", "format": "mp3", "transpose": -3}},
}


def validate_all(obj: dict[str, Any], what: str) -> None:
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{what} ({obj.get('kind')}) is invalid for Kubernetes {version}: "
                        f"{'.'.join(map(str, e.path))}: {e.message}")


def experiment(name: str) -> dict[str, Any]:
    spec = {"dataset": {"source": "s3://voices/alice/"}, "storage": {"uri": "s3://models/rvc"},
            **EXPERIMENTS[name]}
    return {"apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment",
            "metadata": {"name": f"alice-{name}", "namespace": "voice", "uid": "1234-abcd", "generation": 3},
            "spec": spec}


def test_versions_reach_the_newest_release() -> None:
    assert VERSIONS[0].startswith("1.33.") and VERSIONS[-1] >= "1.37", VERSIONS


def test_strict_validation_catches_a_bad_field() -> None:
    job = jobs.build_job_spec(experiment("gpu"), "train", 1, CFGS["default"])
    job["spec"]["template"]["spec"]["nodeSelectr"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, VERSIONS[-1], strict=True)


@pytest.mark.parametrize("cel", [False, True])
def test_crd_variants(cel: bool) -> None:
    validate_all(crd.build_crd(cel), f"the CRD (cel={cel})")


def test_checked_in_files() -> None:
    for path in [ROOT / "crds" / "rbac.yaml", ROOT / "crds" / "rvcexperiments-cel.yaml",
                 CHART / "crds" / "rvcexperiments.yaml", CHART / "files" / "rvcexperiments-cel.yaml"]:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                validate_all(doc, str(path.relative_to(ROOT)))


@pytest.mark.parametrize("values", sorted(CHART_VALUE_SETS))
def test_chart_output(values: str) -> None:
    out = subprocess.run([str(tool("helm")), "template", "rvc", str(CHART), "-n", "rvc-system",
                          *CHART_VALUE_SETS[values]], check=True, capture_output=True, text=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    kinds = {d["kind"] for d in docs}
    assert "Deployment" in kinds and (values != "monitoring" or kinds >= FOREIGN_KINDS)
    for doc in docs:
        if doc["kind"] not in FOREIGN_KINDS:
            validate_all(doc, f"chart ({values}) {doc['kind']}/{doc['metadata']['name']}")
    if values.startswith("crd-"):
        (got,) = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
        assert ("x-kubernetes-validations" in str(got)) == (values == "crd-1.35")


@pytest.mark.parametrize("cfg", sorted(CFGS))
@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_jobs_and_configmap(name: str, cfg: str) -> None:
    m = experiment(name)
    validate_all(jobs.build_spec_configmap(m, CFGS[cfg]), f"ConfigMap of {name}")
    for step in STEP_ORDER:
        job = jobs.build_job_spec(m, step, 2, CFGS[cfg], force=step == "train", inputs_hash="abc123")
        validate_all(job, f"Job {step} of {name} with config {cfg}")


@pytest.mark.parametrize("cfg", sorted(CFGS))
@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_sharded_jobs(name: str, cfg: str) -> None:
    """The Jobs of sharded data steps (spec.resources.shards): the first and the last shard of 64."""
    m = experiment(name)
    m["spec"].setdefault("resources", {})["shards"] = 64
    for step in jobs.SHARDED_STEPS:
        for shard in ((0, 64), (63, 64)):
            job = jobs.build_job_spec(m, step, 12, CFGS[cfg], inputs_hash="abc123", shard=shard)
            assert job["metadata"]["labels"]["rvc-operator.dev/shard"] == str(shard[0])
            validate_all(job, f"Job {step} shard {shard} of {name} with config {cfg}")


class _RecordingCore:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def create_namespaced_event(self, namespace: str, body: dict[str, Any]) -> None:
        self.events.append(body)


def test_event_the_operator_posts() -> None:
    from rvc_operator.cluster import KubeCluster
    from rvc_operator.status import Event

    kube = KubeCluster.__new__(KubeCluster)  # no API client: only the body it would send is checked
    kube.core = _RecordingCore()  # type: ignore[assignment]
    body = experiment("gpu")
    body["metadata"]["resourceVersion"] = "42"
    kube.post_event(body, Event(type="Warning", reason="StepFailed", message="train exited 2 " * 200))
    (event,) = kube.core.events  # type: ignore[attr-defined]
    validate_all(event, "the operator's Event")
