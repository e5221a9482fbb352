#!/usr/bin/env bash
# Bring up a real single-node Kubernetes v1.20.2 on this machine, all on loopback:
# dockerd, etcd, kube-apiserver, kube-controller-manager, kube-scheduler and a kubelet
# (dockershim). No kube-proxy, no cluster DNS. Idempotent: running components are kept.
#
# Writes the admin kubeconfig to $RVC_CLUSTER_DIR/kubeconfig (printed at the end).
# Needs: build-kubernetes.sh (binaries in $RVC_CACHE_DIR/bin), root.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"

RUN="$RVC_CLUSTER_DIR"
PKI="$RUN/pki"
LOGS="$RUN/logs"
NODE="${RVC_NODE_NAME:-rvc-e2e-node}"
API_PORT="${RVC_APISERVER_PORT:-16443}"
ETCD_PORT="${RVC_ETCD_PORT:-12379}"
SERVICE_CIDR="10.96.0.0/16"
PAUSE_IMAGE="rvc-pause:3.2"
DOCKER_DATA_ROOT="${RVC_DOCKER_DATA_ROOT:-/var/lib/docker}"
DOCKER_SOCK=/var/run/docker.sock
export KUBECONFIG="$RUN/kubeconfig"
KUBECTL="$RVC_BIN_DIR/kubectl"
DOCKER="$(docker_cli)"

mkdir -p "$RUN" "$PKI" "$LOGS"
for b in kube-apiserver kube-controller-manager kube-scheduler kubelet; do
  [ -x "$RVC_BIN_DIR/$b" ] || die "$RVC_BIN_DIR/$b missing: run $HERE/build-kubernetes.sh first"
done

alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

# start NAME CMD...: run CMD in the background (own session), log to $LOGS/NAME.log.
start() {
  local name="$1"; shift
  if alive "$name"; then log "$name already running (pid $(cat "$RUN/$name.pid"))"; return 0; fi
  setsid "$@" >>"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$RUN/$name.pid"
  log "started $name (pid $!), log $LOGS/$name.log"
}

