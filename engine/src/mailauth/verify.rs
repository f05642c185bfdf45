//! Inbound verification: SPF (RFC 7208) for the client address with HELO and MAIL
//! FROM, DKIM (RFC 6376, RFC 8463) for every signature, DMARC (RFC 7489) with
//! alignment, ARC (RFC 8617) chain validation; the results as one
//! `Authentication-Results:` header (RFC 8601) and a log summary.
//!
//! mail-auth resolves with hickory on tokio, so verification runs on a control
//! thread of its own (a current-thread tokio runtime running many verifications at
//! once, each waiting on DNS), never on an executor. One thread: with one per core
//! (two here) bench/verify.sh measured more CPU per message (340 µs against 243)
//! and a lower rate, the threads competing with the executors for the cores. Executors hand it a copy of the message
//! text (the verifiers parse it whole) and await the verdict over a oneshot channel.
//! hickory's resolver cache keeps answers for their TTL (`RESOLVER_CACHE`), so a
//! sender's records are fetched once. This is the fallback design: feeding
//! mail-auth's lookup caches from ringmail's own resolver would need every name of an
//! SPF chain known before verifying, and those caches cannot hold "not found".

use mail_auth::arc::ArcSealer;
use mail_auth::common::crypto::DkimKey;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::Done;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::dmarc::Policy;
use mail_auth::hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts,
};
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimResult, DmarcResult, MessageAuthenticator,
    SpfResult,
};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Verifications waiting for the thread; beyond them a message is taken unverified
/// (recorded as a temporary error, so `dns-temperror = "tempfail"` defers it).
const QUEUE_MAX: usize = 4096;
/// Answers hickory keeps.
const RESOLVER_CACHE: u64 = 16 << 10;

/// What to do with a DMARC failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DmarcPolicy {
    /// The header and the log only.
    #[default]
    Record,
    /// `p=reject` refused at the end of DATA (550 5.7.1); `p=quarantine` marked.
    Enforce,
}

/// What to do when DNS failed temporarily for a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsTempError {
    #[default]
    Accept,
    /// 451 4.7.5: the client retries later.
    Tempfail,
}

/// The `[mail-auth]` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MailAuthSettings {
    #[serde(default = "yes")]
    pub verify: bool,
    #[serde(default)]
    pub dmarc_policy: DmarcPolicy,
    #[serde(default)]
    pub dns_temperror: DnsTempError,
}

fn yes() -> bool {
    true
}

impl Default for MailAuthSettings {
    fn default() -> Self {
        MailAuthSettings {
            verify: true,
            dmarc_policy: DmarcPolicy::Record,
            dns_temperror: DnsTempError::Accept,
        }
    }
}

