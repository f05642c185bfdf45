//! Delivery to local users: one entry in each user's INBOX, on the user's home shard,
//! referring to the message this shard already stored (no second copy of the body).
//!
//! The message is parsed once here (`mime::analyze`), on the shard that holds it and
//! usually still has it in memory; each home shard gets the encoded structure for its
//! cache file. This shard takes one reference per entry before handing it over (it
//! owns the message's count) and gives it back if the home shard refuses. The outcome
//! of each recipient is recorded by the scheduler like a remote attempt's, after the
//! home shards answered, so a recipient is marked delivered only once its entry is
//! durable.

use super::attempt::Outcome;
use crate::accounts::DirectoryCell;
use crate::mailbox::{DeliverError, Delivery, MailService};
use crate::queue::{MessageText, Spool};
use crate::smtp::address::{domain_key, xtext_encode};
use crate::smtp::client::{RcptResult, Reply};
use ringmail_store::accounts::{Directory, Resolution};
use ringmail_store::message::Envelope;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

pub struct Local {
    pub directory: Arc<DirectoryCell>,
    pub mail: MailService,
}

/// An address as the directory looks it up: the domain as its A-label (what RCPT
/// checked), so `user@bücher.test` finds `user@xn--bcher-kva.test`.
fn lookup_key(address: &str) -> String {
    match address.rsplit_once('@') {
        Some((local, domain)) => format!("{local}@{}", domain_key(domain)),
        None => address.to_string(),
    }
}

/// What the delivery log shows as the relay of a local delivery.
pub const RELAY: &str = "mailbox";

fn is_postmaster(address: &str) -> bool {
    address
        .rsplit_once('@')
        .map_or(address, |(l, _)| l)
        .eq_ignore_ascii_case("postmaster")
}

fn reply(code: u16, e: (u8, u16, u16), text: &str) -> Reply {
    Reply {
        code,
        text: text.to_string(),
        enhanced: Some(e),
    }
}

/// An address that leads to no user (any more): bounced.
fn user_unknown() -> RcptResult {
    RcptResult::Failed(reply(
        550,
        (5, 1, 1),
        "Recipient address rejected: User unknown",
    ))
}

/// The per-entry prefix of a delivered message (docs/mailboxes.md): never stored as
/// bytes, the mailbox frontends build it from the envelope and the account.
pub fn entry_prefix(sender: &str, address: &str) -> String {
    format!("Return-Path: <{sender}>\r\nDelivered-To: {address}\r\n")
}

impl Local {
    /// Whether mail for `domain` (a local domain, as `domain_key` gives it) goes
    /// into mailboxes: once the domain has an account, an alias or a catch-all.
    /// Before that, its mail waits in the queue, as before accounts existed (the
    /// RCPT check accepts every recipient of such a domain).
    pub fn serves(&self, domain: &str) -> bool {
        self.directory.load().has_domain(domain)
    }

    /// Delivers message `env.id` of `spool` to its recipients `rcpts` (indexes into
    /// `env.recipients`, all in local domains): one result per recipient, in order.
    /// `retried`: some of them were attempted before.
    pub async fn deliver(
        &self,
        spool: &Rc<Spool>,
        env: &Envelope,
        message: &MessageText,
        rcpts: &[u32],
        retried: bool,
    ) -> Outcome {
        let dir = self.directory.load();
        // Stored before this start, or tried before: a home shard may hold the
        // entry already (see `Delivery::maybe_done`).
        let maybe_done = retried || spool.store().stored_before_open(env.id);
        // The body parsed where it lies (no copy of it with the trace prefix): the
        // prefix is header lines, which `shifted` puts in front of the top header.
        let mut meta = Vec::new();
        ringmail_store::mime::analyze(&message.body)
            .shifted(message.prefix.len() as u64)
            .encode(&mut meta);
        // Each user once per message, however many of its recipients lead there
        // (aliases are expanded when the message is queued; a catch-all or an
        // alias queued before may still name a user twice).
        let mut tasks: HashMap<u64, glommio::task::JoinHandle<Result<u32, DeliverError>>> =
            HashMap::new();
        let mut targets: Vec<Result<Vec<u64>, RcptResult>> = Vec::with_capacity(rcpts.len());
        for &i in rcpts {
            let to = &env.recipients[i as usize].address;
            let users = match dir.resolve(&lookup_key(to)) {
                Resolution::Users(u) if !u.is_empty() => u,
                // Postmaster is always accepted (RFC 5321 §4.5.1): without an
                // account or alias it waits for one (and bounces at expiry).
                _ if is_postmaster(to) => {
                    targets.push(Err(RcptResult::Deferred(reply(
                        451,
                        (4, 3, 0),
                        "no account or alias for postmaster yet",
                    ))));
                    continue;
                }
                _ => {
                    targets.push(Err(user_unknown()));
                    continue;
                }
            };
            for &user in &users {
                if tasks.contains_key(&user) {
                    continue;
                }
                let Some(account) = dir.user_by_id(user) else {
                    continue;
                };
                let prefix = entry_prefix(&env.from, &account.address);
                let d = Delivery {
                    user,
                    message: env.id,
                    size: (prefix.len() + message.len()).min(u32::MAX as usize) as u32,
                    internal_date: (env.received_at_ms / 1000) as i64,
                    meta: meta.clone(),
                    received_at_ms: env.received_at_ms,
                    maybe_done,
                };
                // The entry's reference, taken here where the count lives.
                spool.store().add_ref(env.id);
                let (mail, spool, id) = (self.mail.clone(), spool.clone(), env.id);
                let task = glommio::spawn_local(async move {
                    let r = mail
                        .on_home(user, move |home| {
                            Box::pin(async move { home.deliver(d).await })
                        })
                        .await
                        .unwrap_or_else(|e| Err(DeliverError::Store(e.to_string())));
                    if r.is_err() {
                        spool.store().drop_ref(id);
                    }
                    r
                })
                .detach();
                tasks.insert(user, task);
            }
            targets.push(Ok(users));
        }
        let mut done: HashMap<u64, Result<u32, DeliverError>> = HashMap::new();
        for (user, task) in tasks {
            let r = task
                .await
                .unwrap_or_else(|| Err(DeliverError::Store("delivery task cancelled".into())));
            done.insert(user, r);
        }
        let results = targets
            .into_iter()
            .map(|t| match t {
                Err(r) => r,
                Ok(users) => rcpt_result(users.iter().filter_map(|u| done.get(u))),
            })
            .collect();
        Outcome {
            results,
            relay: Some(RELAY.into()),
            tls: None,
            peer_dsn: false,
        }
    }
}

