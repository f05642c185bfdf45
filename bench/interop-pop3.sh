#!/usr/bin/env bash
# POP3 interop: real clients fetch from ringmail (or, with --server dovecot, from a
# private Dovecot, which proves the fetch and the checks themselves).
#   fetchmail  user0: every message, through an MDA that writes one file each;
#   getmail6   user1: every message, into a maildir;
#   mpop       user2: every message, into a maildir.
# Each user first gets N messages of 200 B to 20 KiB from `ringmail-load smtp` (over
# SMTP into ringmail, over LMTP into Dovecot), each carrying the CRC32C of its body
# in X-Load-Checksum and its number in its Subject. Afterwards every saved message
# must match its checksum (`ringmail-load verify`: line ends put back to CRLF,
# headers the client added in front ignored), and each client must have saved
# exactly N messages, N distinct numbers.
# Installs fetchmail, getmail6 and mpop (and dovecot-pop3d, dovecot-lmtpd for
# --server dovecot) when missing; every server listens on 127.0.0.1.
#
#   bench/interop-pop3.sh                    # against ringmail, N=1000
#   bench/interop-pop3.sh --server dovecot
#   N=200 NO_BUILD=1 bench/interop-pop3.sh   # binaries already built
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin"
SERVER=ringmail
while [ $# -gt 0 ]; do
  case $1 in
    --server) SERVER=$2; shift 2 ;;
    *) echo "usage: $0 [--server ringmail|dovecot]" >&2; exit 2 ;;
  esac
done
N=${N:-1000}

if ! command -v fetchmail >/dev/null || ! command -v getmail >/dev/null || ! command -v mpop >/dev/null; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends fetchmail getmail6 mpop
fi
source bench/lib/dovecot.sh
[ "$SERVER" = dovecot ] && dovecot_install
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p ringmail -p ringmail-bench
BIN=${CARGO_TARGET_DIR:-target}/release
R=$BIN/ringmail
LOAD=$BIN/ringmail-load

work=$(mktemp -d)
chmod 755 "$work"
rm_pid=""
cleanup() {
  [ -n "$rm_pid" ] && { kill -TERM "$rm_pid" 2>/dev/null || true; wait "$rm_pid" 2>/dev/null || true; }
  [ "$SERVER" = dovecot ] && dovecot_stop "$work/dovecot"
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 600); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null && return 0; sleep 0.05; done; echo "nothing listens on $1" >&2; return 1; }
json() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(d[sys.argv[2]])' "$1" "$2"; }

POP3=$(free_port)
IN=$(free_port)
USERS=3
case $SERVER in
  ringmail)
    if ! $R serve --help 2>&1 | grep -q -- '--pop3'; then
      echo "interop-pop3: this ringmail serves no POP3 (no serve --pop3); try --server dovecot" >&2; exit 1
    fi
    RINGMAIL_LOG=info $R serve --data "$work/data" --smtp "127.0.0.1:$IN" --pop3 "127.0.0.1:$POP3" \
      --hostname bench.test 2> "$work/ringmail.log" & rm_pid=$!
    wait_port "$POP3"
    for i in $(seq 0 $((USERS - 1))); do
      echo "password$i" | $R user add "user$i@localhost" --password-stdin --data "$work/data" >/dev/null
    done
    out=$($LOAD smtp --target "127.0.0.1:$IN" --sessions 8 --messages $((USERS * N)) --size 200 --size-max 20000 \
      --to-pattern 'user{}@localhost' --to-count "$USERS" --json) ;;
  dovecot)
    $LOAD passwd-file --user-count "$USERS" > "$work/passwd"
    dovecot_start "$work/dovecot" "$POP3" "$IN" "$work/passwd"
    wait_port "$POP3"
    out=$($LOAD smtp --lmtp --target "127.0.0.1:$IN" --sessions 8 --messages $((USERS * N)) --size 200 --size-max 20000 \
      --to-pattern 'user{}@localhost' --to-count "$USERS" --json) ;;
  *) echo "unknown server $SERVER" >&2; exit 2 ;;
