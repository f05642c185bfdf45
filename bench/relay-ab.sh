#!/usr/bin/env bash
# Relay rate of two ringmail builds side by side, interleaved: ringmail-load (32
# sessions) -> ringmail (routed to a ringmail-sink) -> ringmail-sink. "relay" is
# messages over the time from the first message sent until the queue is empty (the
# admin API's summary, polled every 10 ms by a poller started before the load).
#
#   bench/relay-ab.sh OLD_BIN_DIR NEW_BIN_DIR [SIZE] [N] [REPS]
#   bench/relay-ab.sh /tmp/base/target/release target/release 102400 5000 3
#
# Build the old one in a checkout of its own with its own target directory. Prints a
# line per run and the medians. Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib/ports.sh
A=$1; B=$2; SIZE=${3:-4096}; N=${4:-20000}; REPS=${5:-3}
cargo build --release -q -p ringmail-bench
LOAD=target/release/ringmail-load
SINK=target/release/ringmail-sink
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

run() { # BIN_DIR NAME
  local bin=$1 name=$2 sp port d
  sp=$(free_port)
  $SINK --listen "127.0.0.1:$sp" > "$work/sink.json" & local sink=$!; pids+=($sink)
  d=$(mktemp -d -p "$work"); port=$(free_port)
  RINGMAIL_LOG=info "$bin/ringmail" serve --data "$d/data" --smtp "127.0.0.1:$port" \
    --admin 127.0.0.1:0 --hostname bench.test --route "*=127.0.0.1:$sp" 2>"$d/log" &
  local server=$!; pids+=($server)
  wait_port "$port"; wait_port "$sp"
  mkfifo "$d/go"
  python3 bench/lib/queue_drained.py "$d/go" "$d/data/admin.addr" > "$d/t2" &
  local poller=$! t0 t1
  t0=$(now)
  $LOAD smtp --target "127.0.0.1:$port" --sessions 32 --messages "$N" --size "$SIZE" \
    --domain remote.test --rcpts 1 --max-seconds 600 --json > "$d/out"
  t1=$(now)
  echo go > "$d/go"; wait "$poller"
  kill -TERM "$server"; wait "$server" 2>/dev/null || true
  kill -INT "$sink"; wait "$sink" 2>/dev/null || true
  python3 -c "import sys; n=$N; print('$name', round(n/($t1-$t0)), round(n/($(cat "$d/t2")-$t0)))"
}

for _ in $(seq 1 "$REPS"); do
  run "$A" old
  run "$B" new
done | tee "$work/runs"
python3 - "$work/runs" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
for name in ("old", "new"):
    r = [row for row in rows if row[0] == name]
    print(f"{name}: ingest {statistics.median(int(x[1]) for x in r):.0f} msg/s, "
          f"relay {statistics.median(int(x[2]) for x in r):.0f} msg/s (medians of {len(r)})")
PY
