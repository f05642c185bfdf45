#!/usr/bin/env bash
# Fuzzes one target for SECONDS with libFuzzer (libfuzzer-sys, stable toolchain):
#   fuzz/run.sh smtp_session 600
# Targets: smtp_session smtp_client dns_answer record_decode.
# New interesting inputs go to fuzz/corpus/TARGET/ (the corpus CI replays); a crash
# is saved as fuzz/artifacts/TARGET/crash-*; copy it into the corpus once fixed, so
# that it stays a regression test. Ends with a line of executions and crashes.
set -euo pipefail
target=${1:?usage: fuzz/run.sh TARGET SECONDS}
seconds=${2:?usage: fuzz/run.sh TARGET SECONDS}
cd "$(dirname "$0")"
[ -d "corpus/$target" ] || { echo "no target $target (see corpus/)" >&2; exit 2; }
# The coverage instrumentation libFuzzer needs, with stable -C flags only (cargo fuzz
# adds -Zsanitizer=address, which needs a nightly compiler; safe Rust does not need it
# to find panics, overflows and aborts). --cfg fuzzing as cargo fuzz sets it.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
# An explicit --target keeps RUSTFLAGS off build scripts and proc macros (they would
# be instrumented too, and fail to link without libFuzzer).
host=$(rustc -vV | sed -n 's/^host: //p')
cmd=(cargo build --release --locked --target "$host" --bin "$target")
# The machine's shared build lock, where there is one.
if [ -e /tmp/cargo.lock ] && command -v flock >/dev/null; then cmd=(flock /tmp/cargo.lock "${cmd[@]}"); fi
"${cmd[@]}"
mkdir -p "artifacts/$target"
log=$(mktemp)
stamp=$(mktemp)
trap 'rm -f "$log" "$stamp"' EXIT
rc=0
"$CARGO_TARGET_DIR/$host/release/$target" "corpus/$target" \
    -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="artifacts/$target/" -print_final_stats=1 2>&1 | tee "$log" || rc=$?
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
crashes=$(find "artifacts/$target" -type f -newer "$stamp" | wc -l)
echo "fuzz $target: ${seconds}s, ${execs:-?} executions, $crashes crashes (exit $rc)"
[ "$crashes" -eq 0 ] && [ "$rc" -eq 0 ]
