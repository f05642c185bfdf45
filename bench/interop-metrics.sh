#!/usr/bin/env bash
# /metrics against Prometheus's own checker: ringmail takes and relays mail (to
# ringmail-sink), refuses a recipient, then `promtool check metrics` (Debian package
# `prometheus`, installed when missing; no daemon is started) lints the scrape, and
# Prometheus's text parser reads it (promtool fails on a parse error too).
#
#   bench/interop-metrics.sh
#
# Everything listens on 127.0.0.1 only. Exit status 0 when every check passed.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
fi
cargo build --release -q -p ringmail -p ringmail-bench
R=target/release/ringmail

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
source bench/lib/ports.sh

sink=$(free_port); smtp=$(free_port); admin=$(free_port)
target/release/ringmail-sink --listen "127.0.0.1:$sink" > "$work/sink.json" 2>/dev/null & pids+=($!)
wait_port "$sink"
RINGMAIL_LOG=info $R serve --data "$work/data" --smtp "127.0.0.1:$smtp" --pop3 127.0.0.1:0 --smtps 127.0.0.1:0 \
  --pop3s 127.0.0.1:0 --submission 127.0.0.1:0 --admin "127.0.0.1:$admin" --hostname ringmail.test \
  --local-domain local.test --route "sink.test=127.0.0.1:$sink" 2>"$work/ringmail.log" & pids+=($!)
wait_port "$admin"
echo secret-password | $R user add ann@local.test --password-stdin --data "$work/data" >/dev/null
python3 - "$smtp" <<'PY'
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]))
for i in range(10):
    s.sendmail("a@src.test", ["x@sink.test", "ann@local.test"], b"Subject: %d\r\n\r\nbody\r\n" % i)
s.mail("a@src.test")
assert s.rcpt("nobody@local.test")[0] == 550
s.quit()
PY
for _ in $(seq 1 200); do
  [ -z "$($R queue list --json --data "$work/data")" ] && break
  sleep 0.05
done
curl -sS "http://127.0.0.1:$admin/metrics" > "$work/metrics.txt"
fail=0
check() { if eval "$2"; then echo "ok   $1"; else echo "FAIL $1"; fail=1; fi; }
check "promtool check metrics" "promtool check metrics < '$work/metrics.txt'"
check "10 messages received" "grep -qx 'ringmail_messages_received_total 10' '$work/metrics.txt'"
check "20 recipients delivered" "grep -qx 'ringmail_recipients_delivered_total 20' '$work/metrics.txt'"
check "1 unknown recipient refused" "grep -qx 'ringmail_recipients_rejected_total{reason=\"unknown_user\"} 1' '$work/metrics.txt'"
check "an empty queue" "grep -qx 'ringmail_queue_messages{state=\"ready\"} 0' '$work/metrics.txt'"
[ "$fail" = 0 ] || { echo "--- scrape"; cat "$work/metrics.txt"; }
exit "$fail"
