#!/usr/bin/env bash
# DKIM interop: mail ringmail signs verifies with an independent verifier, dkimpy
# (Debian's python3-dkim, with python3-nacl for Ed25519).
#   For each algorithm (ed25519, rsa2048): `ringmail dkim generate` makes a key and
#   the TXT record; ringmail runs with that key (`--dkim`) for example.test; N
#   messages from example.test (plain and dot-leading lines, trailing spaces, an
#   8-bit body, a folded Subject) go in over SMTP from the relay network to a local
#   user; each stored message (`ringmail mailbox show`) must pass dkimpy's
#   `dkim.verify` against the generated record, and fail it once its body is changed.
# And the other way: dkimpy signs messages (RSA-SHA256 with an OpenSSL key, Ed25519
# with a PyNaCl one) for signer.test; a private dnsmasq publishes the keys; ringmail,
# verifying mail from outside its relay networks, must record `dkim=pass` for each in
# its Authentication-Results, and not for a copy changed after signing.
# Installs python3-dkim, python3-nacl and dnsmasq-base when missing; every server
# listens on 127.0.0.1 only. About 15 s.
#
#   bench/interop-dkim.sh
#   N=20 NO_BUILD=1 bench/interop-dkim.sh     # binaries already built
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-10}
if ! python3 -c 'import dkim, nacl' 2>/dev/null && ! /usr/bin/python3 -c 'import dkim, nacl' 2>/dev/null; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-dkim python3-nacl
fi
# Debian's packages are for Debian's python3.
PY=python3
python3 -c 'import dkim, nacl' 2>/dev/null || PY=/usr/bin/python3
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p ringmail
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
R=$BIN/ringmail

work=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"; }
trap cleanup EXIT
failed=0

for alg in ed25519 rsa2048; do
  data="$work/$alg"
  echo pw | $R user add bob@localhost --password-stdin --data "$data" >/dev/null 2>"$work/$alg-user.log"
  record=$($R dkim generate example.test --selector "s-$alg" --algorithm "$alg" --data "$data" 2>"$work/$alg-key")
  key=$(tail -1 "$work/$alg-key")
  algo=$([ "$alg" = ed25519 ] && echo ed25519 || echo rsa-sha256)
  $R serve --data "$data" --smtp 127.0.0.1:0 --pop3 127.0.0.1:0 --smtps 127.0.0.1:0 --pop3s 127.0.0.1:0 \
    --submission 127.0.0.1:0 --hostname ringmail.test --dns 127.0.0.1:9 \
    --dkim "domain=example.test,selector=s-$alg,key=$key,algorithm=$algo" 2>"$work/$alg.log" &
  pid=$!
  for _ in $(seq 1 200); do grep -q 'ringmail ready' "$work/$alg.log" && break; sleep 0.05; done
  port=$(grep -o 'ringmail ready smtp=127.0.0.1:[0-9]*' "$work/$alg.log" | grep -o '[0-9]*$')
  $PY - "$port" "$N" <<'PY'
import smtplib, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
s = smtplib.SMTP('127.0.0.1', port, timeout=30)
for i in range(n):
    body = ('.dot first\r\nline with trailing spaces   \r\n\tindented\r\n'
            'caf\xc3\xa9 8-bit\r\n' * (1 + i * 50)).encode('latin-1')
    msg = (b'From: Alice <alice@example.test>\r\nTo: bob@localhost\r\n'
           b'Subject: message %d\r\n folded subject\r\nMIME-Version: 1.0\r\n'
           b'Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n' % i) + body
    s.sendmail('alice@example.test', ['bob@localhost'], msg)
s.quit()
PY
  for _ in $(seq 1 200); do
    [ "$($R mailbox list bob@localhost --json --data "$data" 2>/dev/null | wc -l)" -ge "$N" ] && break; sleep 0.05
  done
  mkdir -p "$work/$alg-msgs"
  for uid in $($R mailbox list bob@localhost --json --data "$data" 2>/dev/null | $PY -c 'import json,sys; [print(json.loads(l)["uid"]) for l in sys.stdin]'); do
    $R mailbox show bob@localhost --uid "$uid" --data "$data" > "$work/$alg-msgs/$uid.eml" 2>/dev/null
  done
  if $PY - "$record" "$work/$alg-msgs" "$N" <<'PY'
import dkim, os, sys
record, folder, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
name, value = record.split(' IN TXT ', 1)
txt = ''.join(p.strip('"') for p in value.split('" "')).encode()
def dns(qname, timeout=5):
    return txt if qname.decode().rstrip('.') == name.rstrip('.') else None
files = sorted(os.listdir(folder))
ok = bad_caught = 0
for f in files:
    m = open(os.path.join(folder, f), 'rb').read()
    if dkim.verify(m, dnsfunc=dns):
        ok += 1
    else:
        print('  not verified:', f, m[:400])
    changed = m[:-4] + (b'X' if m[-4:-3] != b'X' else b'Y') + m[-3:]
    if not dkim.verify(changed, dnsfunc=dns):
        bad_caught += 1
