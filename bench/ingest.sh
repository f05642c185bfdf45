#!/usr/bin/env bash
# Ingest benchmark: Postfix's smtp-source (4 KiB messages, 32 sessions) into
#   (a) ringmail, durable (every 250 after the fdatasync covering the message), on
#       all cores (the default) and on one core (`--cores 1`: like smtp-sink, one
#       thread, leaving the other core to smtp-source), and
#   (b) Postfix's smtp-sink, which stores nothing: the limit,
# in both modes (one message per connection, and -d: many per connection), repeated
# and interleaved (sink, ringmail, ringmail 1 core, sink, ...) so that drift on a
# shared machine hits all alike. Prints a Markdown table of medians and the ratios.
#
#   bench/ingest.sh                # 3 repetitions
#   REPS=5 bench/ingest.sh
#   bench/ingest.sh --quick        # 1 repetition, fewer messages
#   RINGMAIL_ARGS="--cores 1" bench/ingest.sh   # extra flags for ringmail serve
#   CLIENTS=2 bench/ingest.sh      # two smtp-source processes, 16 sessions each
#
# Installs the postfix package when smtp-source is missing (never starts the postfix
# daemon). Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-3}
N_CONN=${N_CONN:-10000}     # messages, one per connection
N_MANY=${N_MANY:-40000}     # messages, many per connection (-d)
SESSIONS=${SESSIONS:-32}
SIZE=${SIZE:-4096}
CLIENTS=${CLIENTS:-1}       # smtp-source processes sharing the sessions and messages
if [ "${1:-}" = "--quick" ]; then REPS=1; N_CONN=3000; N_MANY=10000; fi

if ! command -v smtp-source >/dev/null && [ ! -x /usr/sbin/smtp-source ]; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postfix
fi
export PATH="$PATH:/usr/sbin"
cargo build --release -q -p ringmail
RINGMAIL=target/release/ringmail

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

source bench/lib/ports.sh

# rate PORT COUNT [smtp-source flags]: prints messages/s over CLIENTS processes
rate() {
  local port=$1 count=$2; shift 2
  local t0 t1 i pids=()
  t0=$(date +%s.%N)
  for i in $(seq 1 "$CLIENTS"); do
    smtp-source "$@" -s $((SESSIONS / CLIENTS)) -l "$SIZE" -m $((count / CLIENTS)) -f bench@source.test -t rcpt@localhost "127.0.0.1:$port" &
    pids+=($!)
  done
  wait "${pids[@]}"
  t1=$(date +%s.%N)
  python3 -c "print(round($((count / CLIENTS * CLIENTS)) / ($t1 - $t0)))"
}

results="$work/results.txt"
: > "$results"
for rep in $(seq 1 "$REPS"); do
  # The limit: smtp-sink.
  port=$(free_port)
  smtp-sink -u nobody "127.0.0.1:$port" 1000 & pids+=($!)
  wait_port "$port"
  echo "sink conn $(rate "$port" "$N_CONN")" >> "$results"
  echo "sink many $(rate "$port" "$N_MANY" -d)" >> "$results"
  kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true

  # ringmail, fresh data directory, durable: all cores, then one.
  for name in ringmail ringmail1; do
    cores=""; [ "$name" = ringmail1 ] && cores="--cores 1"
    port=$(free_port)
    rm -rf "$work/data"
    RINGMAIL_LOG=warn $RINGMAIL serve --data "$work/data" --smtp "127.0.0.1:$port" --hostname bench.test $cores ${RINGMAIL_ARGS:-} 2>"$work/ringmail.log" & pids+=($!)
    wait_port "$port"
    echo "$name conn $(rate "$port" "$N_CONN")" >> "$results"
    echo "$name many $(rate "$port" "$N_MANY" -d)" >> "$results"
    kill -TERM "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
    queued=$($RINGMAIL queue list --json --data "$work/data" | wc -l)
    expected=$(( N_CONN / CLIENTS * CLIENTS + N_MANY / CLIENTS * CLIENTS ))
    if [ "$queued" -ne "$expected" ]; then
      echo "ringmail queued $queued messages, expected $expected" >&2; cat "$work/ringmail.log" >&2; exit 1
    fi
  done
done

python3 - "$results" "$SESSIONS" "$SIZE" "$REPS" "$CLIENTS" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
med = {}
for name, mode, r in rows:
    med.setdefault((name, mode), []).append(int(r))
print(f"smtp-source -s {sys.argv[2]} -l {sys.argv[3]} in {sys.argv[5]} process(es), medians of {sys.argv[4]} interleaved runs (msg/s)\n")
print("| mode | smtp-sink (limit) | ringmail, all cores | / limit | ringmail, 1 core | / limit |")
print("|---|---|---|---|---|---|")
for mode, label in (("conn", "one message per connection"), ("many", "many per connection (-d)")):
    s = statistics.median(med[("sink", mode)])
    r = statistics.median(med[("ringmail", mode)]); r1 = statistics.median(med[("ringmail1", mode)])
    print(f"| {label} | {s:.0f} | {r:.0f} | {r/s:.2f} | {r1:.0f} | {r1/s:.2f} |")
PY
