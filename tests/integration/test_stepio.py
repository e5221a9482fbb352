"""The step I/O shell (run_step, StepContext) on a real S3 API: pull, push, markers, skips, crashes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from rvc_pipeline import stepio
from rvc_pipeline.core.layout import PROGRESS_FILE, marker_key
from rvc_pipeline.core.spec import DEFAULT_STEPS, STEP_ORDER, Experiment, parse_manifest
from rvc_pipeline.core.storage import S3Storage, Storage
from rvc_pipeline.progress import read_events
from rvc_pipeline.stepio import invalidate_from, is_complete
from rvc_pipeline.steps import index as index_step
from rvc_pipeline.steps.runner import StepContext, run_step

from tests.s3server import S3Endpoint

EXP = "alice"


def _exp(s3: S3Endpoint, **spec: Any) -> Experiment:
    return parse_manifest({
        "apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment", "metadata": {"name": EXP},
        "spec": {"dataset": {"source": s3.uri("voices")},
                 "storage": {"uri": s3.uri("runs"), "endpoint": s3.url},
                 "resources": {"device": "cpu", "parallelism": 1}, **spec},
    })


def _keys(s3: S3Endpoint, prefix: str = "runs/") -> dict[str, bytes]:
    c = s3.client()
    out = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix):]] = c.get_object(Bucket=s3.bucket, Key=o["Key"])["Body"].read()
    return out


def _put(s3: S3Endpoint, key: str, data: bytes) -> None:
    s3.client().put_object(Bucket=s3.bucket, Key=f"runs/{key}", Body=data)


class Recorder:
    """Wraps a Storage, records every write (upload/write_bytes/delete) in order; can fail an upload."""

    def __init__(self, inner: Storage, fail_after_uploads: int | None = None):
        self.inner = inner
        self.uri = inner.uri
        self.ops: list[tuple[str, str]] = []
        self.uploads = 0
        self.fail_after = fail_after_uploads

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def upload(self, src: Path, key: str) -> None:
        if self.fail_after is not None and self.uploads >= self.fail_after:
            raise ConnectionResetError(f"simulated network failure while uploading {key}")
        self.uploads += 1
        self.inner.upload(src, key)
        self.ops.append(("upload", key))

    def write_bytes(self, key: str, data: bytes) -> None:
        self.inner.write_bytes(key, data)
        self.ops.append(("write", key))

    def delete(self, key: str) -> None:
        self.inner.delete(key)
        self.ops.append(("delete", key))


class Recorders:
    """Opens run_step's storage through a Recorder; `made` holds one Recorder per run."""

    def __init__(self) -> None:
        self.made: list[Recorder] = []
        self.fail_after: int | None = None


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorders:
    recs = Recorders()
    real = stepio.open_artifacts

    def wrapped(exp: Experiment) -> Storage:
        r = Recorder(real(exp), recs.fail_after)
        recs.made.append(r)
        return r  # type: ignore[return-value]

    monkeypatch.setattr(stepio, "open_artifacts", wrapped)
    return recs


def toy_step(calls: list[str]) -> Any:
    """A step like the real ones: pull `in/`, write one output per input plus a summary file, push."""

    def run(ctx: StepContext) -> dict[str, Any]:
        calls.append(str(ctx.workdir))
        ctx.pull("in")
        files = sorted((ctx.exp_dir / "in").glob("*.txt"))
        out = ctx.exp_dir / "out"
        out.mkdir(parents=True, exist_ok=True)
        for f in files:
            (out / f.name).write_text(f.read_text().upper())
        (ctx.exp_dir / "toy.json").write_text(json.dumps({"n": len(files)}))
        ctx.push("out", "toy.json")
        return {"files": len(files)}

    return run


# ---------------------------------------------------------------- the happy path


