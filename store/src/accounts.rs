//! Accounts, aliases and catch-alls (docs/mailboxes.md, "Where things live"): the
//! `AccountIndex` on shard 0, rebuilt from its `Kind::Account` records, and the
//! `Directory`, the immutable view of it every executor reads.
//!
//! **Addresses.** The index and the directory key addresses by [`address_key`]: ASCII
//! letters lower-cased in the local part and in the domain, every other byte as given
//! (Postfix compares local parts so). The domain must already be the IDNA A-label: the
//! engine normalises addresses (`ringmail::accounts::canonical`) before they get here.
//! A catch-all is the alias whose source is `@domain`.
//!
//! **Records** (`Kind::Account`, one op byte then the op's fields, codec.rs encoding).
//! Each carries the whole resulting state of what it touches, so replay is last writer
//! wins and idempotent over a snapshot that holds its effect already. User records
//! other than `AddUser` name the user by id: one for a user that is gone (deleted, its
//! address maybe reused by a newer user) changes nothing.

use crate::codec::{put_bytes, Reader};
use crate::record::Kind;
use crate::shard::{Index, Replayed};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const OP_ADD_USER: u8 = 1;
const OP_DELETE_USER: u8 = 2;
const OP_SET_PASSWORD: u8 = 3;
const OP_SET_QUOTA: u8 = 4;
const OP_ADD_ALIAS: u8 = 5;
const OP_DELETE_ALIAS: u8 = 6;

/// The home shard of a user's mailboxes: `splitmix64(user_id) % shards`. Fixed: the
/// placement of every user's mailbox records depends on it.
pub fn home_shard(user_id: u64, shards: u32) -> u32 {
    let mut z = user_id.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z % u64::from(shards.max(1))) as u32
}

/// The key an address is looked up by: ASCII letters lower-cased, the rest as given.
pub fn address_key(address: &str) -> String {
    address.to_ascii_lowercase()
}

/// The domain of a key (`a@b` → `b`, `@b` → `b`).
fn domain_of(key: &str) -> Option<&str> {
    key.rsplit_once('@').map(|(_, d)| d)
}

/// An account's limits; 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    pub bytes: u64,
    pub messages: u64,
}

/// What a user's mailboxes hold, all mailboxes together. The home shard keeps the
/// figures (it alone changes the mailboxes); RCPT reads them from any executor, so
/// they may be a little stale there. The same `Arc` for a user id in every
/// directory version.
#[derive(Debug, Default)]
pub struct Usage {
    pub bytes: AtomicU64,
    pub messages: AtomicU64,
}

impl Usage {
    /// Whether these figures are at or over `q`, or `incoming` more bytes would take
    /// them over.
    pub fn is_full(&self, q: Quota, incoming: u64) -> bool {
        let bytes = self.bytes.load(Ordering::Relaxed);
        let messages = self.messages.load(Ordering::Relaxed);
        (q.bytes > 0 && (bytes >= q.bytes || bytes.saturating_add(incoming) > q.bytes))
            || (q.messages > 0 && messages >= q.messages)
    }
}

/// One account change, as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountRecord {
    AddUser {
        user_id: u64,
        address: String,
        phc_hash: String,
        quota_bytes: u64,
        quota_messages: u64,
    },
    DeleteUser {
        user_id: u64,
    },
    SetPassword {
        user_id: u64,
        phc_hash: String,
    },
    SetQuota {
        user_id: u64,
        quota_bytes: u64,
        quota_messages: u64,
    },
    /// `from` is an address, or `@domain` for the domain's catch-all; `targets` are
    /// user addresses, the whole list.
    AddAlias {
        from: String,
        targets: Vec<String>,
    },
    DeleteAlias {
        from: String,
    },
}

const TRUNCATED: &str = "account record truncated";