esac
[ "$(json "$out" messages)" -eq $((USERS * N)) ] || { echo "delivery into $SERVER failed: $out" >&2; exit 1; }
# Delivered when every mailbox lists its N (ringmail delivers asynchronously).
for _ in $(seq 1 300); do
  out=$($LOAD pop3 --target "127.0.0.1:$POP3" --user-count "$USERS" --sessions "$USERS" --once --list-only --json)
  [ "$(json "$out" listed)" -eq $((USERS * N)) ] && break
  sleep 0.2
done
[ "$(json "$out" listed)" -eq $((USERS * N)) ] || { echo "$SERVER holds $(json "$out" listed) of $((USERS * N)) messages" >&2; exit 1; }
echo "$SERVER: $N messages in each of $USERS mailboxes" >&2

passed=0 failed=0
check() { # NAME DIR
  local v
  if v=$($LOAD verify --expect "$N" "$2" 2>&1); then
    passed=$((passed + 1)); echo "$1: $N messages fetched, every one intact ($v)"
  else
    failed=$((failed + 1)); echo "$1: FAILED: $v"
  fi
}

# fetchmail: every message (fetchall), kept on the server, each to an MDA that
# writes it to a file of its own.
mkdir -p "$work/fetchmail"
cat > "$work/mda.sh" <<'SH'
#!/bin/sh
exec cat > "$1/$(date +%s%N).$$"
SH
chmod +x "$work/mda.sh"
cat > "$work/fetchmailrc" <<RC
set no syslog
poll 127.0.0.1 with proto POP3 port $POP3 auth password timeout 60
  user 'user0@localhost' there with password 'password0' is 'root' here
  options fetchall keep no rewrite sslproto '' no sslcertck
  mda "$work/mda.sh $work/fetchmail"
RC
chmod 600 "$work/fetchmailrc"
fetchmail -f "$work/fetchmailrc" --nodetach -i "$work/fetchids" > "$work/fetchmail.log" 2>&1 \
  || [ $? -eq 1 ] || { echo "fetchmail failed:"; tail -20 "$work/fetchmail.log"; }
check fetchmail "$work/fetchmail"

# getmail6: every message (read_all) into a maildir, kept on the server. It refuses
# to deliver as root: the maildir is nobody's, and so is the delivery.
mkdir -p "$work/getmail/Maildir/"{cur,new,tmp}
chown -R nobody:nogroup "$work/getmail/Maildir"
cat > "$work/getmailrc" <<RC
[retriever]
type = SimplePOP3Retriever
server = 127.0.0.1
port = $POP3
username = user1@localhost
password = password1
timeout = 60

[destination]
type = Maildir
path = $work/getmail/Maildir/
user = nobody

[options]
read_all = true
delete = false
verbose = 0
RC
getmail --rcfile "$work/getmailrc" --getmaildir "$work/getmail" > "$work/getmail.log" 2>&1 \
  || { echo "getmail failed:"; tail -20 "$work/getmail.log"; }
check getmail6 "$work/getmail/Maildir"

# mpop: every message (not only new ones) into a maildir, kept on the server.
mkdir -p "$work/mpop/Maildir/"{cur,new,tmp}
mpop --host=127.0.0.1 --port="$POP3" --tls=off --auth=user --user=user2@localhost \
  --passwordeval='echo password2' --keep=on --only-new=off --uidls-file="$work/mpop/uidls" \
  --delivery=maildir,"$work/mpop/Maildir" --quiet > "$work/mpop.log" 2>&1 \
  || { echo "mpop failed:"; tail -20 "$work/mpop.log"; }
check mpop "$work/mpop/Maildir"

echo "interop-pop3 ($SERVER): $passed passed, $failed failed"
[ "$failed" -eq 0 ]
