//! SIGHUP: the config file (and the flags `serve` was started with) read again. The
//! settings in [`RELOADABLE`] take effect at once, for new sessions and the next
//! delivery attempts (an open session keeps its SMTP limits; its mail is judged by
//! the settings current when it is stored); any
//! other changed setting is named in the log as needing a restart and keeps its
//! running value. A config that does not load or check changes nothing.
//!
//! The signal thread builds the new settings and publishes them here; each executor
//! looks at the generation with its shutdown poll and hands the new `Config` to its
//! ingest, POP3 and delivery.

use crate::config::{Config, Settings};
use crate::delivery::tls::OutboundTls;
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The generation of the settings the server started with.
pub const STARTING_GENERATION: u64 = 0;

/// Settings a SIGHUP applies (TOML keys). The certificates' contents are re-read too
/// (`net::certs`); their paths need a restart.
pub const RELOADABLE: &[&str] = &[
    "relay-network",
    "message-size-max",
    "line-length-max",
    "data-line-length-max",
    "recipients-max",
    "hop-count-max",
    "idle-timeout",
    "connections-max",
    "pop3-idle-timeout",
    "smtp-auth-without-tls",
    "pop3-auth-without-tls",
    "sender-login-match",
    "route",
    "mx-port",
    "retry-first",
    "retry-max",
    "queue-age-max",
    "delivery-connect-timeout",
    "delivery-greeting-timeout",
    "delivery-command-timeout",
    "delivery-rcpt-timeout",
    "delivery-data-init-timeout",
    "delivery-data-block-timeout",
    "delivery-data-done-timeout",
    "delivery-attempt-timeout",
    "destination-rate",
    "destination-connections",
    "deliveries-max",
    "tls-policy",
    "tls-ca-file",
];

/// `running` with the reloadable settings of `new`: what the executors switch to.
pub fn apply(running: &Config, new: &Config) -> Config {
    let mut c = running.clone();
    c.relay_networks = new.relay_networks.clone();
    c.limits = new.limits.clone();
    c.idle_timeout = new.idle_timeout;
    c.connections_per_shard_max = new.connections_per_shard_max;
    c.pop3_idle_timeout = new.pop3_idle_timeout;
    c.smtp_auth_without_tls = new.smtp_auth_without_tls;
    c.pop3_auth_without_tls = new.pop3_auth_without_tls;
    c.sender_login_match = new.sender_login_match;
    c.routes = new.routes.clone();
    c.mx_port = new.mx_port;
    c.retry = new.retry;
    c.delivery_timeouts = new.delivery_timeouts;
    c.destination_rate = new.destination_rate;
    c.connections_per_destination_max = new.connections_per_destination_max;
    c.deliveries_per_shard_max = new.deliveries_per_shard_max;
    c.tls_policies = new.tls_policies.clone();
    c.tls_ca_file = new.tls_ca_file.clone();
    c
}