impl AccountRecord {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let u64s = |out: &mut Vec<u8>, v: &[u64]| {
            for x in v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
        match self {
            AccountRecord::AddUser {
                user_id,
                address,
                phc_hash,
                quota_bytes,
                quota_messages,
            } => {
                out.push(OP_ADD_USER);
                u64s(out, &[*user_id]);
                put_bytes(out, address.as_bytes());
                put_bytes(out, phc_hash.as_bytes());
                u64s(out, &[*quota_bytes, *quota_messages]);
            }
            AccountRecord::DeleteUser { user_id } => {
                out.push(OP_DELETE_USER);
                u64s(out, &[*user_id]);
            }
            AccountRecord::SetPassword { user_id, phc_hash } => {
                out.push(OP_SET_PASSWORD);
                u64s(out, &[*user_id]);
                put_bytes(out, phc_hash.as_bytes());
            }
            AccountRecord::SetQuota {
                user_id,
                quota_bytes,
                quota_messages,
            } => {
                out.push(OP_SET_QUOTA);
                u64s(out, &[*user_id, *quota_bytes, *quota_messages]);
            }
            AccountRecord::AddAlias { from, targets } => {
                out.push(OP_ADD_ALIAS);
                put_bytes(out, from.as_bytes());
                out.extend_from_slice(&(targets.len() as u32).to_le_bytes());
                for t in targets {
                    put_bytes(out, t.as_bytes());
                }
            }
            AccountRecord::DeleteAlias { from } => {
                out.push(OP_DELETE_ALIAS);
                put_bytes(out, from.as_bytes());
            }
        }
    }

    pub fn decode(payload: &[u8]) -> Result<AccountRecord, &'static str> {
        let mut r = Reader::new(payload, TRUNCATED);
        let rec = match r.u8()? {
            OP_ADD_USER => AccountRecord::AddUser {
                user_id: r.u64()?,
                address: r.string()?,
                phc_hash: r.string()?,
                quota_bytes: r.u64()?,
                quota_messages: r.u64()?,
            },
            OP_DELETE_USER => AccountRecord::DeleteUser { user_id: r.u64()? },
            OP_SET_PASSWORD => AccountRecord::SetPassword {
                user_id: r.u64()?,
                phc_hash: r.string()?,
            },
            OP_SET_QUOTA => AccountRecord::SetQuota {
                user_id: r.u64()?,
                quota_bytes: r.u64()?,
                quota_messages: r.u64()?,
            },
            OP_ADD_ALIAS => {
                let from = r.string()?;
                let n = r.u32()? as usize;
                // Each target takes at least its 4-byte length: a count past what the
                // payload can hold is damage, not an allocation.
                if n > payload.len() / 4 {
                    return Err(TRUNCATED);
                }
                let mut targets = Vec::with_capacity(n);
                for _ in 0..n {
                    targets.push(r.string()?);
                }
                AccountRecord::AddAlias { from, targets }
            }
            OP_DELETE_ALIAS => AccountRecord::DeleteAlias { from: r.string()? },
            _ => return Err("unknown account record op"),
        };
        if !r.at_end() {
            return Err("account record has trailing bytes");
        }
        Ok(rec)
    }
}

/// A user as the index keeps it.
#[derive(Debug, Clone)]
pub struct UserEntry {
    pub id: u64,
    /// As [`address_key`] gives it.
    pub address: String,
    pub phc: Arc<str>,
    pub quota: Quota,
    pub usage: Arc<Usage>,
}

/// The accounts of the data directory, on shard 0 (the one writer is executor 0, or
/// the offline CLI holding `DATA/lock`).
#[derive(Debug, Default)]
pub struct AccountIndex {
    users: BTreeMap<u64, UserEntry>,
    by_address: HashMap<String, u64>,
    /// Alias source (address key or `@domain`) → (target address keys, its place in
    /// `alias_order`).
    aliases: HashMap<String, (Vec<String>, u64)>,
    /// Aliases in a stable order for the snapshot cursor: a sequence number per
    /// insertion (in memory only), so that removing one never shifts the others.
    alias_order: BTreeMap<u64, String>,
    alias_seq: u64,
}

