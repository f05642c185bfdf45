#!/usr/bin/env bash
# Inbound verification cost: ingest of 4 KiB messages (ringmail-load, 32 sessions,
# many per connection), each DKIM-signed (Ed25519) by the load tool, from an address
# outside the relay networks, into ringmail with `[mail-auth] verify` off and on,
# interleaved. With it on, every message gets SPF (MAIL FROM and HELO), DKIM and
# DMARC checks and an Authentication-Results header; the answers come from a private
# dnsmasq on 127.0.0.1 and stay in the verifier's cache after the first lookups.
# Reports messages/s and the server's CPU per message (user + system over the run).
#
#   bench/verify.sh                         # REPS=3, N=20000
#   REPS=1 N=5000 NO_BUILD=1 bench/verify.sh
# Installs dnsmasq-base when missing. Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin"
REPS=${REPS:-3}
N=${N:-20000}
command -v dnsmasq >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends dnsmasq-base; }
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p ringmail -p ringmail-bench
BIN=${CARGO_TARGET_DIR:-target}/release
R=$BIN/ringmail
LOAD=$BIN/ringmail-load

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
source bench/lib/ports.sh

record=$($R dkim generate ringmail-load.test --selector s1 --data "$work/keys" 2>"$work/key.path")
key=$(tail -1 "$work/key.path")
value=$(python3 -c 'import sys; n, v = sys.argv[1].split(" IN TXT ", 1); print("".join(p.strip("\"") for p in v.split("\" \"")))' "$record")
dns_port=$(free_port)
dnsmasq --keep-in-foreground --no-resolv --no-hosts --bind-interfaces --listen-address=127.0.0.1 \
  --port="$dns_port" --local=/test/ --user=root --pid-file="$work/dnsmasq.pid" \
  --txt-record="ringmail-load.test,v=spf1 ip4:127.0.0.1 -all" \
  --txt-record="_dmarc.ringmail-load.test,v=DMARC1; p=none" \
  --txt-record="s1._domainkey.ringmail-load.test,$value" 2>"$work/dnsmasq.log" & pids+=($!)
sleep 0.5

cpu() { python3 -c 'import os,sys; f=open(f"/proc/{sys.argv[1]}/stat").read().rsplit(")",1)[1].split(); print((int(f[11])+int(f[12]))/os.sysconf("SC_CLK_TCK"))' "$1"; }
results="$work/results.txt"
: > "$results"
port=$(free_port)
run() { # MODE
  local verify=false
  [ "$1" = verify ] && verify=true
  rm -rf "$work/data"
  RINGMAIL_LOG=info $R serve --data "$work/data" --smtp "127.0.0.1:$port" --pop3 127.0.0.1:0 \
    --smtps 127.0.0.1:0 --pop3s 127.0.0.1:0 --submission 127.0.0.1:0 --hostname mx.bench.test \
    --dns "127.0.0.1:$dns_port" --relay-network 192.0.2.0/24 --mail-auth "verify=$verify" 2>"$work/ringmail.log" &
  local rm_pid=$!
  for _ in $(seq 1 200); do grep -q 'ringmail ready' "$work/ringmail.log" && break; sleep 0.05; done
  local c0 c1 out
  c0=$(cpu "$rm_pid")
  out=$($LOAD smtp --target "127.0.0.1:$port" --sessions 32 --messages "$N" --size 4096 --per-connection 0 \
    --to rcpt@localhost --dkim "domain=ringmail-load.test,selector=s1,key=$key" --max-seconds 300 --json 2>/dev/null | tail -1)
  c1=$(cpu "$rm_pid")
  kill -TERM "$rm_pid"; wait "$rm_pid" 2>/dev/null || true
  if [ "$1" = verify ]; then
    local passed
    passed=$(grep " queued " "$work/ringmail.log" | grep -c "spf=pass dkim=pass dmarc=pass" || true)
    [ "$passed" -eq "$N" ] || { echo "verify: $passed of $N messages passed SPF, DKIM and DMARC" >&2; grep -m3 " queued " "$work/ringmail.log" >&2; exit 1; }
  fi
  python3 - "$1" "$out" "$c0" "$c1" "$N" >> "$results" <<'PY'
import json, sys
mode, out, c0, c1, n = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
assert out["messages"] == n and out["errors"] == 0, out
print(mode, round(out["messages_per_sec"]), round((c1 - c0) / n * 1e6))
PY
  echo "$(tail -1 "$results") (mode msg/s µs-CPU/msg)" >&2
}

for _ in $(seq 1 "$REPS"); do
  for mode in plain verify; do run "$mode"; done
done
mkdir -p bench/results
base=bench/results/verify-$(date -u +%Y%m%dT%H%M%SZ)
cp "$results" "$base.txt"
python3 - "$results" "$REPS" "$N" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
m = {k: (statistics.median(float(r[1]) for r in rows if r[0] == k), statistics.median(float(r[2]) for r in rows if r[0] == k)) for k in ("plain", "verify")}
print(f"ingest of {sys.argv[3]} DKIM-signed 4 KiB messages, medians of {sys.argv[2]} interleaved runs\n")
print("| mode | msg/s | / plain | server CPU µs/msg |")
print("|---|---|---|---|")
for k in ("plain", "verify"):
    print(f"| {k} | {m[k][0]:.0f} | {m[k][0] / m['plain'][0]:.2f} | {m[k][1]:.0f} |")
PY
echo "raw: $base.txt" >&2
