"""Environment and scenario helpers of the operator e2e tests (tests/e2e/test_operator_e2e.py).

One test body, two modes (`RVC_E2E_CLUSTER`):

* `local` (default): the single-node v1.20.2 cluster of `tests/e2e/cluster` (fixtures `cluster` and
  `images`), a moto S3 server and a real Prometheus + Pushgateway on the host's loopback. Pods that talk
  to them run with hostNetwork; the operator pod too, reaching the API server at 127.0.0.1 through
  KUBERNETES_SERVICE_HOST/PORT (no kube-proxy, no DNS here). Ports of the operator's metrics/health
  endpoints are free host ports, since hostNetwork shares the host's.
* `external` (`RVC_E2E_CLUSTER=external`, used by scripts/kind-e2e.sh): the cluster of the current
  kubeconfig context, `kubectl`/`helm` from PATH, S3 at `RVC_E2E_S3_ENDPOINT_HOST` (from this machine)
  and `RVC_E2E_S3_ENDPOINT_POD` (from pods), credentials from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`,
  namespace `RVC_E2E_NAMESPACE`, bucket `RVC_E2E_BUCKET`, step image pull policy
  `RVC_E2E_IMAGE_PULL_POLICY`. No Prometheus (those checks are skipped, with a message), no hostNetwork
  unless `RVC_E2E_HOST_NETWORK=1` (a cluster like the local one: no kube-proxy, S3 on loopback).

In both modes the operator is installed with the Helm chart (charts/rvc-operator), the credentials
reach the pods through the Secret the chart creates, and experiments are applied with `kubectl apply`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.e2e.cluster.harness import REPO_ROOT, TIMINGS, Cluster

T = TypeVar("T")

CHART = REPO_ROOT / "charts" / "rvc-operator"
RELEASE = "rvc-operator"  # the chart's full name is then just "rvc-operator"
API_VERSION = "rvc-operator.dev/v1alpha1"
KIND = "RVCExperiment"
CRD_NAME = "rvcexperiments.rvc-operator.dev"
LABEL_EXPERIMENT = "rvc-operator.dev/experiment"
LABEL_STEP = "rvc-operator.dev/step"
STEPS = ("preprocess", "f0", "features", "train", "index")


def mode() -> str:
    m = os.environ.get("RVC_E2E_CLUSTER", "local").strip().lower() or "local"
    if m not in ("local", "external"):
        raise ValueError(f"RVC_E2E_CLUSTER: got {m!r}; allowed values: ['local', 'external']")
    return m


def _need_env(name: str) -> str:
    v = os.environ.get(name, "").strip()
    if not v:
        raise RuntimeError(f"{name} must be set in external mode (RVC_E2E_CLUSTER=external)")
    return v


def wait_until(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 1.0,
               diagnostics: Callable[[], str] | None = None) -> T:
    """Poll `probe` until it returns something truthy; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            extra = f"\n{diagnostics()}" if diagnostics else ""
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(interval)