/// Snapshot cursors at and above this are alias sequence numbers (user ids are 56-bit).
const ALIAS_CURSOR: u64 = 1 << 63;

impl AccountIndex {
    /// Applies a durable record (the writer after its fdatasync, and replay).
    pub fn apply(&mut self, rec: &AccountRecord) {
        match rec {
            AccountRecord::AddUser {
                user_id,
                address,
                phc_hash,
                quota_bytes,
                quota_messages,
            } => {
                let address = address_key(address);
                // A newer user of the address replaces an older one (last writer).
                if let Some(old) = self.by_address.get(&address).copied() {
                    if old != *user_id {
                        self.users.remove(&old);
                    }
                }
                let usage = match self.users.remove(user_id) {
                    Some(u) => {
                        self.by_address.remove(&u.address);
                        u.usage
                    }
                    None => Arc::default(),
                };
                self.by_address.insert(address.clone(), *user_id);
                self.users.insert(
                    *user_id,
                    UserEntry {
                        id: *user_id,
                        address,
                        phc: Arc::from(phc_hash.as_str()),
                        quota: Quota {
                            bytes: *quota_bytes,
                            messages: *quota_messages,
                        },
                        usage,
                    },
                );
            }
            AccountRecord::DeleteUser { user_id } => {
                if let Some(u) = self.users.remove(user_id) {
                    self.by_address.remove(&u.address);
                }
            }
            AccountRecord::SetPassword { user_id, phc_hash } => {
                if let Some(u) = self.users.get_mut(user_id) {
                    u.phc = Arc::from(phc_hash.as_str());
                }
            }
            AccountRecord::SetQuota {
                user_id,
                quota_bytes,
                quota_messages,
            } => {
                if let Some(u) = self.users.get_mut(user_id) {
                    u.quota = Quota {
                        bytes: *quota_bytes,
                        messages: *quota_messages,
                    };
                }
            }
            AccountRecord::AddAlias { from, targets } => {
                let from = address_key(from);
                let targets = targets.iter().map(|t| address_key(t)).collect();
                match self.aliases.get_mut(&from) {
                    Some(a) => a.0 = targets,
                    None => {
                        self.alias_seq += 1;
                        self.alias_order.insert(self.alias_seq, from.clone());
                        self.aliases.insert(from, (targets, self.alias_seq));
                    }
                }
            }
            AccountRecord::DeleteAlias { from } => {
                if let Some((_, seq)) = self.aliases.remove(&address_key(from)) {
                    self.alias_order.remove(&seq);
                }
            }
        }
    }

    pub fn user(&self, address: &str) -> Option<&UserEntry> {
        self.users.get(self.by_address.get(&address_key(address))?)
    }

    pub fn user_by_id(&self, id: u64) -> Option<&UserEntry> {
        self.users.get(&id)
    }

    /// Every user, by id.
    pub fn users(&self) -> impl Iterator<Item = &UserEntry> {
        self.users.values()
    }

    /// An alias's targets (addresses), `@domain` for a catch-all.
    pub fn alias(&self, from: &str) -> Option<&[String]> {
        self.aliases.get(&address_key(from)).map(|a| a.0.as_slice())
    }

    /// Every alias and catch-all (source, targets), sorted by source.
    pub fn aliases(&self) -> Vec<(&str, &[String])> {
        let mut all: Vec<_> = self
            .aliases
            .iter()
            .map(|(k, v)| (k.as_str(), v.0.as_slice()))
            .collect();
        all.sort();
        all
    }

