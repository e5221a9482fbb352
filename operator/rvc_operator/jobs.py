"""Pure builders: RVCExperiment manifest (+ operator config) -> the ConfigMap and the Job of one step.

Nothing here talks to a cluster; handlers.py sends what these functions return.

Per-step placement (device = spec.resources.device, else the operator's RVC_DEFAULT_DEVICE):

| step       | device=gpu                                  | device=cpu |
|------------|---------------------------------------------|------------|
| preprocess | CPU pod (slicing/resampling use no GPU)     | CPU pod    |
| f0         | 1 GPU for a network method (catalog needs_gpu: crepe/rmvpe/fcpe); else CPU pod | CPU pod |
| features   | 1 GPU (HuBERT)                              | CPU pod    |
| train      | spec.train.gpus GPUs (the pipeline starts DDP itself when > 1) | CPU pod |
| index      | 1 GPU (faiss k-means/IVF training)          | CPU pod    |
| convert    | 1 GPU (one process converts file after file) | CPU pod   |

A GPU pod uses the CUDA image (RVC_PIPELINE_IMAGE), the GPU node selector and tolerations; a CPU pod
uses the CPU image (RVC_PIPELINE_CPU_IMAGE) and the CPU node selector. spec.resources.image,
nodeSelector and tolerations override those defaults for every step.
"""

from __future__ import annotations

import copy
import hashlib
import re
from typing import Any

import yaml
from rvc_pipeline.core import errors
from rvc_pipeline.core.catalog import pitch_needs_gpu
from rvc_pipeline.core.layout import SHARDED_STEPS
from rvc_pipeline.core.spec import API_GROUP, API_VERSION, KIND, STEP_ORDER, Experiment, parse_manifest

from .config import OperatorConfig

APP_LABEL = "app.kubernetes.io/name"
APP = "rvc-operator"
LABEL_EXPERIMENT = f"{API_GROUP}/experiment"
LABEL_STEP = f"{API_GROUP}/step"
LABEL_ATTEMPT = f"{API_GROUP}/attempt"
LABEL_SHARD = f"{API_GROUP}/shard"  # the shard index I of a sharded step's Job
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
ANN_EXPERIMENT = f"{API_GROUP}/experiment-name"
ANN_GENERATION = f"{API_GROUP}/generation"
ANN_INPUTS = f"{API_GROUP}/inputs-hash"
ANN_FORCE = f"{API_GROUP}/force"
ANN_SHARDS = f"{API_GROUP}/shards"  # N of a sharded step's Job (read back when adopting it)
ANN_DELETE_ARTIFACTS = f"{API_GROUP}/delete-artifacts"

CONTAINER = "step"
SPEC_DIR = "/etc/rvc"
SPEC_FILE = "experiment.yaml"
SPEC_PATH = f"{SPEC_DIR}/{SPEC_FILE}"
SCRATCH = "/scratch"

GPU_RESOURCE = "nvidia.com/gpu"
PERMANENT_EXIT_CODES = errors.PERMANENT_EXIT_CODES  # rvc-pipeline: 2 bad spec/data, 3 missing weights

_DNS_BAD = re.compile(r"[^a-z0-9.-]+")


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def k8s_name(base: str, suffix: str = "", limit: int = 63) -> str:
    """`base + suffix` as a DNS-1123 label of at most `limit` chars. Too long: the base is cut and a
    hash of the whole base keeps names distinct. Deterministic: the same input gives the same name."""
    clean = _DNS_BAD.sub("-", base.lower()).strip("-.") or "x"
    if len(clean + suffix) <= limit and clean == base:
        return clean + suffix
    h = _short_hash(base)
    keep = limit - len(suffix) - len(h) - 1
    if keep < 1:
        raise ValueError(f"suffix {suffix!r} too long for a {limit}-char name")
    return f"{clean[:keep].rstrip('-.')}-{h}{suffix}"


