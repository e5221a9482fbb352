"""steps.runner: the one is_primary() rule (torchrun's RANK and multi-node NODE_RANK) and the one
process-pool start-method rule; run_step on a non-primary node writes no marker and no event."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from rvc_pipeline import lease, stepio
from rvc_pipeline.core.spec import parse_manifest
from rvc_pipeline.stepio import is_complete, open_artifacts, run_step
from rvc_pipeline.steps import runner

RANK_CASES = [  # (RANK, NODE_RANK, primary); None = unset
    (None, None, True), ("0", None, True), ("", "", True), (" 0 ", "0\n", True), ("00", None, True),
    ("1", None, False), (None, "1", False), ("0", "2", False), ("3", "0", False), ("x", None, False),
    ("-0", None, False), ("1e0", None, False), (None, "0x0", False),
]


@pytest.mark.parametrize(("rank", "node_rank", "primary"), RANK_CASES)
def test_is_primary_one_rule(monkeypatch: pytest.MonkeyPatch, rank: str | None, node_rank: str | None,
                             primary: bool) -> None:
    for var, value in (("RANK", rank), ("NODE_RANK", node_rank)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    assert runner.is_primary() is primary
    assert lease.is_primary is runner.is_primary and stepio.is_primary is runner.is_primary


def test_start_method_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    linux = ["fork", "spawn", "forkserver"]
    monkeypatch.setattr(runner.multiprocessing, "get_all_start_methods", lambda: linux)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert runner.start_method() == "fork"
    assert runner.start_method(torch_workers=True) == "forkserver"
    monkeypatch.setitem(sys.modules, "torch", sys)  # torch loaded in this process: never fork
    assert runner.start_method() == "forkserver"
    monkeypatch.setattr(runner.multiprocessing, "get_all_start_methods", lambda: ["spawn"])  # macOS/Windows
    assert runner.start_method() == "spawn"


def test_process_pool_runs_jobs() -> None:
    with runner.process_pool(2) as pool:
        # builtins only: a forkserver/spawn worker cannot import a test module (pytest's importlib mode)
        pids = {f.result() for f in [pool.submit(os.getpid) for _ in range(8)]}
        assert sorted(pool.map(abs, [-3, 2, -1])) == [1, 2, 3]
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_multi_node_without_torchrun_writes_no_marker(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """NODE_RANK=1 (the documented multi-node mode, no torchrun: RANK unset) runs the step but owns
    nothing: no marker, no progress events; node 0 then completes it."""
    exp = parse_manifest({
        "apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment", "metadata": {"name": "nodes"},
        "spec": {"dataset": {"source": str(tmp_path / "data")}, "storage": {"uri": str(tmp_path / "store")},
                 "resources": {"device": "cpu", "parallelism": 1}},
    })
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("NODE_RANK", "1")
    assert run_step(exp, "train", lambda ctx: {"node": 1}) == {"node": 1}
    store = tmp_path / "store"
    assert not is_complete(open_artifacts(exp), "nodes", "train")
    assert not [p for p in store.rglob("*") if p.is_file() and p.name.endswith((".json", ".jsonl"))]
    monkeypatch.setenv("NODE_RANK", "0")
    assert run_step(exp, "train", lambda ctx: {"node": 0})["node"] == 0
    assert is_complete(open_artifacts(exp), "nodes", "train")
