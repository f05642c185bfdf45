#!/usr/bin/env bash
# POP3 side by side: ringmail against a private Dovecot (bench/lib/dovecot.sh), both
# on 127.0.0.1, interleaved in the same run, measured by `ringmail-load pop3`.
#
# Per message size (separate rounds, fresh servers): USERS users on both (ringmail:
# `ringmail user add`; Dovecot: a passwd-file with the same argon2id parameters,
# from `ringmail-load passwd-file`), each sent the same MESSAGES_<size> messages
# (`ringmail-load smtp --to-pattern`, over SMTP into ringmail, over LMTP into
# Dovecot; delivery is checked with a LIST pass: every user holds all of them).
# Then for each client count and repetition, ringmail then Dovecot, each restarted
# first (an empty login cache):
#   cold logins/s  the first login of every user after the start (login + QUIT);
#   warm logins/s  the same users again for WARM_SECONDS (the cache full);
#   RETR msg/s, MiB/s  log in, STAT, RETR every message, QUIT, for RETR_SECONDS
#                  (the logins' time included); every message checked against its
#                  X-Load-Checksum, octets against STAT.
# A Markdown table of medians on stdout, with ringmail / Dovecot; raw lines and the
# table in bench/results/pop3-<time>.{txt,md}. Fails if any run had errors.
#
#   bench/pop3.sh                                   # ~10 minutes
#   REPS=1 WARM_SECONDS=2 RETR_SECONDS=2 bench/pop3.sh   # ~2 minutes
#   SERVERS=dovecot bench/pop3.sh                   # one side only
#   NO_BUILD=1 CARGO_TARGET_DIR=/elsewhere bench/pop3.sh   # binaries already built there
#
# Every server listens on 127.0.0.1; every run is bounded in logins and seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin"

USERS=${USERS:-64}
CLIENTS=${CLIENTS:-"1 16 64"}
SIZES=${SIZES:-"4096 102400"}
MESSAGES_4096=${MESSAGES_4096:-100}
MESSAGES_102400=${MESSAGES_102400:-20}
REPS=${REPS:-3}
WARM_SECONDS=${WARM_SECONDS:-5}
RETR_SECONDS=${RETR_SECONDS:-5}
SERVERS=${SERVERS:-"ringmail dovecot"}
SETTLE=${SETTLE:-1}   # seconds between a server's start and the cold logins

source bench/lib/dovecot.sh
dovecot_install
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p ringmail -p ringmail-bench   # NO_BUILD=1: use the binaries as built
BIN=${CARGO_TARGET_DIR:-target}/release
R=$BIN/ringmail
LOAD=$BIN/ringmail-load

if [[ " $SERVERS " == *" ringmail "* ]] && ! $R serve --help 2>&1 | grep -q -- '--pop3'; then
  echo "pop3.sh: this ringmail serves no POP3 (no serve --pop3); SERVERS=dovecot measures Dovecot alone" >&2
  exit 1
fi

work=$(mktemp -d)
chmod 755 "$work"   # Dovecot's unprivileged processes reach their files below it
rm_pid=""
dc_dir=""
stop_ringmail() { if [ -n "$rm_pid" ]; then kill -TERM "$rm_pid" 2>/dev/null || true; wait "$rm_pid" 2>/dev/null || true; rm_pid=""; fi; }
stop_dovecot() { if [ -n "$dc_dir" ]; then dovecot_stop "$dc_dir"; wait_gone "$dc_dir"; dc_dir=""; fi; }
cleanup() { stop_ringmail; stop_dovecot; rm -rf "$work"; }
trap cleanup EXIT

source bench/lib/ports.sh
# Dovecot's master removes its pid file when it has stopped.
wait_gone() { for _ in $(seq 1 200); do [ -f "$1/run/master.pid" ] || return 0; sleep 0.05; done; }
json() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(d[sys.argv[2]])' "$1" "$2"; }

SMTP_PORT=$(free_port)
POP3_PORT=$(free_port)
LMTP_PORT=$(free_port)
$LOAD passwd-file --user-count "$USERS" > "$work/passwd"
# The limit of cold logins: every one is an argon2id verification of these
# parameters (measured again at the end, the machine being shared).
argon2_rate() { $LOAD argon2 --seconds 2; }
argon2_before=$(argon2_rate)

