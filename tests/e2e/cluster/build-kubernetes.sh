#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager, kube-scheduler and kubelet v1.20.2 from
# Debian bookworm's `kubernetes` source package, with the fixes this environment needs,
# into $RVC_CACHE_DIR/bin. Skips everything when the cached binaries exist.
#
# The system's apt configuration is left alone: the deb-src line lives in a private
# sources list, and the package lists and caches in private folders under the cache.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"

BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet)
STAMP="$RVC_BIN_DIR/.kubernetes-$K8S_VERSION-p$K8S_PATCH_LEVEL"

have_all() {
  [ -f "$STAMP" ] || return 1
  local b
  for b in "${BINS[@]}"; do [ -x "$RVC_BIN_DIR/$b" ] || return 1; done
}

if have_all; then
  log "kubernetes $K8S_VERSION binaries cached in $RVC_BIN_DIR; nothing to build"
  exit 0
fi

SRC_CACHE="$RVC_CACHE_DIR/kubernetes-src"
APT_DIR="$RVC_CACHE_DIR/apt"
BUILD_DIR="${RVC_K8S_BUILD_DIR:-$RVC_CACHE_DIR/kubernetes-build}"
mkdir -p "$SRC_CACHE" "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial" "$RVC_BIN_DIR"

install_deps() {
  ensure_pkgs golang-go rsync golang-github-modern-go-reflect2-dev ca-certificates make
}

APT_OPTS=(
  -o "Dir::Etc::SourceList=$APT_DIR/sources.list"
  -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State::Lists=$APT_DIR/lists"
  -o "Dir::Cache=$APT_DIR/cache"
  -o "APT::Sandbox::User=root"
)

fetch_source() {
  if ls "$SRC_CACHE"/kubernetes_*.orig.tar.* >/dev/null 2>&1; then
    log "kubernetes source tarball cached: $(ls "$SRC_CACHE"/kubernetes_*.orig.tar.*)"
    return 0
  fi
  local mirror="${RVC_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
  echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bookworm main" \
    > "$APT_DIR/sources.list"
  apt-get "${APT_OPTS[@]}" -q update >/dev/null
  (cd "$SRC_CACHE" && apt-get "${APT_OPTS[@]}" -q source --download-only kubernetes >/dev/null)
  ls "$SRC_CACHE"/kubernetes_*.orig.tar.* >/dev/null 2>&1 || die "apt-get source did not fetch kubernetes"
  log "fetched $(ls "$SRC_CACHE")"
}

unpack() {
  rm -rf "$BUILD_DIR"
  mkdir -p "$BUILD_DIR"
  tar -xf "$SRC_CACHE"/kubernetes_*.orig.tar.* -C "$BUILD_DIR" --strip-components=1
  [ -f "$BUILD_DIR/go.mod" ] || die "unexpected source layout in $BUILD_DIR"
}

patch_tree() {
  local d="$BUILD_DIR"
  # 1) reflect2 1.0.1 (vendored) crashes under Go >= 1.18 on the first custom-resource write;
  #    Debian's golang-github-modern-go-reflect2-dev (1.0.2) does not.
  local r2=/usr/share/gocode/src/github.com/modern-go/reflect2
  [ -d "$r2" ] || die "$r2 missing (golang-github-modern-go-reflect2-dev)"
  rm -rf "$d/vendor/github.com/modern-go/reflect2"
  mkdir -p "$d/vendor/github.com/modern-go/reflect2"
  find "$r2" -maxdepth 1 -type f -name '*.go' ! -name '*_test.go' -exec cp {} "$d/vendor/github.com/modern-go/reflect2/" \;
  find "$r2" -maxdepth 1 -type f -name '*.s' -exec cp {} "$d/vendor/github.com/modern-go/reflect2/" \;

  # 2) No CAP_SYS_RESOURCE here: negative oom_score_adj is refused, so the sandbox (-998)
  #    and guaranteed-QoS (-997) adjustments become 0.
  #    (The constant itself stays: it also sets the floor of the burstable range.)
  local pol="$d/pkg/kubelet/qos/policy.go" sbx="$d/pkg/kubelet/dockershim/docker_sandbox.go"
  grep -Eq 'defaultSandboxOOMAdj +int += +-998' "$sbx" || die "no defaultSandboxOOMAdj = -998 in $sbx"
  sed -i -E 's/(defaultSandboxOOMAdj +int += +)-998/\10/' "$sbx"
  [ "$(grep -c 'return guaranteedOOMScoreAdj' "$pol")" = 2 ] || die "unexpected $pol"
  sed -i 's/return guaranteedOOMScoreAdj$/return 0 \/\/ rvc-e2e: was guaranteedOOMScoreAdj (-997)/' "$pol"
  grep -q 'return guaranteedOOMScoreAdj' "$pol" && die "OOM score patch did not apply to $pol"

  # 3) Accept a loopback --node-ip (single-node cluster on 127.0.0.1, so `kubectl logs` works).
  local f hits=0
  while IFS= read -r f; do
    sed -i -E '/nodeIP\.IsLoopback\(\)/{s/nodeIP\.IsLoopback\(\)/false \&\& nodeIP.IsLoopback()/}' "$f"
    hits=$((hits + 1))
  done < <(grep -rl 'nodeIP.IsLoopback()' "$d/pkg/kubelet" "$d/cmd/kubelet" 2>/dev/null || true)
  ((hits > 0)) || die "loopback node IP check not found in the kubelet sources"
  log "patched: reflect2 <- Debian 1.0.2; OOM adj sandbox -998 / guaranteed -997 -> 0; loopback node IP accepted ($hits file(s))"
}

build() {
  (
    cd "$BUILD_DIR"
    export GOFLAGS= GOPROXY=off GO111MODULE=on CGO_ENABLED=0 \
      KUBE_GIT_VERSION="$K8S_VERSION" KUBE_GIT_TREE_STATE=clean \
      GOCACHE="$RVC_CACHE_DIR/go-build-cache" GOPATH="$RVC_CACHE_DIR/gopath"
    make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet"
  )
  local out="$BUILD_DIR/_output/local/bin/linux/amd64" b
  for b in "${BINS[@]}"; do
    [ -x "$out/$b" ] || die "build produced no $out/$b"
    install -m 0755 "$out/$b" "$RVC_BIN_DIR/$b"
  done
  touch "$STAMP"
}

phase "k8s: apt build deps" install_deps
phase "k8s: fetch source package" fetch_source
phase "k8s: unpack" unpack
phase "k8s: patch" patch_tree
phase "k8s: make (4 binaries)" build
# The build tree (~1.5 GB with _output) is not needed once the binaries are cached.
[ -n "${RVC_KEEP_K8S_BUILD:-}" ] || rm -rf "$BUILD_DIR"
"$RVC_BIN_DIR/kube-apiserver" --version
log "kubernetes binaries in $RVC_BIN_DIR"
