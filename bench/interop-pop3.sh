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
# --tls stls: the clients fetch over STLS (RFC 2595) on the POP3 port, TLS required;
# --tls pop3s: over implicit TLS (RFC 8314) on ringmail's pop3s listener
# (`serve --pop3s 127.0.0.1:0`, its port read from the `ringmail ready` line).
# ringmail only (--server dovecot refuses --tls). Each client connects by the name
# localhost and verifies ringmail's self-signed certificate (made on first start in
# DATA/tls/bench.test.pem, valid for bench.test and localhost) with that file as its
# only CA: fetchmail sslcertck sslcertfile, getmail6 ca_certs (it then checks the
# name too), mpop tls_trust_file; none needs verification turned off. A client
# passes only if, besides the checks above, it really used TLS: its own output shows
# the negotiated protocol (fetchmail -v "SSL/TLS: using protocol", getmail6
# --fingerprint "using cipher ...TLSv1.x", mpop --debug "TLS session parameters"),
# and in ringmail's log (ringmail::pop3 at debug) every login of its run came on a
# connection whose "pop3: TLS started" line precedes it. getmail6 speaks no STLS
# (its POP3 retrievers are plaintext or implicit TLS, SimplePOP3SSLRetriever), so
# with --tls stls it is skipped, and reported as skipped.
#
#   bench/interop-pop3.sh                    # against ringmail, N=1000
#   bench/interop-pop3.sh --server dovecot
#   bench/interop-pop3.sh --tls stls         # or --tls pop3s
#   N=200 NO_BUILD=1 bench/interop-pop3.sh   # binaries already built
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin"
SERVER=ringmail
TLS=none
usage() { echo "usage: $0 [--server ringmail|dovecot] [--tls stls|pop3s]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --server) [ $# -ge 2 ] || usage; SERVER=$2; shift 2 ;;
    --tls) [ $# -ge 2 ] || usage; TLS=$2; shift 2 ;;
    *) usage ;;
  esac
done
case $TLS in none|stls|pop3s) ;; *) usage ;; esac
if [ "$TLS" != none ] && [ "$SERVER" != ringmail ]; then
  echo "interop-pop3: --tls $TLS is for ringmail only (the private Dovecot has no TLS set up); drop --tls or --server $SERVER" >&2
  exit 2
fi
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
source bench/lib/ports.sh
json() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(d[sys.argv[2]])' "$1" "$2"; }

POP3=$(free_port)
IN=$(free_port)
USERS=3
case $SERVER in
  ringmail)
    if ! $R serve --help 2>&1 | grep -q -- '--pop3'; then
      echo "interop-pop3: this ringmail serves no POP3 (no serve --pop3); try --server dovecot" >&2; exit 1
    fi
    if [ "$TLS" = none ]; then
      RINGMAIL_LOG=info $R serve --data "$work/data" --smtp "127.0.0.1:$IN" --pop3 "127.0.0.1:$POP3" \
        --hostname bench.test 2> "$work/ringmail.log" & rm_pid=$!
      wait_port "$POP3"
    else
      # ringmail::pop3 at debug: its "pop3: TLS started" lines.
      RINGMAIL_LOG=info,ringmail::pop3=debug $R serve --data "$work/data" --smtp "127.0.0.1:$IN" \
        --pop3 "127.0.0.1:$POP3" --pop3s 127.0.0.1:0 --hostname bench.test 2> "$work/ringmail.log" & rm_pid=$!
      ready=""
      for _ in $(seq 1 600); do
        ready=$(grep -m1 'ringmail ready' "$work/ringmail.log" || true)
        [ -n "$ready" ] || ! kill -0 "$rm_pid" 2>/dev/null && break
        sleep 0.05
      done
      [ -n "$ready" ] || { echo "ringmail did not start; its log:" >&2; tail -20 "$work/ringmail.log" >&2; exit 1; }
      POP3S=$(sed -n 's/.* pop3s=127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' <<< "$ready")
      [ -n "$POP3S" ] || { echo "no pop3s port in: $ready" >&2; exit 1; }
      CA=$work/data/tls/bench.test.pem
      [ -s "$CA" ] || { echo "ringmail made no certificate $CA" >&2; exit 1; }
      if [ "$TLS" = stls ]; then PORT=$POP3; else PORT=$POP3S; fi
      wait_port "$PORT"
    fi
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

