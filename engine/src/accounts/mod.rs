//! Accounts on the engine side (docs/mailboxes.md): the published directory every
//! executor reads, the RCPT check against it, the changes (validated, logged on shard
//! 0, applied once durable) that the control socket (`control`) and the offline CLI
//! (`cli`) both make, and the data directory lock that decides which of them writes.
//!
//! Addresses are kept as [`canonical`] gives them: the local part with its ASCII
//! letters lower-cased (compared case-insensitively, as Postfix does; other
//! characters as given), the domain as its lower-case IDNA A-label.

pub mod cli;
pub mod control;
pub mod login;

use crate::queue::Spool;
use crate::smtp::address::{is_local_domain, parse_domain, Domain};
use crate::smtp::{LocalRecipients, LocalVerdict};
use arc_swap::ArcSwap;
use ringmail_store::accounts::{AccountIndex, AccountRecord, Directory, Resolution};
use ringmail_store::{Kind, LogError};
use serde::{Deserialize, Serialize};
use std::cell::{Cell, RefCell};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `DATA/lock`: the running server (or an offline account change) holds it.
pub fn lock_path(data: &Path) -> PathBuf {
    data.join("lock")
}

/// `DATA/control.sock`: where the running server takes account changes.
pub fn socket_path(data: &Path) -> PathBuf {
    data.join("control.sock")
}

/// Takes the data directory lock (exclusive flock on `DATA/lock`, created if
/// missing; the directory must exist). `Ok(None)`: someone else holds it. Released
/// when the file is dropped (or the process dies, however).
pub fn try_lock(data: &Path) -> std::io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(lock_path(data))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } == 0
    {
        return Ok(Some(f));
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(None),
        _ => Err(e),
    }
}

/// `address` when its domain is not a local one (an alias target elsewhere), with
/// the domain in its A-label form; None for a local address; an error when it is no
/// address.
fn remote_address(address: &str, local_domains: &[String]) -> Result<Option<String>, String> {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Err(format!("{address:?} is not an address (local-part@domain)"));
    };
    let ascii = match parse_domain(domain) {
        Ok(Domain::Name(a)) => a,
        _ => return Err(format!("{address:?}: {domain:?} is not a domain name")),
    };
    if is_local_domain(local_domains, &ascii) {
        return Ok(None);
    }
    if local.is_empty() || local.len() > 64 || local.contains(char::is_whitespace) {
        return Err(format!("{address:?}: not a deliverable address"));
    }
    Ok(Some(format!("{local}@{ascii}")))
}

/// An address in the accounts' spelling (see the module doc). `catch_all`: `@domain`
/// (an empty local part) is allowed too. The domain must be one of `local_domains`.
pub fn canonical(
    address: &str,
    local_domains: &[String],
    catch_all: bool,
) -> Result<String, String> {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Err(format!("{address:?} is not an address (local-part@domain)"));
    };
    if local.is_empty() && !catch_all {
        return Err(format!("{address:?} has no local part"));
    }
    // A dot-atom (RFC 5321 §4.1.2), UTF-8 allowed (RFC 6531): quoted local parts
    // are not accepted for accounts.
    let atext = |c: char| {
        c.is_ascii_alphanumeric()
            || "!#$%&'*+-/=?^_`{|}~".contains(c)
            || (!c.is_ascii() && !c.is_control() && !c.is_whitespace())
    };
    let dot_atom = local
        .split('.')
        .all(|a| !a.is_empty() && a.chars().all(atext));
    if local.len() > 64 || (!local.is_empty() && !dot_atom) {
        return Err(format!(
            "{address:?}: the local part must be a dot-atom of at most 64 bytes"
        ));
    }
    let ascii = match parse_domain(domain) {
        Ok(Domain::Name(a)) => a,
        _ => return Err(format!("{address:?}: {domain:?} is not a domain name")),
    };
    if !is_local_domain(local_domains, &ascii) {
        return Err(format!(
            "{address:?}: {ascii} is not a local domain (local domains: {}; see `local-domain`)",
            local_domains.join(", ")
        ));
    }
    Ok(format!("{}@{ascii}", local.to_ascii_lowercase()))
}

