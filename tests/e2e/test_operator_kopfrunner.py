"""The operator in-process under `kopf.testing.KopfRunner`, against the e2e tier's real API server.

kopf needs a Kubernetes API (list/watch streams, patches, its own startup/cleanup sequence); the unit and
integration tiers have none (their reconcile tests answer the ClusterAPI from memory, and a fake API server
that serves kopf's watch protocol would be a second Kubernetes to maintain), so this test lives here. It
checks the kopf wiring itself: the startup handler reads the RVC_* settings and the kubeconfig, the create
handler reconciles (Job created, status written), nothing puts a finalizer on the experiment, and the
DELETED handler cleans up. The chart's operator is scaled to 0 meanwhile, so only the in-process one acts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from kopf.testing import KopfRunner

from tests.e2e.e2e_env import E2EEnv, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def chart_operator_paused(e2e_env: E2EEnv) -> Iterator[None]:
    """Scale the chart's operator to 0 while the test runs, if it is installed (the tier's last test
    uninstalls the chart; the CRD stays, which is all the in-process operator needs)."""
    deploy = f"deployment/{e2e_env.deployment}"
    installed = e2e_env.kubectl("-n", e2e_env.namespace, "get", deploy, check=False).returncode == 0
    if installed:
        e2e_env.kubectl("-n", e2e_env.namespace, "scale", deploy, "--replicas=0")
    wait_until("the chart's operator pods to stop", lambda: not e2e_env.operator_pods() or None, 120)
    try:
        yield
    finally:
        if installed:
            e2e_env.kubectl("-n", e2e_env.namespace, "scale", deploy, "--replicas=1")
            e2e_env.kubectl("-n", e2e_env.namespace, "rollout", "status", deploy, "--timeout=240s",
                            timeout=260)


def _job(e2e_env: E2EEnv, name: str) -> dict[str, Any] | None:
    proc = e2e_env.kubectl("-n", e2e_env.namespace, "get", "job", name, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def _running(e2e_env: E2EEnv, name: str) -> dict[str, Any] | None:
    body = e2e_env.get_experiment(name)
    return body if body is not None and (body.get("status") or {}).get("phase") == "Running" else None


def test_kopf_runner_reconciles_and_cleans_up_without_finalizer(
        e2e_env: E2EEnv, chart_operator_paused: None, monkeypatch: pytest.MonkeyPatch) -> None:
    ns = e2e_env.namespace
    settings = {
        "KUBECONFIG": str(e2e_env.kube.kubeconfig),
        "AWS_ACCESS_KEY_ID": e2e_env.access_key, "AWS_SECRET_ACCESS_KEY": e2e_env.secret_key,
        "AWS_DEFAULT_REGION": e2e_env.region,
        "RVC_S3_ENDPOINT": e2e_env.s3_host,  # the in-process operator reads storage from this machine
        "RVC_PIPELINE_CPU_IMAGE": e2e_env.pipeline_cpu_image, "RVC_IMAGE_PULL_POLICY": e2e_env.pull_policy,
        "RVC_DEFAULT_DEVICE": "cpu", "RVC_WATCH_NAMESPACE": ns, "RVC_METRICS_PORT": "0",
        "RVC_RECONCILE_INTERVAL": "2",
        "RVC_STORAGE_ALLOWED_PREFIXES": json.dumps({ns: [e2e_env.uri("models/")], "*": []}),
    }
    for k, v in settings.items():
        monkeypatch.setenv(k, v)
    # kopf's own login reads the kubernetes client's default location, fixed when it was first imported
    import kubernetes.config.kube_config as kube_config

    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", settings["KUBECONFIG"])
    name = f"kopfrunner-{e2e_env.run_id}"
    args = ["run", "--standalone", "--namespace", ns, "--module", "rvc_operator.handlers"]
    with KopfRunner(args, timeout=120) as runner:
        e2e_env.apply(e2e_env.experiment(name, "kopfrunner/", steps=("preprocess",)))
        job = wait_until("the in-process operator to create the preprocess Job",
                         lambda: _job(e2e_env, f"{name}-preprocess-1"), 90)
        body = wait_until("the status of the running experiment", lambda: _running(e2e_env, name), 30)
        assert not body["metadata"].get("finalizers"), body["metadata"]
        assert body["status"]["steps"]["preprocess"]["job"] == f"{name}-preprocess-1"
        owner = job["metadata"]["ownerReferences"][0]
        assert owner["uid"] == body["metadata"]["uid"] and owner["kind"] == "RVCExperiment"
        # no finalizer: the delete returns at once; the DELETED handler (and the GC) remove the Job
        e2e_env.kubectl("-n", ns, "delete", "rvcx", name, "--wait=true", "--timeout=30s", timeout=60)
        wait_until("the preprocess Job to be deleted",
                   lambda: _job(e2e_env, f"{name}-preprocess-1") is None or None, 60)
    assert runner.exception is None and runner.exit_code == 0, runner.output
    assert "reconcile failed" not in runner.output and "cleanup after deletion failed" not in runner.output