    /// The read-only view of the index as it is now.
    pub fn directory(&self, version: u64) -> Directory {
        let users: HashMap<String, Arc<User>> = self
            .users
            .values()
            .map(|u| {
                (
                    u.address.clone(),
                    Arc::new(User {
                        id: u.id,
                        address: u.address.clone(),
                        phc: u.phc.clone(),
                        quota: u.quota,
                        usage: u.usage.clone(),
                    }),
                )
            })
            .collect();
        let by_id = users.values().map(|u| (u.id, u.clone())).collect();
        let mut aliases = HashMap::new();
        let mut catch_all = HashMap::new();
        let mut forwards = HashMap::new();
        for (from, (targets, _)) in &self.aliases {
            let elsewhere: Vec<String> = targets
                .iter()
                .filter(|t| !users.contains_key(*t))
                .cloned()
                .collect();
            if !elsewhere.is_empty() {
                forwards.insert(from.clone(), elsewhere);
            }
            let mut ids: Vec<u64> = targets
                .iter()
                .filter_map(|t| users.get(t).map(|u| u.id))
                .collect();
            ids.sort_unstable();
            ids.dedup();
            match from.strip_prefix('@') {
                Some(domain) => catch_all.insert(domain.to_string(), ids),
                None => aliases.insert(from.clone(), ids),
            };
        }
        let mut domains = std::collections::HashSet::new();
        for key in users.keys().chain(self.aliases.keys()) {
            if let Some(d) = domain_of(key) {
                domains.insert(d.to_string());
            }
        }
        Directory {
            version,
            users,
            by_id,
            aliases,
            catch_all,
            forwards,
            domains,
        }
    }

    fn encode_user(u: &UserEntry, out: &mut Vec<u8>) {
        AccountRecord::AddUser {
            user_id: u.id,
            address: u.address.clone(),
            phc_hash: u.phc.to_string(),
            quota_bytes: u.quota.bytes,
            quota_messages: u.quota.messages,
        }
        .encode(out)
    }
}

impl Index for AccountIndex {
    fn replay(&mut self, rec: Replayed<'_>) -> Result<(), &'static str> {
        if let Replayed::Record {
            kind: Kind::Account,
            payload,
            ..
        } = rec
        {
            self.apply(&AccountRecord::decode(payload)?);
        }
        Ok(())
    }

    /// Accounts hold no message.
    fn refs(&self, _each: &mut dyn FnMut(u64)) {}

    /// Users by id, then aliases by insertion; each item is the record that
    /// recreates it (`AddUser`, `AddAlias`).
    fn snapshot_chunk(
        &self,
        cursor: Option<u64>,
        out: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Option<u64> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let mut b = Vec::with_capacity(256);
        if cursor.is_none_or(|c| c < ALIAS_CURSOR) {
            let from = cursor.map_or(Unbounded, Excluded);
            for (id, u) in self.users.range((from, Unbounded)) {
                b.clear();
                Self::encode_user(u, &mut b);
                if !out(&b) {
                    return Some(*id);
                }
            }
        }
        let from = match cursor {
            Some(c) if c >= ALIAS_CURSOR => Excluded(c - ALIAS_CURSOR),
            _ => Included(0),
        };
        for (seq, from) in self.alias_order.range((from, Unbounded)) {
            let (targets, _) = &self.aliases[from];
            b.clear();
            AccountRecord::AddAlias {
                from: from.clone(),
                targets: targets.clone(),
            }
            .encode(&mut b);
            if !out(&b) {
                return Some(ALIAS_CURSOR + seq);
            }
        }
        None
    }

    fn load(&mut self, item: &[u8]) -> Result<(), &'static str> {
        match AccountRecord::decode(item)? {
            rec @ (AccountRecord::AddUser { .. } | AccountRecord::AddAlias { .. }) => {
                self.apply(&rec);
                Ok(())
            }
            _ => Err("account snapshot item is not a user or an alias"),
        }
    }

    fn clear(&mut self) {
        *self = AccountIndex::default();
    }
}

/// A user as the directory shows it.
#[derive(Debug)]
pub struct User {
    pub id: u64,
    /// As [`address_key`] gives it.
    pub address: String,
    /// The PHC string of the password (`$argon2id$...`).
    pub phc: Arc<str>,
    pub quota: Quota,
    pub usage: Arc<Usage>,
}

/// Where mail to an address goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// These users (ids, each once, ascending).
    Users(Vec<u64>),
    Unknown,
}

