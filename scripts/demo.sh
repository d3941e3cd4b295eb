#!/usr/bin/env bash
# The local demo: two pods in network namespaces, the real ztunnel between them (mTLS with
# SPIFFE identities over HBONE), then an AuthorizationPolicy decision. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "run as root (it creates network namespaces)" >&2; exit 1; fi
need=()
for pkg in iproute2 nftables; do dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg"); done
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
echo "==> building (release)"
cargo build --release --locked -p ztunnel -p e2e --bin ztunnel --bin ztunnel-demo
exec target/release/ztunnel-demo "$@"
