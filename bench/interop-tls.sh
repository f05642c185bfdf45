#!/usr/bin/env bash
# TLS interop: ringmail's TLS against real peers, each check a PASS or FAIL line.
#   1. swaks --tls (STARTTLS) into the smtp port delivers to alice@localhost: swaks
#      reports the handshake and a 250 under TLS after the data, and alice's INBOX
#      gets the message, received `with ESMTPS`;
#   2. swaks --tlsc (implicit TLS) into the smtps port, likewise;
#   3. submission: swaks --tls --auth PLAIN and --auth LOGIN deliver (ESMTPSA,
#      authenticated sender alice@localhost); a wrong password is refused 535; MAIL
#      without AUTH is refused 530; the smtp port offers no AUTH before STARTTLS
#      (and answers AUTH there with 538), and offers it after;
#   4. ringmail delivers to a private Postfix smtpd with TLS on (certificate of a
#      private CA for localhost and 127.0.0.1), which relays pf.test on into a
#      ringmail-sink; ringmail routes pf.test to it (--route pf.test=127.0.0.1:PORT):
#      a. tls-policy may: sent with tls=TLSv1.x, and Postfix's maillog shows the
#         message arriving over a TLS connection and relayed on;
#      b. verify, no CA file: deferred, the reason naming the certificate, and
#         Postfix got nothing;
#      c. verify --tls-ca-file CA: sent with tls=TLSv1.x, over TLS in Postfix's log.
# Installs postfix, swaks and libnet-ssleay-perl when missing (preseeding Postfix's
# "No configuration": the system's Postfix is never configured, started or used);
# every server listens on 127.0.0.1, none on port 25. About 10 s.
#
#   bench/interop-tls.sh
#   NO_BUILD=1 BIN=/tmp/rm-bin bench/interop-tls.sh   # binaries already built
#   KEEP=1 bench/interop-tls.sh                        # keep the work directory (logs)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin"

if ! command -v postfix >/dev/null || ! command -v swaks >/dev/null || ! perl -MNet::SSLeay -e1 2>/dev/null; then
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections 2>/dev/null || true
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postfix swaks libnet-ssleay-perl
fi
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p ringmail -p ringmail-bench
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
R=$BIN/ringmail
source bench/lib/postfix.sh