/// The read-mostly view of the accounts: built by executor 0 after every durable
/// change and published whole (`ringmail::accounts::DirectoryCell`); never changed
/// after it is built.
#[derive(Debug, Default)]
pub struct Directory {
    /// Rises with every published change (0: the empty directory before shard 0 was
    /// read).
    pub version: u64,
    users: HashMap<String, Arc<User>>,
    by_id: HashMap<u64, Arc<User>>,
    aliases: HashMap<String, Vec<u64>>,
    catch_all: HashMap<String, Vec<u64>>,
    /// Alias and catch-all (`@domain`) targets that are not users: addresses
    /// elsewhere, where the mail is forwarded (or users since deleted, which the
    /// engine, knowing the local domains, leaves out).
    forwards: HashMap<String, Vec<String>>,
    /// Domains with at least one user, alias or catch-all.
    domains: std::collections::HashSet<String>,
}

impl Directory {
    /// An exact user first, then an alias, then the domain's catch-all. An alias or
    /// catch-all none of whose targets exists any more counts as absent.
    pub fn resolve(&self, address: &str) -> Resolution {
        let key = address_key(address);
        if let Some(u) = self.users.get(&key) {
            return Resolution::Users(vec![u.id]);
        }
        if let Some(ids) = self.aliases.get(&key).filter(|ids| !ids.is_empty()) {
            return Resolution::Users(ids.clone());
        }
        if let Some(ids) = domain_of(&key)
            .and_then(|d| self.catch_all.get(d))
            .filter(|ids| !ids.is_empty())
        {
            return Resolution::Users(ids.clone());
        }
        Resolution::Unknown
    }

    /// The targets of `address`'s alias (else its domain's catch-all) that are not
    /// users, as `resolve` picks the alias: none when `address` is a user.
    pub fn forwards(&self, address: &str) -> &[String] {
        let key = address_key(address);
        if self.users.contains_key(&key) {
            return &[];
        }
        if self.aliases.contains_key(&key) {
            return self.forwards.get(&key).map_or(&[], |f| f.as_slice());
        }
        domain_of(&key)
            .and_then(|d| self.forwards.get(&format!("@{d}")))
            .map_or(&[], |f| f.as_slice())
    }

    pub fn user(&self, address: &str) -> Option<&Arc<User>> {
        self.users.get(&address_key(address))
    }

    /// Whether user `id` may send as `address`: it is the user's own address, or an
    /// alias (not a catch-all) that leads to the user (Postfix's
    /// reject_sender_login_mismatch with the virtual alias map as login map).
    pub fn may_send_as(&self, id: u64, address: &str) -> bool {
        let key = address_key(address);
        if let Some(u) = self.users.get(&key) {
            return u.id == id;
        }
        self.aliases.get(&key).is_some_and(|ids| ids.contains(&id))
    }

    pub fn user_by_id(&self, id: u64) -> Option<&Arc<User>> {
        self.by_id.get(&id)
    }

