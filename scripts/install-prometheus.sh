#!/usr/bin/env bash
# Installs Debian's prometheus package (server + promtool) into .prometheus/ without root, as
# install-envoy.sh installs Envoy: the observability tests and `scripts/demo.sh --observe` use it.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.prometheus
if [ -x "$DEST/usr/bin/prometheus" ] && [ -x "$DEST/usr/bin/promtool" ]; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
  # A fresh machine may have empty package lists.
  if [ "$(id -u)" = 0 ]; then apt-get update -qq >/dev/null; else sudo -n apt-get update -qq >/dev/null; fi
  (cd "$tmp" && apt-get download prometheus >/dev/null)
fi
rm -rf "$DEST.tmp"
mkdir -p "$DEST.tmp"
dpkg -x "$tmp"/prometheus_*.deb "$DEST.tmp"
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
"$DEST/usr/bin/prometheus" --version 2>&1 | head -1
