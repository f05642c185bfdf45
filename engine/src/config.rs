//! Settings. Each one is defined once, in the `settings!` table below: its name (the
//! flag `--NAME` and the top-level TOML key `NAME`, both kebab-case), its type, the
//! range it must be in, and where it goes in `Config`. The defaults are
//! `Config::default()`. Layers, in rising precedence: defaults, a TOML file, flags.
//! The reference of every setting is docs/configuration.md (kept current by a test).

use crate::mailauth::{DkimKeyConfig, MailAuthSettings};
use crate::smtp;
use ipnet::IpNet;
use ringmail_store::record::{RECORD_HEADER_BYTES, RECORD_PAYLOAD_BYTES_MAX};
use ringmail_store::segment::SEGMENT_HEADER_BYTES;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Everything `ringmail serve` runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub data: PathBuf,
    /// Executors to run; `None`: every available core.
    pub cores: Option<usize>,
    pub hostname: String,
    pub smtp: SocketAddr,
    /// POP3 listener (RFC 1939).
    pub pop3: SocketAddr,
    /// How long a POP3 client may stay silent (RFC 1939 §3: at least 10 minutes).
    pub pop3_idle_timeout: Duration,
    /// SMTP with implicit TLS (RFC 8314 submissions).
    pub smtps: SocketAddr,
    /// Message submission (RFC 6409): AUTH required.
    pub submission: SocketAddr,
    /// POP3 with implicit TLS (RFC 8314).
    pub pop3s: SocketAddr,
    /// Metrics and the admin API.
    pub admin: SocketAddr,
    /// Bearer token for the admin API (required off the loopback).
    pub admin_token: Option<String>,
    /// `text` or `json`.
    pub log_format: String,
    /// Drop to this user after binding the listeners.
    pub user: Option<String>,
    /// Certificate chains (PEM), paired in order with `tls_keys`; none: a self-signed
    /// certificate for the hostname, made on first start in the data directory.
    pub tls_certificates: Vec<PathBuf>,
    pub tls_keys: Vec<PathBuf>,
    /// Outbound TLS per destination domain (`*`: the rest; default `may`).
    pub tls_policies: Vec<(String, crate::delivery::tls::TlsLevel)>,
    /// Certificates trusted by outbound `verify` besides the webpki roots.
    pub tls_ca_file: Option<PathBuf>,
    /// DKIM signing keys (`[[dkim]]`), one per domain.
    pub dkim: Vec<crate::mailauth::DkimKeyConfig>,
    /// Inbound SPF/DKIM/DMARC/ARC verification (`[mail-auth]`).
    pub mail_auth: crate::mailauth::MailAuthSettings,
    /// Offer SMTP AUTH before TLS too.
    pub smtp_auth_without_tls: bool,
    pub pop3_auth_without_tls: bool,
    /// An authenticated SMTP client's MAIL FROM must be its own address or an alias.
    pub sender_login_match: bool,
    pub local_domains: Vec<String>,
    pub relay_networks: Vec<IpNet>,
    pub limits: smtp::Limits,
    pub idle_timeout: Duration,
    pub connections_per_shard_max: usize,
    /// How long open sessions may go on finishing their message after SIGTERM.
    pub shutdown_grace: Duration,
    /// Name servers for MX lookups (default: /etc/resolv.conf).
    pub dns: Vec<SocketAddr>,
    /// Port of remote MX hosts.
    pub mx_port: u16,
    /// Fixed next hops: (domain or `*`, host, port).
    pub routes: Vec<(String, String, u16)>,
    pub retry: crate::queue::retry::RetryPolicy,
    /// Concurrent delivery attempts per destination domain and shard.
    pub connections_per_destination_max: usize,
    /// Delivery attempts running at once per shard, all destinations together.
    pub deliveries_per_shard_max: usize,
    /// A log segment is sealed at this size (compaction deletes whole segments).
    pub segment_bytes_max: u64,
    /// Bytes of recently read message records each executor keeps in memory.
    pub read_cache_bytes: usize,
    /// Zeros ahead of the log writer while batches are small (`log-zero-ahead`).
    pub log_zero_ahead: bool,
    /// Messages per second per destination domain and shard (None: no limit).
    pub destination_rate: Option<f64>,
    /// Per-reply deadlines and the ceiling of one delivery attempt (no flag or TOML
    /// key yet).
    pub delivery_timeouts: crate::delivery::attempt::DeliveryTimeouts,
    /// Password checks (`auth-*`).
    pub auth: crate::auth::AuthConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data: PathBuf::from("./ringmail-data"),
            cores: None,
            hostname: system_hostname(),
            smtp: "127.0.0.1:2525".parse().unwrap(),
            pop3: "127.0.0.1:1110".parse().unwrap(),
            pop3_idle_timeout: Duration::from_secs(600),
            smtps: "127.0.0.1:4465".parse().unwrap(),
            submission: "127.0.0.1:5587".parse().unwrap(),
            pop3s: "127.0.0.1:1995".parse().unwrap(),
            admin: "127.0.0.1:8025".parse().unwrap(),
            admin_token: None,
            log_format: "text".into(),
            user: None,
            tls_certificates: Vec::new(),
            tls_keys: Vec::new(),
            tls_policies: Vec::new(),
            tls_ca_file: None,
            dkim: Vec::new(),
            mail_auth: crate::mailauth::MailAuthSettings::default(),
            smtp_auth_without_tls: false,
            pop3_auth_without_tls: false,
            sender_login_match: true,
            local_domains: vec!["localhost".into()],
            relay_networks: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
            limits: smtp::Limits::default(),
            idle_timeout: Duration::from_secs(300),
            connections_per_shard_max: 10_000,
            shutdown_grace: Duration::from_secs(10),
            dns: crate::dns::resolver::servers_from_resolv_conf(std::path::Path::new(
                "/etc/resolv.conf",
            )),
            mx_port: 25,
            routes: Vec::new(),
            retry: crate::queue::retry::RetryPolicy::default(),
            connections_per_destination_max: 16,
            deliveries_per_shard_max: 1000,
            segment_bytes_max: 64 << 20,
            read_cache_bytes: 64 << 20,
            log_zero_ahead: ZERO_AHEAD_DEFAULT,
            destination_rate: None,
            delivery_timeouts: Default::default(),
            auth: Default::default(),
        }
    }
}

impl Config {
    /// Whether a client at `ip` may relay to any domain.
    pub fn relay_allowed(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.relay_networks.iter().any(|n| n.contains(&ip))
    }

    pub fn smtp_config(&self) -> smtp::Config {
        smtp::Config {
            hostname: self.hostname.clone(),
            local_domains: self
                .local_domains
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
            own_addresses: self.own_addresses(),
            limits: self.limits.clone(),
            // Every server has a certificate: a configured one or its self-signed one.
            starttls: true,
            // The account directory and the password check are always there.
            auth: true,
            auth_without_tls: self.smtp_auth_without_tls,
            sender_login_match: self.sender_login_match,
            submission: false,
        }
    }

    /// The SMTP core's settings on the submission listener (RFC 6409).
    pub fn submission_config(&self) -> smtp::Config {
        smtp::Config {
            submission: true,
            ..self.smtp_config()
        }
    }

    /// The addresses mail to this host arrives at (Postfix's inet_interfaces): the
    /// loopback addresses, and the listen address, or every interface's when it
    /// listens on all of them. A literal of one of them is this host.
    pub fn own_addresses(&self) -> Vec<IpAddr> {
        let mut own: Vec<IpAddr> = vec![
            std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::Ipv6Addr::LOCALHOST.into(),
        ];
        let listen = self.smtp.ip().to_canonical();
        if listen.is_unspecified() {
            own.extend(interface_addresses());
        } else {
            own.push(listen);
        }
        own.sort();
        own.dedup();
        own
    }

    /// The configured certificates with their keys.
    pub fn cert_files(&self) -> Vec<crate::net::certs::CertFiles> {
        self.tls_certificates
            .iter()
            .zip(&self.tls_keys)
            .map(|(c, k)| crate::net::certs::CertFiles {
                certificate: c.clone(),
                key: k.clone(),
            })
            .collect()
    }

