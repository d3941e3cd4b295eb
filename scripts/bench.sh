#!/usr/bin/env bash
# Builds ztunnel and the benchmark in release mode and measures ztunnel's data path against a
# direct veth path (throughput, latency, connection rate, HTTP rate, CPU, memory).
# Needs root (network namespaces, nftables). Installs the tools it needs on Debian/Ubuntu.
# Arguments go to the benchmark, e.g. `scripts/bench.sh --duration 10 --json`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "bench.sh: needs root (network namespaces); run it with sudo" >&2
  exit 1
fi

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

need=()
have nft || need+=(nftables)
have ip || need+=(iproute2)
have wrk || need+=(wrk)
have iperf3 || need+=(iperf3)
have nginx || need+=(nginx)
# The eBPF redirection programs (crate ebpf) are built with clang against libbpf's headers.
have clang || need+=(clang)
[ -f /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  # nginx-light is enough (static files only); fall back to nginx where it is not packaged.
  pkgs=("${need[@]/#nginx/nginx-light}")
  if ! apt-get install -y -qq "${pkgs[@]}" >/dev/null; then
    apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

echo "==> cargo build --release -p ztunnel -p e2e" >&2
cargo build --release -p ztunnel -p e2e

echo "==> ztunnel-bench $*" >&2
exec target/release/ztunnel-bench "$@"
