//! The mailbox index: every user homed on a shard, their mailboxes, entries,
//! subscriptions and MODSEQs (docs/mailboxes.md), for IMAP (RFC 3501/9051, CONDSTORE
//! and QRESYNC, RFC 7162) and POP3.
//!
//! In memory and synchronous: the caller logs the records. A change is two steps
//! (`change.rs`): `begin_*` checks the request against the state and reserves what it
//! needs (UIDs, the MODSEQ, keyword slots, names, quota), the caller appends the
//! [`Change`]'s record (`Kind::Mail`) and, once it is durable, `commit`s it. Records
//! carry every number the change was given, and one function applies a record both at
//! commit and at replay, so a restart rebuilds exactly what the commits built.
//!
//! Changes of one user are applied in the order they were begun, whatever the order of
//! their commits (a commit that arrives early waits for the changes begun before it).
//! The caller appends each change's record before it begins the next one (no await
//! between `begin_*` and `Shard::append`), so the log holds them in that same order and
//! replay applies them as the commits did. That makes concurrent changes of one user
//! deterministic (a flag change built on another still in flight sees its result; an
//! entry a concurrent change expunged stays expunged) without a lock.

mod change;
mod record;
mod snapshot;

pub use change::{Change, Committed};
pub use record::decode as decode_record;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::RangeInclusive;

/// `\Seen` (the system flags are bits of [`Entry::flags`]; `\Recent` is a session's,
/// not stored).
pub const SEEN: u8 = 1;
pub const ANSWERED: u8 = 2;
pub const FLAGGED: u8 = 4;
pub const DELETED: u8 = 8;
pub const DRAFT: u8 = 16;
/// Every system flag bit.
pub const ALL_FLAGS: u8 = SEEN | ANSWERED | FLAGGED | DELETED | DRAFT;

/// Keywords a mailbox can know (one bit each in an entry).
pub const KEYWORDS_MAX: usize = 64;
/// Tombstone ranges kept per mailbox; older ones are folded into the vanished floor.
pub const TOMBSTONES_MAX: usize = 10_000;
/// MODSEQs live in the low 56 bits of an entry's word (the flags in the top 8 keep
/// the entry at 48 bytes): 7·10^16 changes per account.
pub const MODSEQ_MAX: u64 = (1 << 56) - 1;
/// A mailbox name's longest form, in bytes.
pub const NAME_BYTES_MAX: usize = 255;

/// The id INBOX has in every account (it is created with the account).
pub const INBOX_ID: u32 = 1;
pub const INBOX: &str = "INBOX";

/// One message in a mailbox: 48 bytes, as a million of them per shard must fit in
/// the memory budget (docs/mailboxes.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    uid: u32,
    size: u32,
    internal_date: i64,
    keywords: u64,
    /// The MODSEQ in the low 56 bits, the system flags in the top 8.
    modseq_flags: u64,
    message: u64,
    cache: u64,
}

const _: () = assert!(std::mem::size_of::<Entry>() == 48);

impl Entry {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        uid: u32,
        size: u32,
        internal_date: i64,
        flags: u8,
        keywords: u64,
        modseq: u64,
        message: u64,
        cache: u64,
    ) -> Entry {
        debug_assert!(modseq <= MODSEQ_MAX);
        Entry {
            uid,
            size,
            internal_date,
            keywords,
            modseq_flags: (modseq & MODSEQ_MAX) | (flags as u64) << 56,
            message,
            cache,
        }
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }
    /// RFC822.SIZE as served (the per-entry prefix included).
    pub fn size(&self) -> u32 {
        self.size
    }
    /// INTERNALDATE, seconds since the epoch.
    pub fn internal_date(&self) -> i64 {
        self.internal_date
    }
    /// System flags ([`SEEN`] …).
    pub fn flags(&self) -> u8 {
        (self.modseq_flags >> 56) as u8
    }
    /// Keyword bitmap into the mailbox's table ([`Mailbox::keyword_names`]).
    pub fn keywords(&self) -> u64 {
        self.keywords
    }
    pub fn modseq(&self) -> u64 {
        self.modseq_flags & MODSEQ_MAX
    }
    /// The message's `Handle` id (its shard in the top bits).
    pub fn message(&self) -> u64 {
        self.message
    }
    /// Offset of the parsed metadata in the home shard's cache file, `u64::MAX` if none.
    pub fn cache(&self) -> u64 {
        self.cache
    }

    pub(crate) fn set_state(&mut self, flags: u8, keywords: u64, modseq: u64) {
        self.keywords = keywords;
        self.modseq_flags = (modseq & MODSEQ_MAX) | (flags as u64) << 56;
    }
}