# ringmail's listeners take connections (into the kernel's backlog) before it has
# recovered its shards; it says `ringmail ready` when it serves.
wait_ready() { for _ in $(seq 1 600); do [ "$(grep -c 'ringmail ready' "$1")" -gt "$2" ] && return 0; sleep 0.05; done; echo "ringmail did not get ready" >&2; return 1; }
start() { # SERVER SIZE
  case $1 in
    ringmail)
      local before
      before=$(grep -c 'ringmail ready' "$work/ringmail.log" 2>/dev/null || true)
      RINGMAIL_LOG=warn,ringmail::runtime=info $R serve --data "$work/ringmail-$2" --smtp "127.0.0.1:$SMTP_PORT" \
        --pop3 "127.0.0.1:$POP3_PORT" --hostname bench.test 2>>"$work/ringmail.log" &
      rm_pid=$!
      wait_ready "$work/ringmail.log" "${before:-0}" ;;
    dovecot)
      dc_dir="$work/dovecot-$2"
      dovecot_start "$dc_dir" "$POP3_PORT" "$LMTP_PORT" "$work/passwd" ;;
  esac
  wait_port "$POP3_PORT"
  # Both servers settle from their start before the cold logins are timed (Dovecot
  # forks its auth and pop3 processes on demand, ringmail finishes its upkeep).
  sleep "$SETTLE"
}
stop() { case $1 in ringmail) stop_ringmail ;; dovecot) stop_dovecot ;; esac; }

fill() { # SERVER SIZE MESSAGES: users and mail, then a LIST pass to check delivery
  local server=$1 size=$2 m=$3 total=$(($USERS * $3)) out
  start "$server" "$size"
  if [ "$server" = ringmail ]; then
    for i in $(seq 0 $((USERS - 1))); do
      echo "password$i" | $R user add "user$i@localhost" --password-stdin --data "$work/ringmail-$size" >/dev/null
    done
    out=$($LOAD smtp --target "127.0.0.1:$SMTP_PORT" --sessions 16 --messages "$total" --size "$size" \
      --to-pattern 'user{}@localhost' --to-count "$USERS" --max-seconds 300 --json)
    for _ in $(seq 1 3000); do
      [ "$($R queue list --json --data "$work/ringmail-$size" | wc -l)" -eq 0 ] && break
      sleep 0.1
    done
  else
    out=$($LOAD smtp --lmtp --target "127.0.0.1:$LMTP_PORT" --sessions 16 --messages "$total" --size "$size" \
      --to-pattern 'user{}@localhost' --to-count "$USERS" --max-seconds 300 --json)
  fi
  [ "$(json "$out" messages)" -eq "$total" ] && [ "$(json "$out" errors)" -eq 0 ] || { echo "$server: delivery failed: $out" >&2; exit 1; }
  local listed
  for _ in $(seq 1 100); do
    out=$($LOAD pop3 --target "127.0.0.1:$POP3_PORT" --user-count "$USERS" --sessions "$(( USERS < 16 ? USERS : 16 ))" \
      --once --list-only --json --max-seconds 120)
    listed=$(json "$out" listed)
    [ "$listed" -eq "$total" ] && break
    sleep 0.2
  done
  [ "$listed" -eq "$total" ] && [ "$(json "$out" errors)" -eq 0 ] || { echo "$server: $listed of $total messages in the mailboxes: $out" >&2; exit 1; }
  stop "$server"
  echo "$server: $USERS users, $m messages of $size bytes each, delivered" >&2
}

results="$work/results.txt"
: > "$results"
record() { # SERVER SIZE CLIENTS METRIC JSON KEY
  local v e
  v=$(json "$5" "$6"); e=$(json "$5" errors)
  echo "$1 $2 $3 $4 $v $e" >> "$results"
  printf '%9s %6s B %3s clients %-10s %10.1f  (%s errors)\n' "$1" "$2" "$3" "$4" "$v" "$e" >&2
}

