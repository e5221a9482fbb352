"""The client (`rvc-pipeline submit|watch|status|logs|download|cancel|resume|list`, `kubectl rvc`) against the
real cluster and S3: from a local folder of recordings to a downloaded model and converted files, with the
optional `convert` step, Ctrl-C during a watch, suspend/resume and delete through the client.

One experiment (tiny CPU training, evaluation off) keeps the tier's cost to a few minutes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.e2e_env import LABEL_STEP, E2EEnv, running_pod, wait_until

CLIENT_TIMEOUT = 1200.0
SOURCES = ("source_a", "source_b")
CONVERT_FORMAT = "flac"


@dataclass
class ClientRun:
    name: str
    folder: Path
    work: Path
    exp_prefix: str
    interrupted: subprocess.CompletedProcess[str] | None = None
    phase_at_interrupt: str | None = None
    suspended: dict[str, Any] | None = None
    watch: subprocess.CompletedProcess[str] | None = None
    error: str | None = None
    seconds: float = 0.0
    outputs: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)

    def require_watch(self) -> subprocess.CompletedProcess[str]:
        assert self.error is None and self.watch is not None, self.error
        return self.watch


def client_env(env: E2EEnv) -> dict[str, str]:
    """What a user's shell has: a kubeconfig and S3 credentials (the endpoint goes as --endpoint)."""
    return dict(os.environ, KUBECONFIG=str(env.kube.kubeconfig), AWS_ACCESS_KEY_ID=env.access_key,
                AWS_SECRET_ACCESS_KEY=env.secret_key, AWS_DEFAULT_REGION=env.region, COLUMNS="200",
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.kube.kubectl_path.parent}{os.pathsep}"
                     f"{os.environ.get('PATH', '')}")


def rvc(env: E2EEnv, *args: str, timeout: float = 300,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "rvc_pipeline.cli", *args, "-n", env.namespace],
                          capture_output=True, text=True, env=client_env(env), timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"rvc-pipeline {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}"
                             f"\n{proc.stderr[-3000:]}")
    return proc


def overrides(env: E2EEnv, name: str) -> dict[str, Any]:
    """The -f file: what the e2e cluster needs (CPU, demo weights) and a tiny run with the convert step."""
    return {
        "model": {"version": "v2", "sampleRate": "40k", "pitchGuidance": True},
        "f0": {"method": "pm"},
        "train": {"epochs": 1, "batchSize": 2, "saveEveryEpoch": 1, "maxStepsPerEpoch": 2, "dataWorkers": 0},
        "eval": {"enabled": False},
        "steps": ["preprocess", "f0", "features", "train", "index", "convert"],
        "convert": {"source": env.uri(f"models/sources/{name}/"), "format": CONVERT_FORMAT,
                    "indexRate": 0.5},
        "resources": {"device": "cpu", "parallelism": 2},
        "demoRandomWeights": True,
    }


def _voice_folder(tmp: Path) -> Path:
    """Three recordings, plus what submit must leave alone: a sub-folder and a text file."""
    from rvc_pipeline.demo.voices import make_voice_set

    folder = tmp / "recordings"
    make_voice_set(folder, n_files=3, seconds_each=10.0, seed=11)
    (folder / "old takes").mkdir()
    (folder / "old takes" / "take1.wav").write_bytes((next(folder.glob("*.wav"))).read_bytes())
    (folder / "notes.txt").write_text("mic: SM7B\n")
    return folder