    /// Every setting in its range, and the ones that bound each other consistent. The
    /// error names the setting (its flag and TOML key) and what it may be.
    pub fn validate(&self) -> Result<(), String> {
        Settings::from_config(self).check()?;
        if self.tls_certificates.len() != self.tls_keys.len() {
            return Err(format!(
                "`tls-certificate` and `tls-key` go in pairs, in the same order: {} \
                 certificate(s) but {} key(s)",
                self.tls_certificates.len(),
                self.tls_keys.len()
            ));
        }
        if !self.admin.ip().is_loopback() && self.admin_token.is_none() {
            return Err(format!(
                "`admin` {} is not a loopback address: set `admin-token`, which every \
                 admin request must then carry",
                self.admin
            ));
        }
        let allowed = message_bytes_allowed(&self.limits);
        if self.limits.message_bytes_max > allowed {
            return Err(format!(
                "`message-size-max` must be at most {allowed} bytes, not {}: a message is \
                 stored as one record of at most {RECORD_PAYLOAD_BYTES_MAX} bytes, and {} of \
                 them are kept for the envelope and a bounce's report (with `recipients-max` \
                 {} and `line-length-max` {})",
                self.limits.message_bytes_max,
                record_headroom(&self.limits),
                self.limits.rcpt_count_max,
                self.limits.line_bytes_max,
            ));
        }
        let needed = segment_bytes_needed(&self.limits);
        if self.segment_bytes_max < needed {
            return Err(format!(
                "`segment-size` must be at least {needed} bytes, not {}: a segment must hold \
                 the largest message record (`message-size-max` {} plus {} bytes of envelope \
                 and framing); raise `segment-size` or lower `message-size-max`",
                self.segment_bytes_max,
                self.limits.message_bytes_max,
                needed - self.limits.message_bytes_max as u64,
            ));
        }
        Ok(())
    }
}

/// Segments smaller than this would roll on every batch.
/// `log-zero-ahead` unless set: see bench/RESULTS.md ("Write amplification") for the
/// throughput and bytes written with each.
const ZERO_AHEAD_DEFAULT: bool = true;

pub const SEGMENT_BYTES_MIN: u64 = 64 << 10;
/// Above this a segment is slow to compact and to copy forward, and gains nothing.
pub const SEGMENT_BYTES_MAX: u64 = 4 << 30;
/// Longest duration any setting takes (seconds): a year. Larger values overflow the
/// millisecond arithmetic of the retry schedule and mean nothing to a mail queue.
pub const DURATION_SECS_MAX: u64 = 365 * 24 * 3600;
/// Room a bounce's report needs per recipient (status fields and the quoted reply).
pub const DSN_RECIPIENT_BYTES: usize = 4096;

/// Bytes a message record, or the bounce that quotes it whole (RET=FULL), may need
/// beyond the message itself, with these limits: every envelope string is bounded by a
/// command line (sender, each recipient with its ORCPT, ENVID, HELO), the trace prefix
/// by a few lines, a bounce's report by `DSN_RECIPIENT_BYTES` per recipient.
pub fn record_headroom(l: &smtp::Limits) -> usize {
    let per_rcpt = l
        .line_bytes_max
        .saturating_mul(2)
        .saturating_add(DSN_RECIPIENT_BYTES + 16);
    l.rcpt_count_max
        .saturating_mul(per_rcpt)
        .saturating_add(l.line_bytes_max.saturating_mul(8))
        .saturating_add(64 << 10)
}

/// The largest `message-size-max` these limits leave room for.
pub fn message_bytes_allowed(l: &smtp::Limits) -> usize {
    RECORD_PAYLOAD_BYTES_MAX.saturating_sub(record_headroom(l))
}

/// The smallest segment that holds the largest message record.
pub fn segment_bytes_needed(l: &smtp::Limits) -> u64 {
    (SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES as u64)
        .saturating_add(l.message_bytes_max as u64)
        .saturating_add(record_headroom(l) as u64)
        .max(SEGMENT_BYTES_MIN)
}

/// What a setting's value must be: a check and its wording in errors and the reference.
pub struct Rule<T> {
    pub describe: String,
    check: Box<dyn Fn(&T) -> bool>,
}

impl<T> Rule<T> {
    fn new(describe: impl Into<String>, check: impl Fn(&T) -> bool + 'static) -> Rule<T> {
        Rule {
            describe: describe.into(),
            check: Box::new(check),
        }
    }
}

/// `lo..=hi`, for integers.
fn between<T>(lo: T, hi: T) -> Rule<T>
where
    T: PartialOrd + fmt::Display + Copy + 'static,
{
    Rule::new(format!("{lo} to {hi}"), move |v| *v >= lo && *v <= hi)
}

/// `lo` or more, for integers.
fn at_least<T>(lo: T) -> Rule<T>
where
    T: PartialOrd + fmt::Display + Copy + 'static,
{
    Rule::new(format!("at least {lo}"), move |v| *v >= lo)
}

/// RFC 1939 section 3: a POP3 inactivity timer "MUST be of at least 10 minutes'
/// duration".
const POP3_IDLE_SECS_MIN: u64 = 600;

fn pop3_idle_seconds() -> Rule<u64> {
    Rule::new(
        format!("{POP3_IDLE_SECS_MIN} to {DURATION_SECS_MAX} (seconds)"),
        |v| (POP3_IDLE_SECS_MIN..=DURATION_SECS_MAX).contains(v),
    )
}

/// A duration in whole seconds: 1 s to a year.
fn seconds() -> Rule<u64> {
    Rule::new(format!("1 to {DURATION_SECS_MAX} (seconds)"), |v| {
        (1..=DURATION_SECS_MAX).contains(v)
    })
}

/// The upper bound depends on other limits: `Config::validate` checks it.
fn message_size() -> Rule<usize> {
    Rule::new(
        format!(
            "1 to the record limit minus envelope room ({} with the default \
             `recipients-max` and `line-length-max`)",
            message_bytes_allowed(&smtp::Limits::default())
        ),
        |v| *v >= 1,
    )
}

/// Whether the largest message record fits depends on other limits: `Config::validate`.
fn segment_size() -> Rule<u64> {
    Rule::new(
        format!(
            "{SEGMENT_BYTES_MIN} to {SEGMENT_BYTES_MAX}, and room for the largest \
             message record"
        ),
        |v| (SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(v),
    )
}

/// A duration in whole seconds where 0 switches the thing off.
fn seconds_or_off(max: u64, off: &str) -> Rule<u64> {
    Rule::new(format!("0 to {max} (seconds; 0: {off})"), move |v| {
        *v <= max
    })
}

fn positive_finite() -> Rule<f64> {
    Rule::new("a finite number above 0", |v: &f64| {
        v.is_finite() && *v > 0.0
    })
}

fn host_name() -> Rule<String> {
    Rule::new(
        "a host name (letters, digits, `-`, dot-separated labels)",
        |v: &String| is_host_name(v),
    )
}

fn host_names() -> Rule<Vec<String>> {
    Rule::new("host names", |v: &Vec<String>| {
        v.iter().all(|d| is_host_name(d))
    })
}

fn non_empty_path() -> Rule<PathBuf> {
    Rule::new("a path", |v: &PathBuf| !v.as_os_str().is_empty())
}

/// Port 0 is allowed: the kernel picks one port, every executor shares it, and the
/// `listening` and `ready` log lines name it (tests and scripts start servers so).
fn listen_address() -> Rule<SocketAddr> {
    Rule::new("ADDR:PORT (port 0: any free port)", |_: &SocketAddr| true)
}

fn name_servers() -> Rule<Vec<SocketAddr>> {
    Rule::new("ADDR:PORT each, port 1 to 65535", |v: &Vec<SocketAddr>| {
        v.iter().all(|a| a.port() != 0)
    })
}

fn anything<T>(describe: &str) -> Rule<T> {
    Rule::new(describe, |_| true)
}

/// RFC 1035 §2.3.1 labels (digits first allowed, RFC 1123), at most 253 bytes.
pub fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// How a setting's value is written in TOML, for errors and the reference.
pub trait TomlType {
    fn toml_type() -> String;
}

macro_rules! toml_type {
    ($($t:ty => $name:literal),* $(,)?) => {
        $(impl TomlType for $t {
            fn toml_type() -> String {
                $name.into()
            }
        })*
    };
}

toml_type! {
    bool => "boolean",
    u16 => "integer",
    u32 => "integer",
    u64 => "integer",
    usize => "integer",
    f64 => "number",
    String => "string",
    PathBuf => "string (a path)",
    SocketAddr => "string (ADDR:PORT)",
    Network => "string (a CIDR network or an address)",
    Route => "string (DOMAIN=HOST:PORT)",
    TlsPolicy => "string (DOMAIN=LEVEL)",
    DkimKeyConfig => "table (domain, selector, key, algorithm, headers)",
    MailAuthSettings => "table (verify, dmarc-policy, dns-temperror)",
}

impl<T: TomlType> TomlType for Vec<T> {
    fn toml_type() -> String {
        format!("array of {}", T::toml_type())
    }
}

/// A relay network: CIDR notation, or a bare address (a host route).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network(pub IpNet);

impl FromStr for Network {
    type Err = String;
    fn from_str(s: &str) -> Result<Network, String> {
        parse_cidr(s).map(Network)
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A fixed next hop: `DOMAIN=HOST:PORT`, DOMAIN `*` for every non-local domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub domain: String,
    pub host: String,
    pub port: u16,
}

impl FromStr for Route {
    type Err = String;
    fn from_str(s: &str) -> Result<Route, String> {
        parse_route(s).map(|(domain, host, port)| Route { domain, host, port })
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}=[{}]:{}", self.domain, self.host, self.port)
        } else {
            write!(f, "{}={}:{}", self.domain, self.host, self.port)
        }
    }
}

