"""The operator image has no torch and reaches the pipeline only through its torch-free core: importing any
operator module loads no torch and no rvc_pipeline module outside rvc_pipeline.core."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import rvc_operator

MODULES = sorted(f"rvc_operator.{m.name}" for m in pkgutil.iter_modules(rvc_operator.__path__))
ALLOWED = ("rvc_pipeline", "rvc_pipeline.core")

PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "rvc_pipeline"))))
"""


def _imported_by(*modules: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_every_operator_module_imports_only_the_core_and_no_torch() -> None:
    assert {"rvc_operator.handlers", "rvc_operator.status", "rvc_operator.progress_reader"} <= set(MODULES)
    loaded = _imported_by(*MODULES)
    outside = [m for m in loaded if m not in ALLOWED and not m.startswith("rvc_pipeline.core.")]
    assert outside == [], f"the operator imported {outside}"
    assert "rvc_pipeline.core.events" in loaded and "rvc_pipeline.core.layout" in loaded


def test_the_probe_sees_a_non_core_import() -> None:
    """The check above can fail: a pipeline module outside the core shows up in the probe's list."""
    assert "rvc_pipeline.progress" in _imported_by("rvc_pipeline.progress")