/// The special-use attributes of RFC 6154 that accounts get by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SpecialUse {
    Drafts = 1,
    Sent = 2,
    Trash = 3,
    Junk = 4,
    Archive = 5,
}

impl SpecialUse {
    pub const ALL: [SpecialUse; 5] = [
        SpecialUse::Drafts,
        SpecialUse::Sent,
        SpecialUse::Trash,
        SpecialUse::Junk,
        SpecialUse::Archive,
    ];

    /// The LIST attribute.
    pub fn attribute(self) -> &'static str {
        match self {
            SpecialUse::Drafts => "\\Drafts",
            SpecialUse::Sent => "\\Sent",
            SpecialUse::Trash => "\\Trash",
            SpecialUse::Junk => "\\Junk",
            SpecialUse::Archive => "\\Archive",
        }
    }

    /// The name `ensure_defaults` gives it.
    pub fn default_name(self) -> &'static str {
        match self {
            SpecialUse::Drafts => "Drafts",
            SpecialUse::Sent => "Sent",
            SpecialUse::Trash => "Trash",
            SpecialUse::Junk => "Junk",
            SpecialUse::Archive => "Archive",
        }
    }

    pub(crate) fn from_u8(v: u8) -> Option<SpecialUse> {
        SpecialUse::ALL.get((v as usize).wrapping_sub(1)).copied()
    }
}

/// Expunged UIDs `lo..=hi` (no entry between them was left) with their expunge's MODSEQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tombstone {
    pub lo: u32,
    pub hi: u32,
    pub modseq: u64,
}

/// One mailbox of a user.
#[derive(Debug, Clone)]
pub struct Mailbox {
    id: u32,
    uidvalidity: u32,
    uidnext: u32,
    special_use: Option<SpecialUse>,
    /// A deleted mailbox kept as a name because it has children (RFC 3501 6.3.4).
    noselect: bool,
    name: Box<str>,
    highestmodseq: u64,
    /// A client asking what vanished since a MODSEQ below this gets every UID below
    /// `uidnext` that is not present (RFC 7162 §3.2.5.1 allows the superset).
    vanished_floor: u64,
    /// Slot `i` names bit `i` of the entries' keywords; slots are never reused.
    keywords: Vec<Box<str>>,
    entries: Vec<Entry>,
    /// Ordered by MODSEQ.
    tombstones: Vec<Tombstone>,
}

/// What a mailbox is created with (in records and snapshots).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MailboxDef {
    pub id: u32,
    pub name: Box<str>,
    pub special_use: Option<SpecialUse>,
    pub uidvalidity: u32,
    /// Its HIGHESTMODSEQ while empty: the account's MODSEQ when it was made.
    pub modseq: u64,
}

impl Mailbox {
    pub(crate) fn new(def: &MailboxDef) -> Mailbox {
        Mailbox {
            id: def.id,
            uidvalidity: def.uidvalidity,
            uidnext: 1,
            special_use: def.special_use,
            noselect: false,
            name: def.name.clone(),
            highestmodseq: def.modseq,
            vanished_floor: 0,
            keywords: Vec::new(),
            entries: Vec::new(),
            tombstones: Vec::new(),
        }
    }

