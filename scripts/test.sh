#!/usr/bin/env bash
# Runs every check and test, as CI does. Needs root (tests create network namespaces).
# Installs what it needs itself on a fresh Debian 12 machine.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "test.sh: needs root (the tests create network namespaces); run it with sudo" >&2
  exit 1
fi

need=()
# clang + libbpf-dev build the eBPF redirection programs (crate ebpf).
for pkg in iproute2 nftables curl iperf3 containernetworking-plugins clang libbpf-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
for comp in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$comp" || rustup component add "$comp"
done
cargo nextest --version >/dev/null 2>&1 || cargo install --locked cargo-nextest

# A one-shot build gains nothing from incremental caches; they only fill the disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
echo "==> disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free"

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> tests"
cargo nextest run --workspace --locked --no-fail-fast "$@"
cargo test --workspace --doc --locked