    /// Every user id (for the home shards' orphan sweep).
    pub fn user_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.by_id.keys().copied()
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `domain` (an A-label) has any user, alias or catch-all.
    pub fn has_domain(&self, domain: &str) -> bool {
        self.domains.contains(&domain.to_ascii_lowercase())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(id: u64, address: &str) -> AccountRecord {
        AccountRecord::AddUser {
            user_id: id,
            address: address.into(),
            phc_hash: format!("$argon2id$v=19$m=19456,t=2,p=1$salt{id}$hash"),
            quota_bytes: 0,
            quota_messages: 0,
        }
    }

    fn alias(from: &str, targets: &[&str]) -> AccountRecord {
        AccountRecord::AddAlias {
            from: from.into(),
            targets: targets.iter().map(|t| t.to_string()).collect(),
        }
    }

    fn history() -> Vec<AccountRecord> {
        vec![
            add(1, "alice@a.test"),
            add(2, "bob@a.test"),
            add(3, "carol@b.test"),
            AccountRecord::SetPassword {
                user_id: 1,
                phc_hash: "$argon2id$new".into(),
            },
            AccountRecord::SetQuota {
                user_id: 2,
                quota_bytes: 1000,
                quota_messages: 10,
            },
            alias("team@a.test", &["alice@a.test", "bob@a.test"]),
            alias("@b.test", &["carol@b.test"]),
            alias("old@a.test", &["bob@a.test"]),
            AccountRecord::DeleteAlias {
                from: "old@a.test".into(),
            },
            AccountRecord::DeleteUser { user_id: 2 },
            // The address comes back as a new user; records of the old one after
            // this must not touch it.
            add(4, "bob@a.test"),
            AccountRecord::SetPassword {
                user_id: 2,
                phc_hash: "$argon2id$stale".into(),
            },
            AccountRecord::DeleteUser { user_id: 2 },
            alias("team@a.test", &["alice@a.test"]),
        ]
    }

    /// What an index holds, comparable.
    fn state(ix: &AccountIndex) -> Vec<String> {
        let mut s: Vec<String> = ix
            .users()
            .map(|u| format!("{} {} {} {:?}", u.id, u.address, u.phc, u.quota))
            .collect();
        s.extend(
            ix.aliases()
                .into_iter()
                .map(|(f, t)| format!("{f} -> {t:?}")),
        );
        s
    }

    fn snapshot_items(ix: &AccountIndex, per_chunk: usize) -> Vec<Vec<u8>> {
        let mut items = Vec::new();
        let mut cursor = None;
        loop {
            let mut n = 0;
            cursor = ix.snapshot_chunk(cursor, &mut |b| {
                items.push(b.to_vec());
                n += 1;
                n < per_chunk
            });
            if cursor.is_none() {
                return items;
            }
        }
    }

    fn replay_all(ix: &mut AccountIndex, recs: &[AccountRecord]) {
        for r in recs {
            let mut payload = Vec::new();
            r.encode(&mut payload);
            assert_eq!(AccountRecord::decode(&payload).as_ref(), Ok(r));
            ix.replay(Replayed::Record {
                at: crate::Location {
                    seq: 0,
                    offset: 0,
                    len: 0,
                },
                kind: Kind::Account,
                payload: &payload,
            })
            .unwrap();
        }
    }

    #[test]
    fn replay_over_a_snapshot_taken_at_any_point_gives_the_same_state() {
        let recs = history();
        let mut whole = AccountIndex::default();
        replay_all(&mut whole, &recs);
        let want = state(&whole);
        assert!(
            want.iter().any(|s| s.starts_with("4 bob@a.test ")),
            "{want:?}"
        );
        assert!(want
            .iter()
            .any(|s| s.starts_with("1 alice@a.test $argon2id$new ")));
        assert!(!want.iter().any(|s| s.starts_with("2 ")), "{want:?}");
        // A snapshot holds the state after `taken` records, but its position may be
        // any earlier `from`: everything from there is replayed over it.
        for taken in 0..=recs.len() {
            let mut at = AccountIndex::default();
            replay_all(&mut at, &recs[..taken]);
            for per_chunk in [1, 2, 100] {
                let items = snapshot_items(&at, per_chunk);
                for from in 0..=taken {
                    let mut ix = AccountIndex::default();
                    for it in &items {
                        ix.load(it).unwrap();
                    }
                    replay_all(&mut ix, &recs[from..]);
                    assert_eq!(
                        state(&ix),
                        want,
                        "snapshot after {taken}, replay from {from}"
                    );
                }
            }
        }
        // Twice over changes nothing either.
        replay_all(&mut whole, &recs);
        assert_eq!(state(&whole), want);
    }

    #[test]
    fn a_snapshot_walk_misses_no_unchanged_alias_when_others_go_meanwhile() {
        let mut ix = AccountIndex::default();
        for i in 0..6 {
            ix.apply(&alias(&format!("a{i}@a.test"), &["x@a.test"]));
        }
        let mut seen = Vec::new();
        let mut cursor = None;
        let mut first = true;
        loop {
            cursor = ix.snapshot_chunk(cursor, &mut |b| {
                seen.push(b.to_vec());
                false
            });
            if first {
                // Between chunks the first two aliases are deleted.
                ix.apply(&AccountRecord::DeleteAlias {
                    from: "a0@a.test".into(),
                });
                ix.apply(&AccountRecord::DeleteAlias {
                    from: "a1@a.test".into(),
                });
                first = false;
            }
            if cursor.is_none() {
                break;
            }
        }
        let mut got = AccountIndex::default();
        for it in &seen {
            got.load(it).unwrap();
        }
        for i in 2..6 {
            assert!(got.alias(&format!("a{i}@a.test")).is_some(), "a{i} missed");
        }
    }

    #[test]
    fn records_round_trip_and_damage_is_refused() {
        for r in history() {
            let mut b = Vec::new();
            r.encode(&mut b);
            assert_eq!(AccountRecord::decode(&b), Ok(r.clone()));
            for cut in 0..b.len() {
                assert!(
                    AccountRecord::decode(&b[..cut]).is_err(),
                    "{r:?} cut at {cut}"
                );
            }
            b.push(0);
            assert!(AccountRecord::decode(&b).is_err());
        }
        assert!(AccountRecord::decode(&[9]).is_err());
        // A target count far past the payload is refused before any allocation.
        let mut b = vec![OP_ADD_ALIAS];
        put_bytes(&mut b, b"x@a.test");
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(AccountRecord::decode(&b), Err(TRUNCATED));
    }

    #[test]
    fn targets_that_are_no_users_are_forwards_in_resolution_order() {
        let mut ix = AccountIndex::default();
        ix.apply(&add(1, "alice@a.test"));
        ix.apply(&alias("out@a.test", &["Someone@elsewhere.test"]));
        ix.apply(&alias("both@a.test", &["alice@a.test", "x@elsewhere.test"]));
        ix.apply(&alias("@a.test", &["catch@elsewhere.test"]));
        ix.apply(&alias("alice@a.test", &["never@elsewhere.test"]));
        let d = ix.directory(1);
        // Only elsewhere: nobody here, forwarded.
        assert_eq!(d.resolve("out@a.test"), Resolution::Unknown);
        // Targets are kept in the accounts' spelling (lower case).
        assert_eq!(
            d.forwards("OUT@a.test"),
            ["someone@elsewhere.test".to_string()]
        );
        // Both: the user, and the address elsewhere.
        assert_eq!(d.resolve("both@a.test"), Resolution::Users(vec![1]));
        assert_eq!(d.forwards("both@a.test"), ["x@elsewhere.test".to_string()]);
        // The catch-all for any other address; a user's own address goes to the user.
        assert_eq!(
            d.forwards("nobody@a.test"),
            ["catch@elsewhere.test".to_string()]
        );
        assert!(d.forwards("alice@a.test").is_empty());
    }

    #[test]
    fn directory_case_rules_aliases_and_catch_all_precedence() {
        let mut ix = AccountIndex::default();
        ix.apply(&add(1, "Alice@A.Test"));
        ix.apply(&add(2, "bob@a.test"));
        ix.apply(&add(3, "postmaster@a.test"));
        ix.apply(&add(5, "Jörg@a.test"));
        ix.apply(&alias(
            "team@a.test",
            &["alice@a.test", "BOB@a.test", "bob@a.test"],
        ));
        ix.apply(&alias("@a.test", &["postmaster@a.test"]));
        // An alias that is also a user's address: the user wins.
        ix.apply(&alias("bob@a.test", &["alice@a.test"]));
        ix.apply(&alias("gone@a.test", &["nobody@a.test"]));
        let d = ix.directory(7);
        assert_eq!(d.version, 7);
        // ASCII case does not matter, in the local part or the domain.
        assert_eq!(d.resolve("ALICE@a.TEST"), Resolution::Users(vec![1]));
        assert_eq!(d.user("alice@a.test").unwrap().address, "alice@a.test");
        // Non-ASCII letters are compared as given.
        assert_eq!(d.resolve("JöRG@a.test"), Resolution::Users(vec![5]));
        assert_eq!(
            d.resolve("JÖRG@a.test"),
            Resolution::Users(vec![3]),
            "catch-all"
        );
        // Exact user > alias > catch-all.
        assert_eq!(d.resolve("bob@a.test"), Resolution::Users(vec![2]));
        assert_eq!(d.resolve("team@a.test"), Resolution::Users(vec![1, 2]));
        assert_eq!(d.resolve("someone@a.test"), Resolution::Users(vec![3]));
        // An alias whose targets are all gone falls through to the catch-all.
        assert_eq!(d.resolve("gone@a.test"), Resolution::Users(vec![3]));
        assert_eq!(d.resolve("someone@b.test"), Resolution::Unknown);
        assert_eq!(d.resolve("postmaster"), Resolution::Unknown);
        assert!(d.has_domain("A.test") && !d.has_domain("b.test"));
        assert_eq!(d.user_by_id(2).unwrap().address, "bob@a.test");
        // Sending as: the own address, or an alias to the user; never a catch-all,
        // and not an alias that is another user's address.
        assert!(d.may_send_as(1, "ALICE@a.test") && d.may_send_as(1, "team@a.test"));
        assert!(d.may_send_as(2, "team@a.test") && !d.may_send_as(3, "team@a.test"));
        assert!(!d.may_send_as(3, "someone@a.test"), "catch-all");
        assert!(!d.may_send_as(1, "bob@a.test"), "bob's own address");
        assert!(!d.may_send_as(1, "nobody@b.test"));
        ix.apply(&AccountRecord::DeleteAlias {
            from: "@a.test".into(),
        });
        assert_eq!(
            ix.directory(8).resolve("someone@a.test"),
            Resolution::Unknown
        );
    }

    #[test]
    fn usage_is_shared_across_directory_versions_and_kept_over_a_password_change() {
        let mut ix = AccountIndex::default();
        ix.apply(&add(1, "a@a.test"));
        let d1 = ix.directory(1);
        d1.user_by_id(1)
            .unwrap()
            .usage
            .bytes
            .store(500, Ordering::Relaxed);
        ix.apply(&AccountRecord::SetPassword {
            user_id: 1,
            phc_hash: "$argon2id$x".into(),
        });
        ix.apply(&add(1, "a@a.test"));
        let d2 = ix.directory(2);
        let u = d2.user_by_id(1).unwrap();
        assert!(Arc::ptr_eq(&u.usage, &d1.user_by_id(1).unwrap().usage));
        assert_eq!(u.usage.bytes.load(Ordering::Relaxed), 500);
        let q = Quota {
            bytes: 1000,
            messages: 0,
        };
        assert!(!u.usage.is_full(q, 500));
        assert!(u.usage.is_full(q, 501));
        u.usage.bytes.store(1000, Ordering::Relaxed);
        assert!(u.usage.is_full(q, 0));
        assert!(!u.usage.is_full(Quota::default(), u64::MAX));
        u.usage.messages.store(3, Ordering::Relaxed);
        assert!(u.usage.is_full(
            Quota {
                bytes: 0,
                messages: 3
            },
            0
        ));
    }

    #[test]
    fn home_shard_is_the_splitmix64_finaliser_and_spreads_users() {
        // splitmix64's first output for seed 0 is 0xe220a8397b1dcdaf.
        assert_eq!(
            home_shard(0, u32::MAX),
            (0xe220_a839_7b1d_cdafu64 % u64::from(u32::MAX)) as u32
        );
        let mut counts = [0u32; 4];
        for id in 0..4000 {
            counts[home_shard(id, 4) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
        assert_eq!(home_shard(12345, 1), 0);
    }
}
