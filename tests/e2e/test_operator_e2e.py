"""The operator on a real cluster, installed with its Helm chart, training a real (tiny) RVC model.

One experiment (`one_click_run`, module-scoped) runs every step on the CPU fallback while it is disturbed
twice, and records what it sees; the tests below assert one property each on those observations:

* test_one_click_succeeds: `kubectl apply` -> Succeeded; status.artifacts point at a model that loads as
  an RVC model and an index faiss reads; printer columns; one Job per step with deterministic names and
  owner references; events; Prometheus sees the operator's gauge and the training step's Pushgateway
  metrics (local mode).
* test_operator_restart_mid_experiment: the operator pod is deleted while a step Job runs; the Deployment
  recreates it; the experiment completes with exactly one Job per step.
* test_training_pod_deleted_resumes_mid_epoch: the training pod is deleted in the middle of the last
  epoch; it saves a mid-epoch checkpoint on SIGTERM and the Job's next pod resumes at that step
  (progress.jsonl: `preempted`, then `train_start` with `init: resume` and the same epoch step; at most
  one step trained twice).

Then the same data as `shards: 2` (sharded_run): two pods per data step with outputs equal to the
unsharded run's, suspended during training and resumed mid-epoch, deleted by its TTL; an experiment past
its activeDeadlineSeconds fails with reason DeadlineExceeded.

Then a second experiment with only corrupt files fails permanently with the files named
(test_corrupt_data_fails_with_message), experiments in other namespaces aimed at a third one's folder are
refused and delete nothing (test_other_namespace_cannot_read_or_delete_an_experiment), and the last test
deletes experiments and uninstalls the chart (test_delete_experiment_then_helm_uninstall).

Modes (local cluster built here, or an external one such as Kind): see tests/e2e/e2e_env.py. Only the
one-click test is meant for external mode (`-k one_click`); it prints where the model is.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.e2e.e2e_env import (
    CRD_NAME,
    LABEL_STEP,
    STEPS,
    E2EEnv,
    progress_events,
    running_pod,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(3600)]

# Full-size v2 40k models (a G_/D_ checkpoint pair is 1.3 GB): two epochs of three steps each, a checkpoint
# after each; the training pod is deleted in the middle of epoch 2 (SIGTERM: it finishes its step, saves and
# uploads a mid-epoch checkpoint) and the Job's next pod resumes at that step of epoch 2.
EPOCHS = 2
STEPS_PER_EPOCH = 3
ONE_CLICK_TIMEOUT = 1200.0


@dataclass
class Disruption:
    """One deliberate disturbance: what was deleted, when, and what replaced it."""

    deleted: str = ""
    step: str = ""
    at_seconds: float = 0.0
    replacement: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class OneClickRun:
    name: str
    exp_prefix: str  # key prefix of logs/<name>/ in the bucket
    seconds: float = 0.0
    final: dict[str, Any] | None = None
    error: str | None = None
    jobs_seen: dict[str, set[str]] = field(default_factory=dict)  # step -> every Job name ever listed
    pods_seen: dict[str, set[str]] = field(default_factory=dict)  # Job -> every pod name ever listed
    restart: Disruption = field(default_factory=Disruption)
    train_kill: Disruption = field(default_factory=Disruption)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    get_output: str = ""
    wide_output: str = ""

    def require_success(self) -> dict[str, Any]:
        assert self.error is None and self.final is not None, self.error
        return self.final


def _observe(env: E2EEnv, run: OneClickRun) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    jobs = env.jobs(run.name)
    pods = env.pods(run.name)
    for j in jobs:
        step = j["metadata"]["labels"].get(LABEL_STEP, "?")
        run.jobs_seen.setdefault(step, set()).add(j["metadata"]["name"])
    for p in pods:
        jn = p["metadata"]["labels"].get("job-name", "?")
        run.pods_seen.setdefault(jn, set()).add(p["metadata"]["name"])
    return jobs, pods


@pytest.fixture(scope="module")
def one_click_run(e2e_env: E2EEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OneClickRun]:
    env = e2e_env
    tmp = tmp_path_factory.mktemp("one-click")
    name = f"one-click-{env.run_id}"
    run = OneClickRun(name=name, exp_prefix=f"models/logs/{name}")
    t_data = time.monotonic()
    # 4 files of about 12 s: enough pieces (>= 10) that training holds some out and evaluates each save
    env.upload_voice_set(tmp, f"datasets/{name}", n_files=4, seconds_each=12.0)
    env.timed("one-click: voice set made and uploaded", time.monotonic() - t_data)

    env.apply(env.experiment(name, f"datasets/{name}", epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH))
    t0 = time.monotonic()
    operator_pod = env.wait_operator_pod()

    def tick(obj: dict[str, Any]) -> None:
        _jobs, pods = _observe(env, run)
        now = time.monotonic() - t0
        # 1. the operator pod goes away while a step Job has a running pod
        if not run.restart.deleted:
            p = running_pod(pods)
            if p is not None:
                step = p["metadata"]["labels"].get(LABEL_STEP, "?")
                env.kubectl("-n", env.namespace, "delete", "pod", operator_pod, "--wait=false")
                run.restart = Disruption(deleted=operator_pod, step=step, at_seconds=now,
                                         detail={"job": p["metadata"]["labels"].get("job-name")})
                print(f"\n[one-click] {now:.0f} s: deleted operator pod {operator_pod} while "
                      f"{step} runs ({p['metadata']['name']})", flush=True)
        elif not run.restart.replacement:
            for op in env.operator_pods():
                st = op.get("status") or {}
                if op["metadata"]["name"] != operator_pod and st.get("phase") == "Running":
                    run.restart.replacement = op["metadata"]["name"]
                    run.restart.detail["replaced_after_s"] = round(now - run.restart.at_seconds, 1)
                    print(f"[one-click] {now:.0f} s: operator pod {run.restart.replacement} running",
                          flush=True)
        # 2. the training pod goes away in the middle of epoch 2 (after the first checkpoint is in S3)
        train_pod = running_pod(pods, "train")
        if not run.train_kill.deleted and train_pod is not None:
            pod_name = train_pod["metadata"]["name"]
            pos = train_position(env, pod_name)
            if pos is not None and pos[1] == EPOCHS and 1 <= pos[2] < STEPS_PER_EPOCH:
                ckpts = sorted(k.rsplit("/", 1)[1] for k in env.s3_keys(f"{run.exp_prefix}/G_"))
                env.kubectl("-n", env.namespace, "delete", "pod", pod_name, "--wait=false")
                run.train_kill = Disruption(deleted=pod_name, step="train", at_seconds=now,
                                            detail={"checkpoints": ckpts, "position": pos})
                print(f"[one-click] {now:.0f} s: deleted training pod {pod_name} at step {pos} (checkpoints "
                      f"in S3: {ckpts})", flush=True)
        elif (run.train_kill.deleted and not run.train_kill.replacement and train_pod is not None
              and train_pod["metadata"]["name"] != run.train_kill.deleted):
            run.train_kill.replacement = train_pod["metadata"]["name"]
            print(f"[one-click] {now:.0f} s: training continues in pod {run.train_kill.replacement}",
                  flush=True)

    try:
        run.final = env.wait_phase(name, ("Succeeded",), ONE_CLICK_TIMEOUT, tick=tick)
    except (AssertionError, TimeoutError) as e:
        run.error = str(e)
    run.seconds = time.monotonic() - t0
    env.timed("one-click experiment (apply -> Succeeded, 2 disruptions)", run.seconds)
    _observe(env, run)
    run.jobs = env.jobs(name)
    run.events = env.events(name, (run.final or {}).get("metadata", {}).get("uid"))
    run.get_output = env.kubectl("-n", env.namespace, "get", "rvcx", name).stdout
    run.wide_output = env.kubectl("-n", env.namespace, "get", "rvcexperiments", name, "-o", "wide").stdout
    if run.final is not None:
        arts = run.final["status"].get("artifacts") or {}
        print(f"\n[one-click] {name} Succeeded in {run.seconds:.0f} s\n{run.get_output}"
              f"  model: {arts.get('model')}\n  index: {arts.get('index')}\n  logs:  {arts.get('logs')}\n"
              f"  S3 endpoint (from this machine): {env.s3_host}", flush=True)
    yield run


# ---------------------------------------------------------------------------------------------------
def test_one_click_succeeds(e2e_env: E2EEnv, one_click_run: OneClickRun, tmp_path: Path) -> None:
    import faiss
    import torch
    from rvc_pipeline.export import load_small_model, read_small_model

    env, run = e2e_env, one_click_run
    obj = run.require_success()
    st = obj["status"]
    uid = obj["metadata"]["uid"]
    assert st["phase"] == "Succeeded"
    assert st["observedGeneration"] == obj["metadata"]["generation"]
    assert {s: st["steps"][s]["phase"] for s in STEPS} == dict.fromkeys(STEPS, "Succeeded")
    conds = {c["type"]: c["status"] for c in st["conditions"]}
    assert conds == {"Ready": "True", "Progressing": "False", "Failed": "False", "Reconciling": "False",
                     "Stalled": "False"}
    assert st["progress"]["epoch"] == EPOCHS and st["progress"]["percent"] == 100.0

    # artifacts: the exported model and the index, both real and readable
    arts = st["artifacts"]
    prefix = f"s3://{env.bucket}/{run.exp_prefix}/"
    assert arts["logs"] == prefix
    assert arts["model"] == f"{prefix}weights/{run.name}.pth"
    model_path = tmp_path / "model.pth"
    model_path.write_bytes(env.s3_get(arts["model"].removeprefix(f"s3://{env.bucket}/")))
    raw = read_small_model(model_path)
    assert {"weight", "config", "info", "sr", "f0", "version"} <= set(raw)
    assert raw["sr"] == "40k" and raw["f0"] == 1 and raw["version"] == "v2"
    assert "DEMO random init" in raw["info"]  # no real weights here: says so in the model itself
    for key in ("enc_p.emb_phone.weight", "emb_g.weight", "dec.conv_pre.weight",
                "flow.flows.0.enc.in_layers.0.bias"):
        assert key in raw["weight"], key
    assert tuple(raw["weight"]["enc_p.emb_phone.weight"].shape) == (192, 768)  # v2: 768-d HuBERT features
    assert all(v.dtype == torch.float16 for v in raw["weight"].values())  # RVC saves half precision
    net, meta = load_small_model(model_path)
    assert meta["version"] == "v2" and meta["f0"] is True and meta["sr"] == 40000
    assert sum(p.numel() for p in net.parameters()) > 1_000_000

    assert arts["index"].startswith(f"{prefix}added_IVF") and arts["index"].endswith(f"_{run.name}_v2.index")
    index_path = tmp_path / "added.index"
    index_path.write_bytes(env.s3_get(arts["index"].removeprefix(f"s3://{env.bucket}/")))
    index = faiss.read_index(str(index_path))
    assert index.d == 768 and index.ntotal > 100
    keys = env.s3_keys(f"{run.exp_prefix}/")
    assert any(k.rsplit("/", 1)[1].startswith("G_") for k in keys)
    assert {f"{run.exp_prefix}/.rvc/{s}.done.json" for s in STEPS} <= set(keys)

    # kubectl get rvcx: the printer columns
    header, row = run.get_output.strip().splitlines()[:2]
    assert header.split()[:4] == ["NAME", "PHASE", "STEP", "EPOCH"]
    assert row.split()[:2] == [run.name, "Succeeded"] and f"{EPOCHS}/{EPOCHS}" in row.split()
    assert "all steps complete" in run.wide_output

    # checkpoint evaluation: the best epoch in the status, kubectl get -o wide, and the files in S3
    best = st["training"]["best"]
    assert best["epoch"] in range(1, EPOCHS + 1) and best["checkpoint"].startswith(f"{prefix}G_")
    # (f0_rmse_cents is left out of the status when no frame is voiced in both: possible for 2 steps' model)
    assert {"mel_l1", "speaker_sim", "dnsmos_ovrl", "voicing_error"} <= set(best["metrics"])
    wide_header, wide_row = run.wide_output.rstrip().splitlines()[:2]
    at, score_at = wide_header.index("BEST"), wide_header.index("SCORE")  # kubectl aligns the columns
    assert wide_row[at:score_at].strip() == str(best["epoch"])
    assert {f"{run.exp_prefix}/{f}" for f in ("eval.jsonl", "report.html", ".rvc/heldout.json")} <= set(keys)
    assert any("/previews/e" in k for k in keys)

    # one Job per step, deterministic names, owned by the experiment
    names = sorted(j["metadata"]["name"] for j in run.jobs)
    assert names == sorted(f"{run.name}-{s}-1" for s in STEPS)
    for j in run.jobs:
        (owner,) = j["metadata"]["ownerReferences"]
        assert owner["kind"] == "RVCExperiment" and owner["uid"] == uid and owner["controller"] is True
        assert j["status"].get("succeeded") == 1
        pod_spec = j["spec"]["template"]["spec"]
        assert pod_spec["containers"][0]["image"] == env.pipeline_cpu_image
        assert pod_spec.get("hostNetwork", False) is env.host_network
    assert {s: st["steps"][s]["job"] for s in STEPS} == {s: f"{run.name}-{s}-1" for s in STEPS}

    # events posted by the operator
    reasons = [e["reason"] for e in run.events]
    assert reasons.count("JobCreated") == len(STEPS), reasons
    assert reasons.count("StepSucceeded") == len(STEPS), reasons
    assert "Succeeded" in reasons
    assert all(e["source"].get("component") == "rvc-operator" for e in run.events)

    if env.prom is None:
        print("[one-click] Prometheus checks skipped: external mode has no Prometheus of this test")
        return
    # Prometheus: the operator's gauge (scraped from its /metrics) and training progress (Pushgateway)
    operator = f'instance="127.0.0.1:{env.metrics_port}"'
    res = env.prom.wait_for(f'rvc_experiments{{phase="Succeeded",{operator}}} >= 1', timeout=60)
    assert float(res[0]["value"][1]) >= 1
    res = env.prom.wait_for(f'rvc_experiment_phase{{experiment="{run.name}",phase="Succeeded"}}', 60)
    assert float(res[0]["value"][1]) == 1
    epoch = env.prom.wait_for(f'max_over_time(rvc_epoch{{experiment="{run.name}",step="train"}}[1h])', 60)
    last = env.prom.wait_for(f'rvc_epoch{{experiment="{run.name}",step="train"}}', 60)
    assert float(last[0]["value"][1]) == EPOCHS, last
    assert float(epoch[0]["value"][1]) == EPOCHS, epoch
    loss = env.prom.wait_for(f'rvc_loss_g{{experiment="{run.name}",step="train"}}', 60)
    assert 0 < float(loss[0]["value"][1]) < 1e4
    created = env.prom.wait_for(f'sum(rvc_jobs_created_total{{{operator}}})', 60)
    assert float(created[0]["value"][1]) >= 1


def test_operator_restart_mid_experiment(e2e_env: E2EEnv, one_click_run: OneClickRun) -> None:
    env, run = e2e_env, one_click_run
    obj = run.require_success()
    r = run.restart
    assert r.deleted and r.step in STEPS, r
    assert r.replacement and r.replacement != r.deleted, r
    print(f"\n[restart] operator pod {r.deleted} deleted at {r.at_seconds:.0f} s during {r.step}; "
          f"{r.replacement} running {r.detail.get('replaced_after_s')} s later")
    # the Deployment replaced the pod; the old one is gone
    pods = {p["metadata"]["name"] for p in env.operator_pods()}
    assert r.deleted not in pods and r.replacement in pods
    # exactly one Job per step: nothing was created twice, before or after the restart
    assert {s: sorted(v) for s, v in run.jobs_seen.items()} == {s: [f"{run.name}-{s}-1"] for s in STEPS}
    steps = obj["status"]["steps"]
    assert {s: (steps[s]["attempts"], steps[s].get("failures", 0)) for s in STEPS} == dict.fromkeys(
        STEPS, (1, 0))
    # the step that ran during the restart finished under the new operator
    events = [e for e in run.events
              if e["reason"] == "StepSucceeded" and e["message"].startswith(f"{r.step}:")]
    assert len(events) == 1, events


def test_training_pod_deleted_resumes_mid_epoch(e2e_env: E2EEnv, one_click_run: OneClickRun) -> None:
    """Issue 11: a deleted (preempted) training pod costs at most one step: it saves a mid-epoch checkpoint
    on SIGTERM and the Job's next pod continues from that step of the epoch."""
    env, run = e2e_env, one_click_run
    obj = run.require_success()
    k = run.train_kill
    assert k.deleted, "the training pod was never seen running in the middle of the last epoch"
    train_job = f"{run.name}-train-1"
    assert k.deleted in run.pods_seen[train_job]
    assert len(run.pods_seen[train_job]) >= 2, run.pods_seen  # the Job made a new pod (backoffLimit)
    assert run.jobs_seen["train"] == {train_job}  # ... inside the same Job
    assert obj["status"]["steps"]["train"]["attempts"] == 1

    events = [e for e in progress_events(env, run.exp_prefix) if e.get("step") == "train"]
    starts = [e for e in events if e["event"] == "train_start"]
    preempted = [e for e in events if e["event"] == "preempted"]
    steps = [e["global_step"] for e in events if e["event"] == "train_step"]
    print(f"\n[resume] training pod {k.deleted} deleted at {k.at_seconds:.0f} s at {k.detail}; preempted: "
          f"{[(p['epoch'], p['epoch_step'], p.get('seconds_to_upload')) for p in preempted]}; train_start: "
          f"{[(s['start_epoch'], s.get('start_epoch_step'), s['init']) for s in starts]}; steps run: {steps}")
    assert len(preempted) == 1, preempted
    p = preempted[0]
    resumed = starts[-1]
    assert resumed["init"] == "resume", starts
    assert p["epoch"] == EPOCHS and 1 <= p["epoch_step"] < STEPS_PER_EPOCH, p
    assert resumed["start_epoch"] == EPOCHS and resumed["start_epoch_step"] == p["epoch_step"]  # mid-epoch
    assert resumed["global_step"] == p["global_step"]
    assert resumed["resumed_from"].endswith(".pth") and Path(resumed["resumed_from"]).name.startswith("G_")
    # every step ran, at most one of them twice
    total = EPOCHS * STEPS_PER_EPOCH
    assert sorted(set(steps)) == list(range(1, total + 1)), steps
    assert len(steps) - len(set(steps)) <= 1, steps
    last = [e for e in events if e["event"] == "epoch" and e["epoch"] == EPOCHS][-1]
    assert last["steps"] == STEPS_PER_EPOCH and last["global_step"] == total
    summary = json.loads(env.s3_get(f"{run.exp_prefix}/train_summary.json"))
    assert summary["init"] == "resume" and summary["last_epoch"] == EPOCHS
    assert summary["global_step"] == total


