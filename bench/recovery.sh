#!/usr/bin/env bash
# Recovery time and resident memory against the number of stored messages (10k, 100k,
# 1M queued 512-byte messages, 2 shards), cold page cache before every start (needs
# root), plus 1M queued behind 1M relayed-and-done messages (--history 1000000,4000000
# for more than one history length). See ringmail-recovery
# --help for the knobs (--counts, --history, --history-first, --size, --label).
# Writes bench/results/recovery-[LABEL-]<time>.{json,md,svg}.
#
#   bench/recovery.sh                          # ~2 minutes, builds release first
#   BIN=target-before/release FILL_BIN=target/release bench/recovery.sh --label before
#
# Mailboxes (docs/mailboxes.md): 1M stored messages in the INBOXes of 10k users, opened
# in-process (heap per message by a counting allocator), from the log alone, and by
# `ringmail serve` (--skip-server for a server that does not recover mail indexes):
#
#   bench/recovery.sh --users 10000 --counts 100000,1000000 --reps 3 --from-log
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${BIN:-}" ]; then
  cargo build --release -q -p ringmail -p ringmail-bench
fi
exec target/release/ringmail-recovery --bin "${BIN:-target/release}" \
  ${FILL_BIN:+--fill-bin "$FILL_BIN"} "$@"
