# Private Dovecot instance for the POP3 benchmarks and interop, in a directory of its
# own, on loopback (source this file).
#   dovecot_install                                  # the packages, when missing
#   dovecot_start DIR POP3_PORT LMTP_PORT PASSWD     # pop3 and lmtp on 127.0.0.1
#   DOVECOT_CONF_EXTRA="pop3_no_flag_updates = yes" dovecot_start ...   # more settings
#   dovecot_stop DIR
# PASSWD is a passwd-file (`user:{ARGON2ID}$argon2id$...` lines, as
# `ringmail-load passwd-file` writes them: ringmail's own argon2id parameters). Mail
# goes in through LMTP (`ringmail-load smtp --lmtp`) into DIR/mail/USER/Maildir,
# owned by nobody. Never touches /etc/dovecot, the system's ports, or a running
# system Dovecot.
#
# Tuning: what Dovecot's own performance notes recommend for a many-login load:
# pop3-login in high-performance mode (service_count = 0, one process per core kept
# ready), pop3 processes reused (service_count = 100), the auth cache on, and
# password hashes verified by the auth-worker processes
# (auth_cache_verify_password_with_worker): passwd-file would otherwise verify every
# argon2id hash in the one auth process, on one core.

dovecot_install() {
  if ! command -v dovecot >/dev/null || [ ! -x /usr/lib/dovecot/pop3 ] || [ ! -x /usr/lib/dovecot/lmtp ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends dovecot-pop3d dovecot-lmtpd
  fi
}

dovecot_start() {
  local dir=$1 pop3=$2 lmtp=$3 passwd=$4
  mkdir -p "$dir/run" "$dir/state" "$dir/mail"
  chmod 755 "$dir"
  chown nobody:nogroup "$dir/mail"
  cp "$passwd" "$dir/passwd"
  chmod 644 "$dir/passwd"
  local cores
  cores=$(nproc)
  cat > "$dir/dovecot.conf" <<CONF
base_dir = $dir/run
state_dir = $dir/state
log_path = $dir/dovecot.log
protocols = pop3 lmtp
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 1
mail_location = maildir:~/Maildir
pop3_uidl_format = %08Xu%08Xv
auth_cache_size = 10M
auth_cache_ttl = 1 hour
auth_cache_verify_password_with_worker = yes
auth_worker_max_count = 30
default_process_limit = 512
default_client_limit = 4096
passdb {
  driver = passwd-file
  args = scheme=ARGON2ID username_format=%u $dir/passwd
}
userdb {
  driver = static
  args = uid=nobody gid=nogroup home=$dir/mail/%u
}
service pop3-login {
  inet_listener pop3 {
    address = 127.0.0.1
    port = $pop3
  }
  inet_listener pop3s {
    port = 0
  }
  service_count = 0
  process_min_avail = $cores
}
service pop3 {
  service_count = 100
  process_limit = 512
}
service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = $lmtp
  }
  unix_listener lmtp {
    mode = 0600
  }
}
${DOVECOT_CONF_EXTRA:-}
CONF
  dovecot -c "$dir/dovecot.conf" || { echo "dovecot did not start; its log:" >&2; cat "$dir/dovecot.log" >&2; return 1; }
}

dovecot_stop() {
  [ -f "$1/run/master.pid" ] && dovecot -c "$1/dovecot.conf" stop >/dev/null 2>&1 || true
}
