#!/usr/bin/env bash
# DKIM interop: mail ringmail signs verifies with an independent verifier, dkimpy
# (Debian's python3-dkim, with python3-nacl for Ed25519).
#   For each algorithm (ed25519, rsa2048): `ringmail dkim generate` makes a key and
#   the TXT record; ringmail runs with that key (`--dkim`) for example.test; N
#   messages from example.test (plain and dot-leading lines, trailing spaces, an
#   8-bit body, a folded Subject) go in over SMTP from the relay network to a local
#   user; each stored message (`ringmail mailbox show`) must pass dkimpy's
#   `dkim.verify` against the generated record, and fail it once its body is changed.
# Not covered yet: mail signed by dkimpy verified by ringmail (inbound verification is
# not built). Installs python3-dkim and python3-nacl when missing; the server listens
# on 127.0.0.1 only. About 10 s.
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
echo "interop-dkim: $failed failed"
exit $((failed > 0))