/// A recipient's result from its users' (one, or an alias's several): delivered
/// when every one was; else the worst (a temporary failure retries them all).
fn rcpt_result<'a>(users: impl Iterator<Item = &'a Result<u32, DeliverError>>) -> RcptResult {
    let mut worst: Option<RcptResult> = None;
    for r in users {
        let this = match r {
            Ok(_) => continue,
            Err(DeliverError::NoUser) => user_unknown(),
            Err(DeliverError::OverQuota) => {
                RcptResult::Deferred(reply(452, (4, 2, 2), "Mailbox full"))
            }
            Err(DeliverError::Store(e)) => RcptResult::Deferred(reply(
                451,
                (4, 3, 0),
                &format!("mailbox store unavailable: {e}"),
            )),
        };
        worst = match (worst, this) {
            (Some(w @ RcptResult::Deferred(_)), _) => Some(w),
            (_, t) => Some(t),
        };
    }
    worst.unwrap_or_else(|| RcptResult::Delivered(reply(250, (2, 0, 0), "delivered to mailbox")))
}

/// Rewrites a message's local recipients to the users they lead to, as the message is
/// queued (as Postfix's cleanup does with virtual aliases): an alias becomes its
/// targets, a catch-all its user, each user once per message, so every recipient in
/// the queue is one mailbox and its outcome is recorded once. A rewritten recipient
/// keeps its DSN parameters, with the address it was sent to as its ORCPT (RFC 3461
/// §4.2) unless it had one. Recipients of other domains, and local ones that lead
/// nowhere (they fail at delivery), stay as they are.
pub fn expand_recipients(
    recipients: Vec<ringmail_store::message::Recipient>,
    dir: &Directory,
    is_local: impl Fn(&str) -> bool,
) -> Vec<ringmail_store::message::Recipient> {
    let mut out: Vec<ringmail_store::message::Recipient> = Vec::with_capacity(recipients.len());
    let mut users = std::collections::HashSet::new();
    for r in recipients {
        // Relayed mail (most of it) is not looked up at all.
        let local = r.address.rsplit_once('@').is_some_and(|(_, d)| is_local(d));
        if !local {
            out.push(r);
            continue;
        }
        let key = lookup_key(&r.address);
        let targets = match dir.resolve(&key) {
            Resolution::Users(u) => u,
            Resolution::Unknown => Vec::new(),
        };
        // Its alias's targets elsewhere: the mail is forwarded there. (A target in
        // a local domain that is no user any more is a deleted user: left out.)
        let elsewhere: Vec<&String> = dir
            .forwards(&key)
            .iter()
            .filter(|t| t.rsplit_once('@').is_some_and(|(_, d)| !is_local(d)))
            .collect();
        if targets.is_empty() && elsewhere.is_empty() {
            out.push(r);
            continue;
        }
        for t in elsewhere {
            if out.iter().any(|o| o.address.eq_ignore_ascii_case(t)) {
                continue;
            }
            out.push(ringmail_store::message::Recipient {
                address: t.clone(),
                notify: r.notify,
                orcpt: r
                    .orcpt
                    .clone()
                    .or_else(|| Some(format!("rfc822;{}", xtext_encode(&r.address)))),
            });
        }
        for user in targets {
            let Some(account) = dir.user_by_id(user) else {
                continue;
            };
            if !users.insert(user) {
                continue;
            }
            let rewritten = !account.address.eq_ignore_ascii_case(&r.address);
            out.push(ringmail_store::message::Recipient {
                address: account.address.to_string(),
                notify: r.notify,
                orcpt: match (&r.orcpt, rewritten) {
                    (Some(o), _) => Some(o.clone()),
                    (None, true) => Some(format!("rfc822;{}", xtext_encode(&r.address))),
                    (None, false) => None,
                },
            });
        }
    }
    out
}
