//! Settings: the embedded defaults (DESIGN.md), a TOML file, and command-line flags,
//! in rising precedence.

use crate::smtp;
use ipnet::IpNet;
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Everything `ringmail serve` runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub data: PathBuf,
    /// Executors to run; `None`: every available core.
    pub cores: Option<usize>,
    pub hostname: String,
    pub smtp: SocketAddr,
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
    /// Messages per second per destination domain and shard (None: no limit).
    pub destination_rate: Option<f64>,
    /// Per-reply deadlines and the ceiling of one delivery attempt (no flag or TOML
    /// key yet).
    pub delivery_timeouts: crate::delivery::attempt::DeliveryTimeouts,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data: PathBuf::from("./ringmail-data"),
            cores: None,
            hostname: system_hostname(),
            smtp: "127.0.0.1:2525".parse().unwrap(),
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
            destination_rate: None,
            delivery_timeouts: Default::default(),
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
            limits: self.limits.clone(),
        }
    }

    /// Applies a TOML settings file over these settings.
    pub fn apply_file(&mut self, path: &Path) -> Result<(), String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        let f: FileConfig =
            toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))?;
        if let Some(v) = f.data {
            self.data = v;
        }
        if let Some(v) = f.cores {
            self.cores = Some(v);
        }
        if let Some(v) = f.hostname {
            self.hostname = v;
        }
        if let Some(v) = f.smtp {
            self.smtp = parse_addr(&v)?;
        }
        if let Some(v) = f.local_domains {
            self.local_domains = v;
        }
        if let Some(v) = f.relay_networks {
            self.relay_networks = v.iter().map(|s| parse_cidr(s)).collect::<Result<_, _>>()?;
        }
        if let Some(l) = f.limits {
            let lim = &mut self.limits;
            lim.line_bytes_max = l.line_bytes_max.unwrap_or(lim.line_bytes_max);
            lim.data_line_bytes_max = l.data_line_bytes_max.unwrap_or(lim.data_line_bytes_max);
            lim.message_bytes_max = l.message_bytes_max.unwrap_or(lim.message_bytes_max);
            lim.rcpt_count_max = l.rcpt_count_max.unwrap_or(lim.rcpt_count_max);
            if let Some(s) = l.idle_timeout_s {
                self.idle_timeout = Duration::from_secs(s);
            }
            if let Some(c) = l.connections_per_shard_max {
                self.connections_per_shard_max = c;
            }
        }
        if let Some(v) = f.segment_size {
            self.segment_bytes_max = v.max(SEGMENT_BYTES_MIN);
        }
        if let Some(d) = f.delivery {
            if let Some(v) = d.dns {
                self.dns = v.iter().map(|s| parse_addr(s)).collect::<Result<_, _>>()?;
            }
            if let Some(v) = d.mx_port {
                self.mx_port = v;
            }
            if let Some(v) = d.routes {
                self.routes = v.iter().map(|s| parse_route(s)).collect::<Result<_, _>>()?;
            }
            if let Some(v) = d.retry_first_s {
                self.retry.first = Duration::from_secs(v);
            }
            if let Some(v) = d.retry_max_s {
                self.retry.cap = Duration::from_secs(v);
            }
            if let Some(v) = d.max_queue_age_s {
                self.retry.max_age = Duration::from_secs(v);
            }
            if let Some(v) = d.connections_per_destination_max {
                self.connections_per_destination_max = v;
            }
            if let Some(v) = d.destination_rate {
                self.destination_rate = Some(v);
            }
            if let Some(v) = d.deliveries_per_shard_max {
                self.deliveries_per_shard_max = v;
            }
        }
        self.validate()
    }

    pub fn validate(&self) -> Result<(), String> {
        let l = &self.limits;
        if l.line_bytes_max < 512 {
            return Err("limits.line_bytes_max must be at least 512 (RFC 5321 §4.5.3.1.4)".into());
        }
        if l.data_line_bytes_max < 1000 {
            return Err(
                "limits.data_line_bytes_max must be at least 1000 (RFC 5321 §4.5.3.1.6)".into(),
            );
        }
        if l.rcpt_count_max < 100 {
            return Err("limits.rcpt_count_max must be at least 100 (RFC 5321 §4.5.3.1.8)".into());
        }
        if self.cores == Some(0) {
            return Err("--cores must be at least 1".into());
        }
        if let Some(r) = self.destination_rate {
            if !(r > 0.0 && r.is_finite()) {
                return Err(
                    "destination rate must be a positive number of messages per second".into(),
                );
            }
        }
        if self.connections_per_destination_max == 0 {
            return Err("delivery.connections_per_destination_max must be at least 1".into());
        }
        if self.deliveries_per_shard_max == 0 {
            return Err("delivery.deliveries_per_shard_max must be at least 1".into());
        }
        if self.hostname.is_empty() || self.hostname.contains(char::is_whitespace) {
            return Err(format!("hostname {:?} is not a host name", self.hostname));
        }
        Ok(())
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    data: Option<PathBuf>,
    cores: Option<usize>,
    hostname: Option<String>,
    smtp: Option<String>,
    local_domains: Option<Vec<String>>,
    relay_networks: Option<Vec<String>>,
    segment_size: Option<u64>,
    limits: Option<FileLimits>,
    delivery: Option<FileDelivery>,
}

