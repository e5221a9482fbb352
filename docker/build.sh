#!/usr/bin/env bash
# Build the project's container images.
#
#   docker/build.sh [--mode wheelhouse|online] [--tag TAG] [--force] [--no-save] [IMAGE...]
#
# IMAGE: operator (rvc-operator), pipeline-cpu (rvc-pipeline-cpu), pipeline (rvc-pipeline,
# CUDA; needs a registry for its base image, so it is never built by default).
# Default: operator pipeline-cpu, tagged :dev.
#
# Modes:
#   wheelhouse (default): Python packages are downloaded on the host into a wheelhouse
#     (cached per requirements file) and installed inside the build with
#     `pip install --no-index --find-links`: the build needs no package index (air-gapped).
#   online: pip resolves from the index inside the build.
#
# Base image: operator and pipeline-cpu start FROM a Debian bookworm image made here with
# `debootstrap --variant=minbase` + `docker import` (cached as a tarball), unless
# RVC_BASE_IMAGE names another (e.g. debian:bookworm-slim on a machine with a registry).
#
# Caching: each image's inputs (Dockerfile, requirements, wheel list, base, the project's
# source files) are hashed; the hash is stored as the label org.rvc-operator.inputs. An
# image whose label matches is not rebuilt; otherwise a tarball saved under
# $RVC_CACHE_DIR/images/ is `docker load`ed (a fresh docker data root); otherwise it is built
# and saved there (only the latest tarball per image is kept).
#
# Env: RVC_CACHE_DIR, RVC_BASE_IMAGE, RVC_DEBIAN_MIRROR, RVC_TORCH_INDEX_URL (wheelhouse mode,
# where torch's CPU build comes from when pip's configuration has none), RVC_SAVE_IMAGES=0.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
RVC_CACHE_DIR="${RVC_CACHE_DIR:-$HOME/.cache/rvc-operator}"
MODE=wheelhouse
TAG=dev
FORCE=0
SAVE="${RVC_SAVE_IMAGES:-1}"
IMAGES=()
MIRROR="${RVC_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
LABEL_KEY=org.rvc-operator.inputs

while (($#)); do
  case "$1" in
    --mode) MODE="$2"; shift 2 ;;
    --tag) TAG="$2"; shift 2 ;;
    --force) FORCE=1; shift ;;
    --no-save) SAVE=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    operator|pipeline-cpu|pipeline) IMAGES+=("$1"); shift ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$MODE" = wheelhouse ] || [ "$MODE" = online ] || { echo "--mode must be wheelhouse or online" >&2; exit 2; }