/// Serde through the string form, the same one the flags take.
macro_rules! serde_via_str {
    ($($t:ty),*) => {
        $(impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        })*
    };
}

/// Outbound TLS for a domain: `DOMAIN=LEVEL`, DOMAIN `*` for every other one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPolicy {
    pub domain: String,
    pub level: crate::delivery::tls::TlsLevel,
}

impl FromStr for TlsPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<TlsPolicy, String> {
        let (domain, level) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}` is not DOMAIN=LEVEL"))?;
        let domain = domain.trim().to_ascii_lowercase();
        if domain != "*" && !is_host_name(&domain) {
            return Err(format!("`{domain}` is not a domain name or `*`"));
        }
        Ok(TlsPolicy {
            domain,
            level: level.trim().parse()?,
        })
    }
}

impl fmt::Display for TlsPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.domain, self.level.name())
    }
}

serde_via_str!(Network, Route, TlsPolicy);

/// One row of the reference (docs/configuration.md).
#[derive(Debug)]
pub struct Reference {
    pub name: String,
    pub toml_type: String,
    pub default: String,
    pub range: String,
    pub doc: String,
}

fn key_of(field: &str) -> String {
    field.replace('_', "-")
}

/// One entry per setting: doc comment (the flag's help and the reference's text),
/// clap attributes, `name: Type`, the TOML aliases it also accepts, an optional
/// default text for the reference (when the default depends on the machine), the rule,
/// how to read it from a `Config` and how to write it into one. A setting added here
/// is a flag, a TOML key, checked, shown by `config show` and listed in the reference.
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])*
        #[arg($($arg:tt)*)]
        $field:ident: $ty:ty,
        aliases [$($alias:literal),*],
        $(default $dd:literal,)?
        rule $rule:expr,
        get |$gc:ident| $get:expr,
        set |$sc:ident, $sv:ident| $set:expr;
    )*) => {
        /// Every setting, each optional so that layers can be merged; field names are
        /// the flags and the TOML keys (kebab-case).
        #[derive(Debug, Clone, Default, PartialEq, clap::Args, Serialize)]
        #[serde(rename_all = "kebab-case")]
        pub struct Settings {
            $(
                $(#[doc = $doc])*
                #[arg($($arg)*)]
                #[serde(skip_serializing_if = "Option::is_none")]
                pub $field: Option<$ty>,
            )*
        }

        impl Settings {
            /// The settings `cfg` holds (all set, but those whose default is "none").
            pub fn from_config(cfg: &Config) -> Settings {
                Settings {
                    $($field: { let $gc = cfg; $get },)*
                }
            }

            /// `over`'s settings replace these (a list replaces a list).
            pub fn merge(&mut self, over: Settings) {
                $(if over.$field.is_some() {
                    self.$field = over.$field;
                })*
            }

            /// Each setting that is set is within its rule.
            pub fn check(&self) -> Result<(), String> {
                $(if let Some(v) = &self.$field {
                    let rule: Rule<$ty> = $rule;
                    if !(rule.check)(v) {
                        return Err(format!(
                            "`{}` must be {}, not {}",
                            key_of(stringify!($field)),
                            rule.describe,
                            shown(v),
                        ));
                    }
                })*
                Ok(())
            }

            /// Writes the settings that are set into `cfg`, unchecked.
            fn apply(self, cfg: &mut Config) {
                $(if let Some($sv) = self.$field {
                    let $sc = &mut *cfg;
                    $set;
                })*
            }

            /// Sets the setting named `key` (or one of its aliases) from a TOML value;
            /// `Ok(false)`: no such setting.
            fn set_key(&mut self, key: &str, value: toml::Value) -> Result<bool, String> {
                $(if key == key_of(stringify!($field)) $(|| key == $alias)* {
                    if self.$field.is_some() {
                        return Err(format!(
                            "`{}` is set twice (as `{key}` and under another name)",
                            key_of(stringify!($field)),
                        ));
                    }
                    let found = value.type_str();
                    self.$field = Some(value.try_into::<$ty>().map_err(|e| {
                        format!(
                            "`{key}` must be {} (found {found}): {}",
                            <$ty as TomlType>::toml_type(),
                            e.message().trim_end(),
                        )
                    })?);
                    return Ok(true);
                })*
                Ok(false)
            }

            /// Names of the settings not set, with what that means.
            fn unset(&self) -> Vec<(String, &'static str)> {
                let mut out = Vec::new();
                $(if self.$field.is_none() {
                    out.push((key_of(stringify!($field)), None$(.or(Some($dd)))?.unwrap_or("not set")));
                })*
                out
            }

            /// The reference of every setting, in definition order.
            pub fn reference() -> Vec<Reference> {
                let defaults = Settings::from_config(&Config::default());
                vec![$({
                    let rule: Rule<$ty> = $rule;
                    let default = None$(.or(Some($dd.to_string())))?
                        .or_else(|| defaults.$field.as_ref().map(toml_value))
                        .unwrap_or_default();
                    Reference {
                        name: key_of(stringify!($field)),
                        toml_type: <$ty as TomlType>::toml_type(),
                        default,
                        range: rule.describe,
                        doc: [$($doc.trim()),*].join(" "),
                    }
                }),*]
            }

            /// Every name a setting answers to, for the hint on an unknown key.
            fn names() -> Vec<String> {
                vec![$(key_of(stringify!($field))),*]
            }
        }
    };
}

fn secs(v: u64) -> Duration {
    Duration::from_secs(v)
}

settings! {
    /// Data directory (created on first start).
    #[arg(long)]
    data: PathBuf, aliases [],
    rule non_empty_path(),
    get |c| Some(c.data.clone()),
    set |c, v| c.data = v;

    /// Executors, one pinned thread per core; unset: every available core.
    #[arg(long)]
    cores: usize, aliases [],
    default "every available core",
    rule between(1, ringmail_store::manifest::SHARDS_MAX as usize),
    get |c| c.cores,
    set |c, v| c.cores = Some(v);

    /// Name in the greeting and in Received headers.
    #[arg(long)]
    hostname: String, aliases [],
    default "the system's host name",
    rule host_name(),
    get |c| Some(c.hostname.clone()),
    set |c, v| c.hostname = v;

    /// SMTP listener, ADDR:PORT.
    #[arg(long, value_parser = parse_addr)]
    smtp: SocketAddr, aliases [],
    rule listen_address(),
    get |c| Some(c.smtp),
    set |c, v| c.smtp = v;

    /// POP3 listener, ADDR:PORT.
    #[arg(long, value_parser = parse_addr)]
    pop3: SocketAddr, aliases [],
    rule listen_address(),
    get |c| Some(c.pop3),
    set |c, v| c.pop3 = v;

    /// Seconds a POP3 client may stay silent before it is disconnected (RFC 1939
    /// asks for at least 10 minutes); nothing it marked deleted is expunged then.
    #[arg(long)]
    pop3_idle_timeout: u64, aliases [],
    rule pop3_idle_seconds(),
    get |c| Some(c.pop3_idle_timeout.as_secs()),
    set |c, v| c.pop3_idle_timeout = secs(v);

    /// SMTP listener with implicit TLS (RFC 8314 "submissions"), ADDR:PORT.
    #[arg(long, value_parser = parse_addr)]
    smtps: SocketAddr, aliases [],
    rule listen_address(),
    get |c| Some(c.smtps),
    set |c, v| c.smtps = v;

    /// Message submission listener (RFC 6409, port 587's service), ADDR:PORT: MAIL
    /// needs AUTH, which needs STARTTLS unless `smtp-auth-without-tls`; a message
    /// without `Date:` or `Message-ID:` gets them.
    #[arg(long, value_parser = parse_addr)]
    submission: SocketAddr, aliases [],
    rule listen_address(),
    get |c| Some(c.submission),
    set |c, v| c.submission = v;

    /// POP3 listener with implicit TLS (RFC 8314), ADDR:PORT.
    #[arg(long, value_parser = parse_addr)]
    pop3s: SocketAddr, aliases [],
    rule listen_address(),
    get |c| Some(c.pop3s),
    set |c, v| c.pop3s = v;

    /// Admin listener, ADDR:PORT: Prometheus metrics (`GET /metrics`) and the queue
    /// API (docs/contracts.md, "Admin API"). Off the loopback it needs `admin-token`.
    #[arg(long, value_parser = parse_addr)]
    admin: SocketAddr, aliases [],
    rule listen_address(),
    get |c| Some(c.admin),
    set |c, v| c.admin = v;

    /// The bearer token every admin request must carry (`Authorization: Bearer
    /// TOKEN`); unset: none asked, which only a loopback `admin` address allows.
    #[arg(long)]
    admin_token: String, aliases [],
    default "none",
    rule Rule::new("at least 16 characters, no spaces", |v: &String| {
        v.len() >= 16 && v.bytes().all(|b| b.is_ascii_graphic())
    }),
    get |c| c.admin_token.clone(),
    set |c, v| c.admin_token = Some(v);

    /// Log lines as `text` (key=value, for people) or `json` (one object per line,
    /// for log shippers). `RINGMAIL_LOG` filters them (`RUST_LOG` syntax: `info`,
    /// `ringmail::delivery=debug,info`).
    #[arg(long)]
    log_format: String, aliases [],
    rule Rule::new("`text` or `json`", |v: &String| v == "text" || v == "json"),
    get |c| Some(c.log_format.clone()),
    set |c, v| c.log_format = v;

    /// Run as this user (and its group) once the listeners are bound: start as root
    /// to bind port 25, then drop to it. The data directory must belong to it.
    #[arg(long)]
    user: String, aliases [],
    default "the user that started it",
    rule Rule::new("a user name", |v: &String| !v.is_empty()),
    get |c| c.user.clone(),
    set |c, v| c.user = Some(v);

    /// A TLS certificate chain, PEM (repeatable; pairs in order with `tls-key`). With
    /// several, the client's SNI name picks the first valid for it, else the first.
    /// None: a self-signed certificate for the hostname, made on first start in the
    /// data directory (`tls/HOSTNAME.pem`).
    #[arg(long)]
    tls_certificate: Vec<PathBuf>, aliases ["tls-certificates"],
    default "a self-signed certificate",
    rule anything("paths"),
    get |c| Some(c.tls_certificates.clone()),
    set |c, v| c.tls_certificates = v;

    /// Outbound TLS for mail to a domain, DOMAIN=LEVEL (repeatable; `*` for every
    /// other domain): `none`, `may` (STARTTLS when offered, any certificate, plaintext
    /// when the handshake fails), `encrypt` (TLS required, any certificate) or
    /// `verify` (TLS with a certificate valid for the MX host name).
    #[arg(long)]
    tls_policy: Vec<TlsPolicy>, aliases ["tls-policies"],
    default "may for every domain",
    rule anything("DOMAIN=LEVEL each"),
    get |c| Some(c.tls_policies.iter().map(|(domain, level)| TlsPolicy {
        domain: domain.clone(),
        level: *level,
    }).collect()),
    set |c, v| c.tls_policies = v.into_iter().map(|p| (p.domain, p.level)).collect();

    /// PEM certificates outbound `verify` trusts besides the webpki (Mozilla) roots.
    #[arg(long)]
    tls_ca_file: PathBuf, aliases [],
    default "the webpki roots only",
    rule non_empty_path(),
    get |c| c.tls_ca_file.clone(),
    set |c, v| c.tls_ca_file = Some(v);

    /// A DKIM signing key (repeatable; TOML: `[[dkim]]` tables with `domain`,
    /// `selector`, `key` (a PEM file, PKCS#8), `algorithm` (`ed25519`, the default, or
    /// `rsa-sha256`) and `headers` (the fields to sign; From, To and Subject are always
    /// oversigned)). Mail from an authenticated session or a relay network whose
    /// `From:` is in the domain or below it is signed as it is queued. As a flag:
    /// `domain=D,selector=S,key=PATH[,algorithm=A][,headers=H1:H2]`.
    #[arg(long)]
    dkim: Vec<DkimKeyConfig>, aliases [],
    default "none: nothing is signed",
    rule Rule::new(
        "entries with a domain, a selector of DNS labels and a key path",
        |v: &Vec<DkimKeyConfig>| v.iter().all(|k| k.check().is_ok()),
    ),
    get |c| Some(c.dkim.clone()),
    set |c, v| c.dkim = v;

    /// Inbound mail authentication, for mail from outside the relay networks and
    /// unauthenticated sessions (TOML: a `[mail-auth]` table): `verify` (SPF, DKIM,
    /// DMARC, ARC, recorded in an `Authentication-Results:` header and the log line),
    /// `dmarc-policy` (`record`: header and log only; `enforce`: a DMARC failure under
    /// `p=reject` is refused with 550 5.7.1, under `p=quarantine` marked), and
    /// `dns-temperror` (`accept`, or `tempfail`: 451 4.7.5 when DNS failed
    /// temporarily). As a flag: `verify=true,dmarc-policy=record,dns-temperror=accept`.
    #[arg(long)]
    mail_auth: MailAuthSettings, aliases [],
    rule anything("verify, dmarc-policy and dns-temperror"),
    get |c| Some(c.mail_auth),
    set |c, v| c.mail_auth = v;

    /// Offer SMTP AUTH (PLAIN, LOGIN) before STARTTLS too; off: only under TLS, so a
    /// password never crosses the network in clear.
    #[arg(long)]
    smtp_auth_without_tls: bool, aliases [],
    rule anything("true or false"),
    get |c| Some(c.smtp_auth_without_tls),
    set |c, v| c.smtp_auth_without_tls = v;

    /// Take POP3 passwords (USER/PASS, AUTH PLAIN) before STLS too; off: they are
    /// neither offered nor accepted without TLS (RFC 2595 section 6), except from a
    /// loopback address, which never crosses a network (Dovecot's rule).
    #[arg(long)]
    pop3_auth_without_tls: bool, aliases [],
    rule anything("true or false"),
    get |c| Some(c.pop3_auth_without_tls),
    set |c, v| c.pop3_auth_without_tls = v;

    /// An authenticated SMTP client's MAIL FROM must be its own address or an alias
    /// of it (Postfix's reject_sender_login_mismatch); `<>` is always allowed.
    #[arg(long)]
    sender_login_match: bool, aliases [],
    rule anything("true or false"),
    get |c| Some(c.sender_login_match),
    set |c, v| c.sender_login_match = v;

    /// The private key (PEM, PKCS#8, PKCS#1 or SEC1) of the `tls-certificate` in the
    /// same position (repeatable).
    #[arg(long)]
    tls_key: Vec<PathBuf>, aliases ["tls-keys"],
    default "the self-signed certificate's",
    rule anything("paths"),
    get |c| Some(c.tls_keys.clone()),
    set |c, v| c.tls_keys = v;

    /// A domain whose mail is accepted from anyone (repeatable; TOML: an array).
    #[arg(long)]
    local_domain: Vec<String>, aliases ["local-domains"],
    rule host_names(),
    get |c| Some(c.local_domains.clone()),
    set |c, v| c.local_domains = v;

    /// A network that may relay to any domain, CIDR or a bare address (repeatable).
    #[arg(long)]
    relay_network: Vec<Network>, aliases ["relay-networks"],
    rule anything("networks"),
    get |c| Some(c.relay_networks.iter().copied().map(Network).collect()),
    set |c, v| c.relay_networks = v.into_iter().map(|n| n.0).collect();

    /// Name server for MX lookups, ADDR:PORT (repeatable).
    #[arg(long, value_parser = parse_addr)]
    dns: Vec<SocketAddr>, aliases [],
    default "the name servers of /etc/resolv.conf",
    rule name_servers(),
    get |c| Some(c.dns.clone()),
    set |c, v| c.dns = v;

    /// Port of remote MX hosts.
    #[arg(long)]
    mx_port: u16, aliases [],
    rule between(1, u16::MAX),
    get |c| Some(c.mx_port),
    set |c, v| c.mx_port = v;

    /// A fixed next hop for a domain, DOMAIN=HOST:PORT; `*` for every non-local domain
    /// (a smarthost) (repeatable).
    #[arg(long)]
    route: Vec<Route>, aliases ["routes"],
    rule anything("routes"),
    get |c| Some(c.routes.iter().map(|(domain, host, port)| Route {
        domain: domain.clone(),
        host: host.clone(),
        port: *port,
    }).collect()),
    set |c, v| c.routes = v.into_iter().map(|r| (r.domain, r.host, r.port)).collect();

    /// Largest message in bytes (after dot-unstuffing); the upper bound is the record
    /// limit (256 MiB) minus room for the envelope, which grows with `recipients-max`
    /// and `line-length-max`.
    #[arg(long, alias = "max-message-size")]
    message_size_max: usize, aliases [],
    rule message_size(),
    get |c| Some(c.limits.message_bytes_max),
    set |c, v| c.limits.message_bytes_max = v;

    /// Longest SMTP command line in bytes, CRLF included (RFC 5321 §4.5.3.1.4).
    #[arg(long)]
    line_length_max: usize, aliases [],
    rule between(512, 65536),
    get |c| Some(c.limits.line_bytes_max),
    set |c, v| c.limits.line_bytes_max = v;

    /// Longest line of message text in bytes, CRLF included (RFC 5321 §4.5.3.1.6).
    #[arg(long)]
    data_line_length_max: usize, aliases [],
    rule between(1000, 1 << 20),
    get |c| Some(c.limits.data_line_bytes_max),
    set |c, v| c.limits.data_line_bytes_max = v;

    /// Most recipients of one message (RFC 5321 §4.5.3.1.8).
    #[arg(long)]
    recipients_max: usize, aliases [],
    rule between(100, 100_000),
    get |c| Some(c.limits.rcpt_count_max),
    set |c, v| c.limits.rcpt_count_max = v;

    /// A message that arrives with this many `Received:` headers is refused (554
    /// 5.4.6): it is looping (Postfix's hopcount_limit).
    #[arg(long)]
    hop_count_max: usize, aliases [],
    rule between(1, 1000),
    get |c| Some(c.limits.hop_count_max),
    set |c, v| c.limits.hop_count_max = v;

    /// Seconds an SMTP client may stay silent before it is disconnected.
    #[arg(long)]
    idle_timeout: u64, aliases [],
    rule seconds(),
    get |c| Some(c.idle_timeout.as_secs()),
    set |c, v| c.idle_timeout = secs(v);

    /// Concurrent SMTP connections per shard; more are answered 421.
    #[arg(long, alias = "max-connections")]
    connections_max: usize, aliases [],
    rule at_least(1),
    get |c| Some(c.connections_per_shard_max),
    set |c, v| c.connections_per_shard_max = v;

    /// Seconds before the first retry of a deferred recipient (doubling after each
    /// attempt).
    #[arg(long)]
    retry_first: u64, aliases [],
    rule seconds(),
    get |c| Some(c.retry.first.as_secs()),
    set |c, v| c.retry.first = secs(v);

    /// Longest wait between retries, in seconds.
    #[arg(long)]
    retry_max: u64, aliases [],
    rule seconds(),
    get |c| Some(c.retry.cap.as_secs()),
    set |c, v| c.retry.cap = secs(v);

    /// Seconds after which an undeliverable message bounces.
    #[arg(long, alias = "max-queue-age")]
    queue_age_max: u64, aliases [],
    rule seconds(),
    get |c| Some(c.retry.max_age.as_secs()),
    set |c, v| c.retry.max_age = secs(v);

    /// Seconds a delivery may wait for a TCP connection to an MX host.
    #[arg(long)]
    delivery_connect_timeout: u64, aliases [],
    rule seconds(),
    get |c| Some(c.delivery_timeouts.connect.as_secs()),
    set |c, v| c.delivery_timeouts.connect = secs(v);

    /// Seconds a delivery waits for the remote greeting (RFC 5321 §4.5.3.2.1: 5 min).
    #[arg(long)]
    delivery_greeting_timeout: u64, aliases [],
    rule seconds(),
    get |c| Some(c.delivery_timeouts.greeting.as_secs()),
    set |c, v| c.delivery_timeouts.greeting = secs(v);

    /// Seconds a delivery waits for the reply to EHLO/HELO, MAIL and other commands
    /// (RFC 5321 §4.5.3.2.2: 5 min).
    #[arg(long)]
    delivery_command_timeout: u64, aliases [],
    rule seconds(),
    get |c| Some(c.delivery_timeouts.command.as_secs()),
    set |c, v| c.delivery_timeouts.command = secs(v);

    /// Seconds a delivery waits for the reply to each RCPT (RFC 5321 §4.5.3.2.3: 5 min).
    #[arg(long)]
    delivery_rcpt_timeout: u64, aliases [],
    rule seconds(),
    get |c| Some(c.delivery_timeouts.rcpt.as_secs()),
    set |c, v| c.delivery_timeouts.rcpt = secs(v);

    /// Seconds a delivery waits for the reply to DATA (RFC 5321 §4.5.3.2.4: 2 min).
    #[arg(long)]
    delivery_data_init_timeout: u64, aliases [],
    rule seconds(),
    get |c| Some(c.delivery_timeouts.data_init.as_secs()),
    set |c, v| c.delivery_timeouts.data_init = secs(v);

    /// Seconds one send of message text may take (RFC 5321 §4.5.3.2.5: 3 min).
    #[arg(long)]
    delivery_data_block_timeout: u64, aliases [],
    rule seconds(),
    get |c| Some(c.delivery_timeouts.data_block.as_secs()),
    set |c, v| c.delivery_timeouts.data_block = secs(v);

    /// Seconds a delivery waits for the reply to the end of the message (RFC 5321
    /// §4.5.3.2.6: 10 min).
    #[arg(long)]
    delivery_data_done_timeout: u64, aliases [],
    rule seconds(),
    get |c| Some(c.delivery_timeouts.data_done.as_secs()),
    set |c, v| c.delivery_timeouts.data_done = secs(v);

    /// Seconds one delivery attempt may take in all, every host and address together.
    #[arg(long)]
    delivery_attempt_timeout: u64, aliases [],
    rule seconds(),
    get |c| Some(c.delivery_timeouts.attempt.as_secs()),
    set |c, v| c.delivery_timeouts.attempt = secs(v);

    /// Size in bytes at which a log segment is sealed; it must hold the largest message
    /// record (`message-size-max` plus envelope room).
    #[arg(long)]
    segment_size: u64, aliases [],
    rule segment_size(),
    get |c| Some(c.segment_bytes_max),
    set |c, v| c.segment_bytes_max = v;

    /// Bytes of recently read messages each executor keeps in memory (records of up
    /// to 256 KiB), so mail read again (a POP3 client that leaves mail on the
    /// server, IMAP clients) is not read from the disk again; 0: none. Message files
    /// are read with O_DIRECT, past the kernel's page cache.
    #[arg(long)]
    read_cache: usize, aliases [],
    rule anything("bytes (0: none)"),
    get |c| Some(c.read_cache_bytes),
    set |c, v| c.read_cache_bytes = v;

    /// Fill each log segment with synced zeros ahead of the writer while batches are
    /// small (the batches most bytes travel in under 256 KiB, on average weighted by
    /// their bytes): a sync then overwrites allocated blocks
    /// instead of appending, which skips the file system's journal commit, but every
    /// byte of the segment is written twice (see bench/RESULTS.md, "Write
    /// amplification").
    #[arg(long)]
    log_zero_ahead: bool, aliases [],
    rule anything("true or false"),
    get |c| Some(c.log_zero_ahead),
    set |c, v| c.log_zero_ahead = v;

    /// Most messages per second to one destination domain, per shard; unset: no limit.
    #[arg(long)]
    destination_rate: f64, aliases [],
    default "no limit",
    rule positive_finite(),
    get |c| c.destination_rate,
    set |c, v| c.destination_rate = Some(v);

    /// Most concurrent delivery attempts to one destination domain, per shard.
    #[arg(long)]
    destination_connections: usize, aliases [],
    rule at_least(1),
    get |c| Some(c.connections_per_destination_max),
    set |c, v| c.connections_per_destination_max = v;

    /// Most delivery attempts running at once per shard, all destinations together.
    #[arg(long, alias = "max-deliveries")]
    deliveries_max: usize, aliases [],
    rule at_least(1),
    get |c| Some(c.deliveries_per_shard_max),
    set |c, v| c.deliveries_per_shard_max = v;

    /// Threads that verify passwords (argon2id), off the executors, at a lower
    /// priority than them; unset: one per available core.
    #[arg(long)]
    auth_workers: usize, aliases [],
    default "one per available core",
    rule between(1, 1024),
    get |c| c.auth.workers,
    set |c, v| c.auth.workers = Some(v);

    /// Password checks that may wait for a verification thread; a login beyond them
    /// gets a temporary failure.
    #[arg(long)]
    auth_queue: usize, aliases [],
    rule between(0, 100_000),
    get |c| Some(c.auth.queue),
    set |c, v| c.auth.queue = v;

    /// Seconds a successful login is remembered, so that the same user, password and
    /// stored hash log in again without a verification (Dovecot's auth_cache_ttl).
    #[arg(long)]
    auth_cache_ttl: u64, aliases [],
    rule seconds_or_off(DURATION_SECS_MAX, "no cache"),
    get |c| Some(c.auth.cache_ttl.as_secs()),
    set |c, v| c.auth.cache_ttl = secs(v);

    /// Seconds a failed login waits before it is answered (Dovecot's
    /// auth_failure_delay).
    #[arg(long)]
    auth_failure_delay: u64, aliases [],
    rule seconds_or_off(60, "answered at once"),
    get |c| Some(c.auth.failure_delay.as_secs()),
    set |c, v| c.auth.failure_delay = secs(v);

    /// Failed logins a client address (IPv6: its /64) may have per minute; beyond
    /// them its logins are refused, without a verification, until the count drains.
    #[arg(long)]
    auth_failures_per_minute: u32, aliases [],
    rule Rule::new("0 to 100000 (0: no limit)", |v: &u32| *v <= 100_000),
    get |c| Some(c.auth.failures_per_minute),
    set |c, v| c.auth.failures_per_minute = v;
}