@dataclass
class E2EEnv:
    """Where the e2e runs: the cluster handle, the S3 endpoint(s), the chart settings, Prometheus."""

    mode: str
    kube: Cluster
    helm_path: str
    namespace: str
    s3_host: str  # endpoint URL used from this process
    s3_pod: str  # endpoint URL used by step pods and the operator pod
    access_key: str
    secret_key: str
    region: str
    bucket: str
    operator_image: str
    pipeline_cpu_image: str
    pull_policy: str
    host_network: bool
    metrics_port: int = 8080
    health_port: int = 8081
    api_host: str | None = None  # KUBERNETES_SERVICE_HOST/PORT for a hostNetwork operator (local mode)
    api_port: str | None = None
    pushgateway: str | None = None
    prom: Any = None  # tests.promstack.PromStack (local mode)
    installed: bool = False
    # experiment names carry it: the Pushgateway of Debian's package keeps its groups across runs (its
    # default --persistence.file), and in external mode the cluster and the bucket outlive a run
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:4])
    timings: list[tuple[str, float]] = field(default_factory=list)
    _closers: list[Callable[[], None]] = field(default_factory=list)

    # ------------------------------------------------------------------ construction
    @classmethod
    def local(cls, cluster: Cluster, images: dict[str, str], tmp: Path) -> E2EEnv:
        from tests import promstack
        from tests.s3server import TEST_CREDENTIALS, free_port, start_moto

        if not promstack.available():
            raise RuntimeError("prometheus and prometheus-pushgateway are needed for the local e2e mode "
                               "(apt-get install --no-install-recommends prometheus prometheus-pushgateway)")
        server = yaml.safe_load(Path(cluster.kubeconfig).read_text())["clusters"][0]["cluster"]["server"]
        host_port = server.split("://", 1)[1].rstrip("/")
        api_host, _, api_port = host_port.rpartition(":")
        s3_url, stop_moto = start_moto()
        metrics_port, health_port = free_port(), free_port()
        try:
            prom = promstack.start_prom_stack(tmp / "prom", extra_targets=[f"127.0.0.1:{metrics_port}"])
        except Exception:
            stop_moto()
            raise
        env = cls(
            mode="local", kube=cluster, helm_path=str(cluster.kubectl_path.with_name("helm")),
            namespace=f"rvc-e2e-{uuid.uuid4().hex[:5]}", s3_host=s3_url, s3_pod=s3_url,
            access_key=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region=TEST_CREDENTIALS["AWS_DEFAULT_REGION"], bucket=f"rvc-e2e-{uuid.uuid4().hex[:8]}",
            operator_image=images["operator"], pipeline_cpu_image=images["pipeline-cpu"],
            pull_policy="Never", host_network=True, metrics_port=metrics_port, health_port=health_port,
            api_host=api_host, api_port=api_port, pushgateway=prom.pushgateway, prom=prom,
        )
        env._closers += [prom.stop, stop_moto]
        return env

    @classmethod
    def external(cls) -> E2EEnv:
        kubectl = shutil.which("kubectl")
        helm = shutil.which("helm")
        if not kubectl or not helm:
            raise RuntimeError("external mode needs kubectl and helm on PATH")
        kubeconfig = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
        kube = Cluster(kubeconfig=Path(kubeconfig), kubectl_path=Path(kubectl), node="")
        # RVC_E2E_HOST_NETWORK=1: a cluster without kube-proxy whose S3 is on the node's loopback (the
        # local cluster of tests/e2e/cluster, driven in external mode to check that code path)
        host_net = os.environ.get("RVC_E2E_HOST_NETWORK", "").lower() in ("1", "true", "yes")
        net: dict[str, Any] = {"host_network": host_net}
        if host_net:
            from tests.s3server import free_port

            server = kube.kubectl("config", "view", "--minify", "-o",
                                  "jsonpath={.clusters[0].cluster.server}").stdout.strip()
            api_host, _, api_port = server.split("://", 1)[1].rstrip("/").rpartition(":")
            net.update(api_host=api_host, api_port=api_port, metrics_port=free_port(),
                       health_port=free_port())
        return cls(
            mode="external", kube=kube, helm_path=helm,
            namespace=os.environ.get("RVC_E2E_NAMESPACE", "rvc-system"),
            s3_host=_need_env("RVC_E2E_S3_ENDPOINT_HOST"), s3_pod=_need_env("RVC_E2E_S3_ENDPOINT_POD"),
            access_key=_need_env("AWS_ACCESS_KEY_ID"), secret_key=_need_env("AWS_SECRET_ACCESS_KEY"),
            region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
            bucket=os.environ.get("RVC_E2E_BUCKET", "rvc-e2e"),
            operator_image=os.environ.get("RVC_E2E_OPERATOR_IMAGE", "rvc-operator:dev"),
            pipeline_cpu_image=os.environ.get("RVC_E2E_PIPELINE_CPU_IMAGE", "rvc-pipeline-cpu:dev"),
            pull_policy=os.environ.get("RVC_E2E_IMAGE_PULL_POLICY", "IfNotPresent"), **net,
        )

    def close(self) -> None:
        for c in reversed(self._closers):
            try:
                c()
            except Exception as e:  # noqa: BLE001 - teardown goes on
                print(f"e2e teardown: {e}")
        self._closers.clear()

    def timed(self, label: str, seconds: float) -> None:
        self.timings.append((label, seconds))
        TIMINGS.add(label, seconds)
        print(f"[e2e timing] {label}: {seconds:.1f} s", flush=True)

    # ------------------------------------------------------------------ tools
    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.kube.kubectl(*args, input=input, check=check, timeout=timeout)

    def get_json(self, *args: str) -> Any:
        return self.kube.get_json(*args)

    def helm(self, *args: str, timeout: float = 300) -> str:
        proc = subprocess.run([self.helm_path, *args], capture_output=True, text=True, env=self.kube.env,
                              timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def s3(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_host, region_name=self.region,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def s3_keys(self, prefix: str) -> dict[str, int]:
        """key -> size of every object under `prefix`."""
        out: dict[str, int] = {}
        for page in self.s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for o in page.get("Contents") or []:
                out[o["Key"]] = int(o["Size"])
        return out

    def s3_get(self, key: str) -> bytes:
        return self.s3().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def s3_put(self, key: str, data: bytes) -> None:
        self.s3().put_object(Bucket=self.bucket, Key=key, Body=data)

    # ------------------------------------------------------------------ namespaces of other teams
    @property
    def other_namespace(self) -> str:
        """A second team's namespace, allowed the same storage prefix as `namespace` (chart values)."""
        return f"{self.namespace}-b"

    @property
    def denied_namespace(self) -> str:
        """A namespace the chart's storage allow-list does not name (so: no storage at all)."""
        return f"{self.namespace}-z"

    # ------------------------------------------------------------------ operator (Helm chart)
    @property
    def deployment(self) -> str:
        return RELEASE

    def chart_values(self) -> dict[str, Any]:
        repo, _, tag = self.operator_image.rpartition(":")
        extra_env = [
            # a failed step is retried after 5 s, not 30 s; the sweep runs every 3 s (default 10 s)
            {"name": "RVC_STEP_RETRY_BACKOFF_SECONDS", "value": "5"},
            {"name": "RVC_RECONCILE_INTERVAL", "value": "3"},
        ]
        if self.api_host:
            extra_env += [{"name": "KUBERNETES_SERVICE_HOST", "value": self.api_host},
                          {"name": "KUBERNETES_SERVICE_PORT", "value": str(self.api_port)}]
        return {
            "image": {"repository": repo, "tag": tag, "pullPolicy": self.pull_policy},
            "pipeline": {"cpuImage": self.pipeline_cpu_image, "pullPolicy": self.pull_policy,
                         "defaultDevice": "cpu", "hostNetwork": self.host_network},
            "jobs": {"backoffLimit": 3, "stepMaxRetries": 2},
            "s3": {"endpoint": self.s3_pod, "createSecret": True, "accessKeyId": self.access_key,
                   "secretAccessKey": self.secret_key},
            "pushgateway": self.pushgateway or "",
            "operator": {"hostNetwork": self.host_network, "metricsPort": self.metrics_port,
                         "healthPort": self.health_port, "extraEnv": extra_env},
            "metrics": {"service": {"port": self.metrics_port}},
            # the secure setting: each namespace names its prefixes, the rest ("*") none
            "storage": {"allowedPrefixes": {self.namespace: [self.uri("models/")],
                                            self.other_namespace: [self.uri("models/")], "*": []}},
        }

    def install_operator(self, tmp: Path) -> None:
        t0 = time.monotonic()
        s3 = self.s3()
        try:
            s3.head_bucket(Bucket=self.bucket)
        except Exception:  # noqa: BLE001 - not there yet
            s3.create_bucket(Bucket=self.bucket)
        values = tmp / "values.yaml"
        values.write_text(yaml.safe_dump(self.chart_values(), sort_keys=False))
        self.installed = True  # from here on, teardown uninstalls (also what a failed install left)
        self.helm("upgrade", "--install", RELEASE, str(CHART), "-n", self.namespace, "--create-namespace",
                  "-f", str(values))
        self.kubectl("-n", self.namespace, "rollout", "status", f"deployment/{self.deployment}",
                     "--timeout=240s", timeout=260)
        pod = self.wait_operator_pod()
        if self.mode == "local":
            wait_until("the operator's /metrics", lambda: self._metrics_up(), 90,
                       diagnostics=lambda: self.operator_logs(pod))
        self.timed("helm install + operator ready", time.monotonic() - t0)

    def _metrics_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
                return b"rvc_experiments" in r.read()
        except OSError:
            return False

    def operator_metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def uninstall_operator(self) -> None:
        if not self.installed:
            return
        self.helm("uninstall", RELEASE, "-n", self.namespace, "--ignore-not-found")
        self.installed = False

    def operator_pods(self) -> list[dict[str, Any]]:
        sel = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/name=rvc-operator"
        return list(self.get_json("pods", "-n", self.namespace, "-l", sel)["items"])

    def wait_operator_pod(self, not_named: str | None = None, timeout: float = 180) -> str:
        """Name of a Running, not terminating operator pod (other than `not_named`)."""

        def probe() -> str | None:
            for p in self.operator_pods():
                meta, st = p["metadata"], p.get("status") or {}
                ready = all(c.get("ready") for c in st.get("containerStatuses") or [{}])
                if (meta["name"] != not_named and not meta.get("deletionTimestamp")
                        and st.get("phase") == "Running" and ready):
                    return str(meta["name"])
            return None

        return wait_until("a running operator pod", probe, timeout,
                          diagnostics=lambda: self.kubectl("-n", self.namespace, "get", "pods,events",
                                                           check=False).stdout)

    def operator_logs(self, pod: str | None = None, tail: int = 80) -> str:
        target = pod or f"deployment/{self.deployment}"
        return self.kubectl("-n", self.namespace, "logs", target, f"--tail={tail}", check=False).stdout

    # ------------------------------------------------------------------ data
    def upload_dir(self, folder: Path, prefix: str) -> list[str]:
        s3 = self.s3()
        keys = []
        for p in sorted(folder.iterdir()):
            if p.is_file():
                key = f"{prefix.rstrip('/')}/{p.name}"
                s3.upload_file(str(p), self.bucket, key)
                keys.append(key)
        return keys

    def upload_voice_set(self, tmp: Path, prefix: str, n_files: int = 3,
                         seconds_each: float = 6.0) -> list[str]:
        """A few seconds of real speech per file (espeak-ng/flite/festival), uploaded under `prefix`."""
        from rvc_pipeline.demo.voices import make_voice_set

        folder = tmp / "voices"
        make_voice_set(folder, n_files=n_files, seconds_each=seconds_each, seed=7)
        return self.upload_dir(folder, prefix)

    def upload_corrupt_set(self, tmp: Path, prefix: str) -> list[str]:
        """Files no decoder can read: text, a WAV header over garbage, random bytes named .mp3."""
        import numpy as np

        folder = tmp / "corrupt"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "notes.txt").write_text("these are my recording notes, not audio\n" * 20)
        (folder / "broken.wav").write_bytes(b"RIFF\x24\x08\x00\x00WAVEfmt " + bytes(range(256)) * 8)
        noise = np.random.default_rng(3).integers(0, 256, 4096, np.uint8)
        (folder / "noise.mp3").write_bytes(noise.tobytes())
        return self.upload_dir(folder, prefix)

    # ------------------------------------------------------------------ experiments
    def experiment(self, name: str, dataset_prefix: str, *, epochs: int = 2, steps_per_epoch: int = 1,
                   steps: Iterable[str] = STEPS) -> dict[str, Any]:
        """A CPU-fallback RVCExperiment with tiny training settings; storage endpoint, credentials Secret
        and Pushgateway come from the operator's defaults (the Helm values)."""
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {
                "dataset": {"source": self.uri(dataset_prefix.rstrip("/") + "/")},
                "storage": {"uri": self.uri("models")},
                "model": {"version": "v2", "sampleRate": "40k", "pitchGuidance": True},
                "f0": {"method": "pm"},
                "features": {"embedder": "hubert_base.pt"},
                "train": {"epochs": epochs, "batchSize": 2, "saveEveryEpoch": 1,
                          "maxStepsPerEpoch": steps_per_epoch,
                          "dataWorkers": 0},
                "steps": list(steps),
                "resources": {"device": "cpu", "parallelism": 2},
                "demoRandomWeights": True,
            },
        }

    def apply(self, manifest: dict[str, Any]) -> None:
        ns = (manifest.get("metadata") or {}).get("namespace") or self.namespace
        self.kubectl("-n", ns, "apply", "-f", "-", input=json.dumps(manifest))

    def get_experiment(self, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        ns = namespace or self.namespace
        proc = self.kubectl("-n", ns, "get", "rvcx", name, "-o", "json", check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr:
                return None
            raise RuntimeError(proc.stderr)
        return json.loads(proc.stdout)

    def wait_phase(self, name: str, phases: tuple[str, ...], timeout: float,
                   tick: Callable[[dict[str, Any]], None] | None = None,
                   namespace: str | None = None) -> dict[str, Any]:
        """Poll the experiment until its phase is one of `phases` (a terminal phase that is not wanted
        fails at once); `tick` sees every observed object."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            obj = self.get_experiment(name, namespace)
            if obj is not None:
                last = obj
                if tick:
                    tick(obj)
                phase = (obj.get("status") or {}).get("phase")
                if phase in phases:
                    return obj
                if phase in ("Succeeded", "Failed"):
                    msg = (obj.get("status") or {}).get("message")
                    raise AssertionError(f"{name}: phase {phase}, expected {phases}: {msg}\n"
                                         f"{self.diagnostics(name)}")
            if time.monotonic() > deadline:
                st = (last or {}).get("status") or {}
                raise TimeoutError(f"{name}: not {phases} after {timeout:.0f} s (phase {st.get('phase')}, "
                                   f"{st.get('message')})\n{self.diagnostics(name)}")
            time.sleep(1.0)

    def jobs(self, name: str, namespace: str | None = None) -> list[dict[str, Any]]:
        ns = namespace or self.namespace
        return list(self.get_json("jobs", "-n", ns, "-l", f"{LABEL_EXPERIMENT}={name}")["items"])

    def pods(self, name: str) -> list[dict[str, Any]]:
        return list(self.get_json("pods", "-n", self.namespace, "-l", f"{LABEL_EXPERIMENT}={name}")["items"])

    def events(self, name: str, uid: str | None = None, namespace: str | None = None) -> list[dict[str, Any]]:
        """Events of the experiment `name` (of this `uid` only, when given: not of a deleted namesake)."""
        items = self.get_json("events", "-n", namespace or self.namespace,
                              "--field-selector", f"involvedObject.name={name}")["items"]
        return [e for e in items if (e.get("involvedObject") or {}).get("kind") == KIND
                and (uid is None or e["involvedObject"].get("uid") == uid)]

    def diagnostics(self, name: str) -> str:
        parts = []
        for title, args in (
            ("experiment", ("get", "rvcx", name, "-o", "yaml")),
            ("jobs/pods", ("get", "jobs,pods", "-o", "wide")),
            ("events", ("get", "events", "--sort-by=.lastTimestamp")),
        ):
            out = self.kubectl("-n", self.namespace, *args, check=False)
            parts.append(f"--- {title}\n{(out.stdout + out.stderr)[-6000:]}")
        parts.append(f"--- operator log\n{self.operator_logs(tail=60)[-6000:]}")
        for p in self.pods(name)[-2:]:
            log = self.kubectl("-n", self.namespace, "logs", p["metadata"]["name"], "--tail=30",
                               check=False)
            parts.append(f"--- log of {p['metadata']['name']}\n{(log.stdout + log.stderr)[-3000:]}")
        return "\n".join(parts)

    def delete_experiment(self, name: str, namespace: str | None = None) -> None:
        self.kubectl("-n", namespace or self.namespace, "delete", "rvcx", name, "--wait=false")


def running_pod(pods: list[dict[str, Any]], step: str | None = None) -> dict[str, Any] | None:
    """A step pod in phase Running (of `step`, if given) that is not being deleted."""
    for p in pods:
        meta, st = p["metadata"], p.get("status") or {}
        if step and (meta.get("labels") or {}).get(LABEL_STEP) != step:
            continue
        if st.get("phase") == "Running" and not meta.get("deletionTimestamp"):
            return p
    return None


def progress_events(env: E2EEnv, exp_prefix: str) -> list[dict[str, Any]]:
    text = env.s3_get(f"{exp_prefix}/progress.jsonl").decode()
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
