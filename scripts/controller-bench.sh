#!/usr/bin/env bash
# Builds the controller scale benchmark in release mode and runs it: model build time for a large
# synthetic cluster, peak RSS of the controller process, and xDS push latency to many clients.
# Arguments go to the benchmark, e.g. `scripts/controller-bench.sh --clients 50 --debounce 10ms`.
# No root needed; everything runs on 127.0.0.1. Exit status is 0 even when a target is missed.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p controller --bin controller-scale-bench
exec target/release/controller-scale-bench "$@"
