#!/usr/bin/env bash
# Interop: ringmail delivering to real peers, with dnsmasq serving the MX records.
#   1. Postfix's smtp-sink as the remote MX of example.test (127.0.0.2);
#   2. Postfix's own smtpd as the remote MX of relay.test (127.0.0.3), relaying on
#      into a ringmail-sink that verifies every message's checksum.
# Installs postfix and dnsmasq-base when missing; every server listens on loopback;
# nothing touches the system's Postfix configuration or port 25.
#
#   bench/interop.sh            # 1000 messages each way
#   N=5000 bench/interop.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000}
export PATH="$PATH:/usr/sbin"
if ! command -v smtp-sink >/dev/null || ! command -v dnsmasq >/dev/null; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postfix dnsmasq-base
fi
cargo build --release -q -p ringmail -p ringmail-bench
source bench/lib/postfix.sh

work=$(mktemp -d)
chmod 755 "$work"   # the postfix user must reach its directories
pids=()
cleanup() { postfix_stop "$work/postfix"; for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
source bench/lib/ports.sh

MX_PORT=$(free_port)
DNS_PORT=$(free_port)
SINK_PORT=$(free_port)
PF_SMTP=$MX_PORT   # Postfix's smtpd listens on 127.0.0.3:MX_PORT (see below)
dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts --bind-interfaces \
  --listen-address=127.0.0.1 --port="$DNS_PORT" --local=/test/ \
  --mx-host=example.test,mx1.example.test,10 --host-record=mx1.example.test,127.0.0.2 \
  --mx-host=relay.test,mx1.relay.test,10 --host-record=mx1.relay.test,127.0.0.3 &
pids+=($!)

# 1. smtp-sink as MX.
smtp-sink -u nobody -c "127.0.0.2:$MX_PORT" 1000 > "$work/smtp-sink.out" 2>&1 & pids+=($!)
wait_port 127.0.0.2 "$MX_PORT"
# 2. Postfix smtpd as MX for relay.test, relaying into ringmail-sink.
target/release/ringmail-sink --listen "127.0.0.1:$SINK_PORT" --verify > "$work/sink.json" 2>/dev/null & sinkpid=$!; pids+=($sinkpid)
wait_port 127.0.0.1 "$SINK_PORT"
POSTFIX_MAIN_CF_EXTRA="relay_domains = relay.test" postfix_start "$work/postfix" "$PF_SMTP" "$SINK_PORT" 127.0.0.3
wait_port 127.0.0.3 "$PF_SMTP"

RM_PORT=$(free_port)
RINGMAIL_LOG=info target/release/ringmail serve --data "$work/data" --smtp "127.0.0.1:$RM_PORT" --hostname ringmail.test \
  --dns "127.0.0.1:$DNS_PORT" --mx-port "$MX_PORT" 2> "$work/ringmail.log" & pids+=($!)
wait_port 127.0.0.1 "$RM_PORT"
target/release/ringmail-load smtp --target "127.0.0.1:$RM_PORT" --sessions 16 --messages "$N" --size 4096 \
  --domain example.test:1 --domain relay.test:1 --rcpts 1 > /dev/null
for _ in $(seq 1 600); do
  [ -z "$(target/release/ringmail queue list --json --data "$work/data")" ] && break
  sleep 0.1
done
sent=$(grep -c "status=sent" "$work/ringmail.log" || true)
to_sink=$(grep -c "relay=mx1.example.test" "$work/ringmail.log" || true)
to_postfix=$(grep -c "relay=mx1.relay.test" "$work/ringmail.log" || true)
for _ in $(seq 1 600); do
  [ "$(postqueue -c "$work/postfix/etc" -p 2>/dev/null | tail -1)" = "Mail queue is empty" ] && break
  sleep 0.1
done
kill -INT $sinkpid; wait $sinkpid 2>/dev/null || true
verified=$(python3 -c "import json; print(json.load(open('$work/sink.json'))['verified'])")
echo "ringmail delivered $sent of $N: $to_sink to smtp-sink (example.test), $to_postfix to Postfix smtpd (relay.test)"
echo "Postfix relayed $verified checksum-verified messages on to ringmail-sink"
[ "$sent" -eq "$N" ] && [ "$verified" -eq "$to_postfix" ] && [ "$to_postfix" -gt 0 ] && [ "$to_sink" -gt 0 ] && echo "interop: 2 passed, 0 failed" || { echo "interop: 0 passed, 1 failed"; tail -20 "$work/ringmail.log"; exit 1; }