/// `v` as TOML writes it.
fn toml_value<T: Serialize>(v: &T) -> String {
    toml::Value::try_from(v)
        .map(|v| v.to_string())
        .unwrap_or_else(|e| format!("<{e}>"))
}

fn shown<T: Serialize>(v: &T) -> String {
    toml_value(v)
}

/// Keys of the old file format (snake_case inside `[limits]` and `[delivery]`) and
/// what they are called now, so an old file gets an error that says what to write.
const RENAMED: &[(&str, &str)] = &[
    ("line_bytes_max", "line-length-max"),
    ("data_line_bytes_max", "data-line-length-max"),
    ("message_bytes_max", "message-size-max"),
    ("rcpt_count_max", "recipients-max"),
    ("idle_timeout_s", "idle-timeout"),
    ("connections_per_shard_max", "connections-max"),
    ("mx_port", "mx-port"),
    ("routes", "route"),
    ("retry_first_s", "retry-first"),
    ("retry_max_s", "retry-max"),
    ("max_queue_age_s", "queue-age-max"),
    ("connections_per_destination_max", "destination-connections"),
    ("destination_rate", "destination-rate"),
    ("deliveries_per_shard_max", "deliveries-max"),
    ("max-message-size", "message-size-max"),
    ("max-connections", "connections-max"),
    ("max-queue-age", "queue-age-max"),
    ("max-deliveries", "deliveries-max"),
];