def label_value(value: str) -> str:
    """A label value (<= 63 chars, alphanumeric at both ends) that stays unique for long names."""
    if len(value) <= 63 and re.fullmatch(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]", value):
        return value
    h = _short_hash(value)
    head = re.sub(r"[^A-Za-z0-9_.-]", "-", value)[: 63 - 9].strip("-_.")
    return f"{head}-{h}" if head else h


# Steps that run as N shard Jobs when spec.resources.shards = N > 1 (`rvc-pipeline <step> --shard I/N`).
# N plain Jobs rather than one Indexed Job: the test cluster is v1.20, which has no Indexed Jobs.


def job_name(resource_name: str, step: str, attempt: int, shard: int | None = None) -> str:
    """Deterministic Job name `<resource>-<step>-<attempt>` (shard I: `<resource>-<step>-s<I>-<attempt>`),
    at most 63 characters."""
    return k8s_name(resource_name, f"-{step}-{attempt}" if shard is None else f"-{step}-s{shard}-{attempt}")


def configmap_name(resource_name: str) -> str:
    return k8s_name(resource_name, "-spec")


def experiment_selector(resource_name: str) -> str:
    """Label selector of every Job of one experiment (combine with the owner uid to exclude old ones)."""
    return f"{LABEL_EXPERIMENT}={label_value(resource_name)}"


# ---------------------------------------------------------------------------------------------------
# spec resolution
# ---------------------------------------------------------------------------------------------------
def _raw_get(d: Any, *path: str) -> Any:
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def resolve_device(manifest: dict[str, Any], cfg: OperatorConfig) -> str:
    """spec.resources.device as written in the manifest, else the operator default (RVC_DEFAULT_DEVICE).
    The raw manifest is read because the typed spec always fills in 'gpu'."""
    dev = _raw_get(manifest, "spec", "resources", "device")
    return str(dev) if dev in ("gpu", "cpu") else cfg.default_device


def _parse(manifest: dict[str, Any]) -> Experiment:
    return parse_manifest({
        "apiVersion": manifest.get("apiVersion", f"{API_GROUP}/{API_VERSION}"),
        "kind": manifest.get("kind", KIND),
        "metadata": {k: v for k, v in (manifest.get("metadata") or {}).items() if k in ("name", "namespace")},
        "spec": copy.deepcopy(manifest.get("spec") or {}),
    })


def effective_manifest(manifest: dict[str, Any], cfg: OperatorConfig, parsed: Experiment | None = None
                       ) -> Experiment:
    """Parse the manifest (SpecError on bad input; `parsed`: the caller parsed it already, a copy is
    changed) and apply the operator defaults for unset fields: resources.device, storage.endpoint,
    storage.credentialsSecret, weightsCache, metrics.pushgateway."""
    exp = parsed.model_copy(deep=True) if parsed is not None else _parse(manifest)
    spec = exp.spec
    spec.resources.device = resolve_device(manifest, cfg)  # type: ignore[assignment]
    for obj, field, value in ((spec.storage, "endpoint", cfg.s3_endpoint),
                              (spec.storage, "credentials_secret", cfg.s3_credentials_secret),
                              (spec, "weights_cache", cfg.weights_cache),
                              (spec.metrics, "pushgateway", cfg.pushgateway)):
        if value and not getattr(obj, field):
            setattr(obj, field, value)
    return exp


def step_uses_gpu(exp: Experiment, step: str) -> bool:
    """Whether `step` requests GPUs (see the module docstring for the table)."""
    spec = exp.spec
    if spec.resources.device != "gpu":
        return False
    if step == "preprocess":
        return False
    if step == "f0":
        return spec.model.pitch_guidance and pitch_needs_gpu(spec.f0.method)
    return step in ("features", "train", "index", "convert")


def gpu_count(exp: Experiment, step: str) -> int:
    if not step_uses_gpu(exp, step):
        return 0
    return exp.spec.train.gpus if step == "train" else 1


