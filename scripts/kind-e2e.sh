#!/usr/bin/env bash
# The Kind path, for users with Docker and internet (it cannot run in this project's CI, which has no
# registry access; the same test body runs there against a single-node cluster built from source).
#
#   scripts/kind-e2e.sh            create a Kind cluster, build + load the images, install MinIO and the
#                                  chart, upload a small voice set, apply the example experiment, wait,
#                                  and print where the model is (via tests/e2e/test_operator_e2e.py)
#   scripts/kind-e2e.sh down       delete the Kind cluster
#
# Needs: docker, kind, kubectl, helm on PATH, and `bash scripts/setup.sh` done (for the test runner).
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=${KIND_CLUSTER:-rvc}
NS=rvc-system
MINIO_IMAGE=${MINIO_IMAGE:-minio/minio:latest}

if [ "${1:-}" = down ]; then
  kind delete cluster --name "$CLUSTER"
  exit 0
fi
for t in docker kind kubectl helm; do
  command -v "$t" >/dev/null || { echo "kind-e2e: $t is required" >&2; exit 1; }
done
[ -x .venv/bin/pytest ] || bash scripts/setup.sh

t0=$(date +%s)
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s
kubectl config use-context "kind-$CLUSTER" >/dev/null
echo "kind-e2e: cluster ready in $(( $(date +%s) - t0 )) s"

t1=$(date +%s)
bash docker/build.sh --mode online operator pipeline-cpu
kind load docker-image --name "$CLUSTER" rvc-operator:dev rvc-pipeline-cpu:dev
echo "kind-e2e: images built and loaded in $(( $(date +%s) - t1 )) s"

# MinIO as the S3 server, in-cluster (Service minio.rvc-system:9000), reached from this host by port-forward.
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$NS" apply -f - <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: minio}
spec:
  selector: {matchLabels: {app: minio}}
  template:
    metadata: {labels: {app: minio}}
    spec:
      containers:
        - name: minio
          image: ${MINIO_IMAGE}
          args: [server, /data]
          env:
            - {name: MINIO_ROOT_USER, value: rvc-e2e}
            - {name: MINIO_ROOT_PASSWORD, value: rvc-e2e-secret}
          ports: [{containerPort: 9000}]
          readinessProbe: {httpGet: {path: /minio/health/ready, port: 9000}}
---
apiVersion: v1
kind: Service
metadata: {name: minio}
spec:
  selector: {app: minio}
  ports: [{port: 9000, targetPort: 9000}]
EOF
kubectl -n "$NS" rollout status deploy/minio --timeout=300s
kubectl -n "$NS" port-forward svc/minio 19000:9000 >/tmp/rvc-kind-portforward.log 2>&1 &
PF=$!
trap 'kill $PF 2>/dev/null || true' EXIT
sleep 3

# The same test body as the local-cluster e2e (tests/e2e/test_operator_e2e.py, shared code in
# tests/e2e/e2e_env.py), pointed at this cluster (external mode): it creates the bucket, installs the chart
# (which creates the credentials Secret from the AWS_* values below), uploads a generated voice set,
# applies a small CPU-fallback experiment with every step, deletes the operator pod and later the training
# pod on the way (the experiment must still succeed, resuming training from its checkpoint), checks the
# model and index in MinIO and prints where they are. Prometheus checks are skipped in this mode. The
# operator stays installed afterwards (helm uninstall rvc-operator -n $NS removes it).
export RVC_E2E_CLUSTER=external
export RVC_E2E_NAMESPACE=$NS
export RVC_E2E_S3_ENDPOINT_HOST=http://127.0.0.1:19000
export RVC_E2E_S3_ENDPOINT_POD=http://minio.$NS:9000
export RVC_E2E_BUCKET=${RVC_E2E_BUCKET:-rvc-e2e}
export AWS_ACCESS_KEY_ID=rvc-e2e AWS_SECRET_ACCESS_KEY=rvc-e2e-secret AWS_DEFAULT_REGION=us-east-1
export RVC_E2E_IMAGE_PULL_POLICY=Never
.venv/bin/pytest -q -s -p no:cacheprovider tests/e2e/test_operator_e2e.py -k one_click
echo "kind-e2e: done in $(( $(date +%s) - t0 )) s (scripts/kind-e2e.sh down removes the cluster)"