def test_run_step_pulls_pushes_and_writes_marker_last(s3: S3Endpoint, recorder: Recorders,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    monkeypatch.setenv("RVC_SCRATCH", str(tmp_path / "scratch"))
    for i in range(5):
        _put(s3, f"logs/{EXP}/in/{i}.txt", f"piece {i}".encode())
    calls: list[str] = []
    summary = run_step(_exp(s3), "f0", toy_step(calls))
    assert summary["files"] == 5 and summary["step"] == "f0" and summary["experiment"] == EXP
    stored = _keys(s3)
    for i in range(5):
        assert stored[f"logs/{EXP}/out/{i}.txt"] == f"PIECE {i}".encode()
    assert json.loads(stored[f"logs/{EXP}/toy.json"]) == {"n": 5}
    marker = json.loads(stored[marker_key(EXP, "f0")])
    assert marker["files"] == 5 and marker["seconds"] >= 0
    # order of writes: the marker is the very last one, after every output and the progress log
    writes = [k for op, k in recorder.made[0].ops if op in ("upload", "write")]
    assert writes[-1] == marker_key(EXP, "f0")
    assert set(writes[:-1]) == {f"logs/{EXP}/out/{i}.txt" for i in range(5)} | {
        f"logs/{EXP}/toy.json", f"logs/{EXP}/{PROGRESS_FILE}"}
    # the scratch folder is gone
    assert calls and not Path(calls[0]).exists()
    assert list((tmp_path / "scratch").iterdir()) == []


def test_second_run_skips_and_force_reruns(s3: S3Endpoint) -> None:
    _put(s3, f"logs/{EXP}/in/a.txt", b"a")
    calls: list[str] = []
    first = run_step(_exp(s3), "f0", toy_step(calls))
    second = run_step(_exp(s3), "f0", toy_step(calls))
    assert len(calls) == 1
    assert second["skipped"] is True and second["files"] == first["files"] == 1
    third = run_step(_exp(s3), "f0", toy_step(calls), force=True)
    assert len(calls) == 2 and "skipped" not in third


def test_progress_log_accumulates_over_steps(s3: S3Endpoint) -> None:
    _put(s3, f"logs/{EXP}/in/a.txt", b"a")
    for step in ("preprocess", "f0", "features"):
        run_step(_exp(s3), step, toy_step([]))
    log = _keys(s3)[f"logs/{EXP}/{PROGRESS_FILE}"].decode().splitlines()
    events = [(e["step"], e["event"]) for e in map(json.loads, log)]
    assert events == [(s, ev) for s in ("preprocess", "f0", "features") for ev in ("start", "done")]


# ---------------------------------------------------------------- failures


def test_failing_step_leaves_no_marker_and_keeps_other_outputs(s3: S3Endpoint, tmp_path: Path) -> None:
    _put(s3, f"logs/{EXP}/in/a.txt", b"a")
    run_step(_exp(s3), "preprocess", toy_step([]))
    before = _keys(s3)
    assert marker_key(EXP, "preprocess") in before

    def broken(ctx: StepContext) -> dict[str, Any]:
        ctx.pull("in")
        (ctx.exp_dir / "half.bin").write_bytes(b"x")
        raise ValueError("no voiced frames in 0_0.wav")

    with pytest.raises(ValueError, match="no voiced frames"):
        run_step(_exp(s3), "f0", broken)
    after = _keys(s3)
    assert marker_key(EXP, "f0") not in after
    assert f"logs/{EXP}/half.bin" not in after  # never pushed
    for k, v in before.items():  # the earlier step's outputs and marker are untouched
        if k != f"logs/{EXP}/{PROGRESS_FILE}":
            assert after[k] == v, k
    (tmp_path / PROGRESS_FILE).write_bytes(after[f"logs/{EXP}/{PROGRESS_FILE}"])
    events = read_events(tmp_path / PROGRESS_FILE, step="f0")
    assert [e["event"] for e in events] == ["start", "failed"]
    assert "no voiced frames in 0_0.wav" in events[-1]["error"]


def test_crash_in_the_middle_of_push_leaves_no_marker_and_rerun_redoes_it(
    s3: S3Endpoint, recorder: Recorders
) -> None:
    for i in range(6):
        _put(s3, f"logs/{EXP}/in/{i}.txt", f"p{i}".encode())
    recorder.fail_after = 2
    calls: list[str] = []
    with pytest.raises(ConnectionResetError, match="simulated network failure"):
        run_step(_exp(s3), "features", toy_step(calls))
    half = _keys(s3)
    outs = [k for k in half if k.startswith(f"logs/{EXP}/out/")]
    assert 0 < len(outs) < 6  # really stopped half way
    assert marker_key(EXP, "features") not in half
    st = S3Storage(s3.uri("runs"), endpoint=s3.url)
    assert not is_complete(st, EXP, "features")

    recorder.fail_after = None
    summary = run_step(_exp(s3), "features", toy_step(calls))
    assert len(calls) == 2 and "skipped" not in summary and summary["files"] == 6
    done = _keys(s3)
    assert sorted(k for k in done if k.startswith(f"logs/{EXP}/out/")) == [
        f"logs/{EXP}/out/{i}.txt" for i in range(6)]
    assert is_complete(st, EXP, "features")
    # the rerun uploaded only what the crash left out or different (identical objects are skipped)
    uploaded = {k for op, k in recorder.made[-1].ops if op == "upload" and "/out/" in k}
    assert uploaded == {f"logs/{EXP}/out/{i}.txt" for i in range(6)} - set(outs)


# ---------------------------------------------------------------- markers


def test_invalidate_from_removes_this_and_later_markers(s3: S3Endpoint) -> None:
    st = S3Storage(s3.uri("runs"), endpoint=s3.url)
    for step in STEP_ORDER:
        st.write_bytes(marker_key(EXP, step), b"{}")
        st.write_bytes(marker_key("bob", step), b"{}")
    invalidate_from(st, EXP, "features")
    assert [is_complete(st, EXP, s) for s in STEP_ORDER] == [True, True, False, False, False, False]
    assert all(is_complete(st, "bob", s) for s in STEP_ORDER)  # other experiments untouched


def test_rerunning_an_early_step_invalidates_later_ones(s3: S3Endpoint) -> None:
    _put(s3, f"logs/{EXP}/in/a.txt", b"a")
    for step in ("preprocess", "f0", "features"):
        run_step(_exp(s3), step, toy_step([]))
    st = S3Storage(s3.uri("runs"), endpoint=s3.url)
    run_step(_exp(s3), "f0", toy_step([]), force=True)
    assert is_complete(st, EXP, "preprocess") and is_complete(st, EXP, "f0")
    assert not is_complete(st, EXP, "features")


# ---------------------------------------------------------------- push/pull content checks


def test_rerun_replaces_outputs_of_the_same_size(s3: S3Endpoint) -> None:
    """Features of a rerun have the same shape, hence the same size, as the old ones: they must still be
    uploaded (push compares the ETag, not only the size)."""
    _put(s3, f"logs/{EXP}/in/a.txt", b"abc")
    run_step(_exp(s3), "f0", toy_step([]))
    assert _keys(s3)[f"logs/{EXP}/out/a.txt"] == b"ABC"
    _put(s3, f"logs/{EXP}/in/a.txt", b"xyz")
    run_step(_exp(s3), "f0", toy_step([]), force=True)
    assert _keys(s3)[f"logs/{EXP}/out/a.txt"] == b"XYZ"


def test_pull_into_a_reused_workdir_refreshes_changed_files(s3: S3Endpoint, tmp_path: Path) -> None:
    _put(s3, f"logs/{EXP}/in/a.txt", b"old")
    wd = tmp_path / "work"
    run_step(_exp(s3), "f0", toy_step([]), workdir=wd)
    assert (wd / "logs" / EXP / "in" / "a.txt").read_bytes() == b"old"
    _put(s3, f"logs/{EXP}/in/a.txt", b"new")  # same size, new content
    run_step(_exp(s3), "f0", toy_step([]), workdir=wd, force=True)
    assert (wd / "logs" / EXP / "in" / "a.txt").read_bytes() == b"new"
    assert _keys(s3)[f"logs/{EXP}/out/a.txt"] == b"NEW"


@pytest.mark.parametrize("mirror", [False, True])
def test_push_mirror_removes_stale_outputs(s3: S3Endpoint, mirror: bool) -> None:
    for name in ("a", "b", "c"):
        _put(s3, f"logs/{EXP}/in/{name}.txt", name.encode())
    run_step(_exp(s3), "preprocess", toy_step([]))
    s3.client().delete_object(Bucket=s3.bucket, Key=f"runs/logs/{EXP}/in/c.txt")

    def step(ctx: StepContext) -> dict[str, Any]:
        ctx.pull("in")
        out = ctx.exp_dir / "out"
        out.mkdir()
        for f in sorted((ctx.exp_dir / "in").glob("*.txt")):
            (out / f.name).write_text(f.read_text())
        ctx.push("out", mirror=mirror)
        return {}

    run_step(_exp(s3), "preprocess", step, force=True)
    outs = sorted(k for k in _keys(s3) if k.startswith(f"logs/{EXP}/out/"))
    want = ["a.txt", "b.txt"] if mirror else ["a.txt", "b.txt", "c.txt"]
    assert outs == [f"logs/{EXP}/out/{n}" for n in want]


# ---------------------------------------------------------------- a real step on S3


def test_index_step_on_s3(s3: S3Endpoint) -> None:
    rng = np.random.default_rng(0)
    c = s3.client()
    feats = []
    for i, n in enumerate([120, 80, 200]):
        a = rng.standard_normal((n, 768)).astype(np.float32)
        feats.append(a)
        buf = _npy_bytes(a)
        c.put_object(Bucket=s3.bucket, Key=f"runs/logs/{EXP}/3_feature768/{i}_0.npy", Body=buf)
    summary = run_step(_exp(s3), "index", index_step.run)
    assert summary["vectors"] == 400 and summary["n_ivf"] == 10
    stored = _keys(s3)
    names = ["total_fea.npy", "trained_IVF10_Flat_nprobe_1_alice_v2.index",
             "added_IVF10_Flat_nprobe_1_alice_v2.index"]
    for n in names:
        assert f"logs/{EXP}/{n}" in stored
    assert json.loads(stored[marker_key(EXP, "index")])["files"] == names
    total = np.load(_as_file(stored[f"logs/{EXP}/total_fea.npy"]))
    raw = stored[f"logs/{EXP}/added_IVF10_Flat_nprobe_1_alice_v2.index"]
    added = faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8))
    assert added.ntotal == 400 and faiss.extract_index_ivf(added).nprobe == 1
    np.testing.assert_array_equal(added.reconstruct_n(0, 400), total)
    allf = np.concatenate(feats)
    np.testing.assert_array_equal(np.sort(total, axis=0), np.sort(allf, axis=0))


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def _as_file(data: bytes) -> Any:
    import io

    return io.BytesIO(data)