work=$(mktemp -d)
chmod 755 "$work"   # the postfix user must reach its directories
rm_pids=() sink_pid=""
cleanup() {
  for p in "${rm_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  [ -d "$work/postfix/etc" ] && postfix_stop "$work/postfix"
  [ -n "$sink_pid" ] && { kill -TERM "$sink_pid" 2>/dev/null || true; wait "$sink_pid" 2>/dev/null || true; }
  if [ -n "${KEEP:-}" ]; then echo "interop-tls: kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
source bench/lib/ports.sh

passed=0 failed=0
pass() { passed=$((passed + 1)); echo "PASS $1: $2"; }
fail() { # NAME REASON [DETAIL]
  failed=$((failed + 1)); echo "FAIL $1: $2"
  [ -z "${3:-}" ] || printf '%s\n' "$3" | tail -40 | sed 's/^/    | /'
}

# ringmail serve on data dir $work/NAME (log $work/NAME.log), every listener on a
# port of its own choosing; sets RM_PID, SMTP, SMTPS, SUB from its ready line.
rm_start() { # NAME ARGS...
  local name=$1 ready=""; shift
  RINGMAIL_LOG=info "$R" serve --data "$work/$name" --hostname ringmail.test --dns 127.0.0.1:9 \
    --smtp 127.0.0.1:0 --pop3 127.0.0.1:0 --smtps 127.0.0.1:0 --pop3s 127.0.0.1:0 --submission 127.0.0.1:0 \
    "$@" 2> "$work/$name.log" &
  RM_PID=$!; rm_pids+=("$RM_PID")
  for _ in $(seq 1 200); do
    ready=$(grep -m1 'ringmail ready' "$work/$name.log" || true)
    [ -n "$ready" ] || ! kill -0 "$RM_PID" 2>/dev/null && break
    sleep 0.05
  done
  [ -n "$ready" ] || { echo "ringmail ($name) did not start; its log:" >&2; tail -20 "$work/$name.log" >&2; exit 1; }
  port_of() { sed -n "s/.* $1=127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p" <<< "$ready"; }
  SMTP=$(port_of smtp) SMTPS=$(port_of smtps) SUB=$(port_of submission)
  [ -n "$SMTP" ] && [ -n "$SMTPS" ] && [ -n "$SUB" ] || { echo "cannot read the ports from: $ready" >&2; exit 1; }
}
rm_stop() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

swaks_() { timeout 30 swaks --server 127.0.0.1 --helo client.test --timeout 20 "$@" 2>&1 || true; }
# The server's reply to the end of the data ("<~  250 …": under TLS), the queue id in it.
data_reply() { awk 'seen { print; exit } /^ [-~]> \.$/ { seen = 1 }' <<< "$1"; }
queue_id() { sed -n 's/^<[-~]  250 .*queued as \([0-9A-Za-z]*\).*/\1/p' <<< "$1" | tail -1; }
tls_line() { grep -m1 '^=== TLS started with cipher' <<< "$1" | sed 's/^=== TLS started with cipher //' || true; }

mailbox_count() { "$R" mailbox list "$2" --json --data "$1" 2>/dev/null | grep -c '"uid"' || true; }
# The newest message in DATA's INBOX of USER once it holds COUNT (10 s at most).
mailbox_newest() { # DATA USER COUNT
  local list n
  for _ in $(seq 1 100); do
    list=$("$R" mailbox list "$2" --json --data "$1" 2>/dev/null || true)
    n=$(grep -c '"uid"' <<< "$list" || true)
    [ "$n" -ge "$3" ] && break
    sleep 0.1
  done
  [ "$n" -ge "$3" ] || { echo "(the mailbox holds $n messages, not $3)"; return 0; }
  local uid; uid=$(tail -1 <<< "$list" | python3 -c 'import json,sys; print(json.load(sys.stdin)["uid"])')
  "$R" mailbox show --uid "$uid" "$2" --data "$1" | tr -d '\r'
}
# The Received header of a message (unfolded).
received() { awk '/^Received:/ { r = $0; on = 1; next } on && /^[ \t]/ { r = r " " $0; next } { on = 0 } END { print r }' <<< "$1" | tr -s ' \t' ' '; }

# A delivery's log line in LOG for queue id ID (20 s at most).
delivery_line() { # LOG ID
  local l=""
  for _ in $(seq 1 200); do
    l=$(grep -m1 "delivery id=$2 " "$1" || true)
    [ -n "$l" ] && break
    sleep 0.1
  done
  sed 's/^.*\(delivery id=\)/\1/' <<< "$l"
}

######## 1-3: swaks into ringmail (the main instance also serves 4a)
PW=alice-secret-1
echo "$PW" | "$R" user add alice@localhost --password-stdin --data "$work/main" > "$work/user-add.log" 2>&1 \
  || { echo "ringmail user add failed:" >&2; cat "$work/user-add.log" >&2; exit 1; }
SINK=$(free_port) PF=$(free_port)
rm_start main --route "pf.test=127.0.0.1:$PF" --tls-policy pf.test=may
MAIN_PID=$RM_PID

# 1. STARTTLS on the smtp port.
inbox=$(($(mailbox_count "$work/main" alice@localhost) + 1))
out=$(swaks_ --port "$SMTP" --tls --from bob@example.org --to alice@localhost --header "Subject: interop-tls 1 starttls")
tls=$(tls_line "$out") reply=$(data_reply "$out")
msg=$(mailbox_newest "$work/main" alice@localhost "$inbox") rcv=$(received "$msg")
if [[ $tls == TLSv1.[23]:* ]] && [[ $reply == "<~  250 "* ]] && grep -q '^Subject: interop-tls 1 starttls' <<< "$msg" && [[ $rcv == *" with ESMTPS "* ]]; then
  pass "1 smtp STARTTLS (swaks --tls)" "TLS $tls; after the data: ${reply#<~  }; in alice's INBOX: $rcv"
else
  fail "1 smtp STARTTLS (swaks --tls)" "TLS '${tls:-none}', after the data '${reply:-nothing}', alice's newest message: '${rcv:-none: ${msg%%$'\n'*}}'" "$out"
fi

# 2. Implicit TLS on the smtps port.
inbox=$(($(mailbox_count "$work/main" alice@localhost) + 1))
out=$(swaks_ --port "$SMTPS" --tlsc --from bob@example.org --to alice@localhost --header "Subject: interop-tls 2 smtps")
tls=$(tls_line "$out") reply=$(data_reply "$out")
msg=$(mailbox_newest "$work/main" alice@localhost "$inbox") rcv=$(received "$msg")
if [[ $tls == TLSv1.[23]:* ]] && grep -q '^<~  220 ' <<< "$out" && [[ $reply == "<~  250 "* ]] \
   && grep -q '^Subject: interop-tls 2 smtps' <<< "$msg" && [[ $rcv == *" with ESMTPS "* ]]; then
  pass "2 smtps implicit TLS (swaks --tlsc)" "TLS $tls before the greeting; after the data: ${reply#<~  }; in alice's INBOX: $rcv"
else
  fail "2 smtps implicit TLS (swaks --tlsc)" "TLS '${tls:-none}', after the data '${reply:-nothing}', alice's newest message: '${rcv:-none: ${msg%%$'\n'*}}'" "$out"
fi

# 3. Submission: AUTH PLAIN and LOGIN under STARTTLS, then the refusals.
for mech in PLAIN LOGIN; do
  inbox=$(($(mailbox_count "$work/main" alice@localhost) + 1))
  out=$(swaks_ --port "$SUB" --tls --auth "$mech" --auth-user alice@localhost --auth-password "$PW" \
    --from alice@localhost --to alice@localhost --header "Subject: interop-tls 3 auth $mech")
  tls=$(tls_line "$out") reply=$(data_reply "$out") auth=$(grep -m1 '^<~\*\? \+[0-9][0-9][0-9] .*uthentica' <<< "$out" || true)
  msg=$(mailbox_newest "$work/main" alice@localhost "$inbox") rcv=$(received "$msg")
  if [[ $tls == TLSv1.[23]:* ]] && [[ $auth == "<~  235 "* ]] && [[ $reply == "<~  250 "* ]] \
     && grep -q "^Subject: interop-tls 3 auth $mech" <<< "$msg" && [[ $rcv == *" with ESMTPSA "* ]] \
     && [[ $rcv == *"(Authenticated sender: alice@localhost)"* ]]; then
    pass "3 submission AUTH $mech (swaks --tls --auth $mech)" "TLS $tls; ${auth#<~  }; after the data: ${reply#<~  }; in alice's INBOX: $rcv"
  else
    fail "3 submission AUTH $mech (swaks --tls --auth $mech)" "TLS '${tls:-none}', AUTH '${auth:-no reply}', after the data '${reply:-nothing}', alice's newest message: '${rcv:-none: ${msg%%$'\n'*}}'" "$out"
  fi
done

out=$(swaks_ --port "$SUB" --tls --auth PLAIN --auth-user alice@localhost --auth-password "not-$PW" \
  --from alice@localhost --to alice@localhost --header "Subject: interop-tls 3 wrong password")
auth=$(grep -m1 '^<~\*\? \+[0-9][0-9][0-9] .*uthentica' <<< "$out" || true)
if [[ $auth == "<~* 535 "* ]] && ! grep -q '^ ~> MAIL FROM' <<< "$out"; then
  pass "3 submission wrong password" "${auth#<~\* }"
else
  fail "3 submission wrong password" "AUTH answered '${auth:-nothing}', not 535" "$out"
fi

out=$(swaks_ --port "$SUB" --tls --from alice@localhost --to alice@localhost --header "Subject: interop-tls 3 no auth")
mail=$(awk 'seen { print; exit } /^ ~> MAIL FROM/ { seen = 1 }' <<< "$out")
if [[ $mail == "<~* 530 "* ]]; then
  pass "3 submission MAIL without AUTH" "${mail#<~\* }"
else
  fail "3 submission MAIL without AUTH" "MAIL answered '${mail:-nothing}', not 530" "$out"
fi

# AUTH on the smtp port: not offered in EHLO before STARTTLS, refused 538 there;
# offered after STARTTLS (a second session). Plain smtplib, no client logic in between.
if v=$(timeout 30 python3 - "$SMTP" "$PW" <<'PY' 2>&1
import base64, smtplib, ssl, sys
port, pw = int(sys.argv[1]), sys.argv[2]
seen, ok = [], True
def ehlo_auth(s):
    s.ehlo()
    a = s.esmtp_features.get("auth")
    return None if a is None else a.strip()
try:
    s = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10)
    before = ehlo_auth(s)
    seen.append(f"EHLO before STARTTLS: {'AUTH ' + before if before is not None else 'no AUTH'}")
    code, msg = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0alice@localhost\0" + pw.encode()).decode())
    seen.append(f"AUTH PLAIN there: {code} {msg.decode()}")
    ok = before is None and code == 538
    s.quit()
    s = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10)
    s.starttls(context=ssl._create_unverified_context())
    after = ehlo_auth(s)
    seen.append(f"EHLO after STARTTLS: {'AUTH ' + after if after is not None else 'no AUTH'}")
    ok = ok and after is not None and "PLAIN" in after.split() and "LOGIN" in after.split()
    s.quit()