# ---------------------------------------------------------------------------------------------------
# issue 11: shards, suspend/resume, TTL, deadline
SHARD_STEPS = ("preprocess", "f0", "features")
OUTPUT_FOLDERS = ("0_gt_wavs", "1_16k_wavs", "2a_f0", "2b-f0nsf", "3_feature768")
TRAIN_LINE = re.compile(r"train: step (\d+) \(epoch (\d+), (\d+)/(\d+)\)")


def train_position(env: E2EEnv, pod: str) -> tuple[int, int, int] | None:
    """(global step, epoch, step in epoch) of the newest per-step log line of a training pod."""
    out = env.kubectl("-n", env.namespace, "logs", pod, "--tail=200", check=False).stdout
    found = TRAIN_LINE.findall(out)
    if not found:
        return None
    g, e, k, _n = (int(x) for x in found[-1])
    return g, e, k


def _outputs(env: E2EEnv, exp_prefix: str) -> dict[str, bytes]:
    keys = [k for folder in OUTPUT_FOLDERS for k in env.s3_keys(f"{exp_prefix}/{folder}/")]
    return {k.removeprefix(exp_prefix + "/"): env.s3_get(k) for k in sorted(keys)}


def _seconds(step_status: dict[str, Any]) -> float:
    from datetime import datetime

    start, end = (datetime.fromisoformat(step_status[k].replace("Z", "+00:00"))
                  for k in ("startTime", "endTime"))
    return (end - start).total_seconds()


