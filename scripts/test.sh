#!/usr/bin/env bash
# The README's test command: formatting, lints and every test in the workspace.
# Works on a fresh machine with the Rust toolchain; installs the project-local Envoy and
# Prometheus first.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
# Debug builds of the test binaries; two cores, so keep one build job per core.
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
if [ -x scripts/install-envoy.sh ]; then
  scripts/install-envoy.sh
fi
# Debian's Prometheus and promtool, for the observability tests (rules, alerts, dashboard).
scripts/install-prometheus.sh
# tests/netns_faults.rs drops packets with iptables (Debian's package; a fresh machine may
# lack it).
if ! command -v iptables >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -qq iptables >/dev/null 2>&1 || {
    apt-get update -qq >/dev/null
    apt-get install -y -qq iptables >/dev/null
  }
fi
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The four images, built the way a user builds them (local base images under the public
# names, since no registry is reachable here); tests/images.rs starts each entrypoint in its
# image. Needs root for podman; SKIP_IMAGES=1 leaves them out (the image test then skips).
if [ "${SKIP_IMAGES:-0}" != 1 ]; then
  echo "== images"
  scripts/build-images.sh --local-bases
  export INFERLANE_IMAGE_TESTS=1
fi
echo "== cargo test"
cargo test --workspace --locked --no-fail-fast -- --test-threads="${TEST_THREADS:-2}"
