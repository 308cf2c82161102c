#!/usr/bin/env bash
# Tollgate benchmarks, one command: installs what is missing, builds the sidecar in release,
# runs every case against HAProxy and nginx, writes bench/results/*.json and the tables in
# docs/benchmarks.md.   Usage: bench/run.sh [--quick] [--runs N] [--duration S] [--only CASES]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cd "$repo"

need_apt=()
command -v taskset >/dev/null || need_apt+=(util-linux)
[ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)
[ -x /usr/sbin/nginx ] || need_apt+=(nginx)
command -v python3 >/dev/null || need_apt+=(python3)
command -v openssl >/dev/null || need_apt+=(openssl)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "bench: installing ${need_apt[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Debian's postinst may start the packaged service; the bench runs its own instances.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
fi

OHA_VERSION=1.16.0
oha_bin="$(command -v oha || true)"
if [ -z "$oha_bin" ] || ! "$oha_bin" --version 2>/dev/null | grep -q "$OHA_VERSION"; then
    echo "bench: installing oha $OHA_VERSION (cargo install, a few minutes the first time)"
    cargo install oha --version "$OHA_VERSION" --locked --quiet
    oha_bin="$(command -v oha || echo "$HOME/.cargo/bin/oha")"
fi

echo "bench: building tollgate-sidecar (release)"
cargo build --release -p tollgate-sidecar --quiet
target_dir="${CARGO_TARGET_DIR:-$repo/target}"

export OHA="$oha_bin" SIDECAR="$target_dir/release/tollgate-sidecar"
exec python3 "$here/bench.py" "$@"
