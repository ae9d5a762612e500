#!/usr/bin/env bash
# Makes the two public base images our Dockerfiles start FROM as local images under the same
# names, for machines that cannot pull them (no registry reachable, as on our CI):
#   docker.io/library/rust:1.95-bookworm   Debian bookworm (mmdebstrap minbase, gcc, libc6-dev, make,
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
  # extract: the listed packages only, no maintainer scripts, hence no shell and no dpkg (and
  # no hooks either: the rest is done to the directory afterwards).
  root="$tmp/runtime"
  mmdebstrap --quiet --variant=extract \
    --include=libc6,libgcc-s1,base-files,netbase,tzdata,ca-certificates \
    "$SUITE" "$root"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$root/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' > "$root/etc/group"
  mkdir -p "$root/home/nonroot" "$root/tmp" "$root/etc/ssl/certs"
  chown 65532:65532 "$root/home/nonroot"
  chmod 1777 "$root/tmp"
  # The certificate bundle the package's maintainer script would have generated.
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/info" \
    "$root/usr/share/lintian" "$root/var/lib/apt" "$root/var/cache/apt" "$root/etc/apt"
  for sh in bin/sh bin/bash bin/dash usr/bin/sh; do
    [ ! -e "$root/$sh" ] || { echo "the runtime base has a shell ($sh)" >&2; exit 1; }
  done
  tar -C "$root" -cf "$tmp/runtime.tar" .
  rm -rf "$root"
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
  root="$tmp/builder"
  mmdebstrap --quiet --variant=minbase --include=gcc,libc6-dev,make,ca-certificates "$SUITE" "$root"
  mkdir -p "$root/usr/local/rust" "$root/usr/local/cargo"
  cp -a "$sysroot/bin" "$sysroot/lib" "$sysroot/libexec" "$root/usr/local/rust/"
  # cargo inside the build trusts the same roots as this machine (to reach crates.io).
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  tar -C "$root" -cf "$tmp/builder.tar" .
  rm -rf "$root"
  podman import --quiet \
    --change 'ENV=CARGO_HOME=/usr/local/cargo' \
    --change 'ENV=PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$tmp/builder.tar" "$BUILDER" >/dev/null
  rm -f "$tmp/builder.tar"
fi
