"""Job and ConfigMap manifests built for each step and device (rvc_operator.jobs, rvc_operator.config)."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml
from rvc_operator import jobs
from rvc_operator.config import ConfigError, OperatorConfig
from rvc_pipeline.core.spec import STEP_ORDER, SpecError, parse_manifest

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def manifest(**spec_over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"dataset": {"source": "s3://voices/alice/"}, "storage": {"uri": "s3://models/rvc"}}
    for k, v in spec_over.items():
        spec[k] = v
    return {
        "apiVersion": "rvc-operator.dev/v1alpha1",
        "kind": "RVCExperiment",
        "metadata": {"name": "alice", "namespace": "voice", "uid": "1234-abcd", "generation": 3},
        "spec": spec,
    }


CFG = OperatorConfig(
    pipeline_image="reg/rvc-pipeline:1.0",
    cpu_image="reg/rvc-pipeline-cpu:1.0",
    gpu_node_selector={"pool": "gpu"},
    gpu_tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    cpu_node_selector={"pool": "cpu"},
)


def container(job: dict[str, Any]) -> dict[str, Any]:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return c


def pod(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


def env(job: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(job)["env"]}


def gpus(job: dict[str, Any]) -> int:
    return int(container(job).get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


# ---------------------------------------------------------------------------------------------------
def test_names_deterministic_and_short() -> None:
    assert jobs.job_name("alice", "train", 1) == "alice-train-1"
    long = "a" * 60 + "-voice.model"
    n1 = jobs.job_name(long, "preprocess", 12)
    assert n1 == jobs.job_name(long, "preprocess", 12)
    assert len(n1) <= 63 and DNS_LABEL.match(n1) and n1.endswith("-preprocess-12")
    other = "a" * 60 + "-voice.modem"  # same 60-char prefix, different name: still distinct
    assert jobs.job_name(other, "preprocess", 12) != n1
    for name in ["x", "a" * 253, "my.exp.v2", "UPPER_case"]:
        for s in STEP_ORDER:
            j = jobs.job_name(name, s, 999)
            assert len(j) <= 63 and DNS_LABEL.match(j), j
        assert len(jobs.configmap_name(name)) <= 63
    lv = jobs.label_value("a" * 100)
    assert len(lv) <= 63 and lv != jobs.label_value("a" * 99)
    assert jobs.label_value("alice") == "alice"


@pytest.mark.parametrize("step", STEP_ORDER)
def test_job_basics_every_step(step: str) -> None:
    m = manifest()
    job = jobs.build_job_spec(m, step, 2, CFG, inputs_hash="h1")
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    md = job["metadata"]
    assert md["name"] == f"alice-{step}-2" and md["namespace"] == "voice"
    assert md["labels"] == {
        "app.kubernetes.io/name": "rvc-operator", "app.kubernetes.io/managed-by": "rvc-operator",
        "rvc-operator.dev/experiment": "alice", "rvc-operator.dev/step": step,
        "rvc-operator.dev/attempt": "2"}
    assert md["annotations"]["rvc-operator.dev/inputs-hash"] == "h1"
    assert md["annotations"]["rvc-operator.dev/generation"] == "3"
    (owner,) = md["ownerReferences"]
    assert owner == {"apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment", "name": "alice",
                     "uid": "1234-abcd", "controller": True, "blockOwnerDeletion": True}
    c = container(job)
    assert c["command"] == ["rvc-pipeline", step, "--spec", "/etc/rvc/experiment.yaml"]
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["imagePullPolicy"] == "IfNotPresent"
    p = pod(job)
    assert p["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 3 and job["spec"]["activeDeadlineSeconds"] == 86400
    assert "ttlSecondsAfterFinished" not in job["spec"]
    rule = job["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["onExitCodes"]["values"] == [2, 3] and rule["action"] == "FailJob"
    # security
    assert p["securityContext"]["runAsNonRoot"] is True and p["securityContext"]["runAsUser"] == 1000
    assert p["securityContext"]["fsGroup"] == 1000
    assert p["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert p["automountServiceAccountToken"] is False
    # volumes
    mounts = {v["mountPath"]: v["name"] for v in c["volumeMounts"]}
    vols = {v["name"]: v for v in p["volumes"]}
    assert mounts["/etc/rvc"] == "spec" and vols["spec"]["configMap"]["name"] == "alice-spec"
    assert mounts["/scratch"] == "scratch" and "emptyDir" in vols["scratch"]
    assert ("/dev/shm" in mounts) == (step == "train")
    if step == "train":
        assert vols["dshm"]["emptyDir"] == {"medium": "Memory"}
    e = env(job)
    assert e["RVC_SCRATCH"] == "/scratch" and e["HOME"] == "/scratch"
    assert e["RVC_WEIGHTS_DIR"] == "/scratch/weights"
    assert "hostNetwork" not in p and "priorityClassName" not in p and "serviceAccountName" not in p


def test_gpu_requests_per_step_and_device() -> None:
    m = manifest(train={"gpus": 4})
    got = {s: gpus(jobs.build_job_spec(m, s, 1, CFG)) for s in STEP_ORDER}
    assert got == {"preprocess": 0, "f0": 0, "features": 1, "train": 4, "index": 1,  # f0 pm: CPU
                   "convert": 1}
    for method, want in [("pm", 0), ("harvest", 0), ("dio", 0), ("crepe", 1), ("rmvpe", 1)]:
        assert gpus(jobs.build_job_spec(manifest(f0={"method": method}), "f0", 1, CFG)) == want, method
    no_pitch = manifest(f0={"method": "rmvpe"}, model={"pitchGuidance": False})
    assert gpus(jobs.build_job_spec(no_pitch, "f0", 1, CFG)) == 0
    cpu = manifest(resources={"device": "cpu"}, train={"gpus": 4})
    assert all(gpus(jobs.build_job_spec(cpu, s, 1, CFG)) == 0 for s in STEP_ORDER)
    job = jobs.build_job_spec(m, "train", 1, CFG)
    res = container(job)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "4"


def test_images_selectors_tolerations_defaults() -> None:
    m = manifest()
    train = jobs.build_job_spec(m, "train", 1, CFG)
    prep = jobs.build_job_spec(m, "preprocess", 1, CFG)
    assert container(train)["image"] == "reg/rvc-pipeline:1.0"
    assert pod(train)["nodeSelector"] == {"pool": "gpu"}
    assert pod(train)["tolerations"] == CFG.gpu_tolerations
    assert "CUDA_VISIBLE_DEVICES" not in env(train)
    assert container(prep)["image"] == "reg/rvc-pipeline-cpu:1.0"
    assert pod(prep)["nodeSelector"] == {"pool": "cpu"}
    assert "tolerations" not in pod(prep)
    assert env(prep)["CUDA_VISIBLE_DEVICES"] == ""
    # GPU image fallback when no CPU image is configured
    cfg = OperatorConfig(pipeline_image="only:gpu", cpu_image="")
    assert container(jobs.build_job_spec(m, "preprocess", 1, cfg))["image"] == "only:gpu"


def test_spec_overrides_win() -> None:
    res = {
        "image": "mine:dev", "nodeSelector": {"zone": "a"},
        "tolerations": [{"key": "spot", "operator": "Equal", "value": "yes", "effect": "NoExecute",
                         "tolerationSeconds": 30}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "gpu", "operator": "In", "values": ["a100"]}]}]}}},
        "priorityClassName": "rvc-high", "queueName": "team-a", "cpu": "4", "memory": "16Gi",
    }
    m = manifest(resources=res)
    for step in ("preprocess", "train"):
        job = jobs.build_job_spec(m, step, 1, CFG)
        p = pod(job)
        assert container(job)["image"] == "mine:dev"
        assert p["nodeSelector"] == {"zone": "a"}
        assert p["tolerations"] == [{"key": "spot", "operator": "Equal", "value": "yes",
                                     "effect": "NoExecute", "tolerationSeconds": 30}]
        assert p["affinity"] == res["affinity"]
        assert p["priorityClassName"] == "rvc-high"
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        assert "kueue.x-k8s.io/queue-name" not in job["spec"]["template"]["metadata"]["labels"]
        r = container(job)["resources"]
        assert r["requests"]["cpu"] == "4" and "cpu" not in r["limits"]
        assert r["requests"]["memory"] == r["limits"]["memory"] == "16Gi"
    plain = jobs.build_job_spec(manifest(), "train", 1, CFG)
    assert "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"]
    cfg = OperatorConfig(priority_class="batch-low")
    assert pod(jobs.build_job_spec(manifest(), "train", 1, cfg))["priorityClassName"] == "batch-low"


def test_operator_default_device_applies_only_when_unset() -> None:
    cpu_cfg = OperatorConfig(default_device="cpu", pipeline_image="g", cpu_image="c")
    unset = manifest()
    assert jobs.resolve_device(unset, cpu_cfg) == "cpu"
    job = jobs.build_job_spec(unset, "train", 1, cpu_cfg)
    assert gpus(job) == 0 and container(job)["image"] == "c"
    explicit = manifest(resources={"device": "gpu"})
    assert jobs.resolve_device(explicit, cpu_cfg) == "gpu"
    assert gpus(jobs.build_job_spec(explicit, "train", 1, cpu_cfg)) == 1
    # the pod reads the resolved device from its ConfigMap
    cm = jobs.build_spec_configmap(unset, cpu_cfg)
    doc = yaml.safe_load(cm["data"]["experiment.yaml"])
    assert doc["spec"]["resources"]["device"] == "cpu"


def test_secret_endpoint_pushgateway_env() -> None:
    cfg = OperatorConfig(s3_endpoint="http://127.0.0.1:9000", s3_credentials_secret="rvc-s3",
                         pushgateway="http://pgw:9091")
    job = jobs.build_job_spec(manifest(), "f0", 1, cfg)
    e = env(job)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert e[key] == {"secretKeyRef": {"name": "rvc-s3", "key": key, "optional": True}}
    assert e["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert e["RVC_PUSHGATEWAY"] == "http://pgw:9091"
    own = manifest(storage={"uri": "s3://m/r", "endpoint": "http://minio:9000", "credentialsSecret": "mine",
                            "region": "eu-west-1"}, metrics={"pushgateway": "http://other:9091"})
    e2 = env(jobs.build_job_spec(own, "f0", 1, cfg))
    assert e2["AWS_ACCESS_KEY_ID"]["secretKeyRef"]["name"] == "mine"
    assert e2["AWS_ENDPOINT_URL"] == "http://minio:9000" and e2["AWS_REGION"] == "eu-west-1"
    assert e2["RVC_PUSHGATEWAY"] == "http://other:9091"
    bare = env(jobs.build_job_spec(manifest(), "f0", 1, OperatorConfig()))
    assert not {"AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL", "RVC_PUSHGATEWAY"} & set(bare)


def test_host_network_service_account_scratch_ttl_force() -> None:
    cfg = OperatorConfig(host_network=True, service_account="rvc-steps", scratch_size_limit="50Gi",
                         job_ttl_seconds=3600, job_backoff_limit=1, job_active_deadline_seconds=600,
                         run_as_user=4242)
    job = jobs.build_job_spec(manifest(), "index", 5, cfg, force=True)
    p = pod(job)
    assert p["hostNetwork"] is True and p["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert p["serviceAccountName"] == "rvc-steps"
    assert {v["name"]: v for v in p["volumes"]}["scratch"]["emptyDir"] == {"sizeLimit": "50Gi"}
    assert job["spec"]["ttlSecondsAfterFinished"] == 3600
    assert job["spec"]["backoffLimit"] == 1 and job["spec"]["activeDeadlineSeconds"] == 600
    assert container(job)["command"][-1] == "--force"
    assert job["metadata"]["annotations"]["rvc-operator.dev/force"] == "true"
    assert p["securityContext"]["runAsUser"] == 4242
    assert container(job)["securityContext"]["runAsUser"] == 4242


def test_configmap_holds_a_manifest_the_pipeline_accepts() -> None:
    cfg = OperatorConfig(s3_endpoint="http://s3:9000", weights_cache="s3://weights/")
    m = manifest(train={"epochs": 7}, f0={"method": "rmvpe"})
    cm = jobs.build_spec_configmap(m, cfg)
    assert cm["metadata"]["name"] == "alice-spec" and cm["metadata"]["namespace"] == "voice"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "1234-abcd"
    assert cm["metadata"]["labels"]["rvc-operator.dev/experiment"] == "alice"
    doc = yaml.safe_load(cm["data"]["experiment.yaml"])
    exp = parse_manifest(doc)  # exactly what `rvc-pipeline <step> --spec` does
    assert exp.name == "alice" and exp.spec.train.epochs == 7
    assert exp.spec.storage.endpoint == "http://s3:9000"
    assert exp.spec.weights_cache == "s3://weights/"
    assert exp.spec.f0.rmvpe_checkpoint == "rmvpe.pt"
    # manifest-level values win over operator defaults
    own = manifest(storage={"uri": "s3://m/r", "endpoint": "http://mine"}, weightsCache="/w")
    doc2 = yaml.safe_load(jobs.build_spec_configmap(own, cfg)["data"]["experiment.yaml"])
    assert doc2["spec"]["storage"]["endpoint"] == "http://mine" and doc2["spec"]["weightsCache"] == "/w"


def test_builders_are_pure_and_deterministic() -> None:
    m = manifest(resources={"affinity": {"x": {"y": 1}}})
    snapshot = copy.deepcopy(m)
    a = jobs.build_job_spec(m, "train", 1, CFG)
    b = jobs.build_job_spec(m, "train", 1, CFG)
    assert a == b and m == snapshot
    a["spec"]["template"]["spec"]["affinity"]["x"]["y"] = 2
    assert m["spec"]["resources"]["affinity"]["x"]["y"] == 1


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="step"):
        jobs.build_job_spec(manifest(), "export", 1, CFG)
    with pytest.raises(ValueError, match="attempt"):
        jobs.build_job_spec(manifest(), "train", 0, CFG)
    with pytest.raises(SpecError, match="spec.train.epochs"):
        jobs.build_job_spec(manifest(train={"epochs": 0}), "train", 1, CFG)
    no_uid = manifest()
    del no_uid["metadata"]["uid"]
    with pytest.raises(ValueError, match="metadata.uid"):
        jobs.build_job_spec(no_uid, "train", 1, CFG)


def test_config_from_env() -> None:
    cfg = OperatorConfig.from_env({
        "RVC_PIPELINE_IMAGE": "a:1", "RVC_PIPELINE_CPU_IMAGE": "b:1", "RVC_IMAGE_PULL_POLICY": "never",
        "RVC_DEFAULT_DEVICE": "CPU", "RVC_GPU_NODE_SELECTOR": '{"pool": "gpu"}',
        "RVC_GPU_TOLERATIONS": '[{"key": "nvidia.com/gpu", "operator": "Exists"}]',
        "RVC_CPU_NODE_SELECTOR": '{"pool": "cpu"}', "RVC_PRIORITY_CLASS": "p",
        "RVC_JOB_ACTIVE_DEADLINE_SECONDS": "100", "RVC_JOB_BACKOFF_LIMIT": "0", "RVC_STEP_MAX_RETRIES": "5",
        "RVC_MAX_CONCURRENT_EXPERIMENTS": "2", "RVC_PUSHGATEWAY": "http://p", "RVC_S3_ENDPOINT": "http://s",
        "RVC_S3_CREDENTIALS_SECRET": "sec", "RVC_SERVICE_ACCOUNT": "sa", "RVC_HOST_NETWORK": "true",
        "RVC_METRICS_PORT": "9000", "RVC_HEALTH_PORT": "9001", "RVC_RUN_AS_USER": "2000",
        "RVC_SCRATCH_SIZE_LIMIT": "10Gi", "RVC_WEIGHTS_CACHE": "s3://w",
        "RVC_DELETE_ARTIFACTS_DEFAULT": "yes",
    })
    assert (cfg.pipeline_image, cfg.cpu_image, cfg.image_pull_policy, cfg.default_device) == (
        "a:1", "b:1", "Never", "cpu")
    assert cfg.gpu_node_selector == {"pool": "gpu"} and cfg.cpu_node_selector == {"pool": "cpu"}
    assert cfg.gpu_tolerations == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert (cfg.job_active_deadline_seconds, cfg.job_backoff_limit, cfg.step_max_retries) == (100, 0, 5)
    assert cfg.max_concurrent_experiments == 2 and cfg.host_network is True
    assert (cfg.metrics_port, cfg.health_port, cfg.run_as_user) == (9000, 9001, 2000)
    assert cfg.delete_artifacts_default is True and cfg.weights_cache == "s3://w"
    d = OperatorConfig.from_env({})
    assert (d.image_pull_policy, d.default_device, d.job_backoff_limit, d.step_max_retries) == (
        "IfNotPresent", "gpu", 3, 2)
    assert (d.job_active_deadline_seconds, d.max_concurrent_experiments, d.metrics_port, d.health_port) == (
        86400, 0, 8080, 8081)
    assert d.run_as_user == 1000 and d.host_network is False and d.delete_artifacts_default is False
    for env_, name in [({"RVC_GPU_NODE_SELECTOR": "{bad"}, "RVC_GPU_NODE_SELECTOR"),
                       ({"RVC_GPU_TOLERATIONS": '{"a": 1}'}, "RVC_GPU_TOLERATIONS"),
                       ({"RVC_DEFAULT_DEVICE": "tpu"}, "RVC_DEFAULT_DEVICE"),
                       ({"RVC_JOB_BACKOFF_LIMIT": "-1"}, "RVC_JOB_BACKOFF_LIMIT"),
                       ({"RVC_HOST_NETWORK": "maybe"}, "RVC_HOST_NETWORK"),
                       ({"RVC_METRICS_PORT": "http"}, "RVC_METRICS_PORT")]:
        with pytest.raises(ConfigError, match=name):
            OperatorConfig.from_env(env_)


# --- shipped examples and RBAC ---------------------------------------------------------------------
def _schema_errors(node: dict[str, Any], value: Any, path: str) -> list[str]:
    """A small structural-schema check: unknown fields (the API server would prune them silently), types,
    enums and bounds."""
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int,
             "number": (int, float)}
    errs = []
    if not isinstance(value, types[node["type"]]) or (node["type"] in ("integer", "number")
                                                       and isinstance(value, bool)):
        return [f"{path}: expected {node['type']}, got {value!r}"]
    if "enum" in node and value not in node["enum"]:
        errs.append(f"{path}: {value!r} not in {node['enum']}")
    if "minimum" in node and value < node["minimum"]:
        errs.append(f"{path}: below minimum")
    if isinstance(value, dict) and "properties" in node:
        for k, v in value.items():
            if k not in node["properties"]:
                errs.append(f"{path}.{k}: unknown field")
            else:
                errs += _schema_errors(node["properties"][k], v, f"{path}.{k}")
    if isinstance(value, list) and "items" in node:
        for i, v in enumerate(value):
            errs += _schema_errors(node["items"], v, f"{path}[{i}]")
    return errs


@pytest.mark.parametrize(("path", "want_gpus"), [
    ("examples/experiment.yaml", {"preprocess": 0, "f0": 1, "features": 1, "train": 1, "index": 1,
                                  "convert": 1}),
    ("examples/experiment-cpu.yaml", dict.fromkeys(STEP_ORDER, 0)),
    ("examples/convert.yaml", {"preprocess": 0, "f0": 1, "features": 1, "train": 1, "index": 1,
                               "convert": 1}),
])
def test_examples_are_valid_and_build_jobs(path: str, want_gpus: dict[str, int]) -> None:
    from pathlib import Path

    from rvc_operator.crd import build_crd
    from rvc_pipeline.core.spec import load_manifest

    root = Path(__file__).resolve().parents[2]
    exp = load_manifest(root / path)
    raw = yaml.safe_load((root / path).read_text())
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _schema_errors(schema["properties"]["spec"], raw["spec"], "spec") == []
    raw["metadata"]["uid"] = "u"
    got = {s: gpus(jobs.build_job_spec(raw, s, 1, CFG)) for s in STEP_ORDER}
    assert got == want_gpus
    assert exp.spec.storage.uri.startswith("s3://") and exp.spec.dataset.source.startswith("s3://")


def test_rbac_grants_what_the_operator_uses_and_no_secrets() -> None:
    from pathlib import Path

    docs = list(yaml.safe_load_all((Path(__file__).resolve().parents[2] / "crds" / "rbac.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
    grants: dict[tuple[str, str], set[str]] = {}
    for r in kinds["ClusterRole"]["rules"]:
        for g in r["apiGroups"]:
            for res in r["resources"]:
                grants.setdefault((g, res), set()).update(r["verbs"])
    need = {
        ("rvc-operator.dev", "rvcexperiments"): {"get", "list", "watch", "patch"},
        ("rvc-operator.dev", "rvcexperiments/status"): {"patch"},
        ("rvc-operator.dev", "rvcexperiments/finalizers"): {"update"},
        ("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
        ("", "pods"): {"get", "list", "watch"},
        ("", "pods/log"): {"get"},
        ("", "configmaps"): {"create", "get", "patch", "delete"},
        ("", "events"): {"create"},
        ("events.k8s.io", "events"): {"create"},
        ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
        ("", "namespaces"): {"list", "watch"},
    }
    for key, verbs in need.items():
        assert verbs <= grants.get(key, set()), key
    assert not any(res == "secrets" for _, res in grants)
    assert all("*" not in v for v in grants.values())
    sub = kinds["ClusterRoleBinding"]["subjects"][0]
    assert (sub["name"], sub["namespace"]) == (kinds["ServiceAccount"]["metadata"]["name"],
                                               kinds["ServiceAccount"]["metadata"]["namespace"])


def test_every_step_pod_carries_its_lease_owner() -> None:
    for step in STEP_ORDER:
        owner = env(jobs.build_job_spec(manifest(), step, 1, CFG))["RVC_LEASE_OWNER"]
        assert owner == "voice/alice/1234-abcd"
    other = manifest()
    other["metadata"].update(namespace="team-b", uid="9999")  # same name elsewhere: another owner
    assert env(jobs.build_job_spec(other, "train", 2, CFG))["RVC_LEASE_OWNER"] == "team-b/alice/9999"


def test_storage_allow_list_from_env() -> None:
    read = OperatorConfig.from_env
    assert read({}).storage_allowed_prefixes is None
    assert read({"RVC_STORAGE_ALLOWED_PREFIXES": "{}"}).storage_allowed_prefixes is None
    assert read({"RVC_STORAGE_ALLOWED_PREFIXES": "null"}).storage_allowed_prefixes is None
    table = '{"team-a": ["s3://bucket-a", "s3://shared/team-a/"], "*": []}'
    cfg = read({"RVC_STORAGE_ALLOWED_PREFIXES": table})
    assert cfg.storage_allowed_prefixes == {"team-a": ("s3://bucket-a/", "s3://shared/team-a/"), "*": ()}
    for value, why in [('["s3://b/"]', "JSON object"), ('{"team-a": "s3://b/"}', "list"),
                       ('{"Team_A": ["s3://b/"]}', "namespace"), ('{"a": ["/data"]}', "s3://"),
                       ('{"a": ["s3://b/x/../y"]}', r"'\.\.'"), ('{"a": [null]}', "s3://"),
                       ('{"a": ["s3://"]}', "bucket"), ("{bad", "JSON")]:
        with pytest.raises(ConfigError, match=f"RVC_STORAGE_ALLOWED_PREFIXES.*{why}"):
            read({"RVC_STORAGE_ALLOWED_PREFIXES": value})


def test_convert_job_one_pod_or_shards_gpu_per_device() -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    spec = {"steps": ["train", "convert"], "convert": {"source": "s3://voices/todo/", "format": "flac"}}
    m = manifest(**spec, resources={"shards": 2})
    one = jobs.build_job_spec(m, "convert", 1, CFG, inputs_hash="h")
    assert container(one)["command"] == ["rvc-pipeline", "convert", "--spec", "/etc/rvc/experiment.yaml"]
    assert one["metadata"]["name"] == "alice-convert-1" and gpus(one) == 1
    assert container(one)["image"] == "reg/rvc-pipeline:1.0" and pod(one)["nodeSelector"] == {"pool": "gpu"}
    sharded = jobs.build_job_spec(m, "convert", 3, CFG, inputs_hash="h", shard=(1, 2))
    assert container(sharded)["command"][-2:] == ["--shard", "1/2"]
    assert sharded["metadata"]["name"] == "alice-convert-s1-3"
    assert sharded["metadata"]["labels"]["rvc-operator.dev/shard"] == "1"
    cpu = jobs.build_job_spec(manifest(**spec, resources={"device": "cpu"}), "convert", 1, CFG)
    assert gpus(cpu) == 0 and container(cpu)["image"] == "reg/rvc-pipeline-cpu:1.0"
    for job in (one, sharded, cpu):
        kubernetes_validate.validate(job, latest_version(), strict=True)
    with pytest.raises(ValueError, match="shard: got 2/2"):
        jobs.build_job_spec(m, "convert", 1, CFG, shard=(2, 2))
    cm = jobs.build_spec_configmap(m, CFG)
    inner = parse_manifest(yaml.safe_load(next(iter(cm["data"].values()))))
    assert inner.spec.convert is not None and inner.spec.convert.format == "flac"