def owner_reference(manifest: dict[str, Any]) -> dict[str, Any]:
    meta = manifest.get("metadata") or {}
    if not meta.get("uid"):
        raise ValueError("metadata.uid: required to own Jobs (pass the object as read from the cluster)")
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def base_labels(manifest: dict[str, Any]) -> dict[str, str]:
    name = (manifest.get("metadata") or {})["name"]
    return {APP_LABEL: APP, "app.kubernetes.io/managed-by": APP, LABEL_EXPERIMENT: label_value(name)}


def pod_manifest_text(exp: Experiment, manifest: dict[str, Any]) -> str:
    """The manifest the step pods read (`rvc-pipeline <step> --spec /etc/rvc/experiment.yaml`)."""
    meta = manifest.get("metadata") or {}
    doc = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace", "default")},
        "spec": exp.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    return yaml.safe_dump(doc, sort_keys=False)


def build_spec_configmap(manifest: dict[str, Any], cfg: OperatorConfig, parsed: Experiment | None = None
                         ) -> dict[str, Any]:
    """ConfigMap `<name>-spec` holding the effective manifest, owned by the RVCExperiment."""
    exp = effective_manifest(manifest, cfg, parsed)
    meta = manifest["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(meta["name"]),
            "namespace": meta.get("namespace", "default"),
            "labels": base_labels(manifest),
            "annotations": {ANN_EXPERIMENT: meta["name"], ANN_GENERATION: str(meta.get("generation", 0))},
            "ownerReferences": [owner_reference(manifest)],
        },
        "data": {SPEC_FILE: pod_manifest_text(exp, manifest)},
    }


def step_image(exp: Experiment, step: str, cfg: OperatorConfig) -> str:
    if exp.spec.resources.image:
        return exp.spec.resources.image
    return cfg.pipeline_image if step_uses_gpu(exp, step) else (cfg.cpu_image or cfg.pipeline_image)


def _tolerations(exp: Experiment, gpu: bool, cfg: OperatorConfig) -> list[dict[str, Any]]:
    if exp.spec.resources.tolerations is not None:
        return [t.model_dump(by_alias=True, exclude_none=True) for t in exp.spec.resources.tolerations]
    return copy.deepcopy(cfg.gpu_tolerations) if gpu else []


def _node_selector(exp: Experiment, gpu: bool, cfg: OperatorConfig) -> dict[str, str]:
    if exp.spec.resources.node_selector is not None:
        return dict(exp.spec.resources.node_selector)
    return dict(cfg.gpu_node_selector if gpu else cfg.cpu_node_selector)


def lease_owner(manifest: dict[str, Any]) -> str:
    """RVC_LEASE_OWNER of the step pods: `<namespace>/<name>/<uid>`. The pipeline's experiment lease
    records it, so a later pod of the same experiment (a retry, a rescheduled pod) may take over its own
    lease, while another resource naming the same folder may not."""
    meta = manifest.get("metadata") or {}
    uid = owner_reference(manifest)["uid"]  # ValueError naming metadata.uid when missing
    return f"{meta.get('namespace', 'default')}/{meta['name']}/{uid}"


def _env(exp: Experiment, gpu: bool, owner: str) -> list[dict[str, Any]]:
    st = exp.spec.storage
    env: list[dict[str, Any]] = [
        {"name": "RVC_LEASE_OWNER", "value": owner},
        # the pod's name: a replacement pod waits for a terminating one to release the lease (lease.py)
        {"name": "RVC_LEASE_INSTANCE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "RVC_SCRATCH", "value": SCRATCH},
        {"name": "HOME", "value": SCRATCH},
        {"name": "TMPDIR", "value": SCRATCH},
        {"name": "RVC_WEIGHTS_DIR", "value": f"{SCRATCH}/weights"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if st.credentials_secret:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {
                "name": st.credentials_secret, "key": key, "optional": True}}})
    if st.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": st.endpoint})
    if st.region:
        env.append({"name": "AWS_REGION", "value": st.region})
    if exp.spec.metrics.pushgateway:
        env.append({"name": "RVC_PUSHGATEWAY", "value": exp.spec.metrics.pushgateway})
    if not gpu:
        # A CPU pod on a GPU node would otherwise see every GPU through the NVIDIA runtime's defaults.
        env.append({"name": "CUDA_VISIBLE_DEVICES", "value": ""})
    return env


