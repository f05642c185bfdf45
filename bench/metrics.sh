#!/usr/bin/env bash
# What the metrics cost, and what a scrape costs:
#   (a) ingest and relay rates of this tree beside the same workloads on a base
#       revision built without metrics (default: the commit before they came,
#       c14c161), interleaved runs (base, new, base, new, ...): ringmail-load, 32
#       sessions, 4 KiB messages; ingest = to a local domain without accounts (queued,
#       no delivery), relay = routed to ringmail-sink, until the queue is empty;
#   (b) GET /metrics with 10 000 destination domains queued (10 messages of 1 000
#       recipients, each in a domain of its own, deferred: DNS answers nothing),
#       20 scrapes: median and max time.
#
#   bench/metrics.sh            # 3 repetitions
#   REPS=5 BASE=<git ref> bench/metrics.sh
#
# Builds the base revision in a git worktree, in target/base-revision (the first
# time a full release build). Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-3}
N=${N:-20000}
SESSIONS=${SESSIONS:-32}
BASE=${BASE:-c14c161}

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  git worktree remove --force "$work/base" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
source bench/lib/ports.sh

git worktree add -q --detach "$work/base" "$BASE"
# A target directory of its own: the base's workspace crates have the same names and
# versions, and sharing one would let cargo take one tree's artifacts for the other's.
CARGO_TARGET_DIR="$(pwd)/target/base-revision" cargo build --release -q -p ringmail --manifest-path "$work/base/Cargo.toml"
cp target/base-revision/release/ringmail "$work/ringmail-base"
cargo build --release -q -p ringmail -p ringmail-bench
cp target/release/ringmail "$work/ringmail-new"
LOAD=target/release/ringmail-load

results="$work/results.txt"
: > "$results"
run() { # BIN NAME WORKLOAD
  local bin=$1 name=$2 workload=$3 port sink args t0 t1 out
  rm -rf "$work/data"
  port=$(free_port)
  args=()
  if [ "$workload" = relay ]; then
    sink=$(free_port)
    target/release/ringmail-sink --listen "127.0.0.1:$sink" > /dev/null 2>&1 & pids+=($!)
    wait_port "$sink"
    args=(--route "*=127.0.0.1:$sink")
  fi
  RINGMAIL_LOG=warn "$bin" serve --data "$work/data" --smtp "127.0.0.1:$port" --pop3 127.0.0.1:0 --smtps 127.0.0.1:0 \
    --pop3s 127.0.0.1:0 --submission 127.0.0.1:0 --hostname bench.test "${args[@]}" \
    $( [ "$name" = new ] && echo --admin 127.0.0.1:0 ) 2>"$work/$name.log" & pids+=($!)
  wait_port "$port"
  local domain=localhost; [ "$workload" = relay ] && domain=remote.test
  t0=$(now)
  out=$($LOAD smtp --target "127.0.0.1:$port" --sessions "$SESSIONS" --messages "$N" --size 4096 --domain "$domain" --rcpts 1 --max-seconds 600 --json)
  if [ "$workload" = relay ]; then
    for _ in $(seq 1 6000); do
      [ -z "$("$bin" queue list --json --data "$work/data" | head -1)" ] && break
      sleep 0.1
    done
  fi
  t1=$(now)
  kill -TERM "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
  [ "$workload" = relay ] && { kill "${pids[-2]}" 2>/dev/null || true; }
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); print(sys.argv[2], sys.argv[3], round(r['messages']/(float(sys.argv[5])-float(sys.argv[4]))))" \
    "$out" "$name" "$workload" "$t0" "$t1" >> "$results"
}

for rep in $(seq 1 "$REPS"); do
  for workload in ingest relay; do
    run "$work/ringmail-base" base "$workload"
    run "$work/ringmail-new" new "$workload"
  done
done

# (b) the scrape with 10 000 destinations queued.
rm -rf "$work/data"
port=$(free_port); admin=$(free_port)
RINGMAIL_LOG=warn "$work/ringmail-new" serve --data "$work/data" --smtp "127.0.0.1:$port" --pop3 127.0.0.1:0 --smtps 127.0.0.1:0 \
  --pop3s 127.0.0.1:0 --submission 127.0.0.1:0 --admin "127.0.0.1:$admin" --hostname bench.test --dns 127.0.0.1:9 \
  2>"$work/scrape.log" & pids+=($!)
wait_port "$port"
python3 - "$port" <<'PY'
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]))
for m in range(10):
    s.sendmail("a@src.test", [f"u@d{m * 1000 + i}.test" for i in range(1000)], b"Subject: many\r\n\r\nbody\r\n")
s.quit()
PY
sleep 2
scrape="$work/scrape.txt"; : > "$scrape"
for _ in $(seq 1 20); do
  curl -sS -o "$work/metrics.txt" -w '%{time_total}\n' "http://127.0.0.1:$admin/metrics" >> "$scrape"
done
dests=$(grep '^ringmail_destinations_queued ' "$work/metrics.txt" | cut -d' ' -f2)
kill -TERM "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true

python3 - "$results" "$scrape" "$dests" "$REPS" "$N" "$BASE" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
times = sorted(float(l) * 1000 for l in open(sys.argv[2]) if l.strip())
dests, reps, n, base = sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
print(f"ringmail-load {n} messages of 4 KiB, 32 sessions; medians of {reps} interleaved runs; base = {base} (no metrics)\n")
print("| workload | base (msg/s) | with metrics (msg/s) | with / base |")
print("|---|---|---|---|")
for w in ("ingest", "relay"):
    b = statistics.median(int(r[2]) for r in rows if r[0] == "base" and r[1] == w)
    m = statistics.median(int(r[2]) for r in rows if r[0] == "new" and r[1] == w)
    print(f"| {w} | {b:.0f} | {m:.0f} | {m/b:.2f} |")
print(f"\nGET /metrics with {dests} destinations queued: median {statistics.median(times):.1f} ms, max {times[-1]:.1f} ms over {len(times)} scrapes")
PY