@dataclass
class ShardedRun:
    name: str
    exp_prefix: str
    final: dict[str, Any] | None = None
    error: str | None = None
    suspended: dict[str, Any] = field(default_factory=dict)
    suspended_at: tuple[int, int, int] | None = None
    jobs_seen: dict[str, set[str]] = field(default_factory=dict)
    active_train_jobs: int = 0  # the most train Jobs ever active at once
    events: list[dict[str, Any]] = field(default_factory=list)
    gone_after_s: float | None = None
    seconds: float = 0.0


SHARDED_STEPS_PER_EPOCH = 4
SHARDED_TTL = 20


@pytest.fixture(scope="module")
def sharded_run(e2e_env: E2EEnv, one_click_run: OneClickRun) -> ShardedRun:
    """The one-click data again, as `shards: 2`, suspended during training and resumed, then TTL'd."""
    env = e2e_env
    name = f"sharded-{env.run_id}"
    run = ShardedRun(name=name, exp_prefix=f"models/logs/{name}")
    m = env.experiment(name, f"datasets/{one_click_run.name}", epochs=1,
                       steps_per_epoch=SHARDED_STEPS_PER_EPOCH,
                       steps=("preprocess", "f0", "features", "train"))
    m["spec"]["resources"]["shards"] = 2
    m["spec"]["eval"] = {"enabled": False}
    m["spec"]["lifecycle"] = {"ttlSecondsAfterFinished": SHARDED_TTL}
    env.apply(m)
    t0 = time.monotonic()

    def tick(obj: dict[str, Any]) -> None:
        jobs = env.jobs(name)
        for j in jobs:
            step = j["metadata"]["labels"].get(LABEL_STEP, "?")
            run.jobs_seen.setdefault(step, set()).add(j["metadata"]["name"])
        active = [j for j in jobs if j["metadata"]["labels"].get(LABEL_STEP) == "train"
                  and not (j.get("status") or {}).get("succeeded")]
        run.active_train_jobs = max(run.active_train_jobs, len(active))
        if run.suspended_at is None:
            pod = running_pod(env.pods(name), "train")
            pos = train_position(env, pod["metadata"]["name"]) if pod else None
            if pos is not None and 1 <= pos[2] < SHARDED_STEPS_PER_EPOCH:
                env.kubectl("-n", env.namespace, "patch", "rvcx", name, "--type", "merge",
                            "-p", '{"spec":{"suspend":true}}')
                run.suspended_at = pos
                print(f"\n[sharded] {time.monotonic() - t0:.0f} s: suspended at step {pos}", flush=True)

    try:
        env.wait_phase(name, ("Running",), 300, tick=tick)
        wait_until("the training pod to run a step", lambda: (tick({}), run.suspended_at)[1], 900,
                   interval=1.0, diagnostics=lambda: env.diagnostics(name))
        obj = env.wait_phase(name, ("Suspended",), 120, tick=tick)
        run.suspended = obj
        wait_until("the training Job and pod to go", lambda: not [
            j for j in env.jobs(name) if j["metadata"]["labels"].get(LABEL_STEP) == "train"]
            and running_pod(env.pods(name), "train") is None, 180, diagnostics=lambda: env.diagnostics(name))
        run.suspended = env.get_experiment(name) or obj
        env.kubectl("-n", env.namespace, "patch", "rvcx", name, "--type", "merge",
                    "-p", '{"spec":{"suspend":false}}')
        run.final = env.wait_phase(name, ("Succeeded",), 900, tick=tick)
        run.events = env.events(name, run.final["metadata"]["uid"])
        t_done = time.monotonic()
        wait_until(f"{name} to be deleted by its TTL", lambda: env.get_experiment(name) is None, 120,
                   diagnostics=lambda: env.operator_logs(tail=40))
        run.gone_after_s = time.monotonic() - t_done
    except (AssertionError, TimeoutError) as e:
        run.error = str(e)
    run.seconds = time.monotonic() - t0
    env.timed("sharded experiment (2 shards, suspend + resume, TTL)", run.seconds)
    return run