/// `[delivery]`: the same settings as the serve flags of the same names.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDelivery {
    dns: Option<Vec<String>>,
    mx_port: Option<u16>,
    /// `DOMAIN=HOST:PORT`, `*` for every non-local domain.
    routes: Option<Vec<String>>,
    retry_first_s: Option<u64>,
    retry_max_s: Option<u64>,
    max_queue_age_s: Option<u64>,
    connections_per_destination_max: Option<usize>,
    destination_rate: Option<f64>,
    deliveries_per_shard_max: Option<usize>,
}

/// Segments smaller than this would roll on every batch.
pub const SEGMENT_BYTES_MIN: u64 = 64 << 10;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    line_bytes_max: Option<usize>,
    data_line_bytes_max: Option<usize>,
    message_bytes_max: Option<usize>,
    rcpt_count_max: Option<usize>,
    idle_timeout_s: Option<u64>,
    connections_per_shard_max: Option<usize>,
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
    if domain.is_empty() || host.is_empty() {
        return Err(bad());
    }
    Ok((
        domain.to_ascii_lowercase(),
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
    ))
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
    if name.is_empty() || name.contains(char::is_whitespace) {
        "localhost".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn file_overrides_and_rejects_unknown_keys() {
        let d = tempfile_dir();
        let p = d.join("c.toml");
        std::fs::write(&p, "smtp = \"127.0.0.1:2626\"\nlocal-domains = [\"a.test\"]\nrelay-networks = [\"10.0.0.0/8\"]\n[limits]\nmessage_bytes_max = 1000\n").unwrap();
        let mut c = Config::default();
        c.apply_file(&p).unwrap();
        assert_eq!(c.smtp.port(), 2626);
        assert_eq!(c.local_domains, vec!["a.test"]);
        assert_eq!(c.limits.message_bytes_max, 1000);
        assert!(!c.relay_allowed("127.0.0.1".parse().unwrap()));
        std::fs::write(
            &p,
            "segment-size = 1048576\n[delivery]\ndns = [\"127.0.0.1:5353\"]\nmx_port = 2526\n\
             routes = [\"*=127.0.0.2:25\"]\nretry_first_s = 5\nretry_max_s = 50\n\
             max_queue_age_s = 500\nconnections_per_destination_max = 4\ndestination_rate = 10.5\n\
             deliveries_per_shard_max = 7\n",
        )
        .unwrap();
        let mut c = Config::default();
        c.apply_file(&p).unwrap();
        assert_eq!(c.segment_bytes_max, 1 << 20);
        assert_eq!(c.dns, vec!["127.0.0.1:5353".parse().unwrap()]);
        assert_eq!(c.mx_port, 2526);
        assert_eq!(c.routes, vec![("*".into(), "127.0.0.2".into(), 25)]);
        assert_eq!(c.retry.first, Duration::from_secs(5));
        assert_eq!(c.retry.cap, Duration::from_secs(50));
        assert_eq!(c.retry.max_age, Duration::from_secs(500));
        assert_eq!(c.connections_per_destination_max, 4);
        assert_eq!(c.destination_rate, Some(10.5));
        assert_eq!(c.deliveries_per_shard_max, 7);
        std::fs::write(&p, "[delivery]\ndestination_rate = -1.0\n").unwrap();
        assert!(Config::default()
            .apply_file(&p)
            .unwrap_err()
            .contains("positive"));
        std::fs::write(&p, "[delivery]\nroutes = [\"nohost\"]\n").unwrap();
        assert!(Config::default().apply_file(&p).is_err());
        std::fs::write(&p, "smpt = \"x\"\n").unwrap();
        assert!(Config::default()
            .apply_file(&p)
            .unwrap_err()
            .contains("unknown field"));
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("ringmail-config-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
