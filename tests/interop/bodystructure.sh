#!/usr/bin/env bash
# Compares ringmail_store::mime::analyze with Dovecot on the MIME corpus
# (tests/interop/mime-corpus/): a private Dovecot on 127.0.0.1 serves a maildir
# holding the corpus; python3 imaplib fetches ENVELOPE, BODY, BODYSTRUCTURE,
# RFC822.SIZE and every section of our part table (BODY[n], BODY[n.MIME],
# BODY[n.HEADER], BODY[n.TEXT], BODY[HEADER], BODY[TEXT]) and compares them with what
# the store's `mime_dump` example prints. Not part of `cargo test`: it installs
# dovecot-imapd when missing and runs Dovecot as root (mail processes as `nobody`).
#
#   tests/interop/bodystructure.sh [PORT]     # exit 1 when anything differs
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
port=${1:-10143}

if ! command -v dovecot >/dev/null || [ ! -x /usr/lib/dovecot/imap ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends dovecot-imapd
fi

work=$(mktemp -d)
cleanup() {
    if [ -f "$work/run/master.pid" ]; then
        dovecot -c "$work/dovecot.conf" stop || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/mail/Maildir/cur" "$work/mail/Maildir/new" "$work/mail/Maildir/tmp" "$work/run" "$work/state"
i=0
for f in "$here"/mime-corpus/*.eml; do
    i=$((i + 1))
    cp "$f" "$work/mail/Maildir/cur/$i.$(basename "$f" .eml).interop:2,S"
done
chown -R nobody:nogroup "$work/mail"
chmod 755 "$work"

cat >"$work/dovecot.conf" <<CONF
base_dir = $work/run
state_dir = $work/state
log_path = $work/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
default_internal_user = dovecot
default_login_user = dovenull
mail_location = maildir:~/Maildir
first_valid_uid = 1
passdb {
  driver = static
  args = password=interop
}
userdb {
  driver = static
  args = uid=nobody gid=nogroup home=$work/mail
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $port
  }
  inet_listener imaps {
    port = 0
  }
}
CONF

# Ours first (it may wait for the cargo lock), then Dovecot.
cd "$repo"
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target} flock -o /tmp/cargo.lock \
    cargo run -q -p ringmail-store --example mime_dump -- "$work"/mail/Maildir/cur/* >"$work/ours.jsonl"

dovecot -c "$work/dovecot.conf"

python3 "$here/bodystructure_compare.py" "$port" "$work/ours.jsonl" || {
    rc=$?
    echo "--- dovecot log"; cat "$work/dovecot.log" || true
    exit $rc
}