except Exception as e:
    seen.append(f"smtplib: {e!r}")
    ok = False
print("; ".join(seen))
sys.exit(0 if ok else 1)
PY
); then
  pass "3 smtp AUTH only after STARTTLS" "$v"
else
  fail "3 smtp AUTH only after STARTTLS" "$v"
fi

######## 4: ringmail -> Postfix smtpd (TLS) -> ringmail-sink
# A private CA and a certificate of it for localhost and 127.0.0.1 (the route's host).
pki=$work/pki
mkdir -p "$pki"
{
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$pki/ca.key" -out "$pki/ca.pem" \
    -days 2 -subj "/CN=interop-tls test CA"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$pki/pf.key" -out "$pki/pf.csr" -subj "/CN=localhost"
  printf '%s\n' 'basicConstraints=critical,CA:FALSE' 'keyUsage=critical,digitalSignature' \
    'extendedKeyUsage=serverAuth' 'subjectAltName=DNS:localhost,IP:127.0.0.1' > "$pki/pf.ext"
  openssl x509 -req -in "$pki/pf.csr" -CA "$pki/ca.pem" -CAkey "$pki/ca.key" -CAcreateserial -days 2 \
    -extfile "$pki/pf.ext" -out "$pki/pf.pem"
} > "$work/openssl.log" 2>&1 || { echo "openssl failed:" >&2; cat "$work/openssl.log" >&2; exit 1; }

