#!/usr/bin/env bash
# The prepared GPU check (issue 13): CUDA correctness checks, then throughput, one JSON report.
#   bash bench/gpu_check.sh [--dry-run] [--quick] [--out gpu_report.json] [--only a,b]
# Uses the python that has CUDA torch (PYTHON, else .venv/bin/python, else python3). Packages the
# project needs beyond torch (pydantic, faiss, pyworld, ...) come from wheels in ./.whl when that folder
# exists (a machine without internet: see bench/README.md), else they must be installed already.
# Exit: 0 all passed or unavailable, 1 a check failed (loudly, with the reason), 2 no CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/rvc-site \
    .whl/*.whl
  export PYTHONPATH="/tmp/rvc-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 RVC_NO_PROGRESS=1
exec "$py" bench/gpu_check.py "$@"