/// Where the executors read the directory: executor 0 publishes a new one after
/// every durable account change; the others load the newest (no lock on the read
/// path). Created before the executors start, one per process.
#[derive(Default)]
pub struct DirectoryCell {
    pub current: ArcSwap<Directory>,
    loaded: AtomicBool,
}

/// How often an executor looks whether shard 0's accounts are loaded, at start.
const LOADED_POLL: Duration = Duration::from_millis(5);

impl DirectoryCell {
    pub fn new() -> Arc<DirectoryCell> {
        Arc::default()
    }

    /// The newest directory.
    pub fn load(&self) -> Arc<Directory> {
        self.current.load_full()
    }

    pub fn publish(&self, d: Directory) {
        self.current.store(Arc::new(d));
        self.loaded.store(true, Ordering::Release);
    }

    /// Whether shard 0's accounts were published once.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Waits until the accounts are loaded (true) or `shutdown` is set (false):
    /// until then no executor may take RCPT for a local domain.
    pub async fn wait_loaded(&self, shutdown: &AtomicBool) -> bool {
        loop {
            if self.is_loaded() {
                return true;
            }
            if shutdown.load(Ordering::SeqCst) {
                return false;
            }
            glommio::timer::sleep(LOADED_POLL).await;
        }
    }
}

/// The RCPT check of local domains (`smtp::LocalRecipients`) over the published
/// directory. A local domain with no user, alias or catch-all at all takes every
/// recipient, as before accounts existed (its mail waits in the queue); once it has
/// one, only what the directory resolves is accepted. A recipient is `Full` when
/// every user it resolves to is at or over quota, or would be with the announced
/// size (the others take the mail; the full ones are deferred at delivery).
pub struct RcptCheck {
    pub cell: Arc<DirectoryCell>,
}

impl LocalRecipients for RcptCheck {
    fn check(&self, address: &str, domain: &str, declared: Option<u64>) -> LocalVerdict {
        let Ok(Domain::Name(ascii)) = parse_domain(domain) else {
            return LocalVerdict::Accept;
        };
        let dir = self.cell.current.load();
        if !dir.has_domain(&ascii) {
            return LocalVerdict::Accept;
        }
        let local = &address[..address.len() - domain.len() - 1];
        let key = format!("{local}@{ascii}");
        match dir.resolve(&key) {
            // An alias whose targets are all elsewhere: taken, to be forwarded.
            Resolution::Unknown if !dir.forwards(&key).is_empty() => LocalVerdict::Accept,
            Resolution::Unknown => LocalVerdict::Unknown,
            Resolution::Users(ids) => {
                let full = ids.iter().all(|id| {
                    dir.user_by_id(*id)
                        .is_some_and(|u| u.usage.is_full(u.quota, declared.unwrap_or(0)))
                });
                match full {
                    true => LocalVerdict::Full,
                    false => LocalVerdict::Accept,
                }
            }
        }
    }

    fn may_send_as(&self, login: &str, sender: &str) -> bool {
        let dir = self.cell.current.load();
        dir.user(login)
            .is_some_and(|u| dir.may_send_as(u.id, sender))
    }
}

/// The address mail to `<Postmaster>` (no domain, RFC 5321 §4.1.1.3) is delivered
/// to: `postmaster@` the first local domain; any other address as it is.
pub fn delivery_address(rcpt: &str, local_domains: &[String]) -> String {
    match (rcpt.contains('@'), local_domains.first()) {
        (false, Some(d)) => format!("{rcpt}@{}", d.to_ascii_lowercase()),
        _ => rcpt.to_string(),
    }
}

