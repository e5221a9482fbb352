"""Sharded data steps (`rvc-pipeline <step> --shard I/N`) on a real S3 API (moto server) and real speech:
the union of the shards' outputs is the unsharded run's byte for byte, the step marker appears only once
every shard is done, a rerun with another N recomputes and deletes nothing, a failed shard rerun alone
completes the step, a stale shard marker never counts, and bad --shard values are refused in one line."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from rvc_operator.progress_reader import dataset_from_summary
from rvc_pipeline import cli
from rvc_pipeline.core import layout
from rvc_pipeline.core.errors import EXIT_BAD_INPUT
from rvc_pipeline.core.spec import Experiment, load_manifest
from rvc_pipeline.stepio import Shard
from rvc_pipeline.steps import f0 as f0step
from rvc_pipeline.steps.runner import run_shard, run_steps

from tests.s3server import S3Endpoint

pytestmark = [
    pytest.mark.skipif(not shutil.which("ffmpeg"), reason="needs ffmpeg"),
    pytest.mark.usefixtures("offline_weights"),
]

ROOT = Path(__file__).resolve().parents[2]
DATA_STEPS = ("preprocess", "f0", "features")
OUTPUT_DIRS = (layout.GT_WAVS_DIR, layout.WAVS_16K_DIR, *layout.F0_DIRS, layout.feature_dir("v2"))


def manifest(tmp_path: Path, s3: S3Endpoint, data: Path, name: str, **spec: Any) -> Path:
    doc = {"apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment", "metadata": {"name": name},
           "spec": {"dataset": {"source": str(data)}, "storage": {"uri": s3.uri("runs"), "endpoint": s3.url},
                    "resources": {"device": "cpu", "parallelism": 1}, "f0": {"method": "pm"},
                    "demoRandomWeights": True, **spec}}  # features: DEMO random HuBERT (seeded)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def objects(s3: S3Endpoint, exp: str) -> dict[str, str]:
    """Key below runs/logs/<exp>/ -> ETag."""
    prefix = f"runs/logs/{exp}/"
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return {o["Key"][len(prefix):]: o["ETag"] for p in pages for o in p.get("Contents", [])}


def body(s3: S3Endpoint, exp: str, key: str) -> bytes:
    return s3.client().get_object(Bucket=s3.bucket, Key=f"runs/logs/{exp}/{key}")["Body"].read()


def outputs(s3: S3Endpoint, exp: str) -> set[str]:
    return {k for k in objects(s3, exp) if k.split("/")[0] in OUTPUT_DIRS}


def marker(s3: S3Endpoint, exp: str, step: str) -> dict[str, Any] | None:
    key = layout.marker_key(exp, step).removeprefix(f"logs/{exp}/")
    return json.loads(body(s3, exp, key)) if key in objects(s3, exp) else None


def cli_shard(spec: Path, step: str, shard: str) -> subprocess.CompletedProcess[str]:
    """The real command line in a subprocess (the operator's Job command)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "pipeline"), "RVC_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "rvc_pipeline.cli", step, "--spec", str(spec), "--json",
                           "--shard", shard], env=env, capture_output=True, text=True, timeout=600)


def assert_same_outputs(s3: S3Endpoint, a: str, b: str) -> None:
    names = outputs(s3, a)
    assert names == outputs(s3, b)
    counts = {d: sum(k.startswith(d + "/") for k in names) for d in OUTPUT_DIRS}
    assert len(set(counts.values())) == 1 and counts[layout.GT_WAVS_DIR] >= 6, counts  # a file per piece
    for k in sorted(names):
        x, y = body(s3, a, k), body(s3, b, k)
        if k.endswith(".npy"):
            xa, ya = np.load(io.BytesIO(x)), np.load(io.BytesIO(y))
            assert xa.dtype == ya.dtype and np.array_equal(xa, ya), k
        else:
            assert x == y, k