def test_sharded_data_steps_equal_unsharded(e2e_env: E2EEnv, one_click_run: OneClickRun,
                                            sharded_run: ShardedRun) -> None:
    env, run = e2e_env, sharded_run
    assert run.error is None and run.final is not None, run.error
    steps = run.final["status"]["steps"]
    for s in SHARD_STEPS:
        assert run.jobs_seen[s] == {f"{run.name}-{s}-s{i}-1" for i in range(2)}, run.jobs_seen
        assert steps[s]["phase"] == "Succeeded"
    unsharded = one_click_run.require_success()["status"]["steps"]
    walls = {s: (_seconds(unsharded[s]), _seconds(steps[s])) for s in SHARD_STEPS}
    print("\n[sharded] wall s per step (unsharded -> 2 shards): "
          + ", ".join(f"{s} {a:.0f} -> {b:.0f}" for s, (a, b) in walls.items()))
    ours, theirs = _outputs(env, run.exp_prefix), _outputs(env, one_click_run.exp_prefix)
    print(f"\n[sharded] {len(ours)} output files of 2 shards; unsharded: {len(theirs)}")
    assert ours.keys() == theirs.keys() and len(ours) > 20
    # audio and pitch: byte for byte; HuBERT features: the same up to float rounding, since the shards batch
    # other pieces together than one process does (BLAS sums in another order for other matrix sizes)
    different = [k for k in ours if ours[k] != theirs[k] and not k.startswith("3_feature")]
    assert not different, different[:5]
    worst = 0.0
    for k in (k for k in ours if k.startswith("3_feature")):
        a, b = (np.load(io.BytesIO(x)) for x in (ours[k], theirs[k]))
        assert a.shape == b.shape and a.dtype == b.dtype, k
        worst = max(worst, float(np.abs(a.astype(np.float64) - b).max()))
    print(f"[sharded] features: largest difference {worst:.2e}")
    assert worst < 1e-4
    for s in SHARD_STEPS:
        assert env.s3_keys(f"{run.exp_prefix}/.rvc/{s}.done.json")
        assert len([k for k in env.s3_keys(f"{run.exp_prefix}/.rvc/{s}.shard-")]) == 2


