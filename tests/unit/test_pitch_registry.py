"""The component catalog and the pitch registry: one file per method, found by name; what the spec, the
CLI, inference and the operator read from it; a catalog that stays torch-free; malformed declarations."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rvc_operator.jobs import step_uses_gpu
from rvc_pipeline import cli, infer
from rvc_pipeline.components.pitch import base
from rvc_pipeline.core import catalog
from rvc_pipeline.core.spec import SpecError, parse_manifest

RVC_METHODS = ("pm", "harvest", "dio", "crepe", "rmvpe")  # RVC's own, in its order


def test_every_method_file_is_listed_in_order() -> None:
    assert catalog.PITCH_METHODS[:5] == RVC_METHODS and "fcpe" in catalog.PITCH_METHODS
    files = {p.stem for p in Path(base.__file__).parent.glob("*.py")} - {"__init__", "base"}
    assert {c.module.rsplit(".", 1)[1] for c in catalog.PITCH.values()} == files
    gpu = {n for n, c in catalog.PITCH.items() if c.needs_gpu}
    assert gpu == {"crepe", "rmvpe", "fcpe"}
    assert catalog.PITCH["rmvpe"].weights == ("rmvpe.pt",)
    assert all(c.speed > 0 for c in catalog.PITCH.values())
    assert isinstance(catalog.EMBEDDERS, dict)


@pytest.mark.parametrize("name", catalog.PITCH_METHODS)
def test_each_name_resolves_to_its_class(name: str) -> None:
    method = base.get(name)
    assert isinstance(method, base.PitchMethod) and method.name == name
    assert type(method).__module__ == catalog.PITCH[name].module


def test_unknown_and_undeclared_names() -> None:
    with pytest.raises(ValueError, match=r"'yin': expected one of pm, harvest, dio, crepe, rmvpe, fcpe"):
        base.get("yin")
    for bad in ("", "PM", "pm ", "../pm"):
        with pytest.raises(ValueError, match="expected one of"):
            base.get(bad)
    with pytest.raises(LookupError, match="not declared in its file's CATALOG"):
        base.register("yin")(type("Yin", (base.PitchMethod,), {"extract": lambda self, c, p, **o: []}))
    assert "yin" not in base.REGISTRY


def test_cpu_methods_on_a_tone() -> None:
    t = np.arange(16000) / 16000
    x = (0.2 * sum(np.sin(2 * np.pi * k * 200.0 * t) / k for k in range(1, 5))).astype(np.float32)
    for name in ("pm", "harvest", "dio"):
        (f0,) = base.get(name).extract([x], [100])
        assert f0.shape == (100,) and abs(np.median(f0[f0 > 0]) - 200.0) < 2.0, name


# -- one new file is a new method -----------------------------------------------------------------


def _write(folder: Path, name: str, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)


def test_discover_reads_declarations_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    _write(tmp_path / "pitch", "yin.py", f"open({str(marker)!r}, 'w')\nimport torch\n"
           'CATALOG = {"yin": {"needs_gpu": False, "weights": [], "speed": 50.0}}\n')
    _write(tmp_path / "pitch", "swipe.py",
           'CATALOG: dict = {"swipe": {"needs_gpu": True, "weights": ["swipe.bin"], "speed": 2, '
           '"rank": 1}}\n')
    _write(tmp_path / "pitch", "helpers.py", "X = 1\n")  # no CATALOG: not a component
    found = catalog.discover("pitch", root=tmp_path)
    assert list(found) == ["swipe", "yin"]  # by rank, then name
    assert found["yin"] == catalog.Component("yin", "rvc_pipeline.components.pitch.yin", False, (), 50.0)
    assert found["swipe"].needs_gpu and found["swipe"].weights == ("swipe.bin",) and found["swipe"].rank == 1
    assert not marker.exists()
    assert catalog.discover("embedders", root=tmp_path) == {}


@pytest.mark.parametrize(("text", "error"), [
    ('CATALOG = ["yin"]', "must be a dict literal"),
    ('CATALOG = {"yin": {"needs_gpu": False, "weights": []}}', "needs needs_gpu, weights, speed"),
    ('CATALOG = {"yin": {"needs_gpu": False, "weights": [], "speed": 1, "color": 2}}', "needs needs_gpu"),
    ('CATALOG = {"yin": {"needs_gpu": False, "weights": "a.pt", "speed": 1}}', "list of file names"),
    ('CATALOG = {"yin": {"needs_gpu": False, "weights": [3], "speed": 1}}', "list of file names"),
    ('CATALOG = {"yin": {"needs_gpu": False, "weights": [], "speed": 0}}', "positive number"),
    ('CATALOG = {"yin": {"needs_gpu": False, "weights": [], "speed": "fast"}}', "positive number"),
    ('CATALOG = {"yin": {"needs_gpu": False, "weights": [], "speed": 1, "rank": 1.5}}', "integer"),
    ('CATALOG = {"bad name": {"needs_gpu": False, "weights": [], "speed": 1}}', "not a new identifier"),
    ('CATALOG = {"pm": {"needs_gpu": False, "weights": [], "speed": 1}}', "not a new identifier"),
    ('CATALOG = {"yin": "x"}', "needs needs_gpu"),
    ('CATALOG = {"yin": {"needs_gpu": "no", "weights": [], "speed": 1}}', "True or False"),
    ('CATALOG = {"yin": {"needs_gpu": False, "weights": [], "speed": True}}', "positive number"),
])
def test_malformed_declarations_are_refused(tmp_path: Path, text: str, error: str) -> None:
    _write(tmp_path / "pitch", "a.py", 'CATALOG = {"pm": {"needs_gpu": False, "weights": [], "speed": 1}}\n')
    _write(tmp_path / "pitch", "b.py", text + "\n")
    with pytest.raises(catalog.CatalogError, match=error) as err:
        catalog.discover("pitch", root=tmp_path)
    assert "b.py" in str(err.value)


def test_code_in_a_declaration_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "pitch", "a.py", 'CATALOG = {"yin": __import__("os").getcwd()}\n')
    with pytest.raises(ValueError, match="malformed"):
        catalog.discover("pitch", root=tmp_path)


def test_catalog_and_spec_stay_torch_free() -> None:
    code = ("import sys, rvc_pipeline.core.catalog, rvc_pipeline.core.spec; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy') "
            "or m.startswith('rvc_pipeline.components')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- what reads the catalog -------------------------------------------------------------------------


def _manifest(**f0: Any) -> dict[str, Any]:
    return {"metadata": {"name": "x"}, "spec": {
        "dataset": {"source": "/data"}, "storage": {"uri": "/store"}, "resources": {"device": "gpu"},
        "f0": f0}}


def test_spec_accepts_every_method_and_names_the_choices() -> None:
    for name in catalog.PITCH_METHODS:
        assert parse_manifest(_manifest(method=name)).spec.f0.method == name
    for bad in ("yin", "FCPE", "", 3):
        with pytest.raises(SpecError, match=r"f0\.method") as err:
            parse_manifest(_manifest(method=bad))
        assert "fcpe" in str(err.value)


def test_operator_gpu_decision_reads_the_catalog() -> None:
    for name in catalog.PITCH_METHODS:
        assert step_uses_gpu(parse_manifest(_manifest(method=name)), "f0") is catalog.PITCH[name].needs_gpu
    no_pitch = _manifest(method="fcpe")
    no_pitch["spec"]["model"] = {"pitchGuidance": False}
    assert step_uses_gpu(parse_manifest(no_pitch), "f0") is False
    assert catalog.pitch_needs_gpu("yin") is False


def test_cli_and_inference_offer_every_method(capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser()
    cli._add_infer_args(p)
    req = ["--model", "m.pth", "--input", "a.wav", "--output", "b.wav"]
    assert p.parse_args([*req, "--f0-method", "fcpe"]).f0_method == "fcpe"
    with pytest.raises(SystemExit):
        p.parse_args([*req, "--f0-method", "yin"])
    assert "fcpe" in capsys.readouterr().err
    assert infer.F0_METHODS == catalog.PITCH_METHODS
    with pytest.raises(infer.InferError, match="expected one of.*fcpe"):
        infer.check_options(f0_method="yin")
