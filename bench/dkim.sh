#!/usr/bin/env bash
# DKIM signing cost: relay 100 KiB messages (ringmail-load, 32 sessions, many per
# connection) through ringmail into ringmail-sink, end to end (first message sent to
# the last `status=sent` line), three ways interleaved in each repetition:
#   unsigned   no key;
#   rsa2048    every message signed RSA-SHA256 with a 2048-bit key (KumoMTA's setup);
#   ed25519    every message signed Ed25519 (RFC 8463).
# The limit is measured in the same run: `ringmail-load dkim-sign` signs the same
# messages with the same mail-auth signer on 2 threads, nothing else running.
# Prints a Markdown table of medians; raw lines in bench/results/dkim-<time>.txt.
#
#   bench/dkim.sh                         # REPS=3, N=5000
#   REPS=1 N=2000 NO_BUILD=1 bench/dkim.sh
# Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
N=${N:-5000}
SIZE=${SIZE:-102400}
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p ringmail -p ringmail-bench
BIN=${CARGO_TARGET_DIR:-target}/release
R=$BIN/ringmail
LOAD=$BIN/ringmail-load

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
source bench/lib/ports.sh

sink_port=$(free_port)
$BIN/ringmail-sink --listen "127.0.0.1:$sink_port" >/dev/null & pids+=($!)
wait_port "$sink_port"
keys="$work/keys"
$R dkim generate ringmail-load.test --selector rsa --algorithm rsa2048 --data "$keys" >/dev/null 2>"$work/rsa.path"
$R dkim generate ringmail-load.test --selector ed --algorithm ed25519 --data "$keys" >/dev/null 2>"$work/ed.path"
rsa_key=$(tail -1 "$work/rsa.path"); ed_key=$(tail -1 "$work/ed.path")

limit() { $LOAD dkim-sign --key "$1" --algorithm "$2" --size "$SIZE" --threads 2 --seconds 3; }
results="$work/results.txt"
: > "$results"
echo "limit rsa2048 $(limit "$rsa_key" rsa-sha256)" >> "$results"
echo "limit ed25519 $(limit "$ed_key" ed25519)" >> "$results"

port=$(free_port)
run() { # MODE
  local args=() t0 t1 sent
  case $1 in
    rsa2048) args=(--dkim "domain=ringmail-load.test,selector=rsa,key=$rsa_key,algorithm=rsa-sha256") ;;
    ed25519) args=(--dkim "domain=ringmail-load.test,selector=ed,key=$ed_key,algorithm=ed25519") ;;
  esac
  rm -rf "$work/data"
  RINGMAIL_LOG=info $R serve --data "$work/data" --smtp "127.0.0.1:$port" --pop3 127.0.0.1:0 \
    --smtps 127.0.0.1:0 --pop3s 127.0.0.1:0 --submission 127.0.0.1:0 --dns 127.0.0.1:9 \
    --hostname relay.bench.test --route "*=127.0.0.1:$sink_port" "${args[@]}" 2>"$work/ringmail.log" &
  local rm_pid=$!
  for _ in $(seq 1 200); do grep -q 'ringmail ready' "$work/ringmail.log" && break; sleep 0.05; done
  t0=$(now)
  $LOAD smtp --target "127.0.0.1:$port" --sessions 32 --messages "$N" --size "$SIZE" --per-connection 0 \
    --to rcpt@relay.test --max-seconds 300 --json > "$work/load.json" 2>/dev/null
  for _ in $(seq 1 6000); do
    sent=$(grep -c "status=sent" "$work/ringmail.log" || true)
    [ "$sent" -ge "$N" ] && break; sleep 0.05
  done
  t1=$(now)
  kill -TERM "$rm_pid"; wait "$rm_pid" 2>/dev/null || true
  local signed
  signed=$(grep -c " queued .*dkim_sign=ringmail-load.test" "$work/ringmail.log" || true)
  [ "$1" = unsigned ] || [ "$signed" -eq "$N" ] || { echo "$1: $signed of $N signed" >&2; exit 1; }
  [ "$sent" -ge "$N" ] || { echo "$1: $sent of $N delivered" >&2; exit 1; }
  python3 -c "print('$1', round($N / ($t1 - $t0)))" >> "$results"
  echo "$(tail -1 "$results") msg/s" >&2
}

for _ in $(seq 1 "$REPS"); do
  for mode in unsigned rsa2048 ed25519; do run "$mode"; done
done

mkdir -p bench/results
base=bench/results/dkim-$(date -u +%Y%m%dT%H%M%SZ)
cp "$results" "$base.txt"
python3 - "$results" "$REPS" "$N" "$SIZE" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
lim = {r[1]: float(r[2]) for r in rows if r[0] == 'limit'}
med = {m: statistics.median(float(r[1]) for r in rows if r[0] == m) for m in ('unsigned', 'rsa2048', 'ed25519')}
print(f"relay of {sys.argv[3]} messages of {sys.argv[4]} bytes, medians of {sys.argv[2]} interleaved runs, messages/s\n")
print("| mode | ringmail | / unsigned | signing limit (2 threads, same run) |")
print("|---|---|---|---|")
print(f"| unsigned | {med['unsigned']:.0f} | 1.00 | – |")
for m in ('rsa2048', 'ed25519'):
    print(f"| {m} | {med[m]:.0f} | {med[m] / med['unsigned']:.2f} | {lim[m]:.0f} |")
PY
echo "raw: $base.txt" >&2
