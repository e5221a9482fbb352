# Shell helpers shared by docker/build.sh and the e2e cluster scripts. Source it; do not run it.
# shellcheck shell=bash

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# phase NAME CMD...: run CMD and print how long it took ([timing] lines are collected by the e2e harness).
phase() {
  local name="$1"; shift
  local t0=${EPOCHREALTIME/./}
  "$@"   # under `set -e` a failure ends the script here (unless phase is itself tested)
  local rc=$?
  local dt=$(( (${EPOCHREALTIME/./} - t0) / 100000 ))
  printf '[timing] %-36s %5d.%d s\n' "$name" $((dt / 10)) $((dt % 10)) >&2
  return $rc
}