"$BIN/ringmail-sink" --listen "127.0.0.1:$SINK" > "$work/sink.json" 2> "$work/sink.log" & sink_pid=$!
wait_port "$SINK"
POSTFIX_MAIN_CF_EXTRA="relay_domains = pf.test
alias_maps =
alias_database =
smtpd_tls_security_level = may
smtpd_tls_cert_file = $pki/pf.pem
smtpd_tls_key_file = $pki/pf.key
smtpd_tls_session_cache_database = btree:$work/postfix/data/smtpd_scache
smtpd_tls_loglevel = 1" postfix_start "$work/postfix" "$PF" "$SINK"
wait_port "$PF"
maillog=$work/postfix/log/maillog

# What Postfix's maillog says of the message with Message-ID MSGID: its queue id, the
# TLS connection (from the smtpd process's lines since its "connect from") it came
# in on, and its relay on, as "QID|TLS|RELAY" (fields empty when not seen).
cat > "$work/pflog.py" <<'PY'
import re, sys
conn, qid_tls, relay, qid = {}, {}, {}, ""
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"postfix/([\w/.-]+)\[(\d+)\]: (.*)$", line)
    if not m:
        continue
    prog, pid, msg = m.groups()
    if prog.endswith("smtpd"):
        if msg.startswith("connect from "):
            conn[pid] = ""
        t = re.match(r"(\w+ TLS connection established from \S+: \S+ with cipher \S+)", msg)
        if t:
            conn[pid] = t.group(1)
        c = re.match(r"(\w+): client=", msg)
        if c:
            qid_tls[c.group(1)] = conn.get(pid, "")
    elif prog.endswith("cleanup"):
        c = re.match(r"(\w+): message-id=(\S+)", msg)
        if c and c.group(2) == sys.argv[2]:
            qid = c.group(1)
    elif prog.endswith("smtp"):
        c = re.match(r"(\w+): to=<[^>]*>, (relay=\S+) .*(status=\w+)", msg)
        if c:
            relay[c.group(1)] = c.group(2)[len("relay="):].rstrip(",") + " " + c.group(3)