print('  %d of %d messages verify with dkimpy; %d of %d changed copies fail' % (ok, len(files), bad_caught, len(files)))
sys.exit(0 if ok == len(files) == n and bad_caught == n else 1)
PY
  then echo "PASS $alg: ringmail's signatures verify with dkimpy ($(grep -o 'a=[a-z0-9-]*' "$work/$alg-msgs"/*.eml | head -1 | cut -d: -f2))"
  else echo "FAIL $alg"; failed=$((failed + 1)); fi
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
done
# dkimpy signs, ringmail verifies.
export PATH="$PATH:/usr/sbin"
command -v dnsmasq >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends dnsmasq-base; }
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$work/rsa.pem" 2>/dev/null
rsa_pub=$(openssl pkey -in "$work/rsa.pem" -pubout -outform DER 2>/dev/null | base64 -w0)
ed=$($PY -c 'import nacl.signing, base64; k = nacl.signing.SigningKey.generate(); print(base64.b64encode(bytes(k)).decode(), base64.b64encode(bytes(k.verify_key)).decode())')
ed_priv=${ed% *}; ed_pub=${ed#* }
dns_port=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# dnsmasq takes a TXT record's strings comma-separated, each at most 255 octets.
rsa_txt="v=DKIM1; k=rsa; p=$rsa_pub"
rsa_strings=$($PY -c 'import sys; v = sys.argv[1]; print(",".join(v[i:i+250] for i in range(0, len(v), 250)))' "$rsa_txt")
dnsmasq --keep-in-foreground --no-resolv --no-hosts --bind-interfaces --listen-address=127.0.0.1 \
  --port="$dns_port" --local=/test/ --user=root --pid-file="$work/dnsmasq.pid" \
  --txt-record="rsa._domainkey.signer.test,$rsa_strings" \
  --txt-record="ed._domainkey.signer.test,v=DKIM1; k=ed25519; p=$ed_pub" 2>"$work/dnsmasq.log" &
dns_pid=$!
data="$work/verifier"
echo pw | $R user add bob@localhost --password-stdin --data "$data" >/dev/null 2>"$work/verifier-user.log"
$R serve --data "$data" --smtp 127.0.0.1:0 --pop3 127.0.0.1:0 --smtps 127.0.0.1:0 --pop3s 127.0.0.1:0 \
  --submission 127.0.0.1:0 --hostname mx.ringmail.test --dns "127.0.0.1:$dns_port" \
  --relay-network 192.0.2.0/24 2>"$work/verifier.log" &
pid=$!
for _ in $(seq 1 200); do grep -q 'ringmail ready' "$work/verifier.log" && break; sleep 0.05; done
port=$(grep -o 'ringmail ready smtp=127.0.0.1:[0-9]*' "$work/verifier.log" | grep -o '[0-9]*$')
$PY - "$port" "$work/rsa.pem" "$ed_priv" <<'PY'
import dkim, smtplib, sys
port, rsa_pem, ed_priv = int(sys.argv[1]), open(sys.argv[2], 'rb').read(), sys.argv[3].encode()
s = smtplib.SMTP('127.0.0.1', port, timeout=30)
for sel, key, alg in [(b'rsa', rsa_pem, b'rsa-sha256'), (b'ed', ed_priv, b'ed25519-sha256')]:
    for changed in (False, True):
        subject = b'dkimpy %s%s' % (sel, b' changed' if changed else b'')
        msg = (b'From: Signer <a@signer.test>\r\nTo: bob@localhost\r\nSubject: ' + subject +
               b'\r\nDate: Thu, 03 Dec 2026 08:00:00 +0000\r\n\r\nsigned by dkimpy  \r\n.with a dot\r\n')
        sig = dkim.sign(msg, sel, b'signer.test', key, signature_algorithm=alg,
                        include_headers=[b'from', b'to', b'subject', b'date'])
        text = sig + msg
        if changed:
            text = text.replace(b'signed by dkimpy', b'signed by someone')
        s.sendmail('a@signer.test', ['bob@localhost'], text)
s.quit()
PY
for _ in $(seq 1 200); do
  [ "$($R mailbox list bob@localhost --json --data "$data" 2>/dev/null | wc -l)" -ge 4 ] && break; sleep 0.05
done
for sel in rsa ed; do
  got=""; changed=""
  for uid in $($R mailbox list bob@localhost --json --data "$data" 2>/dev/null | $PY -c 'import json,sys; [print(json.loads(l)["uid"]) for l in sys.stdin]'); do
    m=$($R mailbox show bob@localhost --uid "$uid" --data "$data" 2>/dev/null | tr -d '\r')
    ar=$(printf '%s\n' "$m" | $PY -c 'import sys; t = sys.stdin.read(); i = t.find("Authentication-Results: mx.ringmail.test;"); j = t.find("\nReceived:", i); print(" ".join(t[i:j].split()))')
    case "$m" in
      *"Subject: dkimpy $sel changed"*) changed=$ar ;;
      *"Subject: dkimpy $sel"*) got=$ar ;;
    esac
  done
  if [[ "$got" == *"dkim=pass"*"@signer.test"* ]] && [[ "$changed" != *"dkim=pass"* ]] && [ -n "$changed" ]; then
    echo "PASS ringmail verifies dkimpy's $sel signature (and refuses the changed copy): ${got:0:160}"
  else
    echo "FAIL dkimpy $sel: signed: $got; changed: $changed"; failed=$((failed + 1))
  fi
done
kill "$pid" "$dns_pid"; wait "$pid" "$dns_pid" 2>/dev/null || true; pid=""
echo "interop-dkim: $failed failed"
exit $((failed > 0))
