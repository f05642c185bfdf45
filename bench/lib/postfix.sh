# Private Postfix instance for benchmarks, in a directory of its own, on loopback.
#   postfix_start DIR SMTP_PORT RELAY_PORT [IP]  # smtpd on IP:SMTP_PORT (127.0.0.1),
#                                               # relays to 127.0.0.1:RELAY_PORT
#   POSTFIX_MAIN_CF_EXTRA="relay_domains = x.test" postfix_start ...   # more main.cf
#   postfix_stop DIR
# Never touches the system's Postfix configuration, queue or port 25.

postfix_start() {
  local dir=$1 port=$2 relay=$3 ip=${4:-127.0.0.1}
  mkdir -p "$dir/etc" "$dir/spool" "$dir/data" "$dir/log"
  chmod 755 "$dir"
  chown postfix:postfix "$dir/data"
  cp /etc/postfix/master.cf "$dir/etc/master.cf"
  cp /etc/postfix/dynamicmaps.cf "$dir/etc/" 2>/dev/null || true
  cat > "$dir/etc/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $dir/spool
data_directory = $dir/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix-peer.test
mydestination =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:$relay
maillog_file = $dir/log/maillog
maillog_file_prefixes = $dir/log
smtpd_banner = \$myhostname ESMTP
default_process_limit = 200
smtp_destination_concurrency_limit = 64
default_destination_concurrency_limit = 64
smtputf8_enable = no
${POSTFIX_MAIN_CF_EXTRA:-}
CF
  # smtpd on a loopback port instead of 25; postlogd for maillog_file.
  sed -i "s/^smtp      inet/$ip:$port inet/" "$dir/etc/master.cf"
  grep -q '^postlog' "$dir/etc/master.cf" || echo "postlog   unix-dgram n  -       n       -       1       postlogd" >> "$dir/etc/master.cf"
  postconf -c "$dir/etc" -F '*/*/chroot = n'
  postfix -c "$dir/etc" set-permissions >/dev/null 2>&1 || true
  postfix -c "$dir/etc" check 2>&1 | grep -v "^$" >&2 || true
  postfix -c "$dir/etc" start >/dev/null 2>&1 || { echo "postfix did not start; its log:" >&2; cat "$dir/log/maillog" >&2; return 1; }
}

postfix_stop() {
  postfix -c "$1/etc" stop >/dev/null 2>&1 || true
}