    pub fn id(&self) -> u32 {
        self.id
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn special_use(&self) -> Option<SpecialUse> {
        self.special_use
    }
    /// Deleted but kept as a name because it has children: not selectable, no entries.
    pub fn is_noselect(&self) -> bool {
        self.noselect
    }
    pub fn uidvalidity(&self) -> u32 {
        self.uidvalidity
    }
    pub fn uidnext(&self) -> u32 {
        self.uidnext
    }
    pub fn highestmodseq(&self) -> u64 {
        self.highestmodseq
    }
    /// In UID order: message sequence number = position + 1.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Every keyword the mailbox knows (PERMANENTFLAGS), in slot order.
    pub fn keyword_table(&self) -> impl Iterator<Item = &str> {
        self.keywords.iter().map(|k| &**k).filter(|k| !k.is_empty())
    }
    /// Whether another keyword can be added ([`KEYWORDS_MAX`]).
    pub fn keywords_full(&self) -> bool {
        self.keywords.len() >= KEYWORDS_MAX
    }

    pub(crate) fn position(&self, uid: u32) -> Result<usize, usize> {
        self.entries.binary_search_by_key(&uid, |e| e.uid)
    }

    pub fn entry(&self, uid: u32) -> Option<&Entry> {
        self.position(uid).ok().map(|i| &self.entries[i])
    }

    /// The message sequence number of `uid`.
    pub fn seq_of(&self, uid: u32) -> Option<u32> {
        self.position(uid).ok().map(|i| i as u32 + 1)
    }

    /// The entries whose UIDs are in `range`.
    pub fn uid_range(&self, range: RangeInclusive<u32>) -> &[Entry] {
        let lo = self.entries.partition_point(|e| e.uid < *range.start());
        let hi = self.entries.partition_point(|e| e.uid <= *range.end());
        &self.entries[lo..hi.max(lo)]
    }

    /// The names of an entry's keywords.
    pub fn keyword_names(&self, e: &Entry) -> Vec<&str> {
        (0..KEYWORDS_MAX)
            .filter(|b| e.keywords & (1 << b) != 0)
            .filter_map(|b| self.keywords.get(b).map(|k| &**k))
            .filter(|k| !k.is_empty())
            .collect()
    }

    /// The keyword's bit, if the mailbox knows it (keywords compare case-insensitively,
    /// RFC 3501 2.3.2).
    pub fn keyword_bit(&self, name: &str) -> Option<u64> {
        self.keywords
            .iter()
            .position(|k| k.eq_ignore_ascii_case(name))
            .map(|i| 1u64 << i)
    }

    /// Entries changed after `modseq` (CHANGEDSINCE).
    pub fn changed_since(&self, modseq: u64) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(move |e| e.modseq() > modseq)
    }

    /// UIDs expunged after `modseq` (QRESYNC VANISHED), as sorted disjoint ranges. Below
    /// the vanished floor the answer is every UID below `uidnext` not present, a
    /// superset RFC 7162 allows. Ranges may also cover UIDs that never existed.
    pub fn vanished_since(&self, modseq: u64) -> Vec<RangeInclusive<u32>> {
        let mut r: Vec<(u32, u32)> = Vec::new();
        if modseq < self.vanished_floor {
            let mut next = 1u32;
            for e in &self.entries {
                if e.uid > next {
                    r.push((next, e.uid - 1));
                }
                next = e.uid.saturating_add(1);
            }
            if self.uidnext > next {
                r.push((next, self.uidnext - 1));
            }
        } else {
            let from = self.tombstones.partition_point(|t| t.modseq <= modseq);
            r.extend(self.tombstones[from..].iter().map(|t| (t.lo, t.hi)));
            r.sort_unstable();
        }
        let mut out: Vec<RangeInclusive<u32>> = Vec::with_capacity(r.len());
        for (lo, hi) in r {
            match out.last_mut() {
                Some(last) if lo <= last.end().saturating_add(1) => {
                    if hi > *last.end() {
                        *last = *last.start()..=hi;
                    }
                }
                _ => out.push(lo..=hi),
            }
        }
        out
    }

    /// The vanished floor (0: nothing folded yet).
    pub fn vanished_floor(&self) -> u64 {
        self.vanished_floor
    }
}

/// Bytes (sum of entry sizes) and messages over all of a user's mailboxes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub messages: u64,
}

/// An account's limits; 0 is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    pub bytes: u64,
    pub messages: u64,
}

/// A message to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    pub message: u64,
    pub size: u32,
    pub internal_date: i64,
    pub flags: u8,
    pub keywords: Vec<String>,
    pub cache: u64,
}

/// How a STORE combines the flags given with an entry's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagOp {
    Replace,
    Add,
    Remove,
}

