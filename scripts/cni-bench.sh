#!/usr/bin/env bash
# CNI ADD latency with and without mesh-cni (p50/p99 over 100 pods), using Debian's bridge and
# host-local plugins and the real node agent, controller and ztunnel in release builds.
# Needs root. Arguments go to the benchmark, e.g. `scripts/cni-bench.sh --pods 50 --json`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "cni-bench.sh: needs root (network namespaces); run it with sudo" >&2
  exit 1
fi
need=()
# clang + libbpf-dev build the eBPF redirection programs (crate ebpf).
for pkg in iproute2 nftables containernetworking-plugins clang libbpf-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 && apt-get install -y -qq "${need[@]}" >/dev/null
fi
echo "==> building release binaries" >&2
cargo build --release --locked -p ztunnel -p controller -p cni-plugin -p e2e --bins >&2
exec target/release/cni-bench "$@"
