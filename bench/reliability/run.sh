#!/usr/bin/env bash
# Every long reliability run, then the figures of docs/reliability.md from their results.
#
#   bench/reliability/run.sh [--report] [--soak-seconds N]
#
# --report: only rewrite docs/reliability.md from the committed results (seconds).
# Otherwise (about 90 minutes on 2 cores): release sidecar build, the flapping partner (5 min),
# 10,000 idle connections, the soak (30 min), the control-plane fan-out bench (1,000 streams),
# every fuzz target short of 10^7 executions taken there, then the report. Results go to
# bench/results/ and fuzz/results.txt; a failed check is reported and the rest still runs;
# the exit status says whether everything passed.
set -uo pipefail
cd "$(dirname "$0")/../.."
soak=1800
report_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --report) report_only=1; shift ;;
    --soak-seconds) soak=$2; shift 2 ;;
    -h|--help) sed -n 2,11p "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
if [ "$report_only" = 1 ]; then
  exec python3 bench/reliability/report.py
fi

started=$(date +%s)
failed=()
step() {
  local name=$1; shift
  local t0; t0=$(date +%s)
  echo "::: ${name}"
  if ! "$@"; then failed+=("$name"); fi
  echo "::: ${name}: done in $(( $(date +%s) - t0 ))s (total $(( $(date +%s) - started ))s)"
}

target_dir="${CARGO_TARGET_DIR:-target}"
command -v oha >/dev/null || [ -x "$HOME/.cargo/bin/oha" ] || step "install oha" cargo install oha --version 1.16.0 --locked --quiet
command -v nginx >/dev/null || step "install nginx" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx'
step "build release sidecar" cargo build --release --locked -p tollgate-sidecar
sidecar="$target_dir/release/tollgate-sidecar"
results=bench/results
step "flapping partner" python3 bench/reliability/flap.py "$sidecar" --seconds 300 --out "$results/reliability-flap.json"
step "10,000 idle connections" python3 bench/reliability/idle.py "$sidecar" --idle 10000 --out "$results/reliability-idle.json"
step "soak" python3 bench/reliability/soak.py "$sidecar" --seconds "$soak" --out "$results/reliability-soak.json"
step "control-plane fan-out" cargo bench --locked -p tollgate-operator --bench fanout -- --out "$results/fanout.json"
# Fuzz targets short of 10^7 executions in their longest run so far.
short=$(python3 - <<'PY'
import re
best = {}
for line in open("fuzz/results.txt"):
    m = re.match(r"^(\S+)\s+(\d+) execs", line)
    if m:
        best[m[1]] = max(best.get(m[1], 0), int(m[2]))
names = [l.split('"')[1] for l in open("fuzz/Cargo.toml") if l.startswith('name = "') and "tollgate-fuzz" not in l]
print(" ".join(n for n in names if best.get(n, 0) < 10_000_000))
PY
)
if [ -n "$short" ]; then
  # shellcheck disable=SC2086
  step "fuzz to 10^7: $short" fuzz/run.sh --runs 10000000 --seconds 2400 --append $short
fi
step "report" python3 bench/reliability/report.py
echo "::: reliability runs done in $(( $(date +%s) - started ))s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "::: failed: ${failed[*]}"
  exit 1
fi