def test_suspend_resume_continues_mid_epoch(e2e_env: E2EEnv, sharded_run: ShardedRun) -> None:
    env, run = e2e_env, sharded_run
    assert run.error is None and run.final is not None, run.error
    st = run.suspended["status"]
    conds = {c["type"]: c for c in st["conditions"]}
    assert st["phase"] == "Suspended" and conds["Suspended"]["status"] == "True", st
    assert conds["Ready"]["status"] == "False" and conds["Reconciling"]["status"] == "False"
    assert st["steps"]["train"]["phase"] == "Pending" and st["steps"]["train"].get("failures", 0) == 0
    final = run.final["status"]
    fconds = {c["type"]: c for c in final["conditions"]}
    assert fconds["Suspended"]["status"] == "False" and fconds["Ready"]["status"] == "True"
    assert run.jobs_seen["train"] == {f"{run.name}-train-1", f"{run.name}-train-2"}
    assert run.active_train_jobs == 1  # never two training Jobs at once
    reasons = [e["reason"] for e in run.events]
    assert "Suspended" in reasons and "Resumed" in reasons, reasons
    events = [e for e in progress_events(env, run.exp_prefix) if e.get("step") == "train"]
    preempted = [e for e in events if e["event"] == "preempted"]
    starts = [e for e in events if e["event"] == "train_start"]
    steps = [e["global_step"] for e in events if e["event"] == "train_step"]
    print(f"\n[suspend] suspended at {run.suspended_at}; preempted: {preempted}; starts: "
          f"{[(s['start_epoch'], s.get('start_epoch_step'), s['init']) for s in starts]}; steps {steps}")
    assert len(preempted) == 1 and len(starts) == 2
    assert starts[1]["init"] == "resume" and starts[1]["start_epoch"] == 1
    assert starts[1]["start_epoch_step"] == preempted[0]["epoch_step"] >= 1  # mid-epoch
    assert sorted(set(steps)) == list(range(1, SHARDED_STEPS_PER_EPOCH + 1))
    assert len(steps) - len(set(steps)) <= 1  # at most one step repeated
    summary = json.loads(env.s3_get(f"{run.exp_prefix}/train_summary.json"))
    assert summary["global_step"] == SHARDED_STEPS_PER_EPOCH


