#!/usr/bin/env bash
# Makes the two public base images our Dockerfiles start FROM as local images under the same
# names, for machines that cannot pull them (no registry reachable, as on our CI):
#   docker.io/library/rust:1.95-bookworm   Debian bookworm (mmdebstrap minbase, gcc, libc6-dev,
#                                          CA certificates) + this machine's Rust toolchain
#   gcr.io/distroless/cc-debian12:nonroot   glibc, libgcc, CA certificates, tzdata, passwd
#                                          entries for nonroot (65532); no shell, no apt
# Built with --pull=never afterwards, the Dockerfiles stay the ones a user builds with the
# public images. An image that already exists is kept (--force remakes both).
# Needs root, podman and mmdebstrap (installed from Debian's packages when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILDER=docker.io/library/rust:1.95-bookworm
RUNTIME=gcr.io/distroless/cc-debian12:nonroot
SUITE=bookworm
force=0
[ "${1:-}" = "--force" ] && force=1

need() { command -v "$1" >/dev/null 2>&1; }
if ! need podman || ! need mmdebstrap; then
  apt-get install -y -qq podman mmdebstrap >/dev/null 2>&1 || {
    apt-get update -qq >/dev/null
    apt-get install -y -qq podman mmdebstrap >/dev/null
  }
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

have() { [ "$force" = 0 ] && podman image exists "$1"; }

if ! have "$RUNTIME"; then
  echo "== $RUNTIME (local, from Debian $SUITE packages)"
  # extract: the listed packages only, no maintainer scripts, hence no shell and no dpkg.
  mmdebstrap --quiet --variant=extract \
    --include=libc6,libgcc-s1,base-files,netbase,tzdata,ca-certificates \
    --customize-hook='printf "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n" > "$1/etc/passwd"' \
    --customize-hook='printf "root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n" > "$1/etc/group"' \
    --customize-hook='mkdir -p "$1/home/nonroot" "$1/tmp" "$1/etc/ssl/certs" && chown 65532:65532 "$1/home/nonroot" && chmod 1777 "$1/tmp"' \
    --customize-hook='cp /etc/ssl/certs/ca-certificates.crt "$1/etc/ssl/certs/ca-certificates.crt"' \
    --customize-hook='rm -rf "$1/usr/share/doc" "$1/usr/share/man" "$1/usr/share/info" "$1/usr/share/lintian" "$1/var/lib/apt" "$1/var/cache/apt" "$1/etc/apt"' \
    "$SUITE" "$tmp/runtime.tar"
  podman import --quiet \
    --change 'USER=65532:65532' --change 'WORKDIR=/home/nonroot' \
    --change 'ENV=PATH=/usr/local/bin:/usr/bin:/bin' \
    --change 'ENV=SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    "$tmp/runtime.tar" "$RUNTIME" >/dev/null
  rm -f "$tmp/runtime.tar"
fi

if ! have "$BUILDER"; then
  sysroot=$(rustc --print sysroot)
  echo "== $BUILDER (local: Debian $SUITE + $(rustc --version) from $sysroot)"
  # The toolchain without its HTML docs (~800 MB); rustc finds its libraries relative to itself.
  mmdebstrap --quiet --variant=minbase --include=gcc,libc6-dev,ca-certificates \
    --customize-hook="mkdir -p \"\$1/usr/local/rust\" \"\$1/usr/local/cargo\" && cp -a $sysroot/bin $sysroot/lib $sysroot/libexec \"\$1/usr/local/rust/\"" \
    --customize-hook='cp /etc/ssl/certs/ca-certificates.crt "$1/etc/ssl/certs/ca-certificates.crt"' \
    "$SUITE" "$tmp/builder.tar"
  podman import --quiet \
    --change 'ENV=CARGO_HOME=/usr/local/cargo' \
    --change 'ENV=PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$tmp/builder.tar" "$BUILDER" >/dev/null
  rm -f "$tmp/builder.tar"
fi