def _sources(env: E2EEnv, tmp: Path, name: str) -> Path:
    from rvc_pipeline.demo.voices import make_voice_set

    src = tmp / "sources"
    make_voice_set(src, n_files=len(SOURCES), seconds_each=3.0, seed=23)
    for p, stem in zip(sorted(src.glob("*.wav")), SOURCES):
        p.rename(src / f"{stem}.wav")
    env.upload_dir(src, f"models/sources/{name}")
    return src


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_submit(env: E2EEnv, run: ClientRun, values: Path) -> None:
    """submit (watching), then SIGINT once the experiment runs: exit 130, the experiment untouched."""
    args = [sys.executable, "-m", "rvc_pipeline.cli", "submit", str(run.folder), "--name", run.name,
            "--storage", env.uri("models"), "-f", str(values), "--endpoint", env.s3_host, "-n", env.namespace]
    # a user's terminal delivers Ctrl-C; a test run started in the background (nohup, CI runners) may
    # hand its children SIGINT ignored, and Python then installs no KeyboardInterrupt handler: restore it
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=client_env(env), preexec_fn=_default_sigint) as proc:
        try:
            obj = env.wait_phase(run.name, ("Running",), 300)
            run.phase_at_interrupt = obj["status"]["phase"]
            time.sleep(3)  # a few watch frames
            proc.send_signal(signal.SIGINT)
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                why = f"submit still ran 30 s after SIGINT:\n{out[-2000:]}\n{err[-2000:]}"
                raise AssertionError(why) from None
        finally:
            if proc.poll() is None:
                proc.kill()
    run.interrupted = subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def client_run(e2e_env: E2EEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClientRun]:
    env = e2e_env
    tmp = tmp_path_factory.mktemp("client")
    name = f"client-{env.run_id}"
    run = ClientRun(name=name, folder=_voice_folder(tmp), work=tmp, exp_prefix=f"models/logs/{name}")
    _sources(env, tmp, name)
    values = tmp / "values.yaml"
    values.write_text(yaml.safe_dump(overrides(env, name), sort_keys=False))
    t0 = time.monotonic()
    try:
        _interrupt_submit(env, run, values)
        run.outputs["suspend"] = rvc(env, "cancel", name, "--suspend")
        run.suspended = env.wait_phase(name, ("Suspended",), 180)
        wait_until("the step pods to go", lambda: running_pod(env.pods(name)) is None, 180,
                   diagnostics=lambda: env.diagnostics(name))
        run.outputs["resume"] = rvc(env, "resume", name)
        run.watch = rvc(env, "watch", name, timeout=CLIENT_TIMEOUT, check=False)
    except (AssertionError, TimeoutError, subprocess.TimeoutExpired) as e:
        run.error = f"{e}\n{env.diagnostics(name)}"
    run.seconds = time.monotonic() - t0
    env.timed("client experiment (submit, Ctrl-C, suspend, resume, watch -> Succeeded)", run.seconds)
    yield run


# ---------------------------------------------------------------------------------------------------
def test_submit_with_a_bad_override_fails_before_uploading(e2e_env: E2EEnv, tmp_path: Path) -> None:
    env = e2e_env
    from rvc_pipeline.demo.voices import make_voice_set

    make_voice_set(tmp_path / "rec", n_files=1, seconds_each=2.0, seed=5)
    name = f"client-bad-{env.run_id}"
    proc = rvc(env, "submit", str(tmp_path / "rec"), "--name", name, "--storage", env.uri("models"),
               "--set", "train.epochs=many", "--endpoint", env.s3_host, check=False)
    assert proc.returncode == 2, proc
    assert "train.epochs" in proc.stderr and "error:" in proc.stderr, proc.stderr
    assert env.s3_keys(f"models/datasets/{name}/") == {}
    assert env.get_experiment(name) is None


def test_ctrl_c_during_watch_leaves_the_experiment_running(e2e_env: E2EEnv, client_run: ClientRun) -> None:
    run = client_run
    assert run.interrupted is not None, run.error
    assert run.interrupted.returncode == 130, (run.interrupted.stdout[-2000:], run.interrupted.stderr[-2000:])
    assert f"rvc-pipeline watch {run.name}" in run.interrupted.stderr
    assert run.phase_at_interrupt == "Running"
    # the experiment went on after the client left: the suspend below found it running, not deleted
    assert run.suspended is not None, run.error
    # submit uploaded the recordings directly inside the folder, not the sub-folder or the text file
    keys = set(e2e_env.s3_keys(f"models/datasets/{run.name}/"))
    assert {k.rsplit("/", 1)[1] for k in keys} == {p.name for p in run.folder.glob("*.wav")}


def test_cancel_suspend_then_resume(e2e_env: E2EEnv, client_run: ClientRun) -> None:
    run = client_run
    assert run.suspended is not None, run.error
    st = run.suspended["status"]
    assert run.suspended["spec"]["suspend"] is True and st["phase"] == "Suspended"
    assert f"rvc-pipeline resume {run.name}" in run.outputs["suspend"].stdout
    assert "resumed" in run.outputs["resume"].stdout
    obj = e2e_env.get_experiment(run.name)
    assert obj is not None and obj["spec"]["suspend"] is False


