#!/usr/bin/env bash
# Wheels that bench/gpu_check.sh needs on a GPU machine that has CUDA torch, transformers, numpy, scipy
# and yaml but no internet (e.g. the lent H200 image): downloaded here into ./.whl (git-ignored), then
# carried there; gpu_check.sh installs them into /tmp/rvc-site. Python 3.12, manylinux x86_64.
#   bash bench/gpu_wheels.sh [python-version]
set -euo pipefail
cd "$(dirname "$0")/.."
pyver="${1:-3.12}"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do plat+=(--platform "$p"); done
for pkg in pydantic pydantic-core annotated-types typing-inspection soundfile cffi pycparser faiss-cpu \
           pyworld praat-parselmouth torchfcpe boto3 botocore s3transfer jmespath; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    "${plat[@]}" -d .whl "$pkg" || { echo "gpu_wheels: no $pkg wheel for Python $pyver" >&2; exit 1; }
done
du -sh .whl