def test_rerun_of_an_early_step_clears_resumable_outputs_of_later_steps(s3: S3Endpoint) -> None:
    """f0/features skip files whose outputs exist; after preprocess reruns, those outputs are stale."""
    exp = _exp(s3)
    base = f"logs/{EXP}"
    for key in ("2a_f0/0_0.wav.npy", "2b-f0nsf/0_0.wav.npy", "3_feature768/0_0.npy", "G_10.pth"):
        _put(s3, f"{base}/{key}", b"old")

    def noop(ctx: StepContext) -> dict[str, Any]:
        return {}

    run_step(exp, "preprocess", noop)
    left = set(_keys(s3))
    assert not any("/2a_f0/" in k or "/2b-f0nsf/" in k or "/3_feature768/" in k for k in left)
    assert f"{base}/G_10.pth" in left  # checkpoints are never deleted by a rerun

    _put(s3, f"{base}/3_feature768/0_0.npy", b"partial")
    run_step(exp, "features", noop)  # not forced: a resume keeps the step's own finished files
    assert f"{base}/3_feature768/0_0.npy" in _keys(s3)
    run_step(exp, "features", noop, force=True)  # forced: everything is recomputed
    assert f"{base}/3_feature768/0_0.npy" not in _keys(s3)


def test_only_rank_zero_writes_markers(s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    exp = _exp(s3)
    monkeypatch.setenv("RANK", "1")
    assert run_step(exp, "train", lambda ctx: {"rank": 1}) == {"rank": 1}
    assert not any(k.endswith("train.done.json") or k.endswith(PROGRESS_FILE) for k in _keys(s3))
    monkeypatch.setenv("RANK", "0")
    run_step(exp, "train", lambda ctx: {})
    assert is_complete(S3Storage(s3.uri("runs"), endpoint=s3.url), EXP, "train")


def test_spec_change_reruns_the_affected_step_and_later_ones(s3: S3Endpoint) -> None:
    """The marker records a hash of the spec fields the step depends on (core.spec.STEP_INPUTS)."""
    calls: list[str] = []

    def rec(ctx: StepContext) -> dict[str, Any]:
        calls.append(f"{ctx.step}:{ctx.spec.f0.method}")
        return {}

    for s in DEFAULT_STEPS:
        run_step(_exp(s3), s, rec)
    assert len(calls) == len(DEFAULT_STEPS)
    calls.clear()
    for s in DEFAULT_STEPS:  # same spec: everything is skipped
        assert run_step(_exp(s3), s, rec)["skipped"] is True
    assert calls == []
    _put(s3, f"logs/{EXP}/2a_f0/0_0.wav.npy", b"pm output")
    for s in DEFAULT_STEPS:  # f0 method changed: preprocess is kept, f0 and everything after it rerun
        run_step(_exp(s3, f0={"method": "harvest"}), s, rec)
    assert calls == ["f0:harvest", "features:harvest", "train:harvest", "index:harvest"]
    assert f"logs/{EXP}/2a_f0/0_0.wav.npy" not in _keys(s3)  # old pm output is not resumed from
    calls.clear()
    for s in DEFAULT_STEPS:  # a resources-only change reruns nothing
        run_step(_exp(s3, f0={"method": "harvest"}, resources={"device": "cpu", "parallelism": 2}), s, rec)
    assert calls == []


def test_writer_that_lost_its_lease_writes_no_marker(s3: S3Endpoint) -> None:
    """The lease is taken over while the step runs (a careless manual overwrite): the step's outputs may
    be half-pushed, but the marker that would declare them complete is never written."""
    from rvc_pipeline.lease import LeaseLost, LeaseRecord, hold, lease_key
    from rvc_pipeline.stepio import open_artifacts

    exp = _exp(s3)
    _put(s3, f"logs/{EXP}/in/a.txt", b"a")
    calls: list[str] = []
    inner = toy_step(calls)

    def step(ctx: Any) -> dict[str, Any]:
        s3.client().put_object(Bucket=s3.bucket, Key=f"runs/{lease_key(EXP)}",
                               Body=LeaseRecord.new("intruder", 60).to_bytes())
        time.sleep(1.2)  # the holder's next renewal (ttl/3 = 0.5 s) finds the lease gone
        return inner(ctx)

    with pytest.raises(LeaseLost, match="intruder"), hold(open_artifacts(exp), EXP, owner="me", ttl=1.5):
        run_step(exp, "f0", step)
    assert calls and f"logs/{EXP}/.rvc/f0.done.json" not in _keys(s3)