def run_two_shards(s3: S3Endpoint, spec: Path, exp: Experiment) -> dict[str, list[set[str]]]:
    """Every data step as shards 0/2 (in process) then 1/2 (preprocess: through the CLI); the outputs
    each shard added."""
    made: dict[str, list[set[str]]] = {}
    for step in DATA_STEPS:
        before = outputs(s3, exp.name)
        first = run_shard(exp, step, Shard(0, 2))
        assert first["complete"] is False and marker(s3, exp.name, step) is None  # not before both
        assert layout.shard_marker_name(step, 0, 2) in {k.split("/")[-1] for k in objects(s3, exp.name)}
        mid = outputs(s3, exp.name)
        if step == "preprocess":
            done = cli_shard(spec, step, "1/2")
            assert done.returncode == 0, done.stderr[-3000:]
            second = json.loads(done.stdout)[0]
        else:
            second = run_shard(exp, step, Shard(1, 2))
        assert second["complete"] is True and marker(s3, exp.name, step) is not None
        made[step] = [mid - before, outputs(s3, exp.name) - mid]
    return made


def test_two_shards_equal_the_unsharded_run_and_a_rerun_with_three_changes_nothing(
    tmp_path: Path, s3: S3Endpoint, voice_dir: Path
) -> None:
    a_spec, b_spec = (manifest(tmp_path, s3, voice_dir, n) for n in ("a", "b"))
    a, b = load_manifest(a_spec), load_manifest(b_spec)
    run_steps(a, list(DATA_STEPS))
    made = run_two_shards(s3, b_spec, b)
    for step, (s0, s1) in made.items():
        assert s0 and s1 and not s0 & s1, step  # disjoint, non-empty
    assert {k.split("/")[1].split("_")[0] for k in made["preprocess"][0]} == {"0", "2"}  # idx0 % 2 == 0
    assert_same_outputs(s3, "a", "b")

    ma, mb = marker(s3, "a", "preprocess"), marker(s3, "b", "preprocess")
    assert ma is not None and mb is not None and mb["shards"] == 2
    assert dataset_from_summary(ma) == dataset_from_summary(mb) is not None
    for k in ("files_total", "files_used", "files_skipped", "pieces", "piece_seconds", "input_seconds",
              "dataset_digest", "skipped_files"):
        assert ma[k] == mb[k], k
    ra, rb = (json.loads(body(s3, e, "preprocess.json")) for e in "ab")
    assert {k: v for k, v in ra.items() if k != "wall_seconds"} == {k: v for k, v in rb.items()
                                                                     if k != "wall_seconds"}
    assert body(s3, "a", "preprocess.log") == body(s3, "b", "preprocess.log")  # written once, the same
    assert body(s3, "a", layout.DATASET_MANIFEST_FILE) == body(s3, "b", layout.DATASET_MANIFEST_FILE)
    fa, fb = marker(s3, "a", "f0"), marker(s3, "b", "f0")
    assert fa and fb and (fa["files"], fa["frames"], fa["voiced_ratio"]) == (fb["files"], fb["frames"],
                                                                              fb["voiced_ratio"])

    # another N on the finished experiment: every shard skips, not an object rewritten or deleted
    before = objects(s3, "b")
    for step in DATA_STEPS:
        for i in range(3):
            assert run_shard(b, step, Shard(i, 3)).get("skipped") is True
    assert objects(s3, "b") == before

    # without the features markers, 3 shards resume from the 2 shards' files: nothing recomputed
    c = s3.client()
    for k in [k for k in before if k.startswith(".rvc/features.") and k.endswith(".done.json")]:
        c.delete_object(Bucket=s3.bucket, Key=f"runs/logs/b/{k}")
    runs = [run_shard(b, "features", Shard(i, 3)) for i in range(3)]
    assert [r["files_written"] for r in runs] == [0, 0, 0] and all(r["files_total"] > 0 for r in runs)
    assert [r["complete"] for r in runs] == [False, False, True]
    after = objects(s3, "b")
    assert {k: after[k] for k in outputs(s3, "b")} == {k: before[k] for k in outputs(s3, "b")}
    assert outputs(s3, "b") == {k for k in before if k.split("/")[0] in OUTPUT_DIRS}
    assert marker(s3, "b", "features")["shards"] == 3  # type: ignore[index]
    assert_same_outputs(s3, "a", "b")


