#!/usr/bin/env bash
# Write amplification under a steady mixed load: 90 s of ringmail-load (4 sessions,
# 4 KiB), 80% relayed into ringmail-sink (which defers 1%) and 20% to the local domain
# (mail that stays), compaction running; the server's bytes written (wait4 ru_oublock,
# as /proc/PID/io write_bytes) over the message bytes it accepted, and the data
# directory at the end. See ringmail-wamp --help (--seconds, --stay-percent,
# --defer-permille, --segment-size, --zero-ahead, --cores, --label). With a server that
# counts them, the bytes written by cause (records, copies, snapshots, tail blocks,
# padding, zeros ahead) are reported too.
# Writes bench/results/wamp-[LABEL-]<time>.{json,md,csv,svg}.
#
#   bench/wamp.sh                                   # builds release first
#   BIN=target-before/release TOOLS_BIN=target/release bench/wamp.sh --label before
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${BIN:-}" ]; then
  cargo build --release -q -p ringmail -p ringmail-bench
fi
exec target/release/ringmail-wamp --bin "${BIN:-target/release}" \
  ${TOOLS_BIN:+--tools-bin "$TOOLS_BIN"} "$@"