def test_watch_ends_with_success_and_the_convert_step_wrote_every_file(e2e_env: E2EEnv,
                                                                     client_run: ClientRun) -> None:
    import soundfile as sf

    env, run = e2e_env, client_run
    watch = run.require_watch()
    assert watch.returncode == 0, (watch.stdout[-3000:], watch.stderr[-3000:])
    assert f"{run.name} succeeded" in watch.stdout
    obj = env.get_experiment(run.name)
    assert obj is not None
    steps = obj["status"]["steps"]
    assert {s: steps[s]["phase"] for s in steps} == dict.fromkeys(
        ("preprocess", "f0", "features", "train", "index", "convert"), "Succeeded")
    keys = env.s3_keys(f"{run.exp_prefix}/converted/")
    outs = {k.rsplit("/", 1)[1] for k in keys}
    assert outs == {f"{s}.{CONVERT_FORMAT}" for s in SOURCES}, keys
    for k in keys:
        path = run.work / k.rsplit("/", 1)[1]
        path.write_bytes(env.s3_get(k))
        info = sf.info(str(path))
        assert info.format == "FLAC" and info.duration > 1.0, (k, info)


def test_status_list_logs_and_kubectl_plugin(e2e_env: E2EEnv, client_run: ClientRun) -> None:
    env, run = e2e_env, client_run
    assert run.require_watch().returncode == 0
    status = rvc(env, "status", run.name)
    assert "Succeeded" in status.stdout and f"weights/{run.name}.pth" in status.stdout, status.stdout
    listing = rvc(env, "list")
    assert run.name in listing.stdout and "Succeeded" in listing.stdout, listing.stdout
    log = rvc(env, "logs", run.name, "--step", "train")
    assert "train" in log.stdout and log.stdout.count("\n") >= 3, log.stdout[-2000:]
    # kubectl finds the kubectl-rvc entry point on PATH (kubectl's plugin convention)
    plugin = subprocess.run([str(env.kube.kubectl_path), "rvc", "list", "-n", env.namespace],
                            capture_output=True, text=True, env=client_env(env), timeout=120, check=False)
    assert plugin.returncode == 0 and run.name in plugin.stdout, (plugin.stdout, plugin.stderr)


def test_download_then_convert_locally(e2e_env: E2EEnv, client_run: ClientRun) -> None:
    import soundfile as sf
    from rvc_pipeline.export import load_small_model

    env, run = e2e_env, client_run
    assert run.require_watch().returncode == 0
    dest = run.work / "downloaded"
    rvc(env, "download", run.name, "--to", str(dest), "--endpoint", env.s3_host)
    model = dest / f"{run.name}.pth"
    indexes = sorted(dest.glob("added_*.index"))
    assert model.is_file() and len(indexes) == 1, sorted(p.name for p in dest.iterdir())
    _net, meta = load_small_model(model)
    assert meta["version"] == "v2" and meta["sr"] == 40000
    again = rvc(env, "download", run.name, "--to", str(dest), "--endpoint", env.s3_host)
    assert "0 downloaded" in again.stdout and "already up to date" in again.stdout, again.stdout
    out = run.work / "converted-here"
    proc = subprocess.run([sys.executable, "-m", "rvc_pipeline.cli", "convert", "--model", str(model),
                           "--index", str(indexes[0]), "--input", str(run.work / "sources"),
                           "--output", str(out), "--f0-method", "pm", "--demo-random-weights"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.wav")) == sorted(f"{s}.wav" for s in SOURCES)
    assert all(sf.info(str(p)).duration > 1.0 for p in out.glob("*.wav"))


def test_cancel_delete_removes_the_experiment_and_keeps_artifacts(e2e_env: E2EEnv,
                                                                  client_run: ClientRun) -> None:
    env, run = e2e_env, client_run
    assert run.require_watch().returncode == 0
    refused = rvc(env, "cancel", run.name, check=False)
    assert refused.returncode == 2 and "--suspend" in refused.stderr
    rvc(env, "cancel", run.name, "--delete", "--yes")
    wait_until(f"{run.name} to be deleted", lambda: env.get_experiment(run.name) is None, 120)
    wait_until("its Jobs to go", lambda: not [j for j in env.jobs(run.name)
                                             if j["metadata"]["labels"].get(LABEL_STEP)], 120)
    assert f"{run.exp_prefix}/weights/{run.name}.pth" in env.s3_keys(f"{run.exp_prefix}/weights/")
