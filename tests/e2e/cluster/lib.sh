# Shared helpers for the real-cluster e2e scripts. Source it; do not run it.
# shellcheck shell=bash

RVC_CACHE_DIR="${RVC_CACHE_DIR:-$HOME/.cache/rvc-operator}"
RVC_CLUSTER_DIR="${RVC_CLUSTER_DIR:-/tmp/rvc-e2e-cluster}"   # run folder: certs, logs, etcd data, pids
RVC_BIN_DIR="$RVC_CACHE_DIR/bin"
export RVC_CACHE_DIR RVC_CLUSTER_DIR RVC_BIN_DIR

# Kubernetes source release we build (Debian bookworm's `kubernetes` source package).
K8S_VERSION="v1.20.2"
# Bump when the patches in build-kubernetes.sh change, so cached binaries are rebuilt.
K8S_PATCH_LEVEL="1"

# log, die, phase
# shellcheck source=../../../scripts/common.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)/scripts/common.sh"

# Install Debian packages that are missing (no recommends, non-interactive).
ensure_pkgs() {
  local missing=()
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    # Other processes may hold the dpkg lock: wait for it rather than fail.
    local apt=(apt-get -o DPkg::Lock::Timeout=900 -y --no-install-recommends)
    if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" install "${missing[@]}" >/dev/null; then
      local i
      for i in 1 2 3 4 5 6; do
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 update >/dev/null && break
        sleep 10
      done
      DEBIAN_FRONTEND=noninteractive "${apt[@]}" install "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
    fi
  fi
}

# The Docker CLI to use: Debian's (matches the engine) when present.
docker_cli() {
  if [ -x /usr/bin/docker ]; then echo /usr/bin/docker; else command -v docker; fi
}