# wait_for WHAT TIMEOUT CMD...: poll CMD until it succeeds.
wait_for() {
  local what="$1" timeout="$2"; shift 2
  local i
  for ((i = 0; i < timeout * 5; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  log "timed out after ${timeout}s waiting for $what; last log lines:"
  tail -n 30 "$LOGS/$what.log" 2>/dev/null >&2 || true
  return 1
}

deps() {
  ensure_pkgs docker.io etcd-server openssl iptables gcc libc6-dev ca-certificates curl
  [ -x "$KUBECTL" ] || "$HERE/get-tools.sh"
}

docker_up() {
  if "$DOCKER" version >/dev/null 2>&1; then log "docker engine already answering on $DOCKER_SOCK"; return 0; fi
  mkdir -p "$DOCKER_DATA_ROOT"
  start dockerd dockerd --data-root "$DOCKER_DATA_ROOT" --host "unix://$DOCKER_SOCK" \
    --exec-root "$RUN/docker-exec" --pidfile "$RUN/docker-daemon.pid"
  wait_for dockerd 60 "$DOCKER" version
}

# --- certificates -----------------------------------------------------------------------
sign() {  # sign NAME SUBJECT [SAN]: key + cert signed by the cluster CA
  local name="$1" subj="$2" san="${3:-}" ext
  [ -f "$PKI/$name.crt" ] && return 0
  openssl genrsa -out "$PKI/$name.key" 2048 2>/dev/null
  openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
  ext="$PKI/$name.ext"
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    if [ -n "$san" ]; then echo "extendedKeyUsage=serverAuth,clientAuth"; echo "subjectAltName=$san"
    else echo "extendedKeyUsage=clientAuth"; fi
  } > "$ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$ext"
}

kubeconfig() {  # kubeconfig FILE CERTNAME
  cat > "$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: rvc-e2e
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority: $PKI/ca.crt
users:
- name: $2
  user:
    client-certificate: $PKI/$2.crt
    client-key: $PKI/$2.key
contexts:
- name: rvc-e2e
  context: {cluster: rvc-e2e, user: $2}
current-context: rvc-e2e
KC
}

pki() {
  if [ ! -f "$PKI/ca.crt" ]; then
    openssl genrsa -out "$PKI/ca.key" 2048 2>/dev/null
    openssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=rvc-e2e-ca" -days 3650 -sha256 \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
      -out "$PKI/ca.crt" 2>/dev/null
  fi
  [ -f "$PKI/sa.key" ] || { openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null; openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null; }
  sign apiserver "/CN=kube-apiserver" \
    "IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  sign kubelet-serving "/CN=$NODE" "IP:127.0.0.1,DNS:localhost,DNS:$NODE"
  sign admin "/O=system:masters/CN=rvc-e2e-admin"
  sign apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  sign controller-manager "/CN=system:kube-controller-manager"
  sign scheduler "/CN=system:kube-scheduler"
  sign kubelet "/O=system:nodes/CN=system:node:$NODE"
  kubeconfig "$RUN/kubeconfig" admin
  kubeconfig "$RUN/controller-manager.kubeconfig" controller-manager
  kubeconfig "$RUN/scheduler.kubeconfig" scheduler
  kubeconfig "$RUN/kubelet.kubeconfig" kubelet
}

# --- pause image ------------------------------------------------------------------------
pause_image() {
  if "$DOCKER" image inspect "$PAUSE_IMAGE" >/dev/null 2>&1; then return 0; fi
  local bin="$RVC_BIN_DIR/pause" tmp
  if [ ! -x "$bin" ] || [ "$HERE/pause.c" -nt "$bin" ]; then
    gcc -static -Os -s -o "$bin" "$HERE/pause.c"
  fi
  tmp="$(mktemp -d)"
  cp "$bin" "$tmp/pause"
  tar -C "$tmp" -cf "$tmp/rootfs.tar" pause
  "$DOCKER" import --change 'ENTRYPOINT ["/pause"]' "$tmp/rootfs.tar" "$PAUSE_IMAGE" >/dev/null
  rm -rf "$tmp"
  log "imported $PAUSE_IMAGE"
}

# --- control plane ----------------------------------------------------------------------
etcd_up() {
  start etcd etcd --name rvc-e2e --data-dir "$RUN/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-cluster "rvc-e2e=http://127.0.0.1:$((ETCD_PORT + 1))" \
    --unsafe-no-fsync --quota-backend-bytes 2147483648
  wait_for etcd 30 curl -sf "http://127.0.0.1:$ETCD_PORT/health"
}

apiserver_up() {
  start kube-apiserver "$RVC_BIN_DIR/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" --insecure-port 0 \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority "$PKI/ca.crt" \
    --kubelet-preferred-address-types InternalIP \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --service-cluster-ip-range "$SERVICE_CIDR" --endpoint-reconciler-type none \
    --allow-privileged=false --profiling=false
  wait_for kube-apiserver 90 "$KUBECTL" get --raw /readyz
}

controllers_up() {
  start kube-controller-manager "$RVC_BIN_DIR/kube-controller-manager" \
    --kubeconfig "$RUN/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --port 0 --secure-port 0 --leader-elect=false \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --use-service-account-credentials=true \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --controllers '*,-nodeipam,-cloud-node-lifecycle' --profiling=false
  start kube-scheduler "$RVC_BIN_DIR/kube-scheduler" \
    --kubeconfig "$RUN/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --port 0 --secure-port 0 --leader-elect=false --profiling=false
}

kubelet_up() {
  mkdir -p "$RUN/kubelet"
  cat > "$RUN/kubelet-config.yaml" <<KCFG
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
oomScoreAdj: 0
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
resolvConf: /etc/resolv.conf
maxPods: 64
syncFrequency: 10s
fileCheckFrequency: 10s
KCFG
  start kubelet "$RVC_BIN_DIR/kubelet" \
    --config "$RUN/kubelet-config.yaml" --kubeconfig "$RUN/kubelet.kubeconfig" \
    --root-dir "$RUN/kubelet" --cert-dir "$RUN/kubelet/pki" \
    --container-runtime docker --docker-endpoint "unix://$DOCKER_SOCK" \
    --pod-infra-container-image "$PAUSE_IMAGE" \
    --node-ip 127.0.0.1 --hostname-override "$NODE" --v 1
  wait_for kubelet 120 sh -c "\"$KUBECTL\" get node \"$NODE\" -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True"
}

phase "up: packages + kubectl" deps
phase "up: dockerd" docker_up
phase "up: certificates" pki
phase "up: pause image" pause_image
phase "up: etcd" etcd_up
phase "up: kube-apiserver" apiserver_up
phase "up: controller-manager+scheduler" controllers_up
phase "up: kubelet, node Ready" kubelet_up
"$KUBECTL" get nodes -o wide >&2
echo "export KUBECONFIG=$KUBECONFIG"
