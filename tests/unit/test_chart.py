"""The Helm chart: lint, rendering with different values, documentation of every value, CRD copy."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.tools import tool

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "rvc-operator"


@pytest.fixture(scope="module")
def helm() -> str:
    return str(tool("helm"))


def render(helm: str, *args: str) -> list[dict]:
    out = subprocess.run(
        [helm, "template", "rvc", str(CHART), "-n", "rvc-system", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def test_lint(helm):
    r = subprocess.run([helm, "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_default_render_is_secure_and_minimal(helm):
    docs = render(helm)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]
    dep = by_kind(docs, "Deployment")[0]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["RVC_PIPELINE_CPU_IMAGE"] == "rvc-pipeline-cpu:dev"
    assert json.loads(env["RVC_GPU_TOLERATIONS"])[0]["key"] == "nvidia.com/gpu"
    assert "AWS_ACCESS_KEY_ID" not in env  # no Secret configured
    # RBAC: no secrets access, no wildcard verbs or resources
    rules = by_kind(docs, "ClusterRole")[0]["rules"]
    assert all("secrets" not in r["resources"] for r in rules)
    assert all("*" not in r["verbs"] and "*" not in r["resources"] for r in rules)


def test_values_reach_the_operator(helm):
    docs = render(
        helm,
        "--set-json",
        'gpu.nodeSelector={"pool":"gpu-l4"}',
        "--set",
        "s3.credentialsSecret=s3creds",
        "--set",
        "s3.endpoint=http://minio:9000",
        "--set",
        "maxConcurrentExperiments=3",
        "--set",
        "pushgateway=http://pg:9091",
        "--set",
        "jobs.backoffLimit=5",
        "--set",
        "pipeline.defaultDevice=cpu",
    )
    c = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert json.loads(env["RVC_GPU_NODE_SELECTOR"]["value"]) == {"pool": "gpu-l4"}
    assert env["RVC_S3_CREDENTIALS_SECRET"]["value"] == "s3creds"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3creds"
    assert env["RVC_S3_ENDPOINT"]["value"] == "http://minio:9000"
    assert env["RVC_MAX_CONCURRENT_EXPERIMENTS"]["value"] == "3"
    assert env["RVC_PUSHGATEWAY"]["value"] == "http://pg:9091"
    assert env["RVC_JOB_BACKOFF_LIMIT"]["value"] == "5"
    assert env["RVC_DEFAULT_DEVICE"]["value"] == "cpu"


def test_env_names_are_the_ones_the_operator_reads(helm):
    from rvc_operator import config

    src = Path(config.__file__).read_text()
    c = by_kind(render(helm), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    for e in c["env"]:
        if e["name"].startswith("RVC_"):
            assert f'"{e["name"]}"' in src, (
                f"{e['name']} is set by the chart but not read by rvc_operator.config"
            )


def test_monitoring_objects_are_optional(helm):
    docs = render(
        helm,
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.podMonitor.enabled=true",
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--set",
        "metrics.grafanaDashboard.enabled=true",
    )
    assert len(by_kind(docs, "ServiceMonitor")) == 1 and len(by_kind(docs, "PodMonitor")) == 1
    rule = by_kind(docs, "PrometheusRule")[0]
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"RVCExperimentFailed", "RVCExperimentStuck"} <= alerts
    cm = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")][0]
    dash = json.loads(cm["data"]["rvc-operator.json"])
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for metric in ("rvc_experiments", "rvc_loss_g", "rvc_loss_d", "rvc_step_duration_seconds_bucket",
                   "rvc_score", "rvc_best_epoch", "rvc_eval_speaker_sim", "rvc_eval_dnsmos_ovrl",
                   "rvc_eval_mel_l1"):
        assert metric in exprs


def test_created_secret_requires_keys(helm):
    r = subprocess.run(
        [helm, "template", "rvc", str(CHART), "--set", "s3.createSecret=true"], capture_output=True, text=True
    )
    assert r.returncode != 0 and "s3.accessKeyId is required" in r.stderr
    docs = render(
        helm, "--set", "s3.createSecret=true", "--set", "s3.accessKeyId=a", "--set", "s3.secretAccessKey=b"
    )
    sec = by_kind(docs, "Secret")[0]
    assert sec["stringData"] == {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}


def test_every_value_is_documented():
    """Each value in values.yaml (or a mapping above it) has a '# --' comment, listed in the chart README."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    readme = (CHART / "README.md").read_text()
    path: list[str] = []
    documented: set[str] = set()
    leaves: list[str] = []
    for i, ln in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z0-9_]+):(.*)$", ln)
        if not m:
            continue
        path = path[: len(m.group(1)) // 2] + [m.group(2)]
        key = ".".join(path)
        if lines[i - 1].strip().startswith("# --"):
            documented.add(key)
        if m.group(3).strip():  # has an inline value: a leaf
            leaves.append(key)
    undocumented = [
        k
        for k in leaves
        if not any(".".join(k.split(".")[:n]) in documented for n in range(1, k.count(".") + 2))
    ]
    assert not undocumented, f"values without a '# --' comment: {undocumented}"
    missing = [k for k in documented if f"`{k}`" not in readme]
    assert not missing, f"values missing from charts/rvc-operator/README.md: {missing}"
    assert len(documented) > 40


def test_chart_crd_is_the_generated_one():
    a = (ROOT / "crds" / "rvcexperiments.yaml").read_text()
    b = (CHART / "crds" / "rvcexperiments.yaml").read_text()
    assert a == b, "charts/rvc-operator/crds/rvcexperiments.yaml differs from crds/: regenerate both"


def test_storage_allow_list_reaches_the_operator(helm):
    from rvc_operator.config import OperatorConfig

    def operator_cfg(*args: str) -> OperatorConfig:
        c = by_kind(render(helm, *args), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
        return OperatorConfig.from_env({e["name"]: e["value"] for e in c["env"] if "value" in e})

    assert operator_cfg().storage_allowed_prefixes is None  # default: no restriction (warned at start)
    cfg = operator_cfg("--set-json", 'storage.allowedPrefixes={"team-a":["s3://bucket-a","s3://shared/team-a/"],'
                                     '"*":[]}')
    assert cfg.storage_allowed_prefixes == {"team-a": ("s3://bucket-a/", "s3://shared/team-a/"), "*": ()}
