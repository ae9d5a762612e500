#!/usr/bin/env bash
# Builds the four images from this checkout with podman (buildah), tagged
# $PREFIX/{epp,lora-sidecar,bbr,vllm-sim}:$TAG (defaults: ghcr.io/inferlane, latest) and :$VERSION.
#
#   scripts/build-images.sh                 # pulls the public base images as a user would
#   scripts/build-images.sh --local-bases   # no registry reachable: makes local base images
#                                           # under the public names first (image-bases.sh)
#                                           # and builds with --pull=never (what CI does)
#
# The four Dockerfiles share one build stage, so the first build compiles the workspace and the
# other three reuse its cached layers. `docker build -f Dockerfile.epp .` runs the same steps.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX="${PREFIX:-ghcr.io/inferlane}"
TAG="${TAG:-latest}"
pull=()
for arg in "$@"; do
  case "$arg" in
    --local-bases) scripts/image-bases.sh; pull=(--pull=never) ;;
    *) echo "unknown argument: $arg (use --local-bases, PREFIX=..., TAG=...)" >&2; exit 2 ;;
  esac
done
command -v podman >/dev/null || { echo "podman is missing (Debian: apt-get install podman)" >&2; exit 1; }
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# chroot isolation: builds run where crun cannot set up containers (no CAP_SYS_RESOURCE).
ISOLATION="${BUILDAH_ISOLATION:-chroot}"
for pair in epp:Dockerfile.epp lora-sidecar:Dockerfile.sidecar bbr:Dockerfile.bbr vllm-sim:Dockerfile.sim; do
  name=${pair%%:*} file=${pair#*:}
  echo "== $PREFIX/$name:$TAG ($file)"
  start=$(date +%s)
  podman build --quiet "${pull[@]}" --isolation="$ISOLATION" --layers \
    --build-arg VERSION="$VERSION" --build-arg REVISION="$REVISION" \
    -f "$file" -t "$PREFIX/$name:$TAG" -t "$PREFIX/$name:$VERSION" . >/dev/null
  size=$(podman image inspect --format '{{.Size}}' "$PREFIX/$name:$TAG")
  echo "   built in $(( $(date +%s) - start )) s, $(( size / 1024 / 1024 )) MiB"
done