def test_ttl_deletes_finished_experiment(e2e_env: E2EEnv, sharded_run: ShardedRun) -> None:
    env, run = e2e_env, sharded_run
    assert run.error is None and run.gone_after_s is not None, run.error
    print(f"\n[ttl] {run.name} deleted {run.gone_after_s:.0f} s after Succeeded (ttl {SHARDED_TTL} s)")
    assert env.get_experiment(run.name) is None
    wait_until(f"{run.name}'s Jobs to go", lambda: not env.jobs(run.name), 120)
    assert env.s3_keys(f"{run.exp_prefix}/train_summary.json")  # artifacts kept (artifactsOnDeletion Keep)


def test_deadline_fails_with_reason(e2e_env: E2EEnv) -> None:
    env = e2e_env
    name = f"deadline-{env.run_id}"
    m = env.experiment(name, f"datasets/{name}", steps=["preprocess"])
    m["spec"]["resources"]["nodeSelector"] = {"rvc-e2e.dev/no-such-node": "true"}  # never runs
    m["spec"]["lifecycle"] = {"activeDeadlineSeconds": 5}
    env.apply(m)
    t0 = time.monotonic()
    obj = env.wait_phase(name, ("Failed",), 120)
    st = obj["status"]
    print(f"\n[deadline] {name} failed after {time.monotonic() - t0:.0f} s: {st['message']}")
    assert st["steps"]["preprocess"]["reason"] == "DeadlineExceeded"
    assert "activeDeadlineSeconds=5" in st["message"]
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Failed"]["status"] == "True" and conds["Failed"]["reason"] == "DeadlineExceeded"
    wait_until(f"{name}'s Job to be stopped", lambda: not [
        j for j in env.jobs(name) if not j["metadata"].get("deletionTimestamp")], 60)
    env.delete_experiment(name)


