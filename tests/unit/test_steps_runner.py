"""steps.runner: the one is_primary() rule (torchrun's RANK and multi-node NODE_RANK) and the one
process-pool start-method rule; run_step on a non-primary node writes no marker and no event."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rvc_pipeline import lease
from rvc_pipeline.core.spec import parse_manifest
from rvc_pipeline.stepio import is_complete, open_artifacts
from rvc_pipeline.steps import processes, runner
from rvc_pipeline.steps.runner import run_step

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
    assert lease.is_primary is runner.is_primary and processes.is_primary is runner.is_primary


def test_start_method_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    linux = ["fork", "spawn", "forkserver"]
    monkeypatch.setattr(processes.multiprocessing, "get_all_start_methods", lambda: linux)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert runner.start_method() == "fork"
    assert runner.start_method(torch_workers=True) == "forkserver"
    monkeypatch.setitem(sys.modules, "torch", sys)  # torch loaded in this process: never fork
    assert runner.start_method() == "forkserver"
    mp = processes.multiprocessing
    monkeypatch.setattr(mp, "get_all_start_methods", lambda: ["spawn"])  # macOS/Windows
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


def test_demo_and_steps_do_not_import_the_cli() -> None:
    """cli imports the runner and the demo, never the other way round (no cli <-> demo cycle): neither at
    import time (a fresh interpreter) nor inside a function (every import statement of the modules)."""
    import ast
    import subprocess

    code = ("import sys, rvc_pipeline.demo.run, rvc_pipeline.steps.runner, rvc_pipeline.stepio; "
            "print(sorted(m for m in sys.modules if m == 'rvc_pipeline.cli'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    pkg = Path(runner.__file__).parents[1]
    for path in [*pkg.joinpath("demo").glob("*.py"), *pkg.joinpath("steps").glob("*.py"), pkg / "stepio.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "rvc_pipeline.cli" or n.startswith("rvc_pipeline.cli.") for n in names), path
            if isinstance(node, ast.ImportFrom) and node.module == "rvc_pipeline":
                assert "cli" not in [a.name for a in node.names], path
    # the demo reaches the runner's run_steps itself
    import rvc_pipeline.demo.run as demo_run

    assert demo_run.run_steps is runner.run_steps


def test_processes_is_a_leaf() -> None:
    """steps.processes imports nothing of the project (lease and pool workers import it cheaply)."""
    import ast

    tree = ast.parse(Path(processes.__file__).read_text())
    mods = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    mods += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert mods and not [m for m in mods if m.startswith("rvc_pipeline")]


@pytest.mark.parametrize("workers", [1, 2])
def test_parallel_map_yields_every_item_once(workers: int) -> None:
    items = [-5, 3, -1, 0, 7, -2]
    got = list(runner.parallel_map(abs, iter(items), workers, in_flight=2))
    assert sorted(got) == sorted((i, abs(i)) for i in items)
    if workers == 1:
        assert got == [(i, abs(i)) for i in items]  # inline: in order


def test_parallel_map_draws_items_lazily_and_raises_worker_errors() -> None:
    drawn: list[int] = []

    def items() -> Iterator[int]:
        for i in range(100):
            drawn.append(i)
            yield i

    gen = runner.parallel_map(abs, items(), 2, in_flight=3)
    next(gen)
    assert len(drawn) <= 4  # at most in_flight submitted, plus the one that replaced the finished one
    gen.close()  # the consumer stops: the pool is shut down, nothing more is drawn
    assert len(drawn) <= 4
    with pytest.raises(ValueError, match="invalid literal"):
        list(runner.parallel_map(int, ["1", "x", "3"], 2))
    with pytest.raises(ValueError, match="invalid literal"):
        list(runner.parallel_map(int, ["1", "x", "3"], 1))