passed=0 failed=0 skipped=0
check() { # NAME DIR [LOG_FROM CLIENT_LOG CLIENT_PATTERN]: the last three with --tls
  local v t=""
  if [ "$TLS" != none ] && ! t=$(tls_used "$3" "$4" "$5"); then
    failed=$((failed + 1)); echo "$1: FAILED: not over TLS: $t"; return
  fi
  if v=$($LOAD verify --expect "$N" "$2" 2>&1); then
    passed=$((passed + 1)); echo "$1: $N messages fetched, every one intact ($v)${t:+; $t}"
  else
    failed=$((failed + 1)); echo "$1: FAILED: $v"
  fi
}
# Lines in ringmail's log so far: a client's run is what comes after.
log_lines() { if [ "$TLS" = none ]; then echo 0; else wc -l < "$work/ringmail.log"; fi; }
# With --tls: the client's log shows the negotiated TLS (CLIENT_PATTERN, a grep -E),
# and in ringmail's log after line LOG_FROM there is a login, and every login's
# connection (client=IP:PORT) had its "pop3: TLS started" before it. Prints what it
# found (or what is wrong: then it fails).
tls_used() { # LOG_FROM CLIENT_LOG CLIENT_PATTERN
  local said
  said=$(grep -m1 -o -E "$3" "$2") || { echo "the client's log shows no TLS (/$3/ in $(basename "$2"))"; return 1; }
  tail -n "+$(($1 + 1))" "$work/ringmail.log" | python3 -c '
import re, sys
tls, logins, plain = {}, 0, []
for line in sys.stdin:
    c = re.search(r" client=(\S+)", line)
    if not c:
        continue
    if "pop3: TLS started" in line:
        t = re.search(r" tls=\"?([^\" ]+)", line)
        tls[c[1]] = t[1] if t else "?"
    elif "pop3 login " in line:
        logins += 1
        if c[1] not in tls:
            plain.append(c[1])
if not logins:
    sys.exit("no login in the server log")
if plain:
    sys.exit("logins without TLS from " + " ".join(plain))
print("server: %d login(s) under TLS %s" % (logins, " ".join(sorted(set(tls.values())))))
' > "$work/tls-check" 2>&1 || { cat "$work/tls-check"; return 1; }
  echo "client: \"$said\"; $(cat "$work/tls-check")"
}

# fetchmail: every message (fetchall), kept on the server, each to an MDA that
# writes it to a file of its own.
mkdir -p "$work/fetchmail"
cat > "$work/mda.sh" <<'SH'
#!/bin/sh
exec cat > "$1/$(date +%s%N).$$"
SH
chmod +x "$work/mda.sh"
# With --tls: by the name localhost, TLS required (sslproto 'tls1.2+': STLS, or with
# ssl the implicit TLS), the certificate checked against ringmail's own as the CA.
case $TLS in
  none) fm_server=127.0.0.1 fm_port=$POP3 fm_tls="sslproto '' no sslcertck" fm_v="" ;;
  stls) fm_server=localhost fm_port=$POP3 fm_tls="sslproto 'tls1.2+' sslcertck sslcertfile '$CA'" fm_v=-v ;;
  pop3s) fm_server=localhost fm_port=$POP3S fm_tls="ssl sslproto 'tls1.2+' sslcertck sslcertfile '$CA'" fm_v=-v ;;
esac
cat > "$work/fetchmailrc" <<RC
set no syslog
poll $fm_server with proto POP3 port $fm_port auth password timeout 60
  user 'user0@localhost' there with password 'password0' is 'root' here
  options fetchall keep no rewrite $fm_tls
  mda "$work/mda.sh $work/fetchmail"
