#!/usr/bin/env bash
# The whole test suite: set-up (idempotent), lint, CRD drift check, unit + integration tests, and the
# real-cluster e2e tier (builds/caches a single-node Kubernetes, Docker images and a wheelhouse under
# ${RVC_CACHE_DIR:-~/.cache/rvc-operator}). RVC_SKIP_E2E=1 skips only the e2e tier, loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" RVC_NO_PROGRESS=1 PYTHONUNBUFFERED=1
echo "== lint (ruff)"
ruff check .
# the restructured parts (issue 9): typed, and no function over McCabe 10; the rest follows as it moves
STRICT=(pipeline/rvc_pipeline/core pipeline/rvc_pipeline/steps pipeline/rvc_pipeline/components
        pipeline/rvc_pipeline/evaluation operator/rvc_operator)
echo "== complexity (ruff C901, max 10) on ${STRICT[*]}"
ruff check --select C901 --config 'lint.mccabe.max-complexity=10' "${STRICT[@]}"
echo "== types (mypy) on ${STRICT[*]}"
mypy "${STRICT[@]}"
echo "== CRD is generated from the spec"
for f in crds/rvcexperiments.yaml charts/rvc-operator/crds/rvcexperiments.yaml; do
  python -m rvc_operator.crd | diff -u "$f" - \
    || { echo "$f is stale: run 'python -m rvc_operator.crd | tee $f'"; exit 1; }
done
for f in crds/rvcexperiments-cel.yaml charts/rvc-operator/files/rvcexperiments-cel.yaml; do
  python -m rvc_operator.crd --cel | diff -u "$f" - \
    || { echo "$f is stale: run 'python -m rvc_operator.crd --cel | tee $f'"; exit 1; }
done
echo "== unit + integration tests"
rc=0
pytest -q -p no:cacheprovider tests/unit tests/integration "$@" || rc=$?
[ "$rc" = 5 ] && { echo "no tests collected"; exit 1; }
if [ "$rc" != 0 ]; then exit "$rc"; fi
if [ "${RVC_SKIP_E2E:-0}" = 1 ]; then
  echo "== e2e tier SKIPPED because RVC_SKIP_E2E=1"
else
  echo "== e2e tests (real single-node Kubernetes)"
  pytest -q -p no:cacheprovider -s tests/e2e || exit $?
fi
echo "== all tests passed in $(( $(date +%s) - t0 )) s"