fn unknown_key(key: &str, value: &toml::Value) -> String {
    let hint = if let (Some(t), "limits" | "delivery") = (value.as_table(), key) {
        let inner: Vec<String> = t
            .keys()
            .map(|k| {
                let new = RENAMED
                    .iter()
                    .find(|(old, _)| old == k)
                    .map_or(k.as_str(), |(_, new)| new);
                format!("`{new}`")
            })
            .collect();
        format!(
            ": there are no tables, every setting is a top-level key (here: {})",
            inner.join(", ")
        )
    } else if let Some((_, new)) = RENAMED.iter().find(|(old, _)| *old == key) {
        format!(": it is now `{new}`")
    } else if Settings::names().contains(&key_of(key)) {
        format!(": did you mean `{}`?", key_of(key))
    } else {
        " (the settings are listed in docs/configuration.md; `ringmail config show` \
         prints them all)"
            .into()
    };
    format!("unknown key `{key}`{hint}")
}

impl Settings {
    /// The settings of a TOML document: top-level keys only, named as the flags.
    pub fn from_toml(text: &str) -> Result<Settings, String> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
        let mut s = Settings::default();
        for (key, value) in table {
            if !s.set_key(&key, value.clone())? {
                return Err(unknown_key(&key, &value));
            }
        }
        Ok(s)
    }

    pub fn read_file(path: &Path) -> Result<Settings, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        Settings::from_toml(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }

    /// The effective settings: the defaults, then `file`, then `flags`, checked.
    pub fn layered(file: Option<&Path>, flags: Settings) -> Result<Settings, String> {
        let mut s = Settings::from_config(&Config::default());
        if let Some(path) = file {
            s.merge(Settings::read_file(path)?);
        }
        s.merge(flags);
        s.to_config()?;
        Ok(s)
    }

    /// These settings over the defaults, as `Config`, every rule checked.
    pub fn to_config(&self) -> Result<Config, String> {
        self.check()?;
        let mut cfg = Config::default();
        self.clone().apply(&mut cfg);
        cfg.validate()?;
        Ok(cfg)
    }

    /// TOML that `from_toml` reads back to these settings; unset ones as comments.
    pub fn to_toml(&self) -> String {
        let mut out = toml::to_string(self).expect("settings serialize");
        for (key, meaning) in self.unset() {
            out.push_str(&format!("# {key}: {meaning}\n"));
        }
        out
    }

    /// The reference table of docs/configuration.md.
    pub fn reference_markdown() -> String {
        let mut out =
            String::from("| Name | Type | Default | Range | Meaning |\n|---|---|---|---|---|\n");
        for r in Settings::reference() {
            out.push_str(&format!(
                "| `{}` | {} | {} | {} | {} |\n",
                r.name,
                r.toml_type,
                if r.default.starts_with(char::is_alphabetic) && !r.default.starts_with("true") {
                    r.default.clone()
                } else {
                    format!("`{}`", r.default)
                },
                r.range.replace('|', "\\|"),
                r.doc.replace('|', "\\|"),
            ));
        }
        out
    }
}

