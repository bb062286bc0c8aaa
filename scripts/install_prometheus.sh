#!/usr/bin/env bash
# Put a pinned Prometheus server (and promtool) into a bin dir, for the dashboard and alert
# rule tests. Debian's package, downloaded and unpacked without installing it (no root
# needed, nothing else on the machine changes). Idempotent.
#   scripts/install_prometheus.sh [BIN_DIR]     (default: .venv/bin)
set -euo pipefail
VERSION="2.42.0+ds-5+deb12u1"
DEST="${1:-.venv/bin}"
if [ -x "$DEST/prometheus" ] && "$DEST/prometheus" --version 2>&1 | grep -q "${VERSION%%+*}"; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download -q "prometheus=$VERSION" >/dev/null 2>&1) || {
  echo "apt-get download prometheus=$VERSION failed (is this Debian 12 with apt sources?)" >&2
  exit 1
}
dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
install -m 0755 "$tmp/x/usr/bin/prometheus" "$tmp/x/usr/bin/promtool" "$DEST/"
echo "installed $("$DEST/prometheus" --version 2>&1 | head -1) -> $DEST"
