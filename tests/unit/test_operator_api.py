"""The operator's typed boundaries: the status models (rvc_operator.api), the settings (rvc_operator.config,
pydantic-settings) and the kopf wiring's start-up (rvc_operator.handlers)."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from typing import Any

import kopf
import pytest
from rvc_operator import handlers
from rvc_operator.api import ExperimentStatus, dump_status, load_status
from rvc_operator.config import ConfigError, OperatorConfig
from rvc_operator.observe import JobSummary
from rvc_operator.status import decide

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
MANIFEST: dict[str, Any] = {
    "metadata": {"name": "alice", "namespace": "voice", "uid": "u-1", "generation": 1},
    "spec": {"dataset": {"source": "s3://voices/alice/"}, "storage": {"uri": "s3://models/rvc"},
             "train": {"epochs": 10}},
}

# Stored statuses the models do not accept (the API server would refuse them; a hand edit or another
# version could still leave them): each must load, and decide must go on from the cluster's Jobs.
HOSTILE_STATUSES: list[Any] = [
    {"phase": "Exploded"},
    {"phase": "Running", "steps": {"preprocess": {"phase": "Running", "attempts": -3}}},
    {"phase": "Running", "steps": {"preprocess": "not a step"}},
    {"phase": "Running", "steps": {"warp": {"phase": "Running"}}},
    {"conditions": [{"type": "Ready"}]},
    {"observedGeneration": "one"},
    {"phase": "Running", "progress": {"epoch": "three", "mood": "good"}},
    {"phase": None, "message": 42},
]


@pytest.mark.parametrize("stored", HOSTILE_STATUSES)
def test_a_status_that_does_not_fit_the_models_loads_and_never_duplicates_a_job(stored: Any) -> None:
    st = load_status(stored)
    assert isinstance(st, ExperimentStatus)
    ExperimentStatus.model_validate(dump_status(st))
    running = JobSummary(name="alice-preprocess-1", step="preprocess", attempt=1, state="Running")
    d = decide(MANIFEST, stored, [running], set(), T0)
    assert d.create == [] and d.delete == []  # the Job in the cluster is adopted, not created again
    assert d.status["steps"]["preprocess"]["job"] == "alice-preprocess-1"
    ExperimentStatus.model_validate(d.status)


def test_only_the_progress_is_dropped_when_it_alone_does_not_fit() -> None:
    st = load_status({"phase": "Running", "message": "m", "progress": {"epoch": "x"}})
    assert (st.phase, st.message, st.progress) == ("Running", "m", None)


def test_dump_leaves_out_unset_and_empty_fields_and_keeps_a_cleared_current_step() -> None:
    st = load_status({"phase": "Running", "currentStep": "f0", "message": ""})
    st.current_step = None
    out = dump_status(st)
    assert out == {"phase": "Running", "currentStep": None}
    assert "currentStep" not in dump_status(load_status({"phase": "Pending"}))
    # a status decide wrote survives a load/dump round trip unchanged
    d = decide(MANIFEST, None, [], set(), T0)
    assert dump_status(load_status(d.status)) == d.status


def test_progress_fields_the_model_does_not_know_are_left_out_and_bad_ones_keep_the_old() -> None:
    shown = {"step": "train", "epoch": 2, "epochs": 10, "epochText": "2/10", "percent": 20.0}
    st = {"phase": "Running", "observedGeneration": 1, "progress": shown,
          "steps": {"preprocess": {"phase": "Running", "attempts": 1, "job": "alice-preprocess-1"}}}
    running = [JobSummary(name="alice-preprocess-1", step="preprocess", attempt=1, state="Running")]
    newer = {**shown, "epoch": 3, "epochText": "3/10", "mood": "good", "lossG": 12.5}
    d = decide(MANIFEST, st, running, set(), T0, progress=newer)
    assert d.status["progress"] == {**shown, "epoch": 3, "epochText": "3/10", "lossG": 12.5}
    broken = decide(MANIFEST, st, running, set(), T0, progress={"epoch": "three"})
    assert broken.status["progress"] == shown


# --- settings ----------------------------------------------------------------------------------------
BAD_SETTINGS = [
    ("RVC_RECONCILE_INTERVAL", "0.5"), ("RVC_GPU_TOLERATIONS", "[1]"), ("RVC_GPU_TOLERATIONS", "{bad"),
    ("RVC_IMAGE_PULL_POLICY", "sometimes"), ("RVC_HEALTH_PORT", "70000"), ("RVC_JOB_TTL_SECONDS", "-5"),
    ("RVC_STEP_RETRY_BACKOFF_SECONDS", "abc"), ("RVC_CPU_NODE_SELECTOR", "[]"), ("RVC_RUN_AS_USER", "0"),
    ("RVC_STORAGE_ALLOWED_PREFIXES", '{"team-a": ["s3://b/", 7]}'), ("RVC_DELETE_ARTIFACTS_DEFAULT", "2"),
    ("RVC_MAX_CONCURRENT_EXPERIMENTS", "1.5"),
]


@pytest.mark.parametrize(("name", "value"), BAD_SETTINGS)
def test_a_bad_setting_is_one_line_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        OperatorConfig.from_env({name: value})
    assert str(err.value).startswith(name) and "\n" not in str(err.value), str(err.value)


def test_settings_come_from_the_environment_only_through_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RVC_PIPELINE_IMAGE", "  reg/gpu:2  ")
    monkeypatch.setenv("RVC_PRIORITY_CLASS", "   ")  # blank: the default (as the chart's "" values)
    monkeypatch.setenv("RVC_GPU_NODE_SELECTOR", '{"pool": "gpu"}')
    monkeypatch.setenv("rvc_job_backoff_limit", "9")  # names are case-sensitive
    cfg = OperatorConfig.from_env()
    assert cfg.pipeline_image == "reg/gpu:2" and cfg.priority_class is None
    assert cfg.gpu_node_selector == {"pool": "gpu"} and cfg.job_backoff_limit == 3
    assert OperatorConfig().pipeline_image == "rvc-pipeline:latest"  # plain construction reads nothing
    assert OperatorConfig.from_env({}).gpu_node_selector == {}  # a given mapping is all there is
    monkeypatch.setenv("RVC_HEALTH_PORT", "http")
    with pytest.raises(ConfigError, match="RVC_HEALTH_PORT"):
        OperatorConfig.from_env()
    with pytest.raises(ValueError):
        cfg.__setattr__("pipeline_image", "x")  # frozen


# --- kopf wiring: configuration at start-up, not at import ------------------------------------------
def test_importing_the_handlers_reads_no_configuration() -> None:
    code = "import rvc_operator.handlers as h; print(h._runtime)"
    env = {"RVC_METRICS_PORT": "http", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "None", out.stderr


def test_startup_refuses_a_bad_setting_with_a_permanent_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RVC_STEP_MAX_RETRIES", "-1")
    with pytest.raises(kopf.PermanentError, match="RVC_STEP_MAX_RETRIES"):
        handlers._startup(settings=kopf.OperatorSettings())
    assert handlers._runtime is None
