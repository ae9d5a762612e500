#!/usr/bin/env bash
# Installs Debian's prometheus package (server + promtool) into .prometheus/ without root, as
# install-envoy.sh installs Envoy: the observability tests and `scripts/demo.sh --observe` use it.
# The JavaScript packages its web UI links to (relative symlinks into usr/share/javascript) are
# unpacked beside it, so the graph pages work when run with
# --web.local-assets=.prometheus/usr/share/prometheus/web/.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.prometheus
UI_DEBS="libjs-bootstrap4 libjs-eonasdan-bootstrap-datetimepicker libjs-jquery libjs-jquery-hotkeys libjs-moment libjs-moment-timezone libjs-mustache libjs-popper.js libjs-rickshaw libjs-d3 fonts-glyphicons-halflings"
if [ -x "$DEST/usr/bin/prometheus" ] && [ -x "$DEST/usr/bin/promtool" ] && [ -d "$DEST/usr/share/javascript/rickshaw" ]; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# shellcheck disable=SC2086
if ! (cd "$tmp" && apt-get download prometheus $UI_DEBS >/dev/null 2>&1); then
  # A fresh machine may have empty package lists.
  if [ "$(id -u)" = 0 ]; then apt-get update -qq >/dev/null; else sudo -n apt-get update -qq >/dev/null; fi
  (cd "$tmp" && apt-get download prometheus $UI_DEBS >/dev/null)
fi
rm -rf "$DEST.tmp"
mkdir -p "$DEST.tmp"
for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$DEST.tmp"; done
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
"$DEST/usr/bin/prometheus" --version 2>&1 | head -1
