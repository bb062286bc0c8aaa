#!/usr/bin/env bash
# Put a pinned Redis server into a bin dir, for the dedup stage's tests and `make` runs.
# Debian's build (redis-tools holds the binary; redis-server is its name), with the two
# libraries it links that a minimal machine lacks (jemalloc, lzf), downloaded and unpacked
# without installing them (no root needed, nothing else on the machine changes), as
# scripts/install_prometheus.sh does. Idempotent.
#   scripts/install_redis.sh [BIN_DIR]     (default: .venv/bin)
set -euo pipefail
VERSION="5:7.0.15-1~deb12u10"
PKGS=("redis-tools=$VERSION" "libjemalloc2=5.3.0-1" "liblzf1=3.6-3")
DEST="${1:-.venv/bin}"
LIBDIR="$(cd "$DEST/.." && pwd)/lib/redis"
if [ -x "$DEST/redis-server" ] && "$DEST/redis-server" --version 2>&1 | grep -q "v=7.0.15"; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download -q "${PKGS[@]}" >/dev/null 2>&1) || {
  echo "apt-get download ${PKGS[*]} failed (is this Debian 12 with apt sources?)" >&2
  exit 1
}
for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$tmp/x"; done
mkdir -p "$LIBDIR"
# The binary decides what it is from its name: it must be called redis-server.
install -m 0755 "$tmp/x/usr/bin/redis-check-rdb" "$LIBDIR/redis-server"
cp -P "$tmp"/x/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 \
  "$tmp"/x/usr/lib/x86_64-linux-gnu/liblzf.so.1* "$LIBDIR/"
cat > "$DEST/redis-server" <<WRAP
#!/bin/sh
LD_LIBRARY_PATH="$LIBDIR\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$LIBDIR/redis-server" "\$@"
WRAP
chmod 0755 "$DEST/redis-server"
echo "installed $("$DEST/redis-server" --version) -> $DEST"
