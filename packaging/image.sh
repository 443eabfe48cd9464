#!/usr/bin/env bash
# The container image of a Bento, built with docker, podman or buildah (no Docker daemon needed).
#
#   packaging/image.sh build [BENTO]   lint the Bento's Dockerfile (hadolint), then
#                                      `bentoml containerize` it (BENTO: default scoring:latest)
#   packaging/image.sh env             print the backend and the container CLI to run images with
#                                      (and podman's CONTAINERS_CONF): eval "$(packaging/image.sh env)"
#
# Settings (environment; docs/container.md):
#   IMAGE_BACKEND   docker | podman | buildah. Default: docker if its daemon answers, else podman.
#   BASE_IMAGE      an image that holds the Bento's Python. Default: the Bento's own
#                   (docker.io/library/python:<version>-slim) if it can be pulled, else `local`.
#                   `local`: bootstrap a minimal Debian with debootstrap (needs root; no registry),
#                   cached as localhost/scoring-base:<suite>-py<version>.
#   EXTRA_CA_CERTS  a PEM file, or a folder of .crt/.pem files, that the build must trust (a
#                   TLS-inspecting proxy). They go into the base's trust store, so the image
#                   trusts them too. Default: the certificates this host added to its own
#                   store (/usr/local/share/ca-certificates/*.crt), if any; empty for none.
#   IMAGE_TAG       the image's tag. Default: the Bento's tag.
#   PYTHON          the Python with bentoml (default .venv/bin/python); its uv and hadolint are used.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
BIN="$(dirname "$PYTHON")"
STATE="$PWD/build/image" # generated containers.conf, base image rootfs, temporary build contexts
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
if [ -z "${EXTRA_CA_CERTS+set}" ] && compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  EXTRA_CA_CERTS=/usr/local/share/ca-certificates # what this host trusts, the build trusts
fi

log() { echo "image: $*" >&2; }
die() {
  log "$*"
  exit 1
}

detect_backend() {
  if [ -n "${IMAGE_BACKEND:-}" ]; then
    echo "$IMAGE_BACKEND"
  elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    echo docker
  elif command -v podman >/dev/null; then
    echo podman
  else
    die "no container tool: docker with a running daemon, or podman"
  fi
}

# podman and buildah read containers.conf. Written here unless CONTAINERS_CONF names your own:
# runc cannot raise a limit above the caller's hard limit, and podman's defaults (nofile 1048576)
# exceed it in CI sandboxes; without systemd there is no systemd cgroup manager and no journald.
podman_conf() {
  [ -z "${CONTAINERS_CONF:-}" ] || return 0
  local conf="$STATE/containers.conf" nofile nproc
  nofile=$(ulimit -Hn)
  nproc=$(ulimit -Hu)
  if [ "$nofile" = unlimited ] || [ "$nofile" -gt 65536 ]; then nofile=65536; fi
  if [ "$nproc" = unlimited ] || [ "$nproc" -gt 16384 ]; then nproc=16384; fi
  mkdir -p "$STATE"
  {
    echo "[containers]"
    echo "default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]"
    echo "[engine]"
    if command -v runc >/dev/null; then echo 'runtime = "runc"'; fi
    if [ ! -d /run/systemd/system ]; then printf 'cgroup_manager = "cgroupfs"\nevents_logger = "file"\n'; fi
  } >"$conf"
  export CONTAINERS_CONF="$conf"
}

setup_backend() {
  BACKEND=$(detect_backend)
  case "$BACKEND" in
  docker) CLI=docker ;;
  podman | buildah)
    CLI=podman # buildah builds into the storage podman runs and imports from
    command -v "$BACKEND" >/dev/null || die "$BACKEND is not installed"
    command -v podman >/dev/null || die "the $BACKEND backend needs podman too (to run and import images)"
    podman_conf
    ;;
  *) die "IMAGE_BACKEND=$BACKEND: expected docker, podman or buildah" ;;
  esac
}

image_exists() { "$CLI" image inspect "$1" >/dev/null 2>&1; }