/// The settings (TOML keys) whose values differ between `a` and `b`.
pub fn changed(a: &Config, b: &Config) -> Vec<String> {
    let table = |c: &Config| match toml::Value::try_from(Settings::from_config(c)) {
        Ok(toml::Value::Table(t)) => t,
        _ => Default::default(),
    };
    let (ta, tb) = (table(a), table(b));
    let mut keys: Vec<String> = ta
        .keys()
        .chain(tb.keys())
        .filter(|k| ta.get(*k) != tb.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// A new config for the executors.
pub struct Published {
    pub config: Config,
    /// Delivery's TLS settings (built again only when their settings changed, so the
    /// TLS session cache survives other reloads).
    pub outbound: OutboundTls,
}

pub type Load = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;

pub struct Reloader {
    load: Option<Load>,
    current: ArcSwap<Published>,
    generation: AtomicU64,
    /// Executors that took a generation (each adds one per generation it applied),
    /// and how many there are: "applied" is logged once every one took it.
    taken: AtomicU64,
    executors: AtomicU64,
}

impl Reloader {
    /// `load` reads the settings as `serve` did (file, then flags); None: nothing to
    /// read again (SIGHUP then re-reads the certificates only).
    pub fn new(running: Config, outbound: OutboundTls, load: Option<Load>) -> Arc<Reloader> {
        Arc::new(Reloader {
            load,
            current: ArcSwap::from_pointee(Published {
                config: running,
                outbound,
            }),
            generation: AtomicU64::new(STARTING_GENERATION),
            taken: AtomicU64::new(0),
            executors: AtomicU64::new(0),
        })
    }

    /// How many executors take each generation (set before they start).
    pub fn set_executors(&self, n: usize) {
        self.executors.store(n as u64, Ordering::Release);
    }

    /// An executor applied the current generation.
    pub fn taken(&self) {
        self.taken.fetch_add(1, Ordering::AcqRel);
    }

    /// Bumped by every reload that changed something.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn current(&self) -> Arc<Published> {
        self.current.load_full()
    }

    /// Reads the settings again and publishes what may change now; logs what
    /// changed and what needs a restart.
    pub fn reload(&self) {
        let Some(load) = &self.load else { return };
        let new = match load().and_then(|c| c.validate().map(|()| c)) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("reload: {e}; the settings in use stay");
                return;
            }
        };
        let running = self.current();
        // Listeners bound to port 0 run on the port they got: not a change.
        let mut asked = new.clone();
        for (a, r) in [
            (&mut asked.smtp, running.config.smtp),
            (&mut asked.pop3, running.config.pop3),
            (&mut asked.smtps, running.config.smtps),
            (&mut asked.pop3s, running.config.pop3s),
            (&mut asked.submission, running.config.submission),
            (&mut asked.admin, running.config.admin),
        ] {
            if a.port() == 0 && a.ip() == r.ip() {
                *a = r;
            }
        }
        let all = changed(&running.config, &asked);
        let (now, later): (Vec<String>, Vec<String>) = all
            .into_iter()
            .partition(|k| RELOADABLE.contains(&k.as_str()));
        if !later.is_empty() {
            tracing::warn!(
                settings = %later.join(" "),
                "reload: changed settings that need a restart keep their running values"
            );
        }
        if now.is_empty() {
            tracing::info!("reload: no setting that applies at once changed");
            return;
        }
        let config = apply(&running.config, &asked);
        // What runs must hold together (a new message-size-max against the running
        // segment-size, say), not only the file.
        if let Err(e) = config.validate() {
            tracing::error!("reload: {e} (with the settings that need a restart at their running values); the settings in use stay");
            return;
        }
        let outbound = if now.iter().any(|k| k == "tls-policy" || k == "tls-ca-file") {
            match OutboundTls::new(config.tls_policies.clone(), config.tls_ca_file.as_deref()) {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!("reload: {e}; the settings in use stay");
                    return;
                }
            }
        } else {
            running.outbound.clone()
        };
        let before = self.taken.load(Ordering::Acquire);
        self.current.store(Arc::new(Published { config, outbound }));
        self.generation.fetch_add(1, Ordering::AcqRel);
        // Each executor looks at the generation every 50 ms: "applied" means mail
        // accepted from now on goes by the new settings.
        let want = before + self.executors.load(Ordering::Acquire);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while self.taken.load(Ordering::Acquire) < want {
            if std::time::Instant::now() > deadline {
                tracing::warn!(settings = %now.join(" "), "reload: published, but not every executor took the new settings within 5 s");
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        tracing::info!(settings = %now.join(" "), "reload: applied");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config differing from the default in `key` alone (its TOML line).
    fn with(line: &str) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, line).unwrap();
        Settings::layered(Some(&p), Settings::default())
            .unwrap()
            .to_config()
            .unwrap()
    }

    #[test]
    fn every_reloadable_setting_is_applied_and_no_other() {
        let base = Config::default();
        let lines = [
            ("relay-network", "relay-network = [\"10.0.0.0/8\"]"),
            ("message-size-max", "message-size-max = 1000000"),
            ("line-length-max", "line-length-max = 600"),
            ("data-line-length-max", "data-line-length-max = 2000"),
            ("recipients-max", "recipients-max = 700"),
            ("hop-count-max", "hop-count-max = 9"),
            ("idle-timeout", "idle-timeout = 77"),
            ("connections-max", "connections-max = 5"),
            ("pop3-idle-timeout", "pop3-idle-timeout = 700"),
            ("smtp-auth-without-tls", "smtp-auth-without-tls = true"),
            ("pop3-auth-without-tls", "pop3-auth-without-tls = true"),
            ("sender-login-match", "sender-login-match = false"),
            ("route", "route = [\"x.test=127.0.0.2:25\"]"),
            ("mx-port", "mx-port = 2525"),
            ("retry-first", "retry-first = 10"),
            ("retry-max", "retry-max = 100"),
            ("queue-age-max", "queue-age-max = 1000"),
            ("delivery-connect-timeout", "delivery-connect-timeout = 3"),
            ("delivery-greeting-timeout", "delivery-greeting-timeout = 3"),
            ("delivery-command-timeout", "delivery-command-timeout = 3"),
            ("delivery-rcpt-timeout", "delivery-rcpt-timeout = 3"),
            (
                "delivery-data-init-timeout",
                "delivery-data-init-timeout = 3",
            ),
            (
                "delivery-data-block-timeout",
                "delivery-data-block-timeout = 3",
            ),
            (
                "delivery-data-done-timeout",
                "delivery-data-done-timeout = 3",
            ),
            ("delivery-attempt-timeout", "delivery-attempt-timeout = 30"),
            ("destination-rate", "destination-rate = 5.0"),
            ("destination-connections", "destination-connections = 3"),
            ("deliveries-max", "deliveries-max = 30"),
            ("tls-policy", "tls-policy = [\"x.test=encrypt\"]"),
            (
                "tls-ca-file",
                "tls-ca-file = \"/etc/ssl/certs/ca-certificates.crt\"",
            ),
        ];
        assert_eq!(lines.len(), RELOADABLE.len());
        for (key, line) in lines {
            assert!(RELOADABLE.contains(&key), "{key}");
            let new = with(line);
            assert_eq!(changed(&base, &new), vec![key.to_string()], "{line}");
            assert_eq!(
                changed(&base, &apply(&base, &new)),
                vec![key.to_string()],
                "{line}"
            );
        }
        for line in [
            "hostname = \"other.test\"",
            "smtp = \"127.0.0.1:2600\"",
            "cores = 1",
        ] {
            let new = with(line);
            assert_eq!(changed(&base, &new).len(), 1, "{line}");
            assert!(changed(&base, &apply(&base, &new)).is_empty(), "{line}");
        }
    }
}