impl std::str::FromStr for MailAuthSettings {
    type Err = String;
    /// `verify=true,dmarc-policy=enforce,dns-temperror=tempfail` (each optional).
    fn from_str(s: &str) -> Result<MailAuthSettings, String> {
        let mut m = MailAuthSettings::default();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` is not NAME=VALUE"))?;
            let v = v.trim().to_ascii_lowercase();
            match (k.trim(), v.as_str()) {
                ("verify", "true") => m.verify = true,
                ("verify", "false") => m.verify = false,
                ("dmarc-policy", "record") => m.dmarc_policy = DmarcPolicy::Record,
                ("dmarc-policy", "enforce") => m.dmarc_policy = DmarcPolicy::Enforce,
                ("dns-temperror", "accept") => m.dns_temperror = DnsTempError::Accept,
                ("dns-temperror", "tempfail") => m.dns_temperror = DnsTempError::Tempfail,
                _ => {
                    return Err(format!(
                        "`{part}`: verify=true|false, dmarc-policy=record|enforce, dns-temperror=accept|tempfail"
                    ))
                }
            }
        }
        Ok(m)
    }
}

impl std::fmt::Display for MailAuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "verify={},dmarc-policy={},dns-temperror={}",
            self.verify,
            match self.dmarc_policy {
                DmarcPolicy::Record => "record",
                DmarcPolicy::Enforce => "enforce",
            },
            match self.dns_temperror {
                DnsTempError::Accept => "accept",
                DnsTempError::Tempfail => "tempfail",
            }
        )
    }
}

/// What one message's checks found.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// `Authentication-Results: HOST; …\r\n`.
    pub header: String,
    /// The results as the header words them, for the log line.
    pub spf: &'static str,
    pub dkim: &'static str,
    pub dmarc: &'static str,
    pub arc: &'static str,
    /// DMARC failed and the domain's policy (after pct/t) is reject / quarantine.
    pub dmarc_reject: bool,
    pub dmarc_quarantine: bool,
    /// The DMARC domain (the From: domain), for replies.
    pub dmarc_domain: String,
    /// A check could not be made for a temporary DNS failure.
    pub temperror: bool,
    /// ARC-Seal, ARC-Message-Signature and ARC-Authentication-Results (RFC 8617),
    /// when asked for and the chain could be sealed; else empty.
    pub arc_set: String,
}

/// The key ARC sets are sealed with: the `[[dkim]]` key of the hostname's domain.
type Sealer = ArcSealer<DkimKey, Done>;

/// Header fields the ARC-Message-Signature covers.
const ARC_HEADERS: &[&str] = &[
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "DKIM-Signature",
];

struct Job {
    message: Vec<u8>,
    ip: IpAddr,
    helo: String,
    mail_from: String,
    /// Seal an ARC set: the message is being forwarded.
    seal: bool,
    reply: futures_channel::oneshot::Sender<Verdict>,
}

/// The verification thread's door.
pub struct Verifier {
    jobs: tokio::sync::mpsc::Sender<Job>,
}

impl Verifier {
    /// Starts the thread, resolving with `dns` (ADDR:PORT each), naming results
    /// `hostname` (the authserv-id). `sealer`: the key ARC sets of forwarded mail
    /// are sealed with (none: no seals).
    pub fn start(
        dns: &[SocketAddr],
        hostname: &str,
        sealer: Option<&super::DkimKeyConfig>,
    ) -> Result<Verifier, String> {
        // A bad key fails the start, as signing does.
        let sealer = match sealer {
            Some(k) => Some((k.clone(), k.load()?)),
            None => None,
        };
        let mut servers = Vec::new();
        for addr in dns {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            servers.push(NameServerConfig::new(addr.ip(), true, vec![udp, tcp]));
        }
        let config = ResolverConfig::from_name_servers(servers);
        let mut opts = ResolverOpts::default();
        opts.timeout = Duration::from_secs(3);
        opts.attempts = 2;
        opts.cache_size = RESOLVER_CACHE;
        let (jobs, mut queue) = tokio::sync::mpsc::channel::<Job>(QUEUE_MAX);
        let hostname = hostname.to_string();
        let (started, ready) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("ringmail-mailauth".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = started.send(Err(format!("mail-auth runtime: {e}")));
                        return;
                    }
                };
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, async move {
                    let auth = match MessageAuthenticator::new(config, opts) {
                        Ok(a) => a,
                        Err(e) => {
                            let _ = started.send(Err(format!("mail-auth resolver: {e}")));
                            return;
                        }
                    };
                    let sealer: Option<std::rc::Rc<Sealer>> = sealer.map(|(k, key)| {
                        std::rc::Rc::new(
                            ArcSealer::from_key(key)
                                .domain(k.domain)
                                .selector(k.selector)
                                .headers(ARC_HEADERS.iter().copied()),
                        )
                    });
                    let _ = started.send(Ok(()));
                    let hostname: std::rc::Rc<str> = hostname.into();
                    while let Some(job) = queue.recv().await {
                        let auth = auth.clone();
                        let hostname = hostname.clone();
                        let sealer = sealer.clone().filter(|_| job.seal);
                        tokio::task::spawn_local(async move {
                            let verdict = check(&auth, &hostname, sealer.as_deref(), &job).await;
                            let _ = job.reply.send(verdict);
                        });
                    }
                });
            })
            .map_err(|e| format!("cannot start the mail-auth thread: {e}"))?;
        ready
            .recv()
            .map_err(|_| "the mail-auth thread ended at start".to_string())??;
        Ok(Verifier { jobs })
    }

    /// Verifies `message` (the text as received, without ringmail's prefixes)
    /// received from `ip` after `helo`, with `mail_from` (empty: `<>`).
    /// With `seal`, an ARC set is sealed for forwarding (when a key is configured).
    pub async fn verify(
        &self,
        message: Vec<u8>,
        ip: IpAddr,
        helo: &str,
        mail_from: &str,
        seal: bool,
    ) -> Verdict {
        let (reply, verdict) = futures_channel::oneshot::channel();
        let job = Job {
            message,
            ip,
            helo: helo.to_string(),
            mail_from: mail_from.to_string(),
            seal,
            reply,
        };
        if self.jobs.try_send(job).is_err() {
            return busy();
        }
        verdict.await.unwrap_or_else(|_| busy())
    }
}

impl Verdict {
    /// Not verified (our own users' mail, or verification off).
    pub const SKIPPED: &'static str = "skipped";
}

/// No verification could be made now.
fn busy() -> Verdict {
    Verdict {
        header: String::new(),
        spf: "temperror",
        dkim: "temperror",
        dmarc: "temperror",
        arc: "temperror",
        dmarc_reject: false,
        dmarc_quarantine: false,
        dmarc_domain: String::new(),
        temperror: true,
        arc_set: String::new(),
    }
}

async fn check(
    auth: &MessageAuthenticator,
    hostname: &str,
    sealer: Option<&Sealer>,
    job: &Job,
) -> Verdict {
    let Some(msg) = AuthenticatedMessage::parse(&job.message) else {
        // Nothing the verifiers can read (no header section): say so.
        let header =
            format!("Authentication-Results: {hostname}; none (no message headers to verify)\r\n");
        return Verdict {
            header,
            spf: "none",
            dkim: "none",
            dmarc: "none",
            arc: "none",
            dmarc_reject: false,
            dmarc_quarantine: false,
            dmarc_domain: String::new(),
            temperror: false,
            arc_set: String::new(),
        };
    };
    let helo = job.helo.as_str();
    let sender = if job.mail_from.is_empty() {
        // RFC 7208 §2.4: the null sender is checked as postmaster@HELO.
        format!("postmaster@{helo}")
    } else {
        job.mail_from.clone()
    };
    let dkim = auth.verify_dkim(&msg).await;
    let arc = auth.verify_arc(&msg).await;
    let spf = auth
        .verify_spf(SpfParameters::verify(job.ip, helo, hostname, &sender))
        .await;
    let mail_from_domain = sender.rsplit_once('@').map_or(helo, |(_, d)| d);
    let dmarc = auth
        .verify_dmarc(DmarcParameters::new(&msg, &dkim, mail_from_domain, &spf))
        .await;
    let results = AuthenticationResults::new(hostname)
        .with_dkim_results(&dkim, msg.from())
        .with_spf_mailfrom_result(&spf, job.ip, &sender, helo)
        .with_arc_result(&arc, job.ip)
        .with_dmarc_result(&dmarc);
    let mut header = results.to_header();
    // RFC 8617 §5.1: a forwarder seals when the chain it received did not fail.
    let arc_set = match sealer.filter(|_| arc.can_be_sealed()) {
        Some(s) => match s.seal(&msg, &results, &arc) {
            // The same fold after `b=` as DKIM signatures have (sign.rs).
            Ok(set) => set.to_header().replace("\r\n\t;\r\n", ";\r\n"),
            Err(e) => {
                tracing::warn!("ARC sealing failed: {e}");
                String::new()
            }
        },
        None => String::new(),
    };
    if dkim.is_empty() {
        // mail-auth writes nothing for an unsigned message; RFC 8601 §2.7.1 has
        // `dkim=none` say so.
        let ours = format!("Authentication-Results: {hostname};");
        header = header.replacen(&ours, &format!("{ours}\r\n\tdkim=none (no signatures);"), 1);
    }
    let spf_word = spf_word(spf.result());
    let dkim_word = dkim_word(&dkim.iter().map(|d| d.result().clone()).collect::<Vec<_>>());
    let arc_word = dkim_word_one(arc.result(), "none");
    let dmarc_result = dmarc.result();
    let dmarc_word = dmarc_word(&dmarc_result);
    let failed = matches!(dmarc_result, DmarcResult::Fail(_));
    let temperror = spf.result() == SpfResult::TempError
        || dkim_word == "temperror"
        || matches!(dmarc_result, DmarcResult::TempError(_));
    Verdict {
        header,
        spf: spf_word,
        dkim: dkim_word,
        dmarc: dmarc_word,
        arc: arc_word,
        dmarc_reject: failed && dmarc.policy() == Policy::Reject,
        dmarc_quarantine: failed && dmarc.policy() == Policy::Quarantine,
        dmarc_domain: dmarc.domain().to_string(),
        temperror,
        arc_set,
    }
}

fn spf_word(r: SpfResult) -> &'static str {
    match r {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

fn dkim_word_one(r: &DkimResult, none: &'static str) -> &'static str {
    match r {
        DkimResult::Pass => "pass",
        DkimResult::Neutral(_) => "neutral",
        DkimResult::Fail(_) => "fail",
        DkimResult::PermError(_) => "permerror",
        DkimResult::TempError(_) => "temperror",
        DkimResult::None => none,
    }
}

/// Several signatures: pass if one passed, else the first other result.
fn dkim_word(results: &[DkimResult]) -> &'static str {
    if results.contains(&DkimResult::Pass) {
        return "pass";
    }
    results.first().map_or("none", |r| dkim_word_one(r, "none"))
}

fn dmarc_word(r: &DmarcResult) -> &'static str {
    match r {
        DmarcResult::Pass => "pass",
        DmarcResult::Fail(_) => "fail",
        DmarcResult::TempError(_) => "temperror",
        DmarcResult::PermError(_) => "permerror",
        DmarcResult::None => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_read_back_from_their_flag_form() {
        let m: MailAuthSettings = "dmarc-policy=enforce,dns-temperror=tempfail"
            .parse()
            .unwrap();
        assert!(m.verify);
        assert_eq!(m.dmarc_policy, DmarcPolicy::Enforce);
        assert_eq!(m.to_string().parse::<MailAuthSettings>().unwrap(), m);
        assert!("verify=maybe".parse::<MailAuthSettings>().is_err());
        assert!("colour=red".parse::<MailAuthSettings>().is_err());
    }

    #[test]
    fn one_passing_signature_is_a_pass() {
        use mail_auth::Error;
        assert_eq!(dkim_word(&[]), "none");
        assert_eq!(
            dkim_word(&[DkimResult::Fail(Error::NotAligned), DkimResult::Pass]),
            "pass"
        );
        assert_eq!(dkim_word(&[DkimResult::Fail(Error::NotAligned)]), "fail");
    }
}