def _resources(exp: Experiment, step: str) -> dict[str, Any]:
    r = exp.spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if r.cpu:
        requests["cpu"] = r.cpu
    if r.memory:
        requests["memory"] = r.memory
        limits["memory"] = r.memory
    n = gpu_count(exp, step)
    if n:
        limits[GPU_RESOURCE] = str(n)
        requests[GPU_RESOURCE] = str(n)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def build_job_spec(
    exp_manifest: dict[str, Any],
    step: str,
    attempt: int,
    cfg: OperatorConfig,
    *,
    force: bool = False,
    inputs_hash: str | None = None,
    parsed: Experiment | None = None,
    shard: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The batch/v1 Job that runs `rvc-pipeline <step> --spec /etc/rvc/experiment.yaml` once (`parsed`:
    the manifest as the caller parsed it already; `shard` (I, N): shard I of N of a sharded step, with
    `--shard I/N`, the name `<name>-<step>-s<I>-<attempt>` and the label rvc-operator.dev/shard=I)."""
    _check_job_args(step, attempt, shard, force)
    exp = effective_manifest(exp_manifest, cfg, parsed)
    meta = exp_manifest["metadata"]
    labels = {**base_labels(exp_manifest), LABEL_STEP: step, LABEL_ATTEMPT: str(attempt)}
    if shard is not None:
        labels[LABEL_SHARD] = str(shard[0])
    if exp.spec.resources.queue_name:
        labels[LABEL_QUEUE] = exp.spec.resources.queue_name
    annotations = {ANN_EXPERIMENT: meta["name"], ANN_GENERATION: str(meta.get("generation", 0))}
    if inputs_hash:
        annotations[ANN_INPUTS] = inputs_hash
    if force:
        annotations[ANN_FORCE] = "true"
    if shard is not None:
        annotations[ANN_SHARDS] = str(shard[1])
    pod_labels = {k: v for k, v in labels.items() if k != LABEL_QUEUE}
    volumes, mounts = _volumes(step, meta["name"], cfg)
    container = _container(exp, step, cfg, force=force, owner=lease_owner(exp_manifest), mounts=mounts,
                           shard=shard)
    job_spec: dict[str, Any] = {
        "backoffLimit": cfg.job_backoff_limit,
        "activeDeadlineSeconds": cfg.job_active_deadline_seconds,
        "podFailurePolicy": pod_failure_policy(),
        # 1.28+: a replacement pod starts only once the old one has terminated (saved and uploaded its
        # work after SIGTERM); 1.20 drops the field, and the pipeline's lease handover waits instead.
        "podReplacementPolicy": "Failed",
        "template": {
            "metadata": {"labels": pod_labels, "annotations": dict(annotations)},
            "spec": _pod_spec(exp, step_uses_gpu(exp, step), cfg, container, volumes),
        },
    }
    if cfg.job_ttl_seconds is not None:
        job_spec["ttlSecondsAfterFinished"] = cfg.job_ttl_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(meta["name"], step, attempt, shard[0] if shard is not None else None),
            "namespace": meta.get("namespace", "default"),
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference(exp_manifest)],
        },
        "spec": job_spec,
    }


def _volumes(step: str, name: str, cfg: OperatorConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts): the spec ConfigMap, the scratch folder, and /dev/shm for training."""
    volumes: list[dict[str, Any]] = [
        {"name": "spec", "configMap": {"name": configmap_name(name),
                                       "items": [{"key": SPEC_FILE, "path": SPEC_FILE}]}},
        {"name": "scratch", "emptyDir": ({"sizeLimit": cfg.scratch_size_limit} if cfg.scratch_size_limit
                                         else {})},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
        {"name": "scratch", "mountPath": SCRATCH},
    ]
    if step == "train":
        # DataLoader workers pass batches through shared memory; the container default is 64 MiB.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _check_job_args(step: str, attempt: int, shard: tuple[int, int] | None, force: bool) -> None:
    if step not in STEP_ORDER:
        raise ValueError(f"step: got {step!r}; allowed values: {list(STEP_ORDER)}")
    if attempt < 1:
        raise ValueError(f"attempt: must be >= 1, got {attempt}")
    if shard is None:
        return
    if step not in SHARDED_STEPS:
        raise ValueError(f"shard: step {step!r} runs as one Job; only {list(SHARDED_STEPS)} are sharded")
    index, count = shard
    if not 2 <= count <= 64 or not 0 <= index < count:
        raise ValueError(f"shard: got {index}/{count}; needs 0 <= I < N and 2 <= N <= 64")
    if force:
        raise ValueError("shard: rvc-pipeline refuses --force with --shard; a forced run is one Job")


def _container(exp: Experiment, step: str, cfg: OperatorConfig, *, force: bool, owner: str,
               mounts: list[dict[str, Any]], shard: tuple[int, int] | None = None) -> dict[str, Any]:
    command = ["rvc-pipeline", step, "--spec", SPEC_PATH] + (["--force"] if force else [])
    if shard is not None:
        command += ["--shard", f"{shard[0]}/{shard[1]}"]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": step_image(exp, step, cfg),
        "imagePullPolicy": cfg.image_pull_policy,
        "command": command,
        "env": _env(exp, step_uses_gpu(exp, step), owner),
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "runAsUser": cfg.run_as_user,
        },
    }
    res = _resources(exp, step)
    if res:
        container["resources"] = res
    return container


