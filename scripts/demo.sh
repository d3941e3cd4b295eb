#!/usr/bin/env bash
# The local demo: `meshctl sandbox` brings up a two-node ambient mesh on this host (controller,
# node agents, ztunnels; pods as network namespaces wired by the real CNI bridge plugin and our
# chained plugin), applies the Bookinfo-shaped quickstart, shows mTLS identities and an
# AuthorizationPolicy decision, and leaves the sandbox running for you to explore.
# Needs root. Installs the Debian packages it needs. Extra arguments go to `sandbox up`, e.g.
# `bash scripts/demo.sh --redirect-mode ebpf` (pods redirected by eBPF programs, no nftables).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "run as root (it creates network namespaces)" >&2; exit 1; fi
need=()
# clang + libbpf-dev build the eBPF redirection programs (crate ebpf).
for pkg in iproute2 nftables curl containernetworking-plugins clang libbpf-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
echo "==> building the mesh binaries"
cargo build --locked --bins
M=target/debug/meshctl
q=examples/quickstart
pp=http://productpage.bookinfo.svc.cluster.local:9080/

echo "==> starting a 2-node sandbox with the quickstart"
$M sandbox down >/dev/null 2>&1 || true
$M sandbox up --nodes 2 -f $q/namespaces.yaml -f $q/bookinfo.yaml -f $q/clients.yaml "$@"

echo; echo "==> pods (ambient = redirected into ztunnel; identity = SPIFFE ID in its certificate)"
$M sandbox get pods

echo; echo "==> bookinfo/sleep calls productpage (which calls details and reviews, across nodes)"
$M sandbox exec bookinfo/sleep -- mesh-testapp call $pp --count 6

echo; echo "==> ztunnel saw these mTLS connections (destination side, both identities):"
label() { grep -o "$1=\"[^\"]*\"" <<<"$2" | cut -d'"' -f2; }
for n in msb-node0 msb-node1; do
  ip netns exec $n curl -s http://127.0.0.1:15020/metrics \
    | grep '^istio_tcp_connections_opened_total' | grep 'reporter="destination"' \
    | while read -r line; do
        echo "  $(label source_principal "$line") -> $(label destination_principal "$line") [$(label security_policy "$line")]"
      done
done | sort -u

echo; echo "==> policy: allow-nothing in bookinfo ($q/try/deny-all.yaml)"
$M sandbox apply -f $q/try/deny-all.yaml
if $M sandbox exec bookinfo/sleep -- mesh-testapp call $pp --count 2 --timeout 2s; then
  echo "unexpected: the call succeeded" >&2; exit 1
else
  echo "  -> refused by the destination's ztunnel, as the policy says"
fi
$M sandbox delete -f $q/try/deny-all.yaml
$M sandbox exec bookinfo/sleep -- mesh-testapp call $pp --count 2 >/dev/null && echo "  policy removed: calls succeed again"

cat <<TXT

The sandbox is still running. Things to try (see $q/try/ and docs/sandbox.md):
  $M sandbox apply -f $q/try/strict-mtls.yaml      # then call from legacy/legacy-sleep: refused
  $M sandbox exec legacy/legacy-sleep -- mesh-testapp call $pp
  $M sandbox apply -f $q/try/deny-all.yaml -f $q/try/allow-productpage.yaml
  $M sandbox exec bookinfo/productpage-v1 -- mesh-testapp call http://reviews:9080/ --count 6
  $M sandbox get workloads
  $M sandbox logs ztunnel-node0
When done:
  $M sandbox down
TXT