/// One request of the control protocol (docs/contracts.md, "Accounts"); the CLI
/// sends the same offline to itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    UserAdd {
        address: String,
        phc: String,
        #[serde(default)]
        quota_bytes: u64,
        #[serde(default)]
        quota_messages: u64,
    },
    UserDel {
        address: String,
    },
    UserPasswd {
        address: String,
        phc: String,
    },
    UserQuota {
        address: String,
        quota_bytes: u64,
        quota_messages: u64,
    },
    UserList,
    AliasAdd {
        from: String,
        targets: Vec<String>,
    },
    AliasDel {
        from: String,
    },
    AliasList,
}

impl Request {
    pub fn is_change(&self) -> bool {
        !matches!(self, Request::UserList | Request::AliasList)
    }
}

/// A user as `user list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserInfo {
    pub address: String,
    pub id: u64,
    pub quota_bytes: u64,
    pub quota_messages: u64,
}

/// An alias or catch-all (`from` = `@domain`) as `alias list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AliasInfo {
    pub from: String,
    pub targets: Vec<String>,
}

/// Every user, by address.
pub fn user_list(ix: &AccountIndex) -> Vec<UserInfo> {
    let mut users: Vec<UserInfo> = ix
        .users()
        .map(|u| UserInfo {
            address: u.address.clone(),
            id: u.id,
            quota_bytes: u.quota.bytes,
            quota_messages: u.quota.messages,
        })
        .collect();
    users.sort_by(|a, b| a.address.cmp(&b.address));
    users
}

pub fn alias_list(ix: &AccountIndex) -> Vec<AliasInfo> {
    ix.aliases()
        .into_iter()
        .map(|(from, targets)| AliasInfo {
            from: from.to_string(),
            targets: targets.to_vec(),
        })
        .collect()
}

/// A PHC string this server can verify: argon2 (id, i or d) and well-formed.
fn check_phc(phc: &str) -> Result<(), String> {
    let ok =
        phc.starts_with("$argon2") && argon2::password_hash::phc::PasswordHash::new(phc).is_ok();
    match ok {
        true => Ok(()),
        false => Err("the password hash is not an argon2 PHC string".into()),
    }
}

/// The one writer of the accounts: validates a change against the index, logs it on
/// shard 0, applies it once durable, and publishes the directory (online). Changes
/// run one at a time, so a validation holds until its record is applied.
pub struct Accounts {
    pub index: Rc<RefCell<AccountIndex>>,
    local_domains: Vec<String>,
    cell: Option<Arc<DirectoryCell>>,
    version: Cell<u64>,
    busy: glommio::sync::Semaphore,
}

impl Accounts {
    /// `cell`: where to publish (the server); `None` offline.
    pub fn new(
        index: Rc<RefCell<AccountIndex>>,
        local_domains: &[String],
        cell: Option<Arc<DirectoryCell>>,
    ) -> Accounts {
        Accounts {
            index,
            local_domains: local_domains.to_vec(),
            cell,
            version: Cell::new(0),
            busy: glommio::sync::Semaphore::new(1),
        }
    }

    /// Publishes the directory as the index holds it now.
    pub fn publish(&self) {
        if let Some(cell) = &self.cell {
            self.version.set(self.version.get() + 1);
            cell.publish(self.index.borrow().directory(self.version.get()));
        }
    }

    fn address(&self, a: &str) -> Result<String, String> {
        canonical(a, &self.local_domains, false)
    }