def pod_failure_policy() -> dict[str, Any]:
    """The Job's podFailurePolicy (Kubernetes 1.26+; 1.20 drops the field, and the operator then does the
    same by looking at the pods, status.py): a permanent exit code (2, 3) fails the Job at once; a pod
    failed by a disruption (condition DisruptionTarget: preemption, eviction, node drain, spot reclaim) is
    replaced without counting against backoffLimit. Such a pod got SIGTERM and saved its work first
    (exit 143, within terminationGracePeriodSeconds); its replacement resumes from that."""
    return {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                              "values": list(PERMANENT_EXIT_CODES)}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def _pod_spec(exp: Experiment, gpu: bool, cfg: OperatorConfig, container: dict[str, Any],
              volumes: list[dict[str, Any]]) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # SIGTERM (suspend, preemption, drain) to SIGKILL: time to finish the training step, save and
        # upload a resumable checkpoint, or push the finished files of a data step
        "terminationGracePeriodSeconds": exp.spec.lifecycle.termination_grace_period_seconds,
        "containers": [container],
        "volumes": volumes,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": cfg.run_as_user,
            "runAsGroup": cfg.run_as_user,
            "fsGroup": cfg.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    optional = {
        "nodeSelector": _node_selector(exp, gpu, cfg),
        "tolerations": _tolerations(exp, gpu, cfg),
        "affinity": copy.deepcopy(exp.spec.resources.affinity) if exp.spec.resources.affinity else None,
        "priorityClassName": exp.spec.resources.priority_class_name or cfg.priority_class,
        "serviceAccountName": cfg.service_account,
    }
    pod_spec.update({k: v for k, v in optional.items() if v})
    if cfg.host_network:
        pod_spec["hostNetwork"] = True
        pod_spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    return pod_spec
