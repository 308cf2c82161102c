#!/usr/bin/env bash
# Kill-switch propagation through the real API server: flips the kill switch N times with two
# sidecars subscribed and measures PATCH -> both sidecars enforcing. Writes p50/p99 to
# bench/results/propagation.json and prints them. See README.md beside this script.
#
#   bench/propagation/run.sh                 # release binaries, 20 flips
#   PROFILE=dev bench/propagation/run.sh     # the debug binaries the e2e tests use
#   bench/propagation/run.sh --flips 50 --poll-ms 1
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
profile="${PROFILE:-release}"

# The control plane (Go) is built once and cached; a no-op when up to date.
tests/build-tools.sh controlplane
# The operator and sidecar in the same profile as the bench, so it runs those.
cargo build --profile "$profile" --bins -p tollgate-operator -p tollgate-sidecar
cargo run --profile "$profile" -p tollgate-e2e --example propagation -- "$@"
