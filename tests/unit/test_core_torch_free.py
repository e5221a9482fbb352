"""The torch-free core: every rvc_pipeline.core module imports without torch, numpy or any pipeline module
outside core (the operator image has none of them), and the one device rule needs no torch for 'cpu'."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import rvc_pipeline.core

CORE_MODULES = sorted(f"rvc_pipeline.core.{m.name}" for m in pkgutil.iter_modules(rvc_pipeline.core.__path__))

CHECK = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
from rvc_pipeline.core.fileio import pick_device
assert pick_device("cpu") == "cpu"
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "torchaudio", "faiss"))
outside = sorted(m for m in sys.modules if m.startswith("rvc_pipeline.")
                 and not m.startswith("rvc_pipeline.core"))
assert not heavy and not outside, (sorted({m.split('.')[0] for m in heavy}), outside)
"""


def test_every_core_module_imports_without_torch_or_the_rest_of_the_pipeline() -> None:
    assert {"rvc_pipeline.core.errors", "rvc_pipeline.core.fileio", "rvc_pipeline.core.storage",
            "rvc_pipeline.core.spec", "rvc_pipeline.core.catalog"} <= set(CORE_MODULES)
    r = subprocess.run([sys.executable, "-c", CHECK, *CORE_MODULES], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_check_itself_sees_torch() -> None:
    r = subprocess.run([sys.executable, "-c", CHECK, "rvc_pipeline.core.errors", "rvc_pipeline.checkpoints"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "'torch'" in r.stderr and "rvc_pipeline.checkpoints" in r.stderr


CLIENT_CHECK = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "torchaudio", "faiss", "kopf"))
assert not heavy, sorted({m.split('.')[0] for m in heavy})
"""


def test_every_client_module_imports_without_torch_numpy_or_kopf() -> None:
    import rvc_pipeline.client

    names = sorted(f"rvc_pipeline.client.{m.name}"
                   for m in pkgutil.iter_modules(rvc_pipeline.client.__path__))
    assert {f"rvc_pipeline.client.{m}" for m in ("cli", "commands", "kube", "overrides", "upload", "view")
            } <= set(names)
    r = subprocess.run([sys.executable, "-c", CLIENT_CHECK, *names], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    # the argparse half is loaded by every `rvc-pipeline` start (step pods too): no rich, no kubernetes
    only_cli = CLIENT_CHECK + "assert not {'rich', 'kubernetes'} & {m.split('.')[0] for m in sys.modules}\n"
    r = subprocess.run([sys.executable, "-c", only_cli, "rvc_pipeline.client.cli"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