RC
chmod 600 "$work/fetchmailrc"
from=$(log_lines)
fetchmail -f "$work/fetchmailrc" --nodetach $fm_v -i "$work/fetchids" > "$work/fetchmail.log" 2>&1 \
  || [ $? -eq 1 ] || { echo "fetchmail failed:"; tail -20 "$work/fetchmail.log"; }
check fetchmail "$work/fetchmail" "$from" "$work/fetchmail.log" 'SSL/TLS: using protocol TLSv1[.0-9]*'

# getmail6: every message (read_all) into a maildir, kept on the server. It refuses
# to deliver as root: the maildir is nobody's, and so is the delivery.
# With --tls pop3s: SimplePOP3SSLRetriever by the name localhost, ringmail's
# certificate as ca_certs (getmail6 then requires it, and checks the name), and
# --fingerprint -v to have it log the cipher and protocol. It has no STLS.
if [ "$TLS" = stls ]; then
  skipped=$((skipped + 1))
  echo "getmail6: skipped: getmail6 $(getmail --version 2>/dev/null | sed -n 's/^getmail //p' | head -1) speaks no STLS (its POP3 retrievers are plaintext or implicit TLS only; --tls pop3s covers it)"
else
  mkdir -p "$work/getmail/Maildir/"{cur,new,tmp}
  chown -R nobody:nogroup "$work/getmail/Maildir"
  if [ "$TLS" = none ]; then
    gm_retriever="type = SimplePOP3Retriever
server = 127.0.0.1
port = $POP3" gm_v=()
  else
    gm_retriever="type = SimplePOP3SSLRetriever
server = localhost
port = $POP3S
ca_certs = $CA" gm_v=(--fingerprint -v)
  fi
  cat > "$work/getmailrc" <<RC
[retriever]
$gm_retriever
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
  from=$(log_lines)
  getmail --rcfile "$work/getmailrc" --getmaildir "$work/getmail" "${gm_v[@]}" > "$work/getmail.log" 2>&1 \
    || { echo "getmail failed:"; tail -20 "$work/getmail.log"; }
  check getmail6 "$work/getmail/Maildir" "$from" "$work/getmail.log" 'using cipher [^ ]*:TLSv1[.0-9]*'
fi

# mpop: every message (not only new ones) into a maildir, kept on the server.
# With --tls: by the name localhost, TLS required (STLS, or at once), ringmail's
# certificate as tls_trust_file; --debug for the "TLS session parameters" (it also
# logs the whole dialogue: the test password, every message).
mkdir -p "$work/mpop/Maildir/"{cur,new,tmp}
case $TLS in
  none) mp=(--host=127.0.0.1 --port="$POP3" --tls=off) mp_v=--quiet ;;
  stls) mp=(--host=localhost --port="$POP3" --tls=on --tls-starttls=on --tls-trust-file="$CA") mp_v=--debug ;;
  pop3s) mp=(--host=localhost --port="$POP3S" --tls=on --tls-starttls=off --tls-trust-file="$CA") mp_v=--debug ;;
esac
from=$(log_lines)
mpop "${mp[@]}" --auth=user --user=user2@localhost \
  --passwordeval='echo password2' --keep=on --only-new=off --uidls-file="$work/mpop/uidls" \
  --delivery=maildir,"$work/mpop/Maildir" $mp_v > "$work/mpop.log" 2>&1 \
  || { echo "mpop failed:"; grep -v -e '^<-- ' -e '^--> ' "$work/mpop.log" | tail -20; }
check mpop "$work/mpop/Maildir" "$from" "$work/mpop.log" 'TLS session parameters'

if [ "$TLS" = none ]; then
  echo "interop-pop3 ($SERVER): $passed passed, $failed failed"
else
  echo "interop-pop3 ($SERVER, --tls $TLS): $passed passed, $failed failed, $skipped skipped"
fi
[ "$failed" -eq 0 ]
