#!/usr/bin/env bash
# Relay benchmark: Postfix's smtp-source (32 sessions, many messages per connection)
# sends to a remote domain through
#   (a) ringmail (durable: every 250 after the fdatasync covering the message),
#       routing everything to Postfix's smtp-sink;
#   (b) Postfix itself, configured as a relay in a temporary directory (smtpd on a
#       loopback port, relayhost = the same smtp-sink);
# and, as the limit, (c) smtp-source straight into smtp-sink.
# 4 KiB and 100 KiB messages; relay rates are end to end: from the first message sent
# until the last one was accepted by smtp-sink (ringmail: its delivery log has a
# status=sent line for every message; Postfix: its queue is empty). Repetitions are
# interleaved (limit, ringmail, postfix, limit, ...). Prints a Markdown table of medians.
#
#   bench/relay.sh              # 3 repetitions
#   REPS=5 bench/relay.sh
#   bench/relay.sh --quick      # 1 repetition, fewer messages
#
# Installs the postfix package when missing (the system's Postfix is never started or
# configured). Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-3}
SESSIONS=${SESSIONS:-32}
N_SMALL=${N_SMALL:-20000}   # 4 KiB messages per run (Postfix gets a fifth)
N_LARGE=${N_LARGE:-5000}    # 100 KiB messages per run
if [ "${1:-}" = "--quick" ]; then REPS=1; N_SMALL=5000; N_LARGE=1500; fi

export PATH="$PATH:/usr/sbin"
if ! command -v smtp-source >/dev/null || ! command -v postfix >/dev/null; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postfix
fi
cargo build --release -q -p ringmail
RINGMAIL=target/release/ringmail
source bench/lib/postfix.sh

work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() {
  postfix_stop "$work/postfix"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

source bench/lib/ports.sh
# until CMD...: polls every 20 ms, for at most 600 s
until_true() {
  local deadline=$((SECONDS + 600))
  until "$@"; do
    [ $SECONDS -lt $deadline ] || { echo "timed out waiting for: $*" >&2; return 1; }
    sleep 0.02
  done
}

sink_port=$(free_port)
smtp-sink -u nobody "127.0.0.1:$sink_port" 1000 & pids+=($!)
wait_port "$sink_port"

pf_port=$(free_port)
postfix_start "$work/postfix" "$pf_port" "$sink_port"
wait_port "$pf_port"
postfix_empty() { postqueue -c "$work/postfix/etc" -p | grep -q "Mail queue is empty"; }

rm_port=$(free_port)
start_ringmail() {
  rm -rf "$work/data"
  RINGMAIL_LOG=info $RINGMAIL serve --data "$work/data" --smtp "127.0.0.1:$rm_port" \
    --hostname relay.bench.test --route "*=127.0.0.1:$sink_port" 2>"$work/ringmail.log" &
  rm_pid=$!
  wait_port "$rm_port"
}
sent_lines() { grep -c "status=sent" "$work/ringmail.log" || true; }
ringmail_done() { [ "$(sent_lines)" -ge "$1" ]; }

# source PORT COUNT SIZE: smtp-source, many messages per connection, to a remote domain
source_run() {
  smtp-source -d -s "$SESSIONS" -l "$3" -m "$2" -f bench@source.test -t rcpt@remote.test "127.0.0.1:$1"
}
rate() { python3 -c "print(round($1 / ($3 - $2)))"; }

results="$work/results.txt"
: > "$results"
for rep in $(seq 1 "$REPS"); do
  for size in 4096 102400; do
    if [ "$size" = 4096 ]; then n=$N_SMALL; else n=$N_LARGE; fi
    # (c) the limit
    t0=$(now); source_run "$sink_port" "$n" "$size"; t1=$(now)
    echo "$size limit $(rate "$n" "$t0" "$t1")" >> "$results"
    # (a) ringmail
    start_ringmail
    t0=$(now); source_run "$rm_port" "$n" "$size"; until_true ringmail_done "$n"; t1=$(now)
    echo "$size ringmail $(rate "$n" "$t0" "$t1")" >> "$results"
    kill -TERM "$rm_pid"; wait "$rm_pid" 2>/dev/null || true
    if grep -q "status=bounced\|status=deferred" "$work/ringmail.log"; then
      echo "ringmail did not deliver everything at once:" >&2; grep -m5 "status=" "$work/ringmail.log" >&2; exit 1
    fi
    # (b) Postfix, a fifth of the messages (it is far slower; the run must stay bounded)
    m=$((n / 5))
    t0=$(now); source_run "$pf_port" "$m" "$size"; until_true postfix_empty; t1=$(now)
    echo "$size postfix $(rate "$m" "$t0" "$t1")" >> "$results"
  done
done

python3 - "$results" "$SESSIONS" "$REPS" <<'PY'
import sys, statistics
med = {}
for line in open(sys.argv[1]):
    size, who, r = line.split()
    med.setdefault((int(size), who), []).append(int(r))
print(f"smtp-source -d -s {sys.argv[2]}, end to end into smtp-sink; medians of {sys.argv[3]} interleaved runs (msg/s)\n")
print("| size | direct (limit) | ringmail | postfix | ringmail / limit | ringmail / postfix |")
print("|---|---|---|---|---|---|")
for size in (4096, 102400):
    l, r, p = (statistics.median(med[(size, w)]) for w in ("limit", "ringmail", "postfix"))
    print(f"| {size // 1024} KiB | {l:.0f} | {r:.0f} | {p:.0f} | {r/l:.2f} | {r/p:.1f} |")
PY