def test_corrupt_data_fails_with_message(e2e_env: E2EEnv, tmp_path: Path) -> None:
    env = e2e_env
    name = f"corrupt-{env.run_id}"
    files = [Path(k).name for k in env.upload_corrupt_set(tmp_path, f"datasets/{name}")]
    env.apply(env.experiment(name, f"datasets/{name}"))
    t0 = time.monotonic()
    jobs_seen: set[str] = set()
    pods_seen: set[str] = set()

    def tick(_obj: dict[str, Any]) -> None:
        jobs_seen.update(j["metadata"]["name"] for j in env.jobs(name))
        pods_seen.update(p["metadata"]["name"] for p in env.pods(name))

    obj = env.wait_phase(name, ("Failed",), 300, tick=tick)
    env.timed("corrupt-data experiment (apply -> Failed)", time.monotonic() - t0)
    st = obj["status"]
    pre = st["steps"]["preprocess"]
    print(f"\n[corrupt] {name}: {st['message']}")
    assert pre["phase"] == "Failed" and pre["exitCode"] == 2 and pre["reason"] == "BadInput"
    assert pre["attempts"] == 1 and pre.get("failures", 0) == 0
    for f in files:
        assert f in st["message"], (f, st["message"])
    assert all(st["steps"][s]["phase"] == "Pending" for s in STEPS[1:])
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Failed"]["status"] == "True" and conds["Ready"]["status"] == "False"
    warnings = [e for e in env.events(name, obj["metadata"]["uid"]) if e["type"] == "Warning"]
    assert {e["reason"] for e in warnings} == {"StepFailed", "Failed"}, warnings
    assert all(all(f in e["message"] for f in files) for e in warnings), warnings

    # no retry storm: one Job, and nothing new while the operator sweeps a few more times (every 3 s)
    time.sleep(10)
    jobs_seen.update(j["metadata"]["name"] for j in env.jobs(name))
    assert jobs_seen == {f"{name}-preprocess-1"}, jobs_seen
    assert len(pods_seen) <= 2, pods_seen  # 1.20's Job controller may start one more pod before the delete
    again = env.get_experiment(name)
    assert again is not None and again["status"]["steps"]["preprocess"]["attempts"] == 1
    assert again["status"]["phase"] == "Failed"
    if env.prom is not None:
        res = env.prom.wait_for('rvc_job_failures_total{step="preprocess",reason="BadInput"}', 60)
        assert float(res[0]["value"][1]) >= 1