/// `DOMAIN=HOST:PORT` (DOMAIN may be `*`: every non-local domain).
pub fn parse_route(s: &str) -> Result<(String, String, u16), String> {
    let bad = || {
        format!(
            "{s:?} is not DOMAIN=HOST:PORT (e.g. example.com=127.0.0.2:2525 or *=relay.example:25)"
        )
    };
    let (domain, hop) = s.split_once('=').ok_or_else(bad)?;
    let (host, port) = hop.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host_ok = is_host_name(host) || host.parse::<IpAddr>().is_ok();
    if (domain != "*" && !is_host_name(domain)) || !host_ok || port == 0 {
        return Err(bad());
    }
    Ok((domain.to_ascii_lowercase(), host.to_string(), port))
}

pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not an address:port (e.g. 127.0.0.1:2525)"))
}

/// A network in CIDR notation; a bare address is a host route.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n.trunc());
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not a network (e.g. 192.0.2.0/24)"))
}

/// The addresses of this host's interfaces (getifaddrs); none if it fails.
fn interface_addresses() -> Vec<IpAddr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` on success; it is freed below, once.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut p = list;
    while !p.is_null() {
        // SAFETY: `p` is a node of the list getifaddrs returned, not yet freed; an
        // address is read as the type its family says.
        unsafe {
            let a = (*p).ifa_addr;
            if !a.is_null() {
                match (*a).sa_family as i32 {
                    libc::AF_INET => {
                        let sin = &*(a as *const libc::sockaddr_in);
                        out.push(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(a as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(sin6.sin6_addr.s6_addr).to_canonical());
                    }
                    _ => {}
                }
            }
            p = (*p).ifa_next;
        }
    }
    // SAFETY: the list from the successful getifaddrs above.
    unsafe { libc::freeifaddrs(list) };
    out
}

fn system_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&c| c == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    // A name the greeting cannot carry is no default: validation would refuse it.
    if is_host_name(&name) {
        name
    } else {
        "localhost".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        settings: Settings,
    }

    fn flags(args: &[&str]) -> Settings {
        let mut argv = vec!["ringmail"];
        argv.extend_from_slice(args);
        Flags::try_parse_from(argv).unwrap().settings
    }

    /// The error for these flags over the defaults.
    fn flag_error(args: &[&str]) -> String {
        Settings::layered(None, flags(args)).unwrap_err()
    }

    fn toml_error(text: &str) -> String {
        Settings::from_toml(text)
            .and_then(|s| Settings::layered(None, s))
            .unwrap_err()
    }

    #[test]
    fn default_relay_networks() {
        let c = Config::default();
        assert!(c.relay_allowed("127.0.0.1".parse().unwrap()));
        assert!(c.relay_allowed("127.9.9.9".parse().unwrap()));
        assert!(c.relay_allowed("::1".parse().unwrap()));
        assert!(c.relay_allowed("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!c.relay_allowed("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn every_setting_is_read_from_the_file_by_its_flag_name() {
        let s = Settings::from_toml(&format!(
            "data = \"/tmp/d\"\ncores = 2\nhostname = \"mx.example.test\"\n\
             smtp = \"127.0.0.1:2626\"\nlocal-domain = [\"a.test\"]\n\
             relay-network = [\"10.0.0.0/8\", \"192.0.2.1\"]\ndns = [\"127.0.0.1:5353\"]\n\
             mx-port = 2526\nroute = [\"*=127.0.0.2:25\"]\nmessage-size-max = 1000\n\
             line-length-max = 1024\ndata-line-length-max = 2000\nrecipients-max = 200\n\
             idle-timeout = 7\nconnections-max = 3\nretry-first = 5\nretry-max = 50\n\
             queue-age-max = 500\nsegment-size = 2097152\ndestination-rate = 10.5\n\
             destination-connections = 4\ndeliveries-max = 9\nlog-zero-ahead = {}\n",
            !ZERO_AHEAD_DEFAULT
        ))
        .unwrap();
        let c = Settings::layered(None, s).unwrap().to_config().unwrap();
        assert_eq!(c.data, PathBuf::from("/tmp/d"));
        assert_eq!(c.cores, Some(2));
        assert_eq!(c.hostname, "mx.example.test");
        assert_eq!(c.smtp.port(), 2626);
        assert_eq!(c.local_domains, vec!["a.test"]);
        assert!(!c.relay_allowed("127.0.0.1".parse().unwrap()));
        assert!(c.relay_allowed("10.1.2.3".parse().unwrap()));
        assert!(c.relay_allowed("192.0.2.1".parse().unwrap()));
        assert_eq!(c.dns, vec!["127.0.0.1:5353".parse().unwrap()]);
        assert_eq!(c.mx_port, 2526);
        assert_eq!(c.routes, vec![("*".into(), "127.0.0.2".into(), 25)]);
        assert_eq!(c.limits.message_bytes_max, 1000);
        assert_eq!(c.limits.line_bytes_max, 1024);
        assert_eq!(c.limits.data_line_bytes_max, 2000);
        assert_eq!(c.limits.rcpt_count_max, 200);
        assert_eq!(c.idle_timeout, Duration::from_secs(7));
        assert_eq!(c.connections_per_shard_max, 3);
        assert_eq!(c.retry.first, Duration::from_secs(5));
        assert_eq!(c.retry.cap, Duration::from_secs(50));
        assert_eq!(c.retry.max_age, Duration::from_secs(500));
        assert_eq!(c.segment_bytes_max, 2 << 20);
        assert_eq!(c.destination_rate, Some(10.5));
        assert_eq!(c.connections_per_destination_max, 4);
        assert_eq!(c.deliveries_per_shard_max, 9);
        assert_eq!(c.log_zero_ahead, !ZERO_AHEAD_DEFAULT);
    }

    #[test]
    fn a_pop3_idle_timer_is_at_least_ten_minutes() {
        let e = flag_error(&["--pop3-idle-timeout", "599"]);
        assert!(e.contains("600 to"), "{e}");
        let s = flags(&["--pop3-idle-timeout", "600"]);
        let c = Settings::layered(None, s).unwrap().to_config().unwrap();
        assert_eq!(c.pop3_idle_timeout, Duration::from_secs(600));
    }

    #[test]
    fn zero_ahead_is_a_flag_with_a_value() {
        for v in [false, true] {
            let s = flags(&["--log-zero-ahead", &v.to_string()]);
            let c = Settings::layered(None, s).unwrap().to_config().unwrap();
            assert_eq!(c.log_zero_ahead, v);
        }
        assert_eq!(Config::default().log_zero_ahead, ZERO_AHEAD_DEFAULT);
    }

    #[test]
    fn old_plural_keys_are_aliases() {
        let s = Settings::from_toml(
            "local-domains = [\"a.test\"]\nrelay-networks = [\"10.0.0.0/8\"]\n\
             routes = [\"b.test=127.0.0.3:25\"]\n",
        )
        .unwrap();
        assert_eq!(s.local_domain, Some(vec!["a.test".to_string()]));
        assert_eq!(s.relay_network.unwrap().len(), 1);
        assert_eq!(s.route.unwrap()[0].host, "127.0.0.3");
        let e = Settings::from_toml("local-domain = [\"a.test\"]\nlocal-domains = [\"b.test\"]\n")
            .unwrap_err();
        assert!(e.contains("`local-domain` is set twice"), "{e}");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = toml_error("smpt = \"127.0.0.1:25\"\n");
        assert!(e.contains("unknown key `smpt`"), "{e}");
        let e = toml_error("message_size_max = 10\n");
        assert!(e.contains("did you mean `message-size-max`"), "{e}");
        // A file of the old layout says where each setting went.
        let e = toml_error("[limits]\nmessage_bytes_max = 10\nidle_timeout_s = 3\n");
        assert!(e.contains("unknown key `limits`"), "{e}");
        assert!(
            e.contains("`message-size-max`") && e.contains("`idle-timeout`"),
            "{e}"
        );
        let e = toml_error("max-message-size = 10\n");
        assert!(e.contains("it is now `message-size-max`"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_key_and_the_type() {
        let e = toml_error("cores = \"two\"\n");
        assert!(e.contains("`cores` must be integer"), "{e}");
        assert!(e.contains("found string"), "{e}");
        let e = toml_error("local-domain = \"a.test\"\n");
        assert!(e.contains("`local-domain` must be array of string"), "{e}");
        let e = toml_error("relay-network = [\"10.0.0.0/33\"]\n");
        assert!(
            e.contains("`relay-network`") && e.contains("not a network"),
            "{e}"
        );
        let e = toml_error("route = [\"nohost\"]\n");
        assert!(
            e.contains("`route`") && e.contains("DOMAIN=HOST:PORT"),
            "{e}"
        );
        let e = toml_error("smtp = \"localhost\"\n");
        assert!(e.contains("`smtp` must be string (ADDR:PORT)"), "{e}");
        let e = toml_error("cores = -1\n");
        assert!(e.contains("`cores`"), "{e}");
        let e = toml_error("cores = 1\ncores = 2\n");
        assert!(e.contains("duplicate key"), "{e}");
    }

    #[test]
    fn message_size_is_bounded_by_the_record_limit() {
        let e = flag_error(&["--message-size-max", "999999999999"]);
        assert!(
            e.contains("`message-size-max` must be at most 263229824 bytes, not 999999999999"),
            "{e}"
        );
        // The largest allowed message fits a record with its envelope, given a segment
        // large enough for it.
        let allowed = message_bytes_allowed(&smtp::Limits::default());
        assert!(allowed + record_headroom(&smtp::Limits::default()) <= RECORD_PAYLOAD_BYTES_MAX);
        let ok = allowed.to_string();
        Settings::layered(
            None,
            flags(&["--message-size-max", &ok, "--segment-size", "300000000"]),
        )
        .unwrap();
        let over = (allowed + 1).to_string();
        assert!(
            flag_error(&["--message-size-max", &over, "--segment-size", "300000000"])
                .contains("`message-size-max` must be at most")
        );
        // More recipients and longer lines leave less room for the message.
        let e = flag_error(&["--recipients-max", "100000", "--line-length-max", "65536"]);
        assert!(
            e.contains("`message-size-max` must be at most 0 bytes"),
            "{e}"
        );
        assert!(
            flag_error(&["--message-size-max", "0"]).starts_with("`message-size-max` must be 1 to")
        );
    }

    #[test]
    fn segment_must_hold_the_largest_message_record() {
        let e = flag_error(&["--segment-size", "1048576"]);
        assert!(e.contains("`segment-size` must be at least"), "{e}");
        assert!(e.contains("lower `message-size-max`"), "{e}");
        Settings::layered(
            None,
            flags(&[
                "--segment-size",
                "1048576",
                "--message-size-max",
                "100000",
                "--recipients-max",
                "100",
            ]),
        )
        .unwrap();
        let e = flag_error(&["--segment-size", "1000", "--message-size-max", "100"]);
        assert!(
            e.starts_with("`segment-size` must be 65536 to 4294967296"),
            "{e}"
        );
        let e = flag_error(&["--segment-size", "5000000000"]);
        assert!(
            e.starts_with("`segment-size` must be 65536 to 4294967296"),
            "{e}"
        );
    }

    #[test]
    fn each_range_is_enforced_and_named() {
        for (args, start) in [
            (&["--cores", "0"][..], "`cores` must be 1 to 256, not 0"),
            (&["--cores", "257"], "`cores` must be 1 to 256, not 257"),
            (
                &["--connections-max", "0"],
                "`connections-max` must be at least 1",
            ),
            (
                &["--destination-connections", "0"],
                "`destination-connections` must be at least 1",
            ),
            (
                &["--deliveries-max", "0"],
                "`deliveries-max` must be at least 1",
            ),
            (
                &["--idle-timeout", "0"],
                "`idle-timeout` must be 1 to 31536000 (seconds), not 0",
            ),
            (&["--retry-first", "0"], "`retry-first` must be 1 to"),
            (&["--retry-max", "0"], "`retry-max` must be 1 to"),
            (
                &["--queue-age-max", "31536001"],
                "`queue-age-max` must be 1 to 31536000",
            ),
            (&["--mx-port", "0"], "`mx-port` must be 1 to 65535"),
            (
                &["--destination-rate", "0"],
                "`destination-rate` must be a finite number above 0",
            ),
            (
                &["--destination-rate=-1"],
                "`destination-rate` must be a finite number",
            ),
            (
                &["--destination-rate", "NaN"],
                "`destination-rate` must be a finite number",
            ),
            (
                &["--destination-rate", "inf"],
                "`destination-rate` must be a finite number",
            ),
            (
                &["--line-length-max", "511"],
                "`line-length-max` must be 512 to 65536",
            ),
            (
                &["--data-line-length-max", "999"],
                "`data-line-length-max` must be 1000 to",
            ),
            (
                &["--recipients-max", "99"],
                "`recipients-max` must be 100 to 100000",
            ),
            (
                &["--hostname", "bad host"],
                "`hostname` must be a host name",
            ),
            (&["--hostname=-x.test"], "`hostname` must be a host name"),
            (&["--hostname", "a..test"], "`hostname` must be a host name"),
            (
                &["--local-domain", "ok.test", "--local-domain", "not ok"],
                "`local-domain` must be host names",
            ),
            (&["--dns", "127.0.0.1:0"], "`dns` must be ADDR:PORT each"),
        ] {
            let e = flag_error(args);
            assert!(e.starts_with(start), "{args:?}: {e}");
        }
        let long_label = format!("{}.test", "a".repeat(64));
        assert!(flag_error(&["--hostname", &long_label]).starts_with("`hostname` must be"));
        assert!(toml_error("destination-rate = inf\n").starts_with("`destination-rate` must be"));
        assert!(toml_error("data = \"\"\n").starts_with("`data` must be a path"));
        // A bad route or network is refused by the flag parser already.
        let mut argv = vec!["ringmail", "--route", "x.test=127.0.0.2:0"];
        assert!(Flags::try_parse_from(&argv).is_err());
        argv[1..].copy_from_slice(&["--route", "bad domain=h:25"]);
        assert!(Flags::try_parse_from(&argv).is_err());
        argv[1..].copy_from_slice(&["--relay-network", "10.0.0.0/99"]);
        assert!(Flags::try_parse_from(&argv).is_err());
    }

    #[test]
    fn validate_checks_a_config_built_in_code() {
        let mut c = Config::default();
        c.limits.message_bytes_max = usize::MAX;
        assert!(c.validate().unwrap_err().contains("`message-size-max`"));
        let c = Config {
            idle_timeout: Duration::ZERO,
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().starts_with("`idle-timeout`"));
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "mx-port = 2600\ndns = [\"127.0.0.1:53\"]\nretry-first = 9\n",
        )
        .unwrap();
        let s = Settings::layered(
            Some(&p),
            flags(&["--mx-port", "2700", "--dns", "127.0.0.1:54"]),
        )
        .unwrap();
        assert_eq!(s.mx_port, Some(2700));
        assert_eq!(s.dns, Some(vec!["127.0.0.1:54".parse().unwrap()]));
        assert_eq!(s.retry_first, Some(9), "the file's own setting stays");
        // The file is checked whole, with its name in the error.
        std::fs::write(&p, "mx-port = \"x\"\n").unwrap();
        let e = Settings::layered(Some(&p), Settings::default()).unwrap_err();
        assert!(
            e.starts_with(&format!("config file {}: `mx-port`", p.display())),
            "{e}"
        );
    }

    #[test]
    fn old_flag_spellings_are_hidden_aliases() {
        let s = flags(&[
            "--max-message-size",
            "1000",
            "--max-connections",
            "2",
            "--max-queue-age",
            "3",
            "--max-deliveries",
            "4",
        ]);
        assert_eq!(s.message_size_max, Some(1000));
        assert_eq!(s.connections_max, Some(2));
        assert_eq!(s.queue_age_max, Some(3));
        assert_eq!(s.deliveries_max, Some(4));
    }

    #[test]
    fn show_round_trips() {
        let s = Settings::layered(
            None,
            flags(&[
                "--route",
                "*=[::1]:2525",
                "--route",
                "b.test=relay.example:25",
                "--relay-network",
                "192.0.2.7",
                "--destination-rate",
                "2.5",
                "--cores",
                "3",
            ]),
        )
        .unwrap();
        let text = s.to_toml();
        let back = Settings::layered(None, Settings::from_toml(&text).unwrap()).unwrap();
        assert_eq!(back, s, "{text}");
        assert_eq!(back.to_toml(), text);
        // Unset settings are comments, and stay unset.
        let d = Settings::layered(None, Settings::default()).unwrap();
        let text = d.to_toml();
        assert!(text.contains("# destination-rate: no limit\n"), "{text}");
        assert_eq!(Settings::from_toml(&text).unwrap().destination_rate, None);
    }

    /// docs/configuration.md carries the table `Settings::reference_markdown` makes;
    /// `RINGMAIL_UPDATE_DOCS=1 cargo test -p ringmail --lib config::` rewrites it.
    #[test]
    fn reference_doc_is_current() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
        let doc = std::fs::read_to_string(&path).unwrap();
        let (begin, end) = ("<!-- settings:begin -->\n", "<!-- settings:end -->");
        let (Some(b), Some(e)) = (doc.find(begin), doc.find(end)) else {
            panic!("{} has no settings markers", path.display());
        };
        let table = Settings::reference_markdown();
        if std::env::var_os("RINGMAIL_UPDATE_DOCS").is_some() {
            let new = format!("{}{table}{}", &doc[..b + begin.len()], &doc[e..]);
            std::fs::write(&path, new).unwrap();
            return;
        }
        assert_eq!(
            &doc[b + begin.len()..e],
            table,
            "docs/configuration.md is stale: rerun with RINGMAIL_UPDATE_DOCS=1"
        );
    }
}
