#!/usr/bin/env bash
# Builds the fuzz targets with coverage instrumentation (libFuzzer via libfuzzer-sys, stable
# toolchain) and runs each for a while on its committed seed corpus.
#
#   fuzz/run.sh [--seconds N] [--runs N] [--results FILE] [--append] [targets...]
#
# Defaults: 60 seconds per target, every target, results in fuzz/results.txt. With --runs, a
# target stops at that many executions (--seconds still caps it). --append adds to the results
# file instead of replacing it. Prints and writes one line per target: name, executions, the
# seconds it ran, corpus size, and "ok" or "CRASH".
# Exits non-zero when a target crashes; the input is kept in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
root=$(pwd)

seconds=60
runs=-1
append=0
results="$root/results.txt"
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --results) results=$2; shift 2 ;;
    --append) append=1; shift ;;
    -h|--help) sed -n 2,12p "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
all=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^tollgate-fuzz$')
[ ${#targets[@]} -gt 0 ] || read -r -a targets <<<"$(echo $all)"
for t in "${targets[@]}"; do
  grep -qx "$t" <<<"$all" || { echo "no fuzz target '$t' (have: $(echo $all))" >&2; exit 2; }
done

# Instrumented code goes to its own target dir so it never invalidates the ordinary build.
target_dir="${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-$root/target}/fuzz}"
triple=$(rustc -vV | sed -n 's/^host: //p')
# sancov without a sanitizer: safe Rust needs no ASan; panics (overflow checks and debug
# assertions are on in this package's release profile) abort, which libFuzzer reports.
# An explicit --target keeps these flags off build scripts and proc macros.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
t0=$(date +%s)
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
cargo build --release --locked --manifest-path "$root/Cargo.toml" --target "$triple" \
  --target-dir "$target_dir" "${bins[@]}"
echo "fuzz: built in $(( $(date +%s) - t0 ))s"

: >"$results.tmp"
failed=0
for t in "${targets[@]}"; do
  seeds="$root/corpus/$t"
  work=$(mktemp -d)
  mkdir -p "$root/artifacts/$t"
  log=$(mktemp)
  status=ok
  started=$(date +%s)
  # Seeds are read-only input; new coverage goes to a scratch corpus.
  if ! "$target_dir/$triple/release/$t" "$work" "$seeds" -max_total_time="$seconds" -runs="$runs" \
      -max_len=65536 -rss_limit_mb=1024 -timeout=10 -print_final_stats=1 \
      -artifact_prefix="$root/artifacts/$t/" >"$log" 2>&1; then
    status=CRASH
    failed=1
    tail -n 40 "$log" >&2
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  corpus=$(find "$work" -type f | wc -l)
  took=$(( $(date +%s) - started ))
  line=$(printf '%-22s %12s execs  %5ss  corpus %6s  %s' "$t" "${execs:-0}" "$took" "$corpus" "$status")
  echo "$line"
  echo "$line" >>"$results.tmp"
  rm -rf "$work" "$log"
  rmdir "$root/artifacts/$t" 2>/dev/null || true
done
[ "$append" = 1 ] && [ -s "$results" ] && echo >>"$results"
[ "$append" = 1 ] || : >"$results"
{
  args="--seconds $seconds"
  [ "$runs" -ge 0 ] && args="$args --runs $runs"
  echo "# fuzz/run.sh $args ${targets[*]}"
  echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(rustc --version)"
  cat "$results.tmp"
} >>"$results"
rm -f "$results.tmp"
rmdir "$root/artifacts" 2>/dev/null || true
exit $failed
