"""Fixtures of the real-cluster e2e tier.

`cluster` (session): builds Kubernetes v1.20.2 from Debian's source package (cached), fetches
kubectl/helm, starts a single-node cluster on loopback and tears it down at the end of the
session (keep it with RVC_E2E_KEEP_CLUSTER=1). `images` (session): builds rvc-operator:dev and
rvc-pipeline-cpu:dev (cached by a hash of their inputs).

The whole tier is skipped, with the reason printed, only when RVC_SKIP_E2E=1. Otherwise any
failure to build or start is a test error, not a skip. Phase timings are printed at the end.

`e2e_env` (session): the operator installed with the Helm chart plus S3 (and, locally, Prometheus), in
the mode RVC_E2E_CLUSTER selects (see tests/e2e/e2e_env.py): `local` starts the cluster and images
above, `external` uses the current kubeconfig context (scripts/kind-e2e.sh).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.e2e import e2e_env as e2e
from tests.e2e.cluster import harness
from tests.e2e.cluster.harness import Cluster

SKIP_REASON = (
    "RVC_SKIP_E2E=1: the real-cluster e2e tier (Kubernetes v1.20.2 built from source, Docker images) "
    "is skipped on request; unset it to run tests/e2e"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = os.environ.get("RVC_SKIP_E2E") == "1"
    for item in items:
        if "tests/e2e/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(pytest.mark.e2e)
            if skip:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if os.environ.get("RVC_SKIP_E2E") == "1":
        terminalreporter.write_sep("=", "e2e tier skipped")
        terminalreporter.write_line(SKIP_REASON)
        return
    if harness.TIMINGS.phases:
        terminalreporter.write_sep("=", "e2e timings (cluster, images, experiments)")
        for line in harness.TIMINGS.lines():
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.fail("the e2e cluster needs root (dockerd, kubelet); run as root or set RVC_SKIP_E2E=1")
    harness.build_kubernetes()
    harness.get_tools()
    harness.cluster_up()
    c = Cluster()
    try:
        yield c
    finally:
        if os.environ.get("RVC_E2E_KEEP_CLUSTER") != "1":
            harness.cluster_down()


@pytest.fixture(scope="session")
def images(cluster: Cluster) -> dict[str, str]:
    """Build (or reuse) the images; the cluster fixture has started the Docker engine."""
    harness.build_images("operator", "pipeline-cpu")
    return {"operator": harness.OPERATOR_IMAGE, "pipeline-cpu": harness.PIPELINE_CPU_IMAGE}


@pytest.fixture(scope="session")
def e2e_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[e2e.E2EEnv]:
    """The operator installed with the chart, S3 with a fresh bucket, and (local mode) Prometheus."""
    tmp = tmp_path_factory.mktemp("e2e-env")
    if e2e.mode() == "local":
        env = e2e.E2EEnv.local(request.getfixturevalue("cluster"), request.getfixturevalue("images"), tmp)
    else:
        env = e2e.E2EEnv.external()
    try:
        env.install_operator(tmp)
        yield env
    finally:
        try:
            if env.mode == "local":
                env.uninstall_operator()
                env.kubectl("delete", "namespace", env.namespace, "--wait=false", check=False)
            elif env.installed:
                print(f"\ne2e: the operator stays installed in namespace {env.namespace} "
                      f"(helm uninstall {e2e.RELEASE} -n {env.namespace} removes it)")
        finally:
            env.close()