# A minimal Debian (debootstrap minbase + python3 + ca-certificates) imported as an image: for
# machines that reach a Debian mirror but no container registry. uv is copied in because the
# image build needs it and Debian's Python has no pip.
local_base() {
  local python="$1" suite tag rootfs uv
  case "$python" in
  3.9) suite=bullseye ;;
  3.11) suite=bookworm ;;
  3.13) suite=trixie ;;
  *) die "no Debian release ships Python $python: set BASE_IMAGE to an image that has it" ;;
  esac
  tag="localhost/scoring-base:$suite-py$python"
  if image_exists "$tag"; then
    log "base: reusing $tag"
    echo "$tag"
    return
  fi
  command -v debootstrap >/dev/null || die "BASE_IMAGE=local needs debootstrap (apt-get install debootstrap)"
  [ "$(id -u)" = 0 ] || die "BASE_IMAGE=local needs root (debootstrap)"
  uv="$BIN/uv"
  [ -x "$uv" ] || uv=$(command -v uv) || die "uv not found (bash .ci/setup installs it)"
  rootfs="$STATE/rootfs-$suite"
  rm -rf "$rootfs"
  mkdir -p "$STATE"
  log "base: bootstrapping $tag (Debian $suite from $DEBIAN_MIRROR)"
  debootstrap --variant=minbase --include=python3,ca-certificates "$suite" "$rootfs" "$DEBIAN_MIRROR" \
    >"$STATE/debootstrap.log" 2>&1 || die "debootstrap failed: see $STATE/debootstrap.log"
  # an image needs no package cache or lists, manuals, translations or docs (copyrights stay)
  rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/man/* \
    "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
  find "$rootfs/usr/share/doc" -type f ! -name copyright -delete
  find "$rootfs/usr/share/doc" -type d -empty -delete
  install -m 0755 "$uv" "$rootfs/usr/local/bin/uv"
  tar -C "$rootfs" -c . | "$CLI" import - "$tag" >/dev/null
  rm -rf "$rootfs"
  echo "$tag"
}

# The base plus the extra CA certificates in its trust store; SSL_CERT_FILE makes uv (which
# otherwise trusts only its own bundle) and PIP_CERT makes pip use the system store.
with_ca_certs() {
  local base="$1" certs="$STATE/ca" tag
  rm -rf "$certs"
  mkdir -p "$certs"
  if [ -d "$EXTRA_CA_CERTS" ]; then
    find "$EXTRA_CA_CERTS" -maxdepth 1 -type f \( -name '*.crt' -o -name '*.pem' \) -print0 |
      while IFS= read -r -d '' cert; do cp "$cert" "$certs/$(basename "${cert%.*}").crt"; done
  elif [ -f "$EXTRA_CA_CERTS" ]; then
    cp "$EXTRA_CA_CERTS" "$certs/extra.crt"
  else
    die "EXTRA_CA_CERTS=$EXTRA_CA_CERTS: no such file or folder"
  fi
  compgen -G "$certs/*.crt" >/dev/null || die "EXTRA_CA_CERTS=$EXTRA_CA_CERTS holds no .crt or .pem file"
  cat >"$certs/Containerfile" <<'EOF'
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY *.crt /usr/local/share/ca-certificates/extra/
RUN update-ca-certificates
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt
EOF
  tag="localhost/scoring-base-ca:$({ echo "$base"; cat "$certs"/*.crt; } | sha256sum | cut -c1-12)"
  log "base: $tag ($base + $(find "$certs" -name '*.crt' | wc -l) CA certificates from $EXTRA_CA_CERTS)"
  "$CLI" build -q --build-arg "BASE_IMAGE=$base" -t "$tag" "$certs" >/dev/null
  echo "$tag"
}

resolve_base() {
  local python="$1" default base
  default="docker.io/library/python:$python-slim"
  case "${BASE_IMAGE:-}" in
  local) base=$(local_base "$python") ;;
  "")
    if image_exists "$default" || "$CLI" pull -q "$default" >/dev/null 2>&1; then
      base="$default"
    else
      log "base: cannot pull $default (no registry reachable?): bootstrapping one (BASE_IMAGE=local)"
      base=$(local_base "$python")
    fi
    ;;
  *) base="$BASE_IMAGE" ;;
  esac
  if [ -n "${EXTRA_CA_CERTS:-}" ]; then base=$(with_ca_certs "$base"); fi
  echo "$base"
}

build() {
  local bento="${1:-scoring:latest}" tag bento_path python base start size hadolint
  setup_backend
  read -r tag bento_path python < <("$PYTHON" - "$bento" <<'EOF'
import sys

import bentoml

bento = bentoml.bentos.get(sys.argv[1])
docker = getattr(bento.info, "docker", None)
if docker is None or not docker.dockerfile_template:
    sys.exit(f"{bento.tag} was not built with packaging/Dockerfile.j2 (see bentofile.yaml)")
print(bento.tag, bento.path, docker.python_version)
EOF
  ) || die "no usable Bento $bento"
  hadolint="$BIN/hadolint"
  [ -x "$hadolint" ] || hadolint=$(command -v hadolint) || die "hadolint not found (bash .ci/setup dev installs it)"
  "$hadolint" --failure-threshold error "$bento_path/env/docker/Dockerfile"
  log "hadolint: no errors in $bento_path/env/docker/Dockerfile"

  start=$(date +%s)
  base=$(resolve_base "$python")
  IMAGE_TAG="${IMAGE_TAG:-$tag}"
  mkdir -p "$STATE/tmp"
  # TMPDIR under the working directory: BentoML >= 1.4.36 refuses a dockerfile_template whose
  # temporary build context is outside it (bentoml/BentoML#5566; no path part may start with ".")
  local env=("TMPDIR=$STATE/tmp")
  if [ "$BACKEND" = buildah ]; then
    # buildah caches layers only when asked; its default OCI isolation needs what runc needs
    env+=("BUILDAH_LAYERS=true" "BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}")
  fi
  if ! env "${env[@]}" "$PYTHON" -m bentoml containerize "$tag" --backend "$BACKEND" \
    --image-tag "$IMAGE_TAG" --opt "build-arg=BASE_IMAGE=$base"; then
    if [ -z "${EXTRA_CA_CERTS:-}" ]; then
      log "PyPI over TLS failed (invalid peer certificate: UnknownIssuer)? Set EXTRA_CA_CERTS"
    fi
    die "bentoml containerize failed"
  fi
  size=$("$CLI" image inspect --format '{{.Size}}' "$IMAGE_TAG")
  log "built $IMAGE_TAG ($BACKEND, base $base) in $(($(date +%s) - start)) s: $((size / 1000000)) MB"
}

case "${1:-build}" in
build) build "${@:2}" ;;
env)
  setup_backend
  printf 'export IMAGE_BACKEND=%q CONTAINER_CLI=%q\n' "$BACKEND" "$CLI"
  if [ -n "${CONTAINERS_CONF:-}" ]; then printf 'export CONTAINERS_CONF=%q\n' "$CONTAINERS_CONF"; fi
  ;;
*) die "usage: packaging/image.sh build [BENTO] | env" ;;
esac
