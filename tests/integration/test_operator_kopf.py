"""The operator's glue (rvc_operator.handlers) against a real S3 API (moto server) and an in-memory cluster.

kopf itself needs an API server, so the in-process KopfRunner test lives in the e2e tier
(tests/e2e/test_operator_kopfrunner.py). Here the reconcile loop runs
exactly as under kopf, with the Kubernetes calls answered by `FakeCluster` (plain dicts, the same shapes the
API returns) and storage on a real S3 endpoint: markers, progress.jsonl and the index are real objects.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from rvc_operator import access, handlers, progress_reader
from rvc_operator.__main__ import kopf_arguments
from rvc_operator.cluster import Conflict
from rvc_operator.config import OperatorConfig
from rvc_operator.metrics import OperatorMetrics
from rvc_operator.observe import observe_jobs
from rvc_operator.reconcile import cleanup, reconcile
from rvc_operator.status import Event
from rvc_operator.sweeper import Sweeper, due_for_sweep
from rvc_pipeline.core.layout import marker_key
from rvc_pipeline.core.spec import DEFAULT_STEPS, STEP_ORDER
from rvc_pipeline.core.storage import open_storage

from tests.s3server import S3Endpoint

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


class FakeCluster:
    """ClusterAPI in memory: Jobs, pods, ConfigMaps are dicts; `fail_patch`/`conflict_patch` inject faults."""

    def __init__(self) -> None:
        self.experiments: dict[tuple[str, str], dict[str, Any]] = {}
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.configmaps: dict[tuple[str, str], dict[str, Any]] = {}
        self.logs: dict[str, str] = {}
        self.rv = 100
        self.fail_patch = 0
        self.conflict_patch = 0
        self.created: list[str] = []
        self.deleted: list[str] = []

    # helpers for tests
    def add_experiment(self, name: str, spec: dict[str, Any], ns: str = "voice",
                       created: str = "2025-03-01T11:00:00Z", annotations: dict[str, str] | None = None
                       ) -> dict[str, Any]:
        self.rv += 1
        body = {"apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment",
                "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}", "generation": 1,
                             "resourceVersion": str(self.rv), "creationTimestamp": created,
                             "annotations": annotations or {}},
                "spec": spec}
        self.experiments[(ns, name)] = body
        return body

    def update_spec(self, ns: str, name: str, spec: dict[str, Any]) -> None:
        body = self.experiments[(ns, name)]
        body["spec"] = spec
        body["metadata"]["generation"] += 1
        self.rv += 1
        body["metadata"]["resourceVersion"] = str(self.rv)

    def finish_job(self, name: str, ok: bool = True, exit_code: int = 0, message: str = "", ns: str = "voice"
                   ) -> None:
        job = self.jobs[(ns, name)]
        cond = {"type": "Complete" if ok else "Failed", "status": "True"}
        if not ok:
            cond["reason"] = "BackoffLimitExceeded"
        job["status"] = {"conditions": [cond], "completionTime": "2025-03-01T12:05:00Z",
                         "startTime": "2025-03-01T12:00:00Z"}
        pod = {"metadata": {"name": f"{name}-abcde", "namespace": ns,
                            "labels": {**job["spec"]["template"]["metadata"]["labels"], "job-name": name},
                            "creationTimestamp": "2025-03-01T12:00:01Z"},
               "status": {"phase": "Succeeded" if ok else "Failed", "containerStatuses": [
                   {"name": "step", "state": {"terminated": {"exitCode": exit_code, "message": message,
                                                             "reason": "Completed" if ok else "Error",
                                                             "finishedAt": "2025-03-01T12:05:00Z"}}}]}}
        self.pods[(ns, pod["metadata"]["name"])] = pod

    def status(self, name: str, ns: str = "voice") -> dict[str, Any]:
        return self.experiments[(ns, name)].get("status") or {}

    # ClusterAPI
    def get_experiment(self, namespace: str, name: str) -> dict[str, Any] | None:
        body = self.experiments.get((namespace, name))
        return copy.deepcopy(body) if body is not None else None

    def list_experiments(self, namespace: str | None) -> list[dict[str, Any]]:
        return [copy.deepcopy(b) for (ns, _), b in self.experiments.items() if namespace in (None, ns)]

    @staticmethod
    def _match(obj: dict[str, Any], selector: str) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(labels.get(k) == v for k, v in (part.split("=", 1) for part in selector.split(",")))

    def list_jobs(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return [copy.deepcopy(j) for (ns, _), j in self.jobs.items()
                if ns == namespace and self._match(j, selector)]

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return [copy.deepcopy(p) for (ns, _), p in self.pods.items()
                if ns == namespace and self._match(p, selector)]

    def pod_log_tail(self, namespace: str, pod: str, container: str, lines: int) -> str | None:
        return self.logs.get(pod)

    def create_job(self, job: dict[str, Any]) -> bool:
        key = (job["metadata"]["namespace"], job["metadata"]["name"])
        if key in self.jobs:
            return False
        j = copy.deepcopy(job)
        j["status"] = {"active": 1}
        self.jobs[key] = j
        self.created.append(key[1])
        return True

    def delete_job(self, namespace: str, name: str) -> None:
        if self.jobs.pop((namespace, name), None) is not None:
            self.deleted.append(name)

    def delete_experiment(self, namespace: str, name: str) -> None:
        body = self.experiments.pop((namespace, name), None)
        uid = (body or {}).get("metadata", {}).get("uid")
        for key, j in list(self.jobs.items()):  # the garbage collector, by owner references
            if any(o.get("uid") == uid for o in j["metadata"].get("ownerReferences") or []):
                self.delete_job(*key)

    def ensure_configmap(self, cm: dict[str, Any]) -> None:
        self.configmaps[(cm["metadata"]["namespace"], cm["metadata"]["name"])] = copy.deepcopy(cm)

    def delete_configmap(self, namespace: str, name: str) -> None:
        self.configmaps.pop((namespace, name), None)

    def patch_status(self, namespace: str, name: str, patch: dict[str, Any], resource_version: str | None
                     ) -> None:
        if self.fail_patch:
            self.fail_patch -= 1
            raise RuntimeError("API server went away")
        body = self.experiments[(namespace, name)]
        if self.conflict_patch:
            self.conflict_patch -= 1
            self.rv += 1
            body["metadata"]["resourceVersion"] = str(self.rv)
            raise Conflict("the object has been modified")
        if resource_version is not None and resource_version != body["metadata"]["resourceVersion"]:
            raise Conflict("stale resourceVersion")
        body["status"] = _merge(body.get("status") or {}, patch)
        self.rv += 1
        body["metadata"]["resourceVersion"] = str(self.rv)


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(target)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class Harness:
    def __init__(self, s3: S3Endpoint, **cfg: Any) -> None:
        self.s3 = s3
        self.cluster = FakeCluster()
        self.cfg = OperatorConfig(s3_endpoint=s3.url, pipeline_image="gpu:1", cpu_image="cpu:1",
                                  retry_backoff_seconds=30, **cfg)
        self.events: list[tuple[str, str, str]] = []
        self.metrics = OperatorMetrics(CollectorRegistry())
        self.now = T0
        self.storage = open_storage(s3.uri("rvc"), endpoint=s3.url)

    def spec(self, **over: Any) -> dict[str, Any]:
        spec = {"dataset": {"source": self.s3.uri("voices/alice")}, "storage": {"uri": self.s3.uri("rvc")},
                "train": {"epochs": 4}, "resources": {"device": "cpu"}}
        spec.update(over)
        return spec

    def post(self, body: dict[str, Any], ev: Event) -> None:
        self.events.append((body["metadata"]["name"], ev.type, ev.reason))

    def reconcile(self, name: str = "alice", advance: float = 15.0):  # noqa: ANN201
        self.now += timedelta(seconds=advance)
        return reconcile(self.cluster, "voice", name, self.cfg, post=self.post, metrics=self.metrics,
                         now=lambda: self.now)

    def marker(self, step: str, exp: str = "alice") -> None:
        self.storage.write_bytes(marker_key(exp, step), json.dumps({"step": step}).encode())

    def metric(self, name: str, **labels: str) -> float:
        v = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v


@pytest.fixture
def h(s3: S3Endpoint) -> Harness:
    return Harness(s3)


def _progress_lines(epochs: int, upto: int) -> bytes:
    lines = [{"time": 1.0e9, "experiment": "alice", "step": "train", "event": "start"},
             {"time": 1.0e9 + 1, "experiment": "alice", "step": "train", "event": "train_start",
              "epochs": epochs, "start_epoch": 1, "global_step": 0}]
    for e in range(1, upto + 1):
        for k in range(3):
            lines.append({"time": 1.0e9 + 10 * e + k, "experiment": "alice", "step": "train",
                          "event": "train_step", "epoch": e, "global_step": 3 * (e - 1) + k + 1,
                          "loss_g": 30.0 - e, "loss_d": 4.5, "loss_mel": 20.0 - e})
        lines.append({"time": 1.0e9 + 10 * e + 5, "experiment": "alice", "step": "train", "event": "epoch",
                      "epoch": e, "epochs": epochs, "seconds": 12.5, "global_step": 3 * e, "avg_loss_g": 29.5,
                      "avg_loss_d": 4.4, "avg_loss_mel": 19.5})
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


# ---------------------------------------------------------------------------------------------------
def test_operator_never_imports_torch() -> None:
    code = ("import sys, rvc_operator.handlers, rvc_operator.__main__, rvc_operator.crd\n"
            "bad = [m for m in ('torch', 'torchaudio', 'numpy', 'faiss') if m in sys.modules]\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"rvc_operator imported {out.stdout.strip()}"


def test_one_click_training_through_all_steps(h: Harness) -> None:
    c = h.cluster
    c.add_experiment("alice", h.spec())
    d = h.reconcile()
    assert c.created == ["alice-preprocess-1"]
    cm = c.configmaps[("voice", "alice-spec")]
    doc = yaml.safe_load(cm["data"]["experiment.yaml"])
    assert doc["spec"]["storage"]["endpoint"] == h.s3.url and doc["spec"]["resources"]["device"] == "cpu"
    job = c.jobs[("voice", "alice-preprocess-1")]
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "cpu:1"
    assert c.status("alice")["phase"] == "Running" and d is not None
    assert ("alice", "Normal", "JobCreated") in h.events
    # nothing new while the Job runs
    h.reconcile()
    assert c.created == ["alice-preprocess-1"]
    for step in DEFAULT_STEPS:
        name = f"alice-{step}-1"
        assert name in c.created, (step, c.created)
        if step == "train":
            h.storage.write_bytes("logs/alice/progress.jsonl", _progress_lines(4, 2))
            h.reconcile()
            prog = c.status("alice")["progress"]
            assert prog["epochText"] == "2/4" and prog["percent"] == 50.0 and prog["globalStep"] == 6
            # the newest event is the epoch summary: its averages are shown
            assert prog["lossMel"] == 19.5 and prog["lossG"] == 29.5 and prog["secondsPerEpoch"] == 12.5
            h.storage.write_bytes("logs/alice/progress.jsonl", _progress_lines(4, 4))
        if step == "index":
            h.storage.write_bytes("logs/alice/added_IVF12_Flat_nprobe_1_alice_v2.index", b"faiss")
            h.storage.write_bytes("logs/alice/total_fea.npy", b"x")
        h.marker(step)
        c.finish_job(name)
        h.reconcile()
    st = c.status("alice")
    assert st["phase"] == "Succeeded", st
    assert all(st["steps"][s]["phase"] == "Succeeded" for s in DEFAULT_STEPS)
    assert st["progress"]["epochText"] == "4/4" and st["progress"]["percent"] == 100.0
    assert st["artifacts"] == {
        "logs": f"{h.s3.uri('rvc')}/logs/alice/",
        "model": f"{h.s3.uri('rvc')}/logs/alice/weights/alice.pth",
        "index": f"{h.s3.uri('rvc')}/logs/alice/added_IVF12_Flat_nprobe_1_alice_v2.index",
    }
    ready = next(x for x in st["conditions"] if x["type"] == "Ready")
    assert ready["status"] == "True"
    assert c.created == [f"alice-{s}-1" for s in DEFAULT_STEPS]
    assert h.metric("rvc_jobs_created_total", step="train") == 1
    assert h.metric("rvc_step_duration_seconds_count", step="index") == 1
    assert h.metric("rvc_experiments", phase="Succeeded") == 1
    assert h.metric("rvc_experiments", phase="Running") == 0
    assert ("alice", "Normal", "Succeeded") in h.events
    # a finished experiment costs no further API writes
    n_events = len(h.events)
    assert h.reconcile() is None and len(h.events) == n_events


def test_the_manifest_is_parsed_once_per_reconcile(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    import rvc_operator.api
    import rvc_operator.jobs

    calls: list[str] = []
    for mod in (rvc_operator.api, rvc_operator.jobs):
        real = mod.parse_manifest

        def counting(body: Any, _real: Any = real) -> Any:
            calls.append(body["metadata"]["name"])
            return _real(body)

        monkeypatch.setattr(mod, "parse_manifest", counting)
    h.cluster.add_experiment("alice", h.spec())
    h.reconcile()  # storage check, decide, the ConfigMap and the Job: one parse
    assert h.cluster.created == ["alice-preprocess-1"] and calls == ["alice"]
    h.marker("preprocess")
    h.cluster.finish_job("alice-preprocess-1")
    h.reconcile()  # a step finished and the next Job created: again one
    assert h.cluster.created == ["alice-preprocess-1", "alice-f0-1"] and calls == ["alice", "alice"]


def test_restart_between_job_creation_and_status_write_never_duplicates(h: Harness) -> None:
    c = h.cluster
    c.add_experiment("alice", h.spec())
    c.fail_patch = 1
    with pytest.raises(RuntimeError, match="went away"):
        h.reconcile()
    assert c.created == ["alice-preprocess-1"] and c.status("alice") == {}
    # "restart": a fresh reconcile from the same cluster state adopts the Job
    h.reconcile()
    assert c.created == ["alice-preprocess-1"]
    st = c.status("alice")
    assert st["steps"]["preprocess"]["job"] == "alice-preprocess-1"
    assert st["steps"]["preprocess"]["attempts"] == 1
    # a stale status write is refused (resourceVersion) and redone from a fresh read
    c.conflict_patch = 1
    h.marker("preprocess")
    c.finish_job("alice-preprocess-1")
    h.reconcile()
    assert c.created == ["alice-preprocess-1", "alice-f0-1"]
    assert c.status("alice")["steps"]["preprocess"]["phase"] == "Succeeded"


def test_markers_already_in_storage_skip_steps(h: Harness) -> None:
    for s in ("preprocess", "f0", "features"):
        h.marker(s)
    h.cluster.add_experiment("alice", h.spec())
    h.reconcile()  # preprocess runs anyway: its Job checks the dataset against the recorded manifest
    assert h.cluster.created == ["alice-preprocess-1"]
    h.cluster.finish_job("alice-preprocess-1", ok=True)
    h.reconcile()
    st = h.cluster.status("alice")
    assert [st["steps"][s]["phase"] for s in DEFAULT_STEPS] == [
        "Succeeded", "Skipped", "Skipped", "Running", "Pending"]
    assert h.cluster.created == ["alice-preprocess-1", "alice-train-1"]


def test_permanent_failure_reports_the_pipeline_error(h: Harness) -> None:
    c = h.cluster
    c.add_experiment("alice", h.spec())
    h.reconcile()
    c.finish_job("alice-preprocess-1", ok=False, exit_code=2,
                 message="12:00:03 INFO preprocess\nerror: preprocess: no audio in s3://b/voices/alice/: "
                         "notes.txt (not audio), empty.wav (0 samples)")
    h.reconcile()
    st = c.status("alice")
    assert st["phase"] == "Failed"
    assert "notes.txt (not audio), empty.wav (0 samples)" in st["message"]
    assert st["steps"]["preprocess"]["exitCode"] == 2
    assert h.metric("rvc_job_failures_total", step="preprocess", reason="BadInput") == 1
    assert ("alice", "Warning", "Failed") in h.events
    assert c.created == ["alice-preprocess-1"]


def test_error_line_from_pod_log_when_termination_message_is_empty(h: Harness) -> None:
    c = h.cluster
    c.add_experiment("alice", h.spec())
    h.reconcile()
    c.finish_job("alice-preprocess-1", ok=False, exit_code=3, message="")
    c.logs["alice-preprocess-1-abcde"] = (
        "INFO x\nerror: hubert_base.pt not found in s3://w/ or /scratch/weights\n")
    h.reconcile()
    st = c.status("alice")
    assert st["phase"] == "Failed" and "hubert_base.pt not found" in st["message"]
    assert st["steps"]["preprocess"]["reason"] == "MissingWeights"


def test_transient_failure_is_retried_after_backoff(h: Harness) -> None:
    c = h.cluster
    c.add_experiment("alice", h.spec())
    h.reconcile()
    c.finish_job("alice-preprocess-1", ok=False, exit_code=1, message="error: s3 read timed out")
    h.reconcile()
    assert c.status("alice")["steps"]["preprocess"]["phase"] == "Pending"
    assert h.metric("rvc_job_retries_total", step="preprocess") == 1
    h.reconcile(advance=10)
    assert c.created == ["alice-preprocess-1"]
    h.reconcile(advance=25)
    assert c.created == ["alice-preprocess-1", "alice-preprocess-2"]


def test_concurrency_limit_queues_the_younger_experiment(s3: S3Endpoint) -> None:
    h = Harness(s3, max_concurrent_experiments=1)
    c = h.cluster
    c.add_experiment("alice", h.spec(), created="2025-03-01T11:00:00Z")
    c.add_experiment("bob", h.spec(experimentName="bob"), created="2025-03-01T11:00:01Z")
    h.reconcile("bob")  # bob is younger: alice (older, not started yet) goes first
    assert c.status("bob")["phase"] == "Queued" and c.created == []
    h.reconcile("alice")
    assert c.status("alice")["phase"] == "Running"
    h.reconcile("bob")
    assert c.status("bob")["phase"] == "Queued"
    assert "1 running" in c.status("bob")["message"]
    for s in DEFAULT_STEPS:
        h.marker(s)
    c.finish_job("alice-preprocess-1")
    h.reconcile("alice")
    assert c.status("alice")["phase"] == "Succeeded"
    h.reconcile("bob")
    assert c.status("bob")["phase"] == "Running" and "bob-preprocess-1" in c.created


def test_spec_change_reruns_with_force_and_replaces_configmap(h: Harness) -> None:
    c = h.cluster
    c.add_experiment("alice", h.spec())
    for s in DEFAULT_STEPS:
        h.reconcile()
        h.marker(s)
        c.finish_job(f"alice-{s}-1")
    h.reconcile()
    assert c.status("alice")["phase"] == "Succeeded"
    c.update_spec("voice", "alice", h.spec(train={"epochs": 8}))
    h.reconcile()
    st = c.status("alice")
    assert st["phase"] == "Running" and st["observedGeneration"] == 2
    assert c.created[-1] == "alice-train-2"
    cmd = c.jobs[("voice", "alice-train-2")]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[-1] == "--force"
    doc = yaml.safe_load(c.configmaps[("voice", "alice-spec")]["data"]["experiment.yaml"])
    assert doc["spec"]["train"]["epochs"] == 8
    assert st["steps"]["preprocess"]["phase"] == "Succeeded" and st["steps"]["index"]["phase"] == "Pending"


def test_storage_unreachable_does_not_stop_the_state_machine(s3: S3Endpoint) -> None:
    h = Harness(s3)
    c = h.cluster
    spec = h.spec(storage={"uri": h.s3.uri("rvc"), "endpoint": "http://127.0.0.1:9"})  # nothing listens
    c.add_experiment("alice", spec)
    h.reconcile()
    assert c.created == ["alice-preprocess-1"]


def test_delete_cleans_jobs_and_optionally_artifacts(h: Harness) -> None:
    c = h.cluster
    body = c.add_experiment("alice", h.spec())
    h.reconcile()
    h.storage.write_bytes("logs/alice/0_gt_wavs/a.wav", b"RIFF")
    h.marker("preprocess")
    h.storage.write_bytes("logs/bob/keep.txt", b"other experiment")
    assert cleanup(c, body, h.cfg, metrics=h.metrics) == []
    assert c.deleted == ["alice-preprocess-1"] and ("voice", "alice-spec") not in c.configmaps
    assert h.storage.exists("logs/alice/0_gt_wavs/a.wav")
    body["metadata"]["annotations"]["rvc-operator.dev/delete-artifacts"] = "true"
    gone = cleanup(c, body, h.cfg, metrics=h.metrics)
    assert sorted(gone) == ["logs/alice/.rvc/preprocess.done.json", "logs/alice/0_gt_wavs/a.wav"]
    assert not h.storage.exists("logs/alice/0_gt_wavs/a.wav") and h.storage.exists("logs/bob/keep.txt")


def test_lifecycle_deadline_then_ttl_deletes_the_experiment_and_its_artifacts(h: Harness) -> None:
    c = h.cluster
    lifecycle = {"activeDeadlineSeconds": 60, "ttlSecondsAfterFinished": 120, "artifactsOnDeletion": "Delete"}
    body = c.add_experiment("alice", h.spec(lifecycle=lifecycle))
    h.reconcile()  # starts at T0+15s
    assert c.created == ["alice-preprocess-1"]
    h.storage.write_bytes("logs/alice/0_gt_wavs/a.wav", b"RIFF")
    h.reconcile(advance=60)  # T0+75s: past the deadline
    st = c.status("alice")
    assert st["phase"] == "Failed" and "activeDeadlineSeconds=60" in st["message"]
    assert c.deleted == ["alice-preprocess-1"] and ("alice", "Warning", "DeadlineExceeded") in h.events
    assert [n for _, n, _ in due_for_sweep(c.list_experiments("voice"))] == ["alice"]  # the TTL is pending
    h.reconcile(advance=100)  # T0+175s: 100s after finishing, TTL 120s
    assert ("voice", "alice") in c.experiments
    h.reconcile(advance=20)
    assert ("voice", "alice") not in c.experiments
    assert cleanup(c, body, h.cfg, metrics=h.metrics) == ["logs/alice/0_gt_wavs/a.wav"]


def test_jobs_of_a_deleted_namesake_are_ignored(h: Harness) -> None:
    c = h.cluster
    c.add_experiment("alice", h.spec())
    h.reconcile()
    # the experiment is deleted and recreated before the garbage collector removed the old Job
    old = c.jobs[("voice", "alice-preprocess-1")]
    del c.experiments[("voice", "alice")]
    body = c.add_experiment("alice", h.spec())
    body["metadata"]["uid"] = "uid-alice-2"
    assert old["metadata"]["ownerReferences"][0]["uid"] == "uid-alice"
    jobs = observe_jobs(c, body)
    assert jobs == []


def test_progress_reader_tail_of_a_large_file(h: Harness) -> None:
    big = _progress_lines(500, 400)
    assert len(big) > progress_reader.TAIL_BYTES
    h.storage.write_bytes("logs/alice/progress.jsonl", big + b'{"torn": ')
    p = progress_reader.read_progress(h.storage, "alice")
    assert p is not None and p.epoch_text == "400/500" and p.percent == 80.0 and p.epochs == 500
    assert progress_reader.read_progress(h.storage, "nobody") is None
    assert progress_reader.read_markers(h.storage, "alice", STEP_ORDER) == set()
    h.marker("f0")
    assert progress_reader.read_markers(h.storage, "alice", STEP_ORDER) == {"f0"}


def test_kopf_settings_and_run_arguments() -> None:
    import kopf

    settings = kopf.OperatorSettings()
    handlers.configure_settings(settings)
    assert settings.peering.standalone is True
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    args = kopf_arguments(OperatorConfig(health_port=9999))
    assert args == {"standalone": True, "clusterwide": True, "namespaces": [],
                    "liveness_endpoint": "http://0.0.0.0:9999/healthz"}
    ns = kopf_arguments(OperatorConfig(watch_namespace="rvc"))
    assert ns["clusterwide"] is False and ns["namespaces"] == ["rvc"]


def test_periodic_sweep_reconciles_only_unfinished_experiments(h: Harness) -> None:
    c = h.cluster
    c.add_experiment("alice", h.spec())
    c.add_experiment("bob", h.spec(experimentName="bob"))
    done = c.add_experiment("carol", h.spec(experimentName="carol"))
    done["status"] = {"phase": "Succeeded", "observedGeneration": 1}
    gone = c.add_experiment("dave", h.spec(experimentName="dave"))
    gone["metadata"]["deletionTimestamp"] = "2025-03-01T12:00:00Z"
    assert due_for_sweep(c.list_experiments(None)) == [
        ("voice", "alice", "uid-alice"), ("voice", "bob", "uid-bob")]
    ran: list[str] = []

    def run(ns: str, name: str, uid: str) -> None:
        ran.append(name)
        h.reconcile(name)

    sweeper = Sweeper(c, h.cfg, run, workers=1)
    assert sweeper.sweep_once() == 2 and sorted(ran) == ["alice", "bob"]
    assert sorted(c.created) == ["alice-preprocess-1", "bob-preprocess-1"]
    c.update_spec("voice", "carol", h.spec(experimentName="carol", train={"epochs": 9}))  # finished, edited
    assert ("voice", "carol", "uid-carol") in due_for_sweep(c.list_experiments("voice"))
    assert due_for_sweep(c.list_experiments("elsewhere")) == []


def test_no_kopf_handler_needs_a_finalizer() -> None:
    """Deleting an experiment must never wait for the operator: no timers/daemons/blocking delete handlers."""
    import kopf

    registry = kopf.get_default_registry()
    assert registry._spawning.get_all_handlers() == []  # timers and daemons always add kopf's finalizer
    changing = registry._changing.get_all_handlers()
    assert changing and all(not h.requires_finalizer for h in changing)


# --- storage access: allow-list and ownership records (issue 8, "the operator as a confused deputy") ---
class Spy:
    """An opener that counts what the operator opens (and can stand in a storage that loses a race)."""

    def __init__(self, wrap: Any = None) -> None:
        self.opened: list[str] = []
        self.wrap = wrap

    def __call__(self, manifest: dict[str, Any], cfg: OperatorConfig) -> Any:
        self.opened.append(manifest["spec"]["storage"]["uri"])
        storage = access.open_experiment_storage(manifest, cfg)
        return self.wrap(storage) if self.wrap else storage


def _reconcile_in(h: Harness, ns: str, name: str, opener: Any = access.open_experiment_storage) -> None:
    h.now += timedelta(seconds=15)
    reconcile(h.cluster, ns, name, h.cfg, post=h.post, metrics=h.metrics, now=lambda: h.now,
              opener=opener)


def _record(h: Harness, exp: str = "alice") -> dict[str, Any]:
    return json.loads(h.storage.read_bytes(f"logs/{exp}/.rvc/owner.json"))


def _victim(h: Harness) -> dict[str, str]:
    """alice in namespace voice has run preprocess and f0 and is training: markers, progress, a checkpoint."""
    h.cluster.add_experiment("alice", h.spec())
    h.reconcile()
    for s in ("preprocess", "f0", "features"):
        h.marker(s)
        h.cluster.finish_job(f"alice-{s}-1")
        h.reconcile()
    h.storage.write_bytes("logs/alice/progress.jsonl", _progress_lines(4, 2))
    h.storage.write_bytes("logs/alice/G_6.pth", b"checkpoint")
    h.reconcile()
    assert h.cluster.status("alice")["progress"]["epochText"] == "2/4"
    return {o.key: o.etag or "" for o in h.storage.list("logs/alice/")}


def test_storage_outside_the_allowed_prefixes_is_never_opened(s3: S3Endpoint) -> None:
    h = Harness(s3, storage_allowed_prefixes={"voice": (s3.uri("rvc") + "/team-a/",), "*": ()})
    spy = Spy()
    c = h.cluster
    hostile = {  # name -> (namespace, spec.storage): each aims the operator somewhere it may not go
        "other-bucket": ("voice", {"uri": s3.uri("elsewhere")}),
        "bucket-root": ("voice", {"uri": s3.uri("rvc")}),
        "look-alike": ("voice", {"uri": s3.uri("rvc") + "/team-a-evil"}),
        "own-endpoint": ("voice", {"uri": s3.uri("rvc") + "/team-a", "endpoint": "http://127.0.0.1:9"}),
        "no-entry": ("team-z", {"uri": s3.uri("rvc") + "/team-a"}),
    }
    for name, (ns, storage) in hostile.items():
        body = c.add_experiment(name, h.spec(storage=storage), ns=ns,
                                annotations={"rvc-operator.dev/delete-artifacts": "true"})
        _reconcile_in(h, ns, name, spy)
        st = c.status(name, ns)
        assert st["phase"] == "Failed", (name, st)
        field = "spec.storage.endpoint" if name == "own-endpoint" else "spec.storage.uri"
        assert st["message"].startswith(field), st["message"]
        allowed = "none" if ns == "team-z" else s3.uri("rvc") + "/team-a/"
        assert allowed in st["message"] and "steps" not in st
        assert (name, "Warning", "StorageNotAllowed") in h.events
        assert cleanup(c, body, h.cfg, opener=spy, metrics=h.metrics) == []
    assert spy.opened == [] and c.created == []
    # inside its prefix the experiment runs, and the operator opens its storage
    c.add_experiment("alice", h.spec(storage={"uri": s3.uri("rvc") + "/team-a"}))
    _reconcile_in(h, "voice", "alice", spy)
    assert c.created == ["alice-preprocess-1"] and spy.opened
    assert h.storage.exists("team-a/logs/alice/.rvc/owner.json")


def test_owner_record_is_written_once_when_the_experiment_starts(h: Harness) -> None:
    c = h.cluster
    c.add_experiment("alice", h.spec())
    h.reconcile()
    rec = _record(h)
    assert rec == {"namespace": "voice", "name": "alice", "uid": "uid-alice",
                   "created": "2025-03-01T12:00:15Z"}
    assert c.created == ["alice-preprocess-1"]
    raw = h.storage.read_bytes("logs/alice/.rvc/owner.json")
    for _ in range(3):
        h.reconcile()
    assert h.storage.read_bytes("logs/alice/.rvc/owner.json") == raw  # never rewritten
    # the record is not a step marker
    assert progress_reader.read_markers(h.storage, "alice", STEP_ORDER) == set()


def test_another_resource_can_neither_read_nor_delete_the_folder(h: Harness) -> None:
    before = _victim(h)
    c = h.cluster
    # mallory, in another namespace, names the same storage.uri and experimentName; it even claims (in a
    # status copied from somewhere) that its training runs, so that the operator would read progress
    body = c.add_experiment("mallory", h.spec(experimentName="alice"), ns="team-b",
                            annotations={"rvc-operator.dev/delete-artifacts": "true"})
    body["status"] = {"phase": "Running", "observedGeneration": 1,
                      "steps": {"train": {"phase": "Running", "attempts": 1, "job": "mallory-train-1"}}}
    _reconcile_in(h, "team-b", "mallory")
    st = c.status("mallory", "team-b")
    assert st["phase"] == "Failed"
    assert st["message"] == ("storage logs/alice/ belongs to another RVCExperiment; choose another "
                             "experimentName or storage.uri")
    assert "voice" not in json.dumps(st)  # the owner's namespace is not revealed
    assert "progress" not in st and "artifacts" not in st
    assert all(s.get("reason") != "AlreadyComplete" for s in st["steps"].values())
    assert ("mallory", "Warning", "StorageOwnedElsewhere") in h.events
    assert not [j for (ns, _), j in c.jobs.items() if ns == "team-b"]
    # deleting mallory with delete-artifacts deletes nothing of alice's
    del c.experiments[("team-b", "mallory")]
    assert cleanup(c, body, h.cfg, metrics=h.metrics) == []
    assert {o.key: o.etag or "" for o in h.storage.list("logs/alice/")} == before
    # alice goes on as before, and her own deletion with delete-artifacts removes the folder
    h.reconcile()
    assert c.status("alice")["phase"] == "Running" and c.status("alice")["progress"]["epochText"] == "2/4"
    alice = c.experiments.pop(("voice", "alice"))
    alice["metadata"]["annotations"]["rvc-operator.dev/delete-artifacts"] = "true"
    gone = cleanup(c, alice, h.cfg, metrics=h.metrics)
    assert sorted(gone) == sorted(k for k in before if not k.endswith("owner.json"))
    assert h.storage.list("logs/alice/") == []


def test_unreadable_or_oversized_record_is_never_treated_as_ours(h: Harness) -> None:
    c = h.cluster
    for i, junk in enumerate([b"\x00garbage", b'{"uid": "uid-alice"}', b"[1, 2]",
                              json.dumps({"namespace": "voice", "name": "alice", "uid": "uid-alice",
                                          "pad": "x" * 8000}).encode()]):
        name = f"a{i}"
        h.storage.write_bytes(f"logs/{name}/.rvc/owner.json", junk)
        h.storage.write_bytes(f"logs/{name}/keep.bin", b"data")
        body = c.add_experiment(name, h.spec(), annotations={"rvc-operator.dev/delete-artifacts": "true"})
        body["metadata"]["uid"] = "uid-alice"  # even the uid the junk names
        h.reconcile(name)
        assert c.status(name)["phase"] == "Failed" and "belongs to another" in c.status(name)["message"]
        assert cleanup(c, body, h.cfg, metrics=h.metrics) == []
        assert h.storage.exists(f"logs/{name}/keep.bin")
    assert c.created == []


def test_recreated_namesake_takes_over_but_a_stale_cleanup_deletes_nothing(h: Harness) -> None:
    c = h.cluster
    old = c.add_experiment("alice", h.spec(), annotations={"rvc-operator.dev/delete-artifacts": "true"})
    h.reconcile()
    h.marker("preprocess")
    del c.experiments[("voice", "alice")]
    new = c.add_experiment("alice", h.spec())  # deleted and created again before the cleanup ran
    new["metadata"]["uid"] = "uid-alice-2"
    h.reconcile()
    assert _record(h)["uid"] == "uid-alice-2"
    assert c.status("alice")["steps"]["preprocess"]["phase"] == "Running"  # its Job re-checks the dataset
    assert cleanup(c, old, h.cfg, metrics=h.metrics) == []  # the old one's late cleanup
    assert h.storage.exists(marker_key("alice", "preprocess"))


def test_upgrade_an_unrecorded_folder_goes_to_the_oldest_resource_naming_it(h: Harness) -> None:
    """Experiments started before ownership records: the folder has markers but no record."""
    c = h.cluster
    h.marker("preprocess")
    c.add_experiment("alice", h.spec(), created="2025-03-01T09:00:00Z")  # the original, older
    c.add_experiment("mallory", h.spec(experimentName="alice"), ns="team-b", created="2025-03-01T10:00:00Z")
    _reconcile_in(h, "team-b", "mallory")  # the younger one comes first after the upgrade
    assert c.status("mallory", "team-b")["phase"] == "Failed"
    assert not h.storage.exists("logs/alice/.rvc/owner.json")
    h.reconcile()
    assert _record(h)["uid"] == "uid-alice" and c.status("alice")["phase"] == "Running"


def test_two_resources_racing_for_a_fresh_folder_one_wins(h: Harness) -> None:
    c = h.cluster
    c.add_experiment("alice", h.spec())

    class LosesRace:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, attr: str) -> Any:
            return getattr(self.inner, attr)

        def create_exclusive(self, key: str, data: bytes) -> bool:
            rival = {"namespace": "team-b", "name": "bob", "uid": "uid-bob", "created": ""}
            assert self.inner.create_exclusive(key, json.dumps(rival).encode())  # the rival got there first
            return self.inner.create_exclusive(key, data)

    h.now += timedelta(seconds=15)
    reconcile(c, "voice", "alice", h.cfg, post=h.post, metrics=h.metrics, now=lambda: h.now,
              opener=Spy(LosesRace))
    assert c.status("alice")["phase"] == "Failed" and c.created == []
    assert _record(h)["uid"] == "uid-bob"


def test_start_up_warns_when_no_allow_list_is_set(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="rvc_operator"):
        handlers.log_storage_policy(OperatorConfig())
        handlers.log_storage_policy(OperatorConfig(storage_allowed_prefixes={"*": ()}))
    warned = "RVC_STORAGE_ALLOWED_PREFIXES is not set"
    levels = [(r.levelname, warned in r.getMessage()) for r in caplog.records]
    assert levels == [("WARNING", True), ("INFO", False)]


def test_sharded_data_steps_run_one_job_per_shard_and_retry_a_shard_alone(h: Harness) -> None:
    c = h.cluster
    c.add_experiment("alice", h.spec(resources={"device": "cpu", "shards": 2}))
    h.reconcile()
    assert c.created == ["alice-preprocess-s0-1", "alice-preprocess-s1-1"]
    cmd = c.jobs[("voice", "alice-preprocess-s1-1")]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[-2:] == ["--shard", "1/2"]
    c.finish_job("alice-preprocess-s0-1")
    c.finish_job("alice-preprocess-s1-1", ok=False, exit_code=1, message="error: s3 read timed out")
    h.reconcile()
    pre = c.status("alice")["steps"]["preprocess"]
    assert pre["phase"] == "Pending"
    assert pre["message"].startswith("1/2 shards done; shard 1: attempt 1 failed")
    h.reconcile(advance=40)  # after the backoff: shard 1 alone runs again
    assert c.created[2:] == ["alice-preprocess-s1-2"]
    h.marker("preprocess")
    c.finish_job("alice-preprocess-s1-2")
    c.fail_patch = 1  # the operator dies after creating f0's shard Jobs, before writing the status
    with pytest.raises(RuntimeError, match="went away"):
        h.reconcile()
    h.reconcile()
    assert c.created[3:] == ["alice-f0-s0-1", "alice-f0-s1-1"]
    st = c.status("alice")
    assert st["steps"]["preprocess"]["message"] == "2/2 shards done"
    assert [x["job"] for x in st["steps"]["f0"]["shards"]] == ["alice-f0-s0-1", "alice-f0-s1-1"]
    # per-shard progress events in storage give the step's ETA: the slowest shard
    events = [{"time": 1.0e9 + dt, "experiment": "alice", "step": "f0", "event": ev, "shard": i, "shards": 2,
               **f}
              for i, rate in ((0, 2), (1, 1))
              for dt, ev, f in ((0, "start", {}),
                                (10, "progress", {"files_done": 10 * rate, "files_total": 40}))]
    h.storage.write_bytes("logs/alice/progress.jsonl",
                          b"".join(json.dumps(e).encode() + b"\n" for e in events))
    h.reconcile()
    f0 = c.status("alice")["steps"]["f0"]
    assert [x["etaSeconds"] for x in f0["shards"]] == [10.0, 30.0] and f0["etaSeconds"] == 30.0
    for i in range(2):
        c.finish_job(f"alice-f0-s{i}-1")
    h.marker("f0")
    h.reconcile()
    assert c.created[5:] == ["alice-features-s0-1", "alice-features-s1-1"]
    for i in range(2):
        c.finish_job(f"alice-features-s{i}-1")
    h.marker("features")
    h.reconcile()
    assert c.created[7:] == ["alice-train-1"] and c.deleted == []
    assert h.metric("rvc_jobs_created_total", step="preprocess") == 3
    assert h.metric("rvc_step_duration_seconds_count", step="preprocess") == 1


class ForegroundCluster(FakeCluster):
    """Job deletion as the operator asks for it (propagationPolicy Foreground): the Job stays listed, with a
    deletionTimestamp, until its pods are gone (`pods_gone`)."""

    def delete_job(self, namespace: str, name: str) -> None:
        job = self.jobs.get((namespace, name))
        if job is not None and not job["metadata"].get("deletionTimestamp"):
            job["metadata"]["deletionTimestamp"] = "2025-03-01T12:30:00Z"
            self.deleted.append(name)

    def pods_gone(self, name: str, ns: str = "voice") -> None:
        self.jobs.pop((ns, name), None)
        for key in [k for k, p in self.pods.items() if p["metadata"]["labels"].get("job-name") == name]:
            del self.pods[key]


def test_suspend_and_resume_through_reconcile(h: Harness) -> None:
    c = h.cluster = ForegroundCluster()
    c.add_experiment("alice", h.spec(lifecycle={"terminationGracePeriodSeconds": 300}))
    h.reconcile()
    for step in ("preprocess", "f0", "features"):
        h.marker(step)
        c.finish_job(f"alice-{step}-1")
        h.reconcile()
    assert c.created[-1] == "alice-train-1"
    pod = c.jobs[("voice", "alice-train-1")]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 300
    # suspend: the Job is deleted (Foreground), its pod saves and exits 143; nothing counts as a failure
    c.update_spec("voice", "alice", {**c.experiments[("voice", "alice")]["spec"], "suspend": True})
    h.reconcile()
    st = c.status("alice")
    assert st["phase"] == "Suspended" and c.deleted == ["alice-train-1"]
    assert ("voice", "alice-train-1") in c.jobs  # still being deleted
    assert next(x for x in st["conditions"] if x["type"] == "Suspended")["status"] == "True"
    assert ("alice", "Normal", "Suspended") in h.events and "suspend\":false" in st["message"]
    assert h.metric("rvc_experiments", phase="Suspended") == 1
    assert h.metric("rvc_experiments", phase="Running") == 0
    c.finish_job("alice-train-1", ok=False, exit_code=143, message="error: preempted (SIGTERM); saved")
    h.reconcile()
    assert c.status("alice")["steps"]["train"]["failures"] == 0
    assert h.metric("rvc_job_failures_total", step="train", reason="Preempted") == 0
    # resume while the old pod still uploads: no second Job of the step until it is gone
    c.update_spec("voice", "alice", {**c.experiments[("voice", "alice")]["spec"], "suspend": False})
    h.reconcile()
    st = c.status("alice")
    assert st["phase"] == "Running" and c.created[-1] == "alice-train-1"
    assert "waiting for Job alice-train-1" in st["message"] and ("alice", "Normal", "Resumed") in h.events
    c.pods_gone("alice-train-1")
    h.reconcile()
    assert c.created[-1] == "alice-train-2" and c.status("alice")["steps"]["train"]["attempts"] == 2
    assert next(x for x in c.status("alice")["conditions"] if x["type"] == "Suspended")["reason"] == "Resumed"
    assert h.metric("rvc_experiments", phase="Running") == 1
    assert [e for e in h.events if e[2] == "Started"] == [("alice", "Normal", "Started")]  # at the start only