/// Why a change is refused (each maps to an IMAP response code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MailError {
    /// No such user on this shard.
    NoSuchUser,
    NoSuchMailbox,
    /// The name is taken (or being taken by a change in flight).
    Exists,
    /// Not a valid mailbox name (docs/mailboxes.md), or a rename into itself.
    BadName(&'static str),
    /// The mailbox is `\Noselect`.
    NoSelect,
    /// DELETE of a `\Noselect` mailbox that has children (RFC 3501 6.3.4).
    HasChildren,
    /// INBOX cannot be deleted.
    Inbox,
    OverQuota,
    /// The mailbox knows [`KEYWORDS_MAX`] keywords already.
    TooManyKeywords,
    BadKeyword,
    /// UIDs or MODSEQs of the account or mailbox are used up.
    Exhausted,
}

impl std::fmt::Display for MailError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MailError::NoSuchUser => f.write_str("no such user"),
            MailError::NoSuchMailbox => f.write_str("no such mailbox"),
            MailError::Exists => f.write_str("mailbox already exists"),
            MailError::BadName(why) => write!(f, "bad mailbox name: {why}"),
            MailError::NoSelect => f.write_str("mailbox is not selectable"),
            MailError::HasChildren => f.write_str("mailbox has children"),
            MailError::Inbox => f.write_str("INBOX cannot be deleted"),
            MailError::OverQuota => f.write_str("quota exceeded"),
            MailError::TooManyKeywords => f.write_str("too many keywords in this mailbox"),
            MailError::BadKeyword => f.write_str("bad keyword"),
            MailError::Exhausted => f.write_str("UIDs or MODSEQs used up"),
        }
    }
}

impl std::error::Error for MailError {}

/// What a committed change did, for change notifications.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub user: u64,
    /// 0 for the account itself ([`NoticeKind::AccountDropped`], subscriptions).
    pub mailbox: u32,
    pub kind: NoticeKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoticeKind {
    Appended {
        uid: u32,
    },
    FlagsChanged {
        uid: u32,
        modseq: u64,
    },
    Expunged {
        uids: Vec<u32>,
    },
    MailboxCreated,
    MailboxRenamed {
        name: String,
    },
    /// Removed, or turned `\Noselect` (its entries expunged) because it has children.
    MailboxDeleted,
    Subscribed {
        name: String,
        on: bool,
    },
    AccountDropped,
}

/// One user's mailboxes and counters.
#[derive(Debug, Default)]
pub(crate) struct User {
    /// Sorted by id.
    pub mailboxes: Vec<Mailbox>,
    /// Sorted; names need not exist (RFC 3501 6.3.6).
    pub subscriptions: Vec<Box<str>>,
    /// The account's highest MODSEQ given out (reserved ones included).
    pub modseq: u64,
    pub next_mailbox: u32,
    pub next_uidvalidity: u32,
    pub usage: Usage,
    /// Held by changes in flight (quota checks count them).
    pub reserved: Usage,
    /// Names being taken by changes in flight.
    pub pending_names: Vec<Box<str>>,
    /// The state changes in flight will give entries: (mailbox, uid) → (modseq,
    /// flags, keywords), so a change begun meanwhile builds on it.
    pub pending_flags: HashMap<(u32, u32), (u64, u8, u64)>,
    /// A `DropAccount` is in flight: no change may begin.
    pub dropping: bool,
}

impl User {
    /// A new account: INBOX (id 1) with the given UIDVALIDITY.
    pub(crate) fn new(inbox_uidvalidity: u32) -> User {
        let mut u = User {
            modseq: 1,
            next_mailbox: INBOX_ID + 1,
            next_uidvalidity: inbox_uidvalidity.wrapping_add(1).max(1),
            ..User::default()
        };
        u.mailboxes.push(Mailbox::new(&MailboxDef {
            id: INBOX_ID,
            name: INBOX.into(),
            special_use: None,
            uidvalidity: inbox_uidvalidity,
            modseq: 1,
        }));
        u
    }

    pub(crate) fn by_id(&self, id: u32) -> Option<&Mailbox> {
        self.mailboxes
            .binary_search_by_key(&id, |m| m.id)
            .ok()
            .map(|i| &self.mailboxes[i])
    }

    pub(crate) fn by_id_mut(&mut self, id: u32) -> Option<&mut Mailbox> {
        self.mailboxes
            .binary_search_by_key(&id, |m| m.id)
            .ok()
            .map(|i| &mut self.mailboxes[i])
    }

    /// By its normalised name.
    pub(crate) fn by_name(&self, name: &str) -> Option<&Mailbox> {
        self.mailboxes.iter().find(|m| &*m.name == name)
    }