((${#IMAGES[@]})) || IMAGES=(operator pipeline-cpu)

# log, die, phase
# shellcheck source=../scripts/common.sh
. "$ROOT/scripts/common.sh"
if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER="$(command -v docker || true)"; fi
[ -n "$DOCKER" ] || die "no docker CLI (apt-get install docker.io)"
export DOCKER_BUILDKIT=0   # the classic builder ships with Debian's docker.io
"$DOCKER" version >/dev/null 2>&1 || die "no Docker engine answering: start one (dockerd &, or tests/e2e/cluster/up.sh)"
mkdir -p "$RVC_CACHE_DIR/images" "$RVC_CACHE_DIR/wheelhouse" "$RVC_CACHE_DIR/build-context"

sha() { sha256sum | cut -c1-16; }
label_of() { "$DOCKER" image inspect -f "{{index .Config.Labels \"$LABEL_KEY\"}}" "$1" 2>/dev/null || true; }

# --- base image: debootstrap minbase bookworm + docker import ------------------------------
BASE_REF=""
BASE_KEY=""
base_image() {
  if [ -n "${RVC_BASE_IMAGE:-}" ]; then BASE_REF="$RVC_BASE_IMAGE"; BASE_KEY="$RVC_BASE_IMAGE"; return 0; fi
  BASE_KEY="$(printf 'debootstrap minbase bookworm %s v1' "$MIRROR" | sha)"
  BASE_REF="rvc-base:bookworm-$BASE_KEY"
  "$DOCKER" image inspect "$BASE_REF" >/dev/null 2>&1 && return 0
  local tarball="$RVC_CACHE_DIR/images/rvc-base-bookworm-$BASE_KEY.tar.gz"
  if [ ! -f "$tarball" ]; then
    command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 \
      install -y --no-install-recommends debootstrap >/dev/null
    local root
    root="$(mktemp -d "$RVC_CACHE_DIR/build-context/rootfs.XXXX")"
    log "debootstrap --variant=minbase bookworm (a minute or two)"
    debootstrap --variant=minbase bookworm "$root" "$MIRROR" > "$RVC_CACHE_DIR/build-context/debootstrap.log" 2>&1 \
      || { tail -20 "$RVC_CACHE_DIR/build-context/debootstrap.log" >&2; die "debootstrap failed"; }
    cat > "$root/etc/apt/sources.list" <<SRC
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SRC
    # Keep image builds small and quiet: no recommends, no docs/man pages.
    printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' > "$root/etc/apt/apt.conf.d/90rvc-norecommends"
    printf 'path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\npath-exclude /usr/share/man/*\npath-exclude /usr/share/info/*\npath-exclude /usr/share/locale/*\npath-include /usr/share/locale/locale.alias\n' \
      > "$root/etc/dpkg/dpkg.cfg.d/90rvc-nodoc"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/* \
      "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
    tar -C "$root" --numeric-owner -czf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
  fi
  "$DOCKER" import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' "$tarball" "$BASE_REF" >/dev/null
  log "base image $BASE_REF from $tarball"
}

# A requirements file has two parts: normal pins, then (after a line starting with
# "# --no-deps") pins installed without their dependencies.
split_requirements() {  # split_requirements REQFILE OUT_MAIN OUT_NODEPS
  awk -v main="$2" -v nodeps="$3" '
    /^#[[:space:]]*--no-deps/ {nd = 1; next}
    /^[[:space:]]*(#|$)/ {next}
    {print > (nd ? nodeps : main)}' "$1"
  touch "$2" "$3"
}

# --- wheelhouse: every wheel the image needs, fetched on the host --------------------------
WHEELS=""
wheelhouse() {  # wheelhouse IMAGE REQFILE
  local image="$1" req="$2" pyver key args=()
  WHEELS=""
  [ "$MODE" = wheelhouse ] || return 0
  # The CUDA image runs Python 3.12 (ubuntu 24.04); the Debian images run bookworm's 3.11.
  if [ "$image" = pipeline ]; then pyver=3.12; else pyver=3.11; fi
  key="$(cat "$req" <(echo "$pyver ${RVC_TORCH_INDEX_URL:-}") | sha)"
  WHEELS="$RVC_CACHE_DIR/wheelhouse/$image-$key"
  [ -f "$WHEELS/.complete" ] && return 0
  # Drop this image's older wheelhouses (other requirements), then fetch.
  find "$RVC_CACHE_DIR/wheelhouse" -mindepth 1 -maxdepth 1 -regextype posix-extended \
    -regex ".*/$image-[0-9a-f]{16}(\.(req|nodeps|log))?" -exec rm -rf {} +
  mkdir -p "$WHEELS"
  split_requirements "$req" "$WHEELS.req" "$WHEELS.nodeps"
  args=(--only-binary=:all: -d "$WHEELS")
  [ -z "${RVC_TORCH_INDEX_URL:-}" ] || args+=(--extra-index-url "$RVC_TORCH_INDEX_URL")
  local hostpy
  hostpy="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  if [ "$hostpy" != "$pyver" ]; then
    args+=(--python-version "$pyver" --implementation cp --abi "cp${pyver/./}")
    local m
    for m in 39 35 34 31 28 27 24 17; do args+=(--platform "manylinux_2_${m}_x86_64"); done
    args+=(--platform manylinux2014_x86_64)
  fi
  log "pip download for $image (Python $pyver) into $WHEELS"
  { python3 -m pip download -q --progress-bar off "${args[@]}" -r "$WHEELS.req" \
    && { [ ! -s "$WHEELS.nodeps" ] || python3 -m pip download -q --progress-bar off "${args[@]}" --no-deps -r "$WHEELS.nodeps"; }
  } > "$WHEELS.log" 2>&1 \
    || { grep -v 'is ignored: it is neither' "$WHEELS.log" | tail -20 >&2; die "pip download for $image failed (requirements: $req)"; }
  rm -f "$WHEELS.log" "$WHEELS.req" "$WHEELS.nodeps"
  if [ "$image" = pipeline-cpu ]; then
    ls "$WHEELS"/torch-*+cpu-*.whl >/dev/null 2>&1 || die "the torch wheel fetched for $image is not the CPU build \
($(cd "$WHEELS" && ls torch-*.whl)): set RVC_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
    ! ls "$WHEELS"/nvidia_* >/dev/null 2>&1 || die "CUDA wheels (nvidia_*) in the $image wheelhouse"
  fi
  if [ "$image" = pipeline ] && ls "$WHEELS"/torch-*+cpu-*.whl >/dev/null 2>&1; then
    die "the torch wheel fetched for the CUDA image is the CPU build: check pip's find-links/index configuration"
  fi
  touch "$WHEELS/.complete"
}

# Every dependency the project declares for this image must be pinned in its requirements
# file (the project itself is installed with --no-deps).
check_requirements() {  # check_requirements REQFILE EXTRA...
  python3 - "$ROOT/pyproject.toml" "$@" <<'PY'
import re, sys, tomllib
pyproject, req, *extras = sys.argv[1:]
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
name = lambda spec: norm(re.split(r"[<>=!~;\[ ]", spec.strip(), maxsplit=1)[0])
meta = tomllib.load(open(pyproject, "rb"))["project"]
wanted = {name(s) for s in meta.get("dependencies", [])}
for extra in extras:
    wanted |= {name(s) for s in meta["optional-dependencies"][extra]}
have = {name(line) for line in open(req) if line.strip() and not line.lstrip().startswith("#")}
missing = sorted(wanted - have)
if missing:
    sys.exit(f"{req}: missing pins for {', '.join(missing)} (declared in {pyproject})")
PY
}

# --- build context: Dockerfile, requirements, wheels, the current checkout -----------------
CTX=""
context() {  # context IMAGE REQFILE
  local image="$1" req="$2"
  CTX="$RVC_CACHE_DIR/build-context/$image"
  rm -rf "$CTX"; mkdir -p "$CTX/src" "$CTX/wheels"
  cp "$HERE/$image.Dockerfile" "$CTX/Dockerfile"
  split_requirements "$req" "$CTX/requirements.txt" "$CTX/requirements-nodeps.txt"
  if [ -n "$WHEELS" ]; then cp -al "$WHEELS"/*.whl "$CTX/wheels/" 2>/dev/null || cp "$WHEELS"/*.whl "$CTX/wheels/"; fi
  # The files a clone of the checkout would have (tracked + new, not ignored), so the inputs
  # hash is the same here and on a clean clone of the same commit.
  if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard -- pyproject.toml README.md LICENSE pipeline operator \
       | xargs -0 -r sh -c 'for f; do [ -f "$f" ] && printf "%s\0" "$f"; done' sh \
       | tar --null -T - -cf -) | tar -C "$CTX/src" -xf -
  else
    (cd "$ROOT" && tar --exclude='__pycache__' --exclude='*.pyc' --exclude='*.egg-info' \
       -cf - pyproject.toml pipeline operator $(ls README.md LICENSE 2>/dev/null)) | tar -C "$CTX/src" -xf -
  fi
  [ -f "$CTX/src/README.md" ] || echo "# rvc-operator" > "$CTX/src/README.md"
}

inputs_hash() {
  {
    echo "mode=$MODE base=$BASE_KEY"
    (cd "$CTX" && find Dockerfile requirements.txt requirements-nodeps.txt src -type f -print0 | sort -z | xargs -0 sha256sum)
    (cd "$CTX/wheels" && find . -name '*.whl' -printf '%f %s\n' | sort)
  } | sha
}

build_one() {
  local image="$1" repo req extras hash tarball t0
  case "$image" in
    operator) repo=rvc-operator; extras=(operator) ;;
    pipeline-cpu) repo=rvc-pipeline-cpu; extras=(pipeline) ;;
    pipeline) repo=rvc-pipeline; extras=(pipeline) ;;
  esac
  req="$HERE/requirements/$image.txt"
  check_requirements "$req" "${extras[@]}" || die "requirements check failed"
  if [ "$image" = pipeline ]; then
    BASE_REF="${RVC_BASE_IMAGE:-}"; BASE_KEY="${RVC_BASE_IMAGE:-default}"
  else
    phase "images: base image" base_image
  fi
  phase "images: $image wheelhouse" wheelhouse "$image" "$req"
  phase "images: $image context" context "$image" "$req"
  hash="$(inputs_hash)"
  tarball="$RVC_CACHE_DIR/images/$repo-$hash.tar"
  if ((!FORCE)); then
    if [ "$(label_of "$repo:$TAG")" = "$hash" ]; then log "$repo:$TAG is up to date (inputs $hash)"; return 0; fi
    if [ -f "$tarball" ]; then
      phase "images: $image docker load" "$DOCKER" load -q -i "$tarball" >/dev/null
      "$DOCKER" tag "$repo:$hash" "$repo:$TAG"
      [ "$(label_of "$repo:$TAG")" = "$hash" ] && { log "$repo:$TAG loaded from $tarball"; return 0; }
    fi
  fi
  local args=(build -t "$repo:$TAG" -t "$repo:$hash" --label "$LABEL_KEY=$hash" --build-arg "PIP_MODE=$MODE" -f "$CTX/Dockerfile")
  [ -z "$BASE_REF" ] || args+=(--build-arg "BASE_IMAGE=$BASE_REF")
  # No --cache-from: with it the classic builder ignores the local layer cache.
  log "docker build $repo:$TAG (inputs $hash, mode $MODE)"
  phase "images: $image docker build" "$DOCKER" "${args[@]}" "$CTX" > "$RVC_CACHE_DIR/build-context/$image.build.log" 2>&1 \
    || { tail -40 "$RVC_CACHE_DIR/build-context/$image.build.log" >&2; die "docker build $repo failed (log: $RVC_CACHE_DIR/build-context/$image.build.log)"; }
  "$DOCKER" image prune -f --filter "label=$LABEL_KEY" --filter dangling=true >/dev/null 2>&1 || true
  if ((SAVE)); then
    rm -f "$RVC_CACHE_DIR/images/$repo"-*.tar
    phase "images: $image docker save" "$DOCKER" save -o "$tarball.tmp" "$repo:$hash"
    mv "$tarball.tmp" "$tarball"
  fi
  log "$repo:$TAG built: $("$DOCKER" image inspect -f '{{.Size}}' "$repo:$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
}

for image in "${IMAGES[@]}"; do
  phase "images: $image total" build_one "$image"
done
for image in "${IMAGES[@]}"; do rm -rf "$RVC_CACHE_DIR/build-context/$image/wheels"; done