    /// A target list, each once: existing users in the local domains, or addresses
    /// elsewhere (the alias forwards there).
    fn targets(&self, targets: &[String]) -> Result<Vec<String>, String> {
        if targets.is_empty() {
            return Err("an alias needs at least one target".into());
        }
        let ix = self.index.borrow();
        let mut out: Vec<String> = Vec::new();
        for t in targets {
            let t = match remote_address(t, &self.local_domains)? {
                Some(remote) => remote,
                None => {
                    let t = self.address(t)?;
                    if ix.user(&t).is_none() {
                        return Err(format!("alias target {t} is not a user"));
                    }
                    t
                }
            };
            if !out.contains(&t) {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// The record a change makes (ids are taken here), or why it is refused.
    async fn plan(&self, spool: &Spool, req: &Request) -> Result<AccountRecord, String> {
        let user_id = |address: &str| -> Result<u64, String> {
            let a = self.address(address)?;
            self.index
                .borrow()
                .user(&a)
                .map(|u| u.id)
                .ok_or_else(|| format!("{a} is not a user"))
        };
        Ok(match req {
            Request::UserAdd {
                address,
                phc,
                quota_bytes,
                quota_messages,
            } => {
                let a = self.address(address)?;
                check_phc(phc)?;
                {
                    let ix = self.index.borrow();
                    if ix.user(&a).is_some() {
                        return Err(format!("{a} is a user already"));
                    }
                    if ix.alias(&a).is_some() {
                        return Err(format!("{a} is an alias (delete it first)"));
                    }
                }
                let id = spool.next_id().await.map_err(|e| e.to_string())?;
                AccountRecord::AddUser {
                    user_id: id,
                    address: a,
                    phc_hash: phc.clone(),
                    quota_bytes: *quota_bytes,
                    quota_messages: *quota_messages,
                }
            }
            Request::UserDel { address } => AccountRecord::DeleteUser {
                user_id: user_id(address)?,
            },
            Request::UserPasswd { address, phc } => {
                check_phc(phc)?;
                AccountRecord::SetPassword {
                    user_id: user_id(address)?,
                    phc_hash: phc.clone(),
                }
            }
            Request::UserQuota {
                address,
                quota_bytes,
                quota_messages,
            } => AccountRecord::SetQuota {
                user_id: user_id(address)?,
                quota_bytes: *quota_bytes,
                quota_messages: *quota_messages,
            },
            Request::AliasAdd { from, targets } => {
                let from = canonical(from, &self.local_domains, true)?;
                let targets = self.targets(targets)?;
                if self.index.borrow().user(&from).is_some() {
                    return Err(format!("{from} is a user"));
                }
                AccountRecord::AddAlias { from, targets }
            }
            Request::AliasDel { from } => {
                let from = canonical(from, &self.local_domains, true)?;
                if self.index.borrow().alias(&from).is_none() {
                    return Err(format!("{from} is not an alias"));
                }
                AccountRecord::DeleteAlias { from }
            }
            Request::UserList | Request::AliasList => unreachable!("not a change"),
        })
    }

    /// Answers one request: the reply's JSON object without `ok`, or the error.
    pub async fn handle(&self, spool: &Spool, req: &Request) -> Result<serde_json::Value, String> {
        match req {
            Request::UserList => {
                return Ok(serde_json::json!({ "users": user_list(&self.index.borrow()) }))
            }
            Request::AliasList => {
                return Ok(serde_json::json!({ "aliases": alias_list(&self.index.borrow()) }))
            }
            _ => {}
        }
        let _one = self
            .busy
            .acquire_permit(1)
            .await
            .map_err(|e| e.to_string())?;
        let rec = self.plan(spool, req).await?;
        let durable = async {
            let t = spool.store().append(Kind::Account, |out| rec.encode(out))?;
            spool.store().durable(&t).await?;
            // Applied before the ticket goes: a snapshot past the record holds it.
            self.index.borrow_mut().apply(&rec);
            drop(t);
            Ok::<_, LogError>(())
        };
        durable
            .await
            .map_err(|e| format!("the change was not stored: {e}"))?;
        self.publish();
        let mut reply = serde_json::json!({});
        if let AccountRecord::AddUser { user_id, .. } = rec {
            reply["id"] = user_id.into();
        }
        tracing::info!(change = ?Redacted(&rec), "account changed");
        Ok(reply)
    }
}

/// A record for the log line, without the password hash.
struct Redacted<'a>(&'a AccountRecord);

impl std::fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            AccountRecord::AddUser {
                user_id, address, ..
            } => write!(f, "add user {address} id {user_id}"),
            AccountRecord::SetPassword { user_id, .. } => {
                write!(f, "set password of user id {user_id}")
            }
            other => write!(f, "{other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_addresses_lower_case_ascii_and_use_the_a_label() {
        let local = vec!["a.test".to_string(), "xn--bcher-kva.test".to_string()];
        assert_eq!(
            canonical("Bob.Smith@A.Test", &local, false).unwrap(),
            "bob.smith@a.test"
        );
        assert_eq!(
            canonical("Jörg@bücher.test", &local, false).unwrap(),
            "jörg@xn--bcher-kva.test"
        );
        assert_eq!(canonical("@a.test", &local, true).unwrap(), "@a.test");
        assert!(canonical("@a.test", &local, false).is_err());
        let e = canonical("bob@elsewhere.test", &local, false).unwrap_err();
        assert!(e.contains("not a local domain"), "{e}");
        for bad in [
            "bob",
            "a b@a.test",
            "a..b@a.test",
            ".a@a.test",
            "\"q\"@a.test",
            "a@[127.0.0.1]",
        ] {
            assert!(canonical(bad, &local, false).is_err(), "{bad}");
        }
        assert!(canonical(&format!("{}@a.test", "x".repeat(65)), &local, false).is_err());
    }

    #[test]
    fn rcpt_check_resolves_through_the_published_directory() {
        let cell = DirectoryCell::new();
        let check = RcptCheck { cell: cell.clone() };
        // Before any account exists a local domain takes everything.
        assert_eq!(
            check.check("x@a.test", "a.test", None),
            LocalVerdict::Accept
        );
        let mut ix = AccountIndex::default();
        ix.apply(&AccountRecord::AddUser {
            user_id: 7,
            address: "bob@a.test".into(),
            phc_hash: "$argon2id$x".into(),
            quota_bytes: 100,
            quota_messages: 0,
        });
        ix.apply(&AccountRecord::AddAlias {
            from: "@xn--bcher-kva.test".into(),
            targets: vec!["bob@a.test".into()],
        });
        cell.publish(ix.directory(1));
        assert_eq!(
            check.check("BOB@A.test", "A.test", Some(100)),
            LocalVerdict::Accept
        );
        assert_eq!(
            check.check("bob@a.test", "a.test", Some(101)),
            LocalVerdict::Full
        );
        assert_eq!(
            check.check("x@a.test", "a.test", None),
            LocalVerdict::Unknown
        );
        // A U-label domain is looked up by its A-label.
        assert_eq!(
            check.check("any@bücher.test", "bücher.test", None),
            LocalVerdict::Accept
        );
        // A domain without accounts still takes everything.
        assert_eq!(
            check.check("x@b.test", "b.test", None),
            LocalVerdict::Accept
        );
        let u = cell.load().user_by_id(7).unwrap().clone();
        u.usage.bytes.store(100, Ordering::Relaxed);
        assert_eq!(
            check.check("bob@a.test", "a.test", None),
            LocalVerdict::Full
        );
        assert_eq!(
            check.check("x@bücher.test", "bücher.test", None),
            LocalVerdict::Full
        );
    }

    #[test]
    fn requests_are_json_with_an_op() {
        let r: Request = serde_json::from_str(
            r#"{"op":"user_add","address":"a@a.test","phc":"$argon2id$x","quota_bytes":5}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::UserAdd {
                address: "a@a.test".into(),
                phc: "$argon2id$x".into(),
                quota_bytes: 5,
                quota_messages: 0
            }
        );
        assert_eq!(
            serde_json::to_string(&Request::AliasList).unwrap(),
            r#"{"op":"alias_list"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"drop_tables"}"#).is_err());
    }
}