    pub(crate) fn inbox_uidvalidity(&self) -> u32 {
        self.by_id(INBOX_ID).map_or(1, |m| m.uidvalidity)
    }
}

/// Every user homed on one shard. See the module doc.
#[derive(Debug, Default)]
pub struct MailIndex {
    pub(crate) users: BTreeMap<u64, User>,
    /// Per user, the changes begun and not yet applied, in the order they were begun:
    /// a slot holds the change once it is committed, and is applied when every slot
    /// before it is.
    pub(crate) inflight: HashMap<u64, VecDeque<change::Slot>>,
    pub(crate) next_change: u64,
    /// Where the snapshot being written stands (see `snapshot.rs`).
    pub(crate) snap: std::cell::Cell<Option<(u64, snapshot::Pos)>>,
}

impl MailIndex {
    /// The users with data here, in id order.
    pub fn users(&self) -> impl Iterator<Item = u64> + '_ {
        self.users.keys().copied()
    }

    pub fn has_user(&self, user: u64) -> bool {
        self.users.contains_key(&user)
    }

    /// What the user's mailboxes hold (committed changes).
    pub fn usage(&self, user: u64) -> Usage {
        self.users.get(&user).map_or(Usage::default(), |u| u.usage)
    }

    /// A mailbox by name (INBOX in any case; the name is normalised as created).
    pub fn mailbox(&self, user: u64, name: &str) -> Option<&Mailbox> {
        let name = normalize_name(name).ok()?;
        self.users.get(&user)?.by_name(&name)
    }

    pub fn mailbox_by_id(&self, user: u64, id: u32) -> Option<&Mailbox> {
        self.users.get(&user)?.by_id(id)
    }

    /// The user's mailboxes in name order (`\Noselect` ones included).
    pub fn mailboxes(&self, user: u64) -> Vec<&Mailbox> {
        let mut v: Vec<&Mailbox> = self
            .users
            .get(&user)
            .map(|u| u.mailboxes.iter().collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Whether mailbox `name` has children (LIST `\HasChildren`).
    pub fn has_children(&self, user: u64, name: &str) -> bool {
        let Ok(name) = normalize_name(name) else {
            return false;
        };
        self.users
            .get(&user)
            .is_some_and(|u| u.mailboxes.iter().any(|m| is_child(&m.name, &name)))
    }

    /// Subscribed names, sorted.
    pub fn subscriptions(&self, user: u64) -> Vec<&str> {
        self.users
            .get(&user)
            .map(|u| u.subscriptions.iter().map(|s| &**s).collect())
            .unwrap_or_default()
    }

    /// The account's MODSEQ counter (the highest given out).
    pub fn account_modseq(&self, user: u64) -> Option<u64> {
        self.users.get(&user).map(|u| u.modseq)
    }

    /// Changes begun and neither applied nor aborted.
    pub fn in_flight(&self) -> usize {
        self.inflight.values().map(|q| q.len()).sum()
    }
}

/// Whether `name` is a descendant of `parent`.
pub(crate) fn is_child(name: &str, parent: &str) -> bool {
    name.len() > parent.len() + 1
        && name.starts_with(parent)
        && name.as_bytes()[parent.len()] == b'/'
}

/// Checks a mailbox name (docs/mailboxes.md) and gives its stored form: the first
/// level `INBOX` in any case becomes `INBOX` (so `inbox/x` is `INBOX/x`), the rest is
/// kept as it is (case-sensitive).
pub fn normalize_name(name: &str) -> Result<String, MailError> {
    if name.is_empty() {
        return Err(MailError::BadName("empty"));
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(MailError::BadName("longer than 255 bytes"));
    }
    if name.starts_with('/') || name.ends_with('/') || name.contains("//") {
        return Err(MailError::BadName("empty hierarchy level"));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err(MailError::BadName("control character"));
    }
    if name.contains(['*', '%']) {
        return Err(MailError::BadName("wildcard character"));
    }
    let first = name.split('/').next().unwrap_or("");
    if first.eq_ignore_ascii_case(INBOX) {
        Ok(format!("{INBOX}{}", &name[first.len()..]))
    } else {
        Ok(name.to_string())
    }
}

#[cfg(test)]
mod tests;
