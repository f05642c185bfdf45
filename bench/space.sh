#!/usr/bin/env bash
# Space under steady relaying: ringmail relays 4 KiB messages into a sink for a while
# (ringmail-load with few sessions keeps a steady rate), and the data directory's size
# is sampled twice a second. The sink answers 4xx to a share of the messages
# (DEFER_PERMILLE, 1% by default), so those stay queued, deferred, for the whole run
# and would pin their segments: compaction copies them forward. With compaction the
# size stays bounded instead of growing with everything ever relayed.
# Writes bench/results/space-<time>.{csv,svg}.
#
#   bench/space.sh              # 60 s
#   SECONDS_RUN=20 bench/space.sh
#   DEFER_PERMILLE=0 bench/space.sh   # every message delivered at once
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${SECONDS_RUN:-60}
DEFER=${DEFER_PERMILLE:-10}
cargo build --release -q -p ringmail -p ringmail-bench
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
source bench/lib/ports.sh
SINK=$(free_port); PORT=$(free_port)
target/release/ringmail-sink --listen "127.0.0.1:$SINK" --tempfail "$DEFER" > "$work/sink.json" 2>/dev/null & pids+=($!)
wait_port "$SINK"
RINGMAIL_LOG=info target/release/ringmail serve --data "$work/data" --smtp "127.0.0.1:$PORT" --cores 1 \
  --route "*=127.0.0.1:$SINK" --segment-size 4194304 \
  --message-size-max 1048576 --recipients-max 100 2>"$work/ringmail.log" & pids+=($!)
wait_port "$PORT"
target/release/ringmail-load smtp --target "127.0.0.1:$PORT" --sessions 2 --messages 100000000 --size 4096 \
  --to rcpt@relay.test --max-seconds "$RUN" --json > "$work/load.json" & load=$!
mkdir -p bench/results
out="bench/results/space-$(date -u +%Y%m%dT%H%M%SZ)"
echo "seconds,data_bytes,messages_sent" > "$out.csv"
start=$(date +%s.%N)
while kill -0 $load 2>/dev/null; do
  now=$(date +%s.%N)
  echo "$(python3 -c "print(round($now-$start,1))"),$(du -sb "$work/data" | cut -f1)," >> "$out.csv"
  sleep 0.5
done
sent=$(python3 -c "import json; print(json.loads(open('$work/load.json').read().strip().splitlines()[-1])['messages'])")
deferred=$(target/release/ringmail queue list --json --data "$work/data" | grep -c '"deferred"' || true)
copied=$(grep -c "copied live messages forward" "$work/ringmail.log" || true)
echo "queued (deferred) at the end: $deferred messages; compaction rounds that copied messages forward: $copied"
python3 - "$out" "$sent" <<'PY'
import sys
out, sent = sys.argv[1], int(sys.argv[2])
rows = [l.split(",") for l in open(out + ".csv").read().split("\n")[1:] if l]
pts = [(float(t), int(b)) for t, b, _ in rows]
tmax = max(t for t, _ in pts) or 1
bmax = max(max(b for _, b in pts), 1)
relayed_mib = sent * 4096 / 2**20
W, H, L, B = 800, 360, 70, 40
poly = " ".join(f"{L + t / tmax * (W - L - 20):.1f},{H - B - b / bmax * (H - B - 30):.1f}" for t, b in pts)
svg = f'''<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{W/2}" y="18" text-anchor="middle" font-size="14">ringmail data directory while relaying {sent} messages ({relayed_mib:.0f} MiB) in {tmax:.0f} s</text>
<line x1="{L}" y1="{H-B}" x2="{W-20}" y2="{H-B}" stroke="black"/><line x1="{L}" y1="30" x2="{L}" y2="{H-B}" stroke="black"/>
<text x="{W/2}" y="{H-8}" text-anchor="middle">seconds</text>
<text x="14" y="{H/2}" transform="rotate(-90 14 {H/2})" text-anchor="middle">data directory, MiB</text>
<text x="{L-6}" y="34" text-anchor="end">{bmax/2**20:.1f}</text><text x="{L-6}" y="{H-B}" text-anchor="end">0</text>
<text x="{W-20}" y="{H-B+14}" text-anchor="end">{tmax:.0f}</text>
<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{poly}"/>
</svg>'''
open(out + ".svg", "w").write(svg)
print(f"relayed {sent} messages ({relayed_mib:.0f} MiB); data directory: max {bmax/2**20:.1f} MiB, last {pts[-1][1]/2**20:.1f} MiB")
print(f"wrote {out}.csv and {out}.svg")
PY