print("|".join([qid, qid_tls.get(qid, ""), relay.get(qid, "")]))
PY
pf_seen() { # MSGID [TRIES]: waits (TRIES x 0.1 s, 10 s) for the relay on
  local r=""
  for _ in $(seq 1 "${2:-100}"); do
    r=$(python3 "$work/pflog.py" "$maillog" "$1")
    [[ $r == *"|"*"|"?* ]] && break
    sleep 0.1
  done
  echo "$r"
}

# Sends a message to carol@pf.test into ringmail's smtp port (plain, relayed as a
# loopback client); sets QID (ringmail's queue id) and MSGID.
send_pf() { # TAG
  MSGID="<interop-tls-$1.$$@client.test>"
  out=$(swaks_ --port "$SMTP" --from bob@example.org --to carol@pf.test --header "Message-Id: $MSGID" --header "Subject: interop-tls 4$1")
  QID=$(queue_id "$out")
  [ -n "$QID" ] || { echo "ringmail did not take the message for pf.test:" >&2; echo "$out" >&2; }
}

# A delivery sent under TLS to Postfix, and Postfix's log agreeing (check 4a and 4c).
check_sent() { # NAME LOG
  local line pf qid pftls pfrelay
  line=$(delivery_line "$2" "$QID")
  pf=$(pf_seen "$MSGID" "$([[ $line == *" status=sent "* ]] && echo 100 || echo 5)")
  IFS='|' read -r qid pftls pfrelay <<< "$pf"
  if [[ $line == *" relay=127.0.0.1[127.0.0.1]:$PF tls=TLSv1."[23]":"* ]] && [[ $line == *" status=sent "* ]] \
     && [[ $pftls == *"TLS connection established from"*"[127.0.0.1]"* ]] && [[ $pfrelay == *"status=sent" ]]; then
    pass "$1" "ringmail: $line; Postfix $qid: $pftls, relayed on to $pfrelay"
  else
    fail "$1" "ringmail: '${line:-no delivery line for ${QID:-the message}}'; Postfix: queue id '$qid', TLS '${pftls:-none}', relay '${pfrelay:-none}'" \
      "$(grep -v ' INFO ringmail_store\| INFO ringmail::queue::spool' "$2" | tail -15; echo "-- Postfix maillog:"; tail -15 "$maillog")"
  fi
}

# 4a. may (the main instance).
send_pf a
check_sent "4a outbound tls-policy=may to Postfix" "$work/main.log"
rm_stop "$MAIN_PID"

# 4b. verify, no CA file: Postfix's certificate chains to no webpki root.
rm_start verify-noca --route "pf.test=127.0.0.1:$PF" --tls-policy pf.test=verify
send_pf b
line=$(delivery_line "$work/verify-noca.log" "$QID")
sleep 0.5   # Postfix's log lines go through postlogd
pf=$(python3 "$work/pflog.py" "$maillog" "$MSGID"); IFS='|' read -r qid pftls pfrelay <<< "$pf"
if [[ $line == *" status=deferred "* ]] && grep -qi 'certificate' <<< "$line" && [ -z "$qid" ]; then
  pass "4b outbound tls-policy=verify without the CA" "ringmail: $line; Postfix took nothing"
else
  fail "4b outbound tls-policy=verify without the CA" "ringmail: '${line:-no delivery line for ${QID:-the message}}'; Postfix queue id '${qid:-none}' (none expected)" \
    "$(tail -15 "$work/verify-noca.log"; echo "-- Postfix maillog:"; tail -15 "$maillog")"
fi
rm_stop "$RM_PID"

# 4c. verify with the CA: the certificate is valid for the route's host, 127.0.0.1.
rm_start verify-ca --route "pf.test=127.0.0.1:$PF" --tls-policy pf.test=verify --tls-ca-file "$pki/ca.pem"
send_pf c
check_sent "4c outbound tls-policy=verify --tls-ca-file CA to Postfix" "$work/verify-ca.log"
rm_stop "$RM_PID"

echo "interop-tls: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
