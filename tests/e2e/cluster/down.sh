#!/usr/bin/env bash
# Stop the e2e cluster started by up.sh: kubelet, pod containers, control plane, etcd and
# (when up.sh started it) dockerd. Caches (binaries, images, wheelhouse) are kept; the etcd
# data and the kubelet's root folder are removed so the next up.sh starts a fresh cluster.
# Logs and certificates stay in $RVC_CLUSTER_DIR. --purge removes that folder entirely.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"
RUN="$RVC_CLUSTER_DIR"
DOCKER="$(docker_cli)"

stop() {  # stop NAME: TERM, wait up to 15 s, then KILL the process recorded in NAME.pid
  local name="$1" pid i
  [ -f "$RUN/$name.pid" ] || return 0
  pid="$(cat "$RUN/$name.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < 75; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null; log "killed $name ($pid)"; else log "stopped $name ($pid)"; fi
  fi
  rm -f "$RUN/$name.pid"
}

[ -d "$RUN" ] || { log "no cluster run folder $RUN"; exit 0; }
t0=$SECONDS
stop kubelet
# Pod containers created by the kubelet (dockershim names them k8s_*).
if [ -n "$DOCKER" ] && "$DOCKER" version >/dev/null 2>&1; then
  ids="$("$DOCKER" ps -aq --filter name=k8s_)"
  [ -z "$ids" ] || { "$DOCKER" rm -f $ids >/dev/null 2>&1; log "removed $(echo "$ids" | wc -w) pod container(s)"; }
fi
stop kube-scheduler
stop kube-controller-manager
stop kube-apiserver
stop etcd
stop dockerd   # only when up.sh started it
# Mounts left under the run folder: the kubelet's root (it bind-mounts it onto itself to
# make it shared), pod volumes (secrets, configmaps, emptyDirs) and dockerd's netns file.
awk -v d="$RUN" '$2 == d || index($2, d "/") == 1 {print $2}' /proc/mounts | sort -r \
  | while read -r m; do umount -l "$m" 2>/dev/null || log "could not unmount $m"; done
rm -rf "$RUN/etcd" "$RUN/kubelet" "$RUN/docker-exec"
if [ "${1:-}" = "--purge" ]; then rm -rf "$RUN"; log "removed $RUN"; fi
printf '[timing] %-36s %5d s\n' "down" $((SECONDS - t0)) >&2