def test_a_failed_shard_rerun_alone_completes_and_stale_shard_markers_do_not_count(
    tmp_path: Path, s3: S3Endpoint, voice_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = load_manifest(manifest(tmp_path, s3, voice_dir, "c"))
    run_steps(exp, ["preprocess"])
    run_shard(exp, "f0", Shard(0, 2))
    # an old shard 1 marker (another spec): it must not complete the step
    stale = layout.shard_marker_key("c", "f0", 1, 2)
    s3.client().put_object(Bucket=s3.bucket, Key=f"runs/{stale}",
                           Body=json.dumps({"inputs_hash": "0123456789abcdef", "shard": 1}).encode())
    again = run_shard(exp, "f0", Shard(0, 2))
    assert again["complete"] is False and marker(s3, "c", "f0") is None

    # shard 1 dies after its first file (a crash, not a SIGTERM): what it finished is stored
    real, calls = f0step.compute_f0_batch, []

    def flaky(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("node lost")
        return real(*args, **kw)

    monkeypatch.setattr(f0step, "compute_f0_batch", flaky)
    with pytest.raises(Exception, match="node lost"):
        run_shard(exp, "f0", Shard(1, 2))
    assert marker(s3, "c", "f0") is None
    monkeypatch.setattr(f0step, "compute_f0_batch", real)
    done = run_shard(exp, "f0", Shard(1, 2))  # the failed shard alone
    assert done["complete"] is True and done["resumed"] == 1 and done["computed"] == done["files"] - 1
    total = marker(s3, "c", "f0")
    coarse = {k for k in outputs(s3, "c") if k.startswith(layout.F0_COARSE_DIR + "/")}
    assert total is not None and total["files"] == len(coarse)


@pytest.mark.parametrize("argv,needle", [
    (["f0", "--shard", "2/2"], "--shard '2/2': need 0 <= I < N"),
    (["f0", "--shard=-1/2"], "--shard '-1/2'"),
    (["f0", "--shard", "0/0"], "--shard '0/0'"),
    (["f0", "--shard", "x"], "--shard 'x': expected I/N"),
    (["f0", "--shard", "1/65"], "--shard '1/65'"),
    (["features", "--shard", "0/2/3"], "--shard '0/2/3'"),
    (["train", "--shard", "0/2"], "--shard: step 'train' cannot be sharded"),
    (["index", "--shard", "0/2"], "--shard: step 'index' cannot be sharded"),
    (["run", "--shard", "0/2"], "--shard: step 'run' cannot be sharded"),
    (["preprocess", "--force", "--shard", "0/2"], "--shard cannot be combined with --force"),
])
def test_bad_shard_arguments_are_refused_in_one_line(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "exp.yaml"
    spec.write_text("kind: RVCExperiment\nmetadata: {name: a}\nspec:\n  dataset: {source: d}\n"
                    f"  storage: {{uri: {tmp_path / 'store'}}}\n")
    code = cli.main([*argv[:1], "--spec", str(spec), *argv[1:]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_BAD_INPUT and len(err) == 1 and err[0].startswith("error: "), err
    assert needle in err[0]
    assert not (tmp_path / "store").exists()  # refused before anything was written


def test_local_shards_delete_only_their_own_files_and_wait_for_shard_0_after_a_spec_change(
    tmp_path: Path, voice_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def local(method: str) -> Experiment:
        doc = {"metadata": {"name": "l"}, "spec": {
            "dataset": {"source": str(voice_dir)}, "storage": {"uri": str(tmp_path / "store")},
            "resources": {"device": "cpu", "parallelism": 1}, "f0": {"method": method}}}
        return load_manifest(_write(tmp_path / f"{method}.yaml", doc))

    exp = local("pm")
    run_steps(exp, ["preprocess"])
    exp_dir = tmp_path / "store" / "logs" / "l"
    pieces = sorted(p.name for p in (exp_dir / layout.WAVS_16K_DIR).glob("*.wav"))
    nsf = exp_dir / layout.F0_NSF_DIR
    nsf.mkdir()
    partial = {i: nsf / f".999.x{i}.{pieces[i]}.npy.partial" for i in (0, 1)}  # of shard 0's, shard 1's
    for p in partial.values():
        p.write_bytes(b"half")
    monkeypatch.setenv("RVC_SHARD_WAIT", "1")
    with pytest.raises(Exception, match="waited 1 s for shard 0"):  # shard 1 alone, before shard 0
        run_shard(exp, "f0", Shard(1, 2))
    assert partial[0].exists() and partial[1].exists() and not list(nsf.glob("*.npy"))
    run_shard(exp, "f0", Shard(0, 2))  # starts the run: clears the step's files (shard 1 waits meanwhile)
    assert not partial[0].exists() and not partial[1].exists()
    assert sorted(p.name for p in nsf.glob("*.npy")) == [n + ".npy" for n in pieces[0::2]]
    assert run_shard(exp, "f0", Shard(1, 2))["complete"] is True
    before = {p.name: p.read_bytes() for p in nsf.glob("*.npy")}
    assert len(before) == len(pieces)

    # the same run again without markers (a retry): each shard removes only its own partial files
    for m in (exp_dir / ".rvc").glob("f0.*done.json"):
        m.unlink()
    for p in partial.values():
        p.write_bytes(b"half")
    assert run_shard(exp, "f0", Shard(0, 2))["computed"] == 0
    assert not partial[0].exists() and partial[1].exists()
    assert run_shard(exp, "f0", Shard(1, 2))["computed"] == 0 and not partial[1].exists()
    assert {p.name: p.read_bytes() for p in nsf.glob("*.npy")} == before

    # another method: shard 1 must neither reuse nor delete the old files before shard 0 started over
    dio = local("dio")
    with pytest.raises(Exception, match="waited 1 s for shard 0"):
        run_shard(dio, "f0", Shard(1, 2))
    assert {p.name: p.read_bytes() for p in nsf.glob("*.npy")} == before
    run_shard(dio, "f0", Shard(0, 2))  # clears every pm file, makes its own
    assert sorted(p.name for p in nsf.glob("*.npy")) == [n + ".npy" for n in pieces[0::2]]
    assert run_shard(dio, "f0", Shard(1, 2))["complete"] is True
    after = {p.name: p.read_bytes() for p in nsf.glob("*.npy")}
    assert set(after) == set(before) and all(after[n] != before[n] for n in after)


def _write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def test_shard_names_and_ownership() -> None:
    name = layout.shard_marker_name("f0", 3, 12)
    assert name == "f0.shard-3-of-12.done.json" and layout.shard_of_marker(name) == ("f0", 3, 12)
    assert layout.shard_marker_key("x", "f0", 3, 12) == "logs/x/.rvc/f0.shard-3-of-12.done.json"
    for bad in ("f0.done.json", "f0.shard-1-of-2.done.json.tmp", "f0.shard-x-of-2.done.json", "12.json"):
        assert layout.shard_of_marker(bad) is None
    assert layout.step_of_marker(name) not in DATA_STEPS  # the operator never takes it for a step marker
    for n in (1, 2, 3, 7):
        owners = [[i for i in range(n) if Shard(i, n).owns(pos)] for pos in range(50)]
        assert all(len(o) == 1 for o in owners)  # every input has exactly one shard
    assert Shard.parse(" 1/2 ") == Shard(1, 2) and str(Shard(1, 2)) == "shard 1/2"


def test_shards_keep_each_others_progress_lines(tmp_path: Path, s3: S3Endpoint) -> None:
    from rvc_pipeline.progress import Reporter
    from rvc_pipeline.stepio import open_artifacts
    from rvc_pipeline.steps.runner import StepContext

    exp = load_manifest(manifest(tmp_path, s3, tmp_path, "g"))
    storage = open_artifacts(exp)
    work = tmp_path / "work"
    ctx = StepContext(exp, "f0", storage, work, Reporter(work / "logs" / "g", "g", "f0"), 1,
                      shard=Shard(1, 2))
    key = layout.progress_key("g")
    other = b'{"step": "f0", "event": "progress", "shard": 0, "files_done": 1}\n'
    storage.write_bytes(key, other)  # shard 0 pushed after this shard pulled
    ctx.reporter.event("progress", files_done=1, files_total=3, shard=1, shards=2)
    ctx.push_progress()
    lines = storage.read_bytes(key).splitlines()
    assert lines[0] == other.strip() and json.loads(lines[1])["shard"] == 1 and len(lines) == 2
    storage.write_bytes(key, other + other.replace(b'"files_done": 1', b'"files_done": 2'))  # ours lost
    ctx.push_progress()  # ... and back with the next push
    assert [json.loads(x).get("shard") for x in storage.read_bytes(key).splitlines()] == [0, 0, 1]