def _progress_jsonl(name: str) -> bytes:
    """What a training run leaves in progress.jsonl (two of four epochs)."""
    lines = [{"time": 1.0e9, "experiment": name, "step": "train", "event": "train_start", "epochs": 4,
              "start_epoch": 1, "global_step": 0}]
    lines += [{"time": 1.0e9 + e, "experiment": name, "step": "train", "event": "epoch", "epoch": e,
               "epochs": 4, "seconds": 9.0, "global_step": 3 * e, "avg_loss_g": 30.0, "avg_loss_d": 4.0,
               "avg_loss_mel": 20.0} for e in (1, 2)]
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def test_other_namespace_cannot_read_or_delete_an_experiment(e2e_env: E2EEnv) -> None:
    """Issue 8: an experiment in another namespace aimed at this one's storage.uri + experimentName neither
    sees its progress nor deletes its artifacts; a namespace outside the chart's allow-list gets no storage.
    Cheap: the victim's only Job can never be scheduled, its folder's contents are written here."""
    env = e2e_env
    victim, prefix = f"victim-{env.run_id}", f"models/logs/victim-{env.run_id}/"
    for ns in (env.other_namespace, env.denied_namespace):
        env.kubectl("create", "namespace", ns)
    t0 = time.monotonic()
    try:
        m = env.experiment(victim, f"datasets/{victim}", steps=["preprocess"])
        m["spec"]["resources"]["nodeSelector"] = {"rvc-e2e.dev/no-such-node": "true"}  # never runs
        env.apply(m)
        rec = json.loads(wait_until("the victim's ownership record", lambda: env.s3_keys(
            f"{prefix}.rvc/owner.json") and env.s3_get(f"{prefix}.rvc/owner.json"), 90,
            diagnostics=lambda: env.diagnostics(victim)))
        obj = env.get_experiment(victim)
        assert obj is not None
        assert rec["namespace"] == env.namespace and rec["name"] == victim
        assert rec["uid"] == obj["metadata"]["uid"]
        # what a run would have left there: markers, progress, a checkpoint
        for key, data in ((".rvc/preprocess.done.json", b'{"step": "preprocess"}'),
                          (".rvc/f0.done.json", b'{"step": "f0"}'),
                          ("progress.jsonl", _progress_jsonl(victim)), ("G_6.pth", b"checkpoint bytes")):
            env.s3_put(prefix + key, data)
        before = env.s3_keys(prefix)

        def hostile(name: str, ns: str) -> dict[str, Any]:
            a = env.experiment(name, f"datasets/{victim}")
            a["metadata"].update(namespace=ns, annotations={"rvc-operator.dev/delete-artifacts": "true"})
            a["spec"]["experimentName"] = victim  # the victim's folder
            env.apply(a)
            return env.wait_phase(name, ("Failed",), 90, namespace=ns)

        mallory = f"mallory-{env.run_id}"
        st = hostile(mallory, env.other_namespace)["status"]
        print(f"\n[confused deputy] {env.other_namespace}/{mallory}: {st['message']}")
        assert st["message"] == (f"storage logs/{victim}/ belongs to another RVCExperiment; choose another "
                                 "experimentName or storage.uri")
        assert env.namespace not in json.dumps(st)  # the owner is not revealed
        assert "progress" not in st and "artifacts" not in st and not st.get("steps"), st
        conds = {c["type"]: c for c in st["conditions"]}
        assert conds["Failed"]["status"] == "True" and conds["Failed"]["reason"] == "StorageOwnedElsewhere"
        reasons = [(e["type"], e["reason"]) for e in env.events(mallory, namespace=env.other_namespace)]
        assert ("Warning", "StorageOwnedElsewhere") in reasons, reasons
        assert env.jobs(mallory, env.other_namespace) == []

        eve = f"eve-{env.run_id}"
        st = hostile(eve, env.denied_namespace)["status"]
        print(f"[confused deputy] {env.denied_namespace}/{eve}: {st['message']}")
        assert st["message"].startswith("spec.storage.uri:") and "none" in st["message"]
        assert st["conditions"][-1]["reason"] == "StorageNotAllowed"
        assert env.jobs(eve, env.denied_namespace) == []

        # deleting both with delete-artifacts deletes nothing of the victim's
        for name, ns in ((mallory, env.other_namespace), (eve, env.denied_namespace)):
            env.delete_experiment(name, ns)
            wait_until(f"{ns}/{name}'s cleanup", lambda n=name: f"/{n}: artifacts kept" in env.operator_logs(
                tail=400), 60, diagnostics=lambda: env.operator_logs(tail=60))
        assert env.s3_keys(prefix) == before
        victim_st = (env.get_experiment(victim) or {}).get("status") or {}
        assert victim_st.get("phase") == "Running", victim_st

        # the owner itself may delete its folder
        env.kubectl("-n", env.namespace, "annotate", "rvcx", victim, "rvc-operator.dev/delete-artifacts=true")
        env.delete_experiment(victim)
        wait_until("the victim's folder to be deleted", lambda: not env.s3_keys(prefix), 60,
                   diagnostics=lambda: env.operator_logs(tail=60))
        env.timed("confused-deputy checks (3 experiments, 2 namespaces)", time.monotonic() - t0)
    finally:
        for ns in (env.other_namespace, env.denied_namespace):
            env.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_delete_experiment_then_helm_uninstall(e2e_env: E2EEnv, one_click_run: OneClickRun) -> None:
    env, run = e2e_env, one_click_run
    run.require_success()
    keys_before = env.s3_keys(f"{run.exp_prefix}/")
    assert keys_before
    # deleting an experiment removes its Jobs, pods and ConfigMap (owner references + the operator)
    assert len(env.jobs(run.name)) == len(STEPS) and len(env.pods(run.name)) >= len(STEPS)
    t0 = time.monotonic()
    env.delete_experiment(run.name)
    wait_until(f"{run.name}'s Jobs, pods and ConfigMap to go",
               lambda: not env.jobs(run.name) and not env.pods(run.name) and env.kubectl(
                   "-n", env.namespace, "get", "configmap", f"{run.name}-spec", check=False).returncode != 0,
               120, diagnostics=lambda: env.kubectl("-n", env.namespace, "get", "all", check=False).stdout)
    env.timed("delete experiment -> Jobs/pods gone", time.monotonic() - t0)
    assert env.get_experiment(run.name) is None
    # artifacts stay in S3 (no delete-artifacts annotation)
    assert env.s3_keys(f"{run.exp_prefix}/") == keys_before

    # helm uninstall: the operator goes, the CRD (in the chart's crds/) and the other experiment stay
    t0 = time.monotonic()
    env.uninstall_operator()
    wait_until("the operator pods to go", lambda: not env.operator_pods(), 120)
    env.timed("helm uninstall -> operator gone", time.monotonic() - t0)
    assert env.kubectl("-n", env.namespace, "get", "deployment", env.deployment, check=False).returncode != 0
    crd = env.get_json("crd", CRD_NAME)
    assert crd["spec"]["names"]["kind"] == "RVCExperiment"
    corrupt = f"corrupt-{env.run_id}"
    remaining = env.get_experiment(corrupt)
    if remaining is not None:
        # deleting an experiment while no operator runs still works (no finalizer) and the garbage
        # collector removes what it owned
        assert not remaining["metadata"].get("finalizers")
        env.delete_experiment(corrupt)
        wait_until(f"{corrupt} to go", lambda: env.get_experiment(corrupt) is None
                   and not env.jobs(corrupt) and not env.pods(corrupt), 120)
