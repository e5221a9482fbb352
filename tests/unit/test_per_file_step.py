"""steps.runner.per_file_step: the one resumable per-file skeleton of f0 and features, on a toy step
(text "audio" in, one .npy per input out) through the real step shell and local storage."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rvc_pipeline.core.errors import StepFailed
from rvc_pipeline.core.spec import Experiment, parse_manifest
from rvc_pipeline.progress import read_events
from rvc_pipeline.steps.runner import FileProgress, PerFile, StepContext, per_file_step, run_step

IN, OUT, PARAMS = "1_16k_wavs", "2b-f0nsf", ".rvc/toy.params.json"


def _exp(root: Path) -> Experiment:
    return parse_manifest({
        "apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment", "metadata": {"name": "toy"},
        "spec": {"dataset": {"source": str(root / "data")}, "storage": {"uri": str(root / "store")},
                 "resources": {"device": "cpu", "parallelism": 1}},
    })


class Toy:
    """A per-file step: out/<name>.npy = the input's numbers times `scale`; fails on input `fail_on`."""

    def __init__(self, scale: int = 2, fail_on: str | None = None) -> None:
        self.scale, self.fail_on = scale, fail_on
        self.computed: list[str] = []

    def __call__(self, ctx: StepContext) -> dict[str, Any]:
        out = ctx.exp_dir / OUT
        pf = PerFile(IN, (OUT,), PARAMS, lambda: {"scale": self.scale},
                     lambda w: (out / (w.name + ".npy"),), select=lambda w: "spec" not in w.name)
        done = per_file_step(ctx, pf, self.process)
        return {"files": len(done.inputs), "computed": len(done.todo), "resumed": done.resumed}

    def process(self, inputs: list[Path], todo: list[Path], progress: FileProgress) -> None:
        for w in progress.bar(todo, total=len(todo), desc="toy"):
            if w.name == self.fail_on:
                raise RuntimeError(f"killed at {w.name}")
            x = np.array([float(v) for v in w.read_text().split()]) * self.scale
            np.save(w.parent.parent / OUT / (w.name + ".npy"), x)
            self.computed.append(w.name)
            progress.advance(1)


@pytest.fixture
def exp_dir(tmp_path: Path) -> Path:
    d = tmp_path / "store" / "logs" / "toy"
    (d / IN).mkdir(parents=True)
    for i in range(5):
        (d / IN / f"0_{i}.wav").write_text(f"{i} {i + 1}")
    return d


def test_resumes_after_a_kill_and_recomputes_when_made_another_way(tmp_path: Path, exp_dir: Path) -> None:
    exp = _exp(tmp_path)
    with pytest.raises(RuntimeError, match="killed at 0_3.wav"):
        run_step(exp, "f0", Toy(fail_on="0_3.wav"))
    assert sorted(p.name for p in (exp_dir / OUT).iterdir()) == [f"0_{i}.wav.npy" for i in range(3)]
    (exp_dir / OUT / "0_4.wav.npy.partial").write_bytes(b"torn")  # a write cut by the kill
    toy = Toy()
    s = run_step(exp, "f0", toy)
    assert (s["files"], s["computed"], s["resumed"]) == (5, 2, 3) and toy.computed == ["0_3.wav", "0_4.wav"]
    assert not list(exp_dir.rglob("*.partial"))
    np.testing.assert_array_equal(np.load(exp_dir / OUT / "0_4.wav.npy"), [8.0, 10.0])
    assert json.loads((exp_dir / PARAMS).read_text()) == {"scale": 2}
    prog = [e for e in read_events(exp_dir / "progress.jsonl", "f0") if e["event"] == "progress"]
    assert prog[-2]["files_done"] == 3 and prog[-1]["files_done"] == prog[-1]["files_total"] == 5
    # made another way (a new setting): every output is recomputed, none is mixed in
    other = Toy(scale=3)
    s = run_step(exp, "f0", other, force=True)
    assert s["computed"] == 5 and len(other.computed) == 5
    np.testing.assert_array_equal(np.load(exp_dir / OUT / "0_0.wav.npy"), [0.0, 3.0])


def test_hostile_inputs_and_outputs(tmp_path: Path, exp_dir: Path) -> None:
    exp = _exp(tmp_path)
    (exp_dir / IN / "dir.wav").mkdir()  # a folder named like an input: not an input
    (exp_dir / IN / "0_9_spec.wav").write_text("1")  # RVC skips "spec" names
    (exp_dir / IN / "notes.txt").write_text("not audio")
    (exp_dir / ".rvc").mkdir()
    (exp_dir / PARAMS).write_text("{not json")  # a damaged record: start over, no crash
    (exp_dir / OUT).mkdir()
    (exp_dir / OUT / "0_0.wav.npy").write_bytes(b"stale")
    (exp_dir / OUT / "keep.txt").write_text("not ours")  # not an owned name: never deleted
    s = run_step(exp, "f0", Toy())
    assert (s["files"], s["computed"]) == (5, 5)
    assert (exp_dir / OUT / "keep.txt").read_text() == "not ours"
    assert not (exp_dir / OUT / "dir.wav.npy").exists() and not (exp_dir / OUT / "0_9_spec.wav.npy").exists()


def test_an_input_left_without_output_fails_naming_it(tmp_path: Path, exp_dir: Path) -> None:
    class Lazy(Toy):
        def process(self, inputs: list[Path], todo: list[Path], progress: FileProgress) -> None:
            super().process(inputs, [w for w in todo if w.name != "0_2.wav"], progress)

    with pytest.raises(StepFailed, match=r"f0: no output for 1 of 5 files: 0_2\.wav"):
        run_step(_exp(tmp_path), "f0", Lazy())


def test_no_inputs_and_a_linked_output_folder(tmp_path: Path, exp_dir: Path) -> None:
    exp = _exp(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.npy").write_bytes(b"x")
    os.symlink(elsewhere, exp_dir / OUT)
    with pytest.raises(StepFailed, match=f"{OUT}: is a symbolic link"):
        run_step(exp, "f0", Toy())
    assert (elsewhere / "precious.npy").exists()
    (exp_dir / OUT).unlink()
    for p in (exp_dir / IN).iterdir():
        p.unlink()
    with pytest.raises(StepFailed, match=f"no input files in {IN}/ of logs/toy .no .wav files"):
        run_step(exp, "f0", Toy())
