#!/usr/bin/env bash
# Local delivery benchmark (docs/mailboxes.md): ringmail-load into USERS local users
# (user0..user999@localhost), each message into one INBOX, beside the ingest-only rate
# of the same run: the same load to a remote domain routed to a closed port, so every
# message is stored and its one attempt is refused at once (a RcptUpdate, as a local
# delivery writes an Append). Interleaved per size and repetition, fresh data
# directory every time (copied from one with the users).
#
# Figures per run: ingest msg/s (as ringmail-load saw the 250s); local delivery msg/s
# = messages / time from the first message sent until the last is in its mailbox
# (the queue is empty); delivery-to-visible latency p50/p99 from the server's
# `mailbox deliveries` line (arrival to durable entry, measured on the home shard).
#
#   bench/local.sh                      # 3 repetitions, 4 KiB and 100 KiB
#   REPS=1 N=5000 bench/local.sh        # quick
#
# Everything listens on 127.0.0.1 only; every run is bounded in messages and time.
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-3}
N=${N:-20000}
SESSIONS=${SESSIONS:-32}
USERS=${USERS:-1000}
SIZES=${SIZES:-"4096 102400"}

cargo build --release -q -p ringmail -p ringmail-bench
R=target/release/ringmail
LOAD=target/release/ringmail-load

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

source bench/lib/ports.sh

# The users, added through a running server (one argon2id hash each, in the CLI).
port=$(free_port)
RINGMAIL_LOG=warn $R serve --data "$work/template" --smtp "127.0.0.1:$port" --admin 127.0.0.1:0 --hostname bench.test 2>"$work/template.log" & pids+=($!)
wait_port "$port"
for i in $(seq 0 $((USERS - 1))); do
  echo "password$i" | $R user add "user$i@localhost" --password-stdin --data "$work/template" >/dev/null
done
kill -TERM "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
echo "added $USERS users" >&2

results="$work/results.txt"
: > "$results"
run() { # NAME SIZE DOMAIN [serve flags]
  local name=$1 size=$2 domain=$3; shift 3
  rm -rf "$work/data"; cp -r "$work/template" "$work/data"
  port=$(free_port)
  RINGMAIL_LOG=info $R serve --data "$work/data" --smtp "127.0.0.1:$port" --admin 127.0.0.1:0 --hostname bench.test "$@" 2>"$work/$name.log" & pids+=($!)
  wait_port "$port"
  local t0 t1 t2 out
  if [ "$name" = local ]; then
    # Delivered: nothing left in the queue, as the admin API's summary counts it,
    # asked every 10 ms once the load is done (bounded wait); the poller starts
    # before the load so that its own start-up is not counted. (`queue list`
    # replays the data directory: 0.2-0.4 s of CPU and reads per call at 100 KiB,
    # which slowed what it measured.)
    rm -f "$work/go"; mkfifo "$work/go"
    python3 bench/lib/queue_drained.py "$work/go" "$work/data/admin.addr" > "$work/t2" &
    poller=$!
  fi
  t0=$(now)
  out=$($LOAD smtp --target "127.0.0.1:$port" --sessions "$SESSIONS" --messages "$N" --size "$size" --domain "$domain" --rcpts 1 --max-seconds 600 --json)
  t1=$(now)
  if [ "$name" = local ]; then
    echo go > "$work/go"
    wait "$poller"
    t2=$(cat "$work/t2")
  else
    t2=$t1
  fi
  kill -TERM "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
  python3 - "$name" "$size" "$t0" "$t1" "$t2" "$out" "$work/$name.log" >> "$results" <<'PY'
import sys, json, re
name, size, t0, t1, t2, out, log = sys.argv[1:]
r = json.loads(out)
ingest = r["messages"] / (float(t1) - float(t0))
done = r["messages"] / (float(t2) - float(t0))
p50 = p99 = "-"
for line in open(log, errors="replace"):
    if "mailbox deliveries" in line and "executor" not in line:
        p50 = re.search(r"latency_p50_ms=(\d+)", line).group(1)
        p99 = re.search(r"latency_p99_ms=(\d+)", line).group(1)
print(name, size, r["messages"], round(ingest), round(done), p50, p99)
PY
}

for rep in $(seq 1 "$REPS"); do
  for size in $SIZES; do
    run ingest "$size" remote.test --route '*=127.0.0.1:9'
    run local "$size" localhost
  done
done

python3 - "$results" "$REPS" "$N" "$SESSIONS" "$USERS" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
print(f"ringmail-load {sys.argv[3]} messages, {sys.argv[4]} sessions, {sys.argv[5]} users; medians of {sys.argv[2]} interleaved runs\n")
print("| size | ingest only (msg/s) | local: ingest (msg/s) | local: delivered (msg/s) | delivered / ingest only | p50 ms | p99 ms |")
print("|---|---|---|---|---|---|---|")
for size in sorted({r[1] for r in rows}, key=int):
    ing = statistics.median(int(r[3]) for r in rows if r[0] == "ingest" and r[1] == size)
    loc = [r for r in rows if r[0] == "local" and r[1] == size]
    li = statistics.median(int(r[3]) for r in loc)
    ld = statistics.median(int(r[4]) for r in loc)
    p50 = statistics.median(int(r[5]) for r in loc if r[5] != "-")
    p99 = statistics.median(int(r[6]) for r in loc if r[6] != "-")
    print(f"| {int(size)//1024} KiB | {ing:.0f} | {li:.0f} | {ld:.0f} | {ld/ing:.2f} | {p50:.0f} | {p99:.0f} |")
PY