measure() { # SERVER SIZE CLIENTS
  local server=$1 size=$2 c=$3 pop=(--target "127.0.0.1:$POP3_PORT" --user-count "$USERS" --sessions "$3" --json) out
  start "$server" "$size"
  out=$($LOAD pop3 "${pop[@]}" --logins-only --once --max-seconds 120)
  record "$server" "$size" "$c" cold_logins "$out" logins_per_sec
  out=$($LOAD pop3 "${pop[@]}" --logins-only --logins 0 --max-seconds "$WARM_SECONDS")
  record "$server" "$size" "$c" warm_logins "$out" logins_per_sec
  out=$($LOAD pop3 "${pop[@]}" --logins 0 --max-seconds "$RETR_SECONDS")
  record "$server" "$size" "$c" retr_msgs "$out" messages_per_sec
  record "$server" "$size" "$c" retr_mib "$out" mib_per_sec
  stop "$server"
}

started=$(date +%s)
for size in $SIZES; do
  var=MESSAGES_$size
  m=${!var:-20}
  for server in $SERVERS; do fill "$server" "$size" "$m"; done
  for c in $CLIENTS; do
    for _ in $(seq 1 "$REPS"); do
      for server in $SERVERS; do measure "$server" "$size" "$c"; done
    done
  done
done

mkdir -p bench/results
base=bench/results/pop3-$(date -u +%Y%m%dT%H%M%SZ)
cp "$results" "$base.txt"
argon2_after=$(argon2_rate)
python3 - "$results" "$REPS" "$USERS" "$(($(date +%s) - started))" "$(dovecot --version)" "$argon2_before" "$argon2_after" > "$base.md" <<'PY'
import sys, statistics, json
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
reps, users, secs, dv = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
a2 = [json.loads(a) for a in sys.argv[6:8]]
names = {"cold_logins": "logins/s, cold cache", "warm_logins": "logins/s, warm cache",
         "retr_msgs": "RETR messages/s", "retr_mib": "RETR MiB/s"}
servers = list(dict.fromkeys(r[0] for r in rows))
print(f"ringmail-load pop3, {users} users, medians of {reps} interleaved run(s); {secs} s in all; Dovecot {dv}\n")
print("Cold-login limit (`ringmail-load argon2`, ringmail's check of the same hashes, "
      f"{a2[0]['phc_params']}), before and after the runs: "
      + ", ".join(f"{a['one_thread_per_sec']:.0f}/s on 1 thread, {a['threads_per_sec']:.0f}/s on {a['threads']}" for a in a2)
      + ". One client's logins are sequential: one verification at a time.\n")
head = "| size | clients | workload | " + " | ".join(servers) + " |"
if len(servers) == 2:
    head += f" {servers[0]} / {servers[1]} |"
print(head)
print("|---" * (3 + len(servers) + (len(servers) == 2)) + "|")
bad = 0
for size in sorted({r[1] for r in rows}, key=int):
    for c in sorted({r[2] for r in rows if r[1] == size}, key=int):
        for metric in names:
            med = {}
            for s in servers:
                v = [float(r[4]) for r in rows if (r[0], r[1], r[2], r[3]) == (s, size, c, metric)]
                if metric != "retr_mib":  # the same run as retr_msgs
                    bad += sum(int(r[5]) for r in rows if (r[0], r[1], r[2], r[3]) == (s, size, c, metric))
                if v:
                    med[s] = statistics.median(v)
            if not med:
                continue
            kib = f"{int(size) // 1024} KiB"
            fmt = (lambda v: f"{v:.1f}") if metric == "retr_mib" else (lambda v: f"{v:.0f}")
            line = f"| {kib} | {c} | {names[metric]} | " + " | ".join(fmt(med[s]) if s in med else "–" for s in servers) + " |"
            if len(servers) == 2:
                a, b = med.get(servers[0]), med.get(servers[1])
                line += f" {a / b:.2f} |" if a is not None and b else " – |"
            print(line)
if bad:
    print(f"\n{bad} errors in all (see the raw lines)")
PY
cat "$base.md"
echo "wrote $base.{txt,md}" >&2
! grep -q 'errors in all' "$base.md"
