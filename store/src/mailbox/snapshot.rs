//! The mailbox index as a store [`Index`]: replay of `Kind::Mail` records, the
//! references its entries hold, and its snapshot section.
//!
//! Snapshot items, in a stable order: per user (by id) its header (counters and
//! subscriptions), then per mailbox (by id) its header (names, counters, keyword
//! table, tombstones) and its entries in chunks of [`ENTRIES_PER_ITEM`] by UID. The
//! cursor is a token for the position kept in the index (a `u64` cannot hold user,
//! mailbox and UID), so a snapshot can stop anywhere, even inside a large mailbox,
//! and go on from there after the index changed.

use super::record::{self, def, put_def};
use super::{Entry, MailIndex, Mailbox, Tombstone, User, ALL_FLAGS, KEYWORDS_MAX};
use crate::codec::{put_bytes, Reader};
use crate::record::Kind;
use crate::shard::{Index, Replayed};

/// Entries per snapshot item: ~90 KiB.
pub(crate) const ENTRIES_PER_ITEM: usize = 2048;

const ITEM_USER: u8 = 1;
const ITEM_MAILBOX: u8 = 2;
const ITEM_ENTRIES: u8 = 3;

/// The next item a snapshot writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pos {
    /// The header of the first user from this id on.
    User(u64),
    /// The header of the user's first mailbox from this id on.
    Mailbox(u64, u32),
    /// The mailbox's entries from this UID on.
    Entries(u64, u32, u32),
}

fn after_user(user: u64) -> Option<Pos> {
    user.checked_add(1).map(Pos::User)
}

fn after_mailbox(user: u64, id: u32) -> Option<Pos> {
    match id.checked_add(1) {
        Some(next) => Some(Pos::Mailbox(user, next)),
        None => after_user(user),
    }
}

fn encode_user(out: &mut Vec<u8>, id: u64, u: &User) {
    out.push(ITEM_USER);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&u.modseq.to_le_bytes());
    out.extend_from_slice(&u.next_mailbox.to_le_bytes());
    out.extend_from_slice(&u.next_uidvalidity.to_le_bytes());
    out.extend_from_slice(&(u.subscriptions.len() as u32).to_le_bytes());
    for s in &u.subscriptions {
        put_bytes(out, s.as_bytes());
    }
}

fn encode_mailbox(out: &mut Vec<u8>, user: u64, m: &Mailbox) {
    out.push(ITEM_MAILBOX);
    out.extend_from_slice(&user.to_le_bytes());
    put_def(
        out,
        &super::MailboxDef {
            id: m.id,
            name: m.name.clone(),
            special_use: m.special_use,
            uidvalidity: m.uidvalidity,
            modseq: m.highestmodseq,
        },
    );
    out.extend_from_slice(&m.uidnext.to_le_bytes());
    out.push(m.noselect as u8);
    out.extend_from_slice(&m.vanished_floor.to_le_bytes());
    out.push(m.keywords.len() as u8);
    for k in &m.keywords {
        put_bytes(out, k.as_bytes());
    }
    out.extend_from_slice(&(m.tombstones.len() as u32).to_le_bytes());
    for t in &m.tombstones {
        out.extend_from_slice(&t.lo.to_le_bytes());
        out.extend_from_slice(&t.hi.to_le_bytes());
        out.extend_from_slice(&t.modseq.to_le_bytes());
    }
}

fn encode_entries(out: &mut Vec<u8>, user: u64, mailbox: u32, es: &[Entry]) {
    out.push(ITEM_ENTRIES);
    out.extend_from_slice(&user.to_le_bytes());
    out.extend_from_slice(&mailbox.to_le_bytes());
    out.extend_from_slice(&(es.len() as u32).to_le_bytes());
    for e in es {
        record::put_entry(out, e);
    }
}

impl MailIndex {
    fn load_item(&mut self, item: &[u8]) -> Result<(), &'static str> {
        let len = item.len();
        let mut r = Reader::new(item, "mailbox snapshot item truncated");
        let tag = r.u8()?;
        let user = r.u64()?;
        match tag {
            ITEM_USER => {
                let modseq = r.u64()?;
                let next_mailbox = r.u32()?;
                let next_uidvalidity = r.u32()?;
                let n = record::count(&mut r, len, 4)?;
                let mut subscriptions: Vec<Box<str>> = (0..n)
                    .map(|_| r.str().map(Box::from))
                    .collect::<Result<_, _>>()?;
                subscriptions.sort();
                subscriptions.dedup();
                let u = self.users.entry(user).or_default();
                u.modseq = modseq;
                u.next_mailbox = next_mailbox;
                u.next_uidvalidity = next_uidvalidity;
                u.subscriptions = subscriptions;
            }
            ITEM_MAILBOX => {
                let d = def(&mut r)?;
                let mut m = Mailbox::new(&d);
                m.highestmodseq = d.modseq;
                m.uidnext = r.u32()?;
                m.noselect = r.u8()? != 0;
                m.vanished_floor = r.u64()?;
                let n = r.u8()? as usize;
                if n > KEYWORDS_MAX {
                    return Err("mailbox snapshot: too many keywords");
                }
                m.keywords = (0..n)
                    .map(|_| r.str().map(Box::from))
                    .collect::<Result<_, _>>()?;
                let n = record::count(&mut r, len, 16)?;
                m.tombstones = (0..n)
                    .map(|_| {
                        Ok(Tombstone {
                            lo: r.u32()?,
                            hi: r.u32()?,
                            modseq: r.u64()?,
                        })
                    })
                    .collect::<Result<_, &'static str>>()?;
                m.tombstones.sort_by_key(|t| t.modseq);
                let u = self
                    .users
                    .get_mut(&user)
                    .ok_or("mailbox of an unknown user")?;
                match u.mailboxes.binary_search_by_key(&m.id, |x| x.id) {
                    Ok(i) => {
                        let old = std::mem::replace(&mut u.mailboxes[i], m);
                        for e in &old.entries {
                            u.usage.bytes -= e.size() as u64;
                            u.usage.messages -= 1;
                        }
                    }
                    Err(i) => u.mailboxes.insert(i, m),
                }
            }
            ITEM_ENTRIES => {
                let id = r.u32()?;
                let n = record::count(&mut r, len, 45)?;
                let u = self
                    .users
                    .get_mut(&user)
                    .ok_or("entries of an unknown user")?;
                let i = u
                    .mailboxes
                    .binary_search_by_key(&id, |x| x.id)
                    .map_err(|_| "entries of an unknown mailbox")?;
                let mb = &mut u.mailboxes[i];
                mb.entries.reserve_exact(n);
                for _ in 0..n {
                    let e = record::entry(&mut r)?;
                    if e.flags() & !ALL_FLAGS != 0 {
                        return Err("mailbox snapshot: bad flags");
                    }
                    if mb.entries.last().is_none_or(|l| l.uid() < e.uid()) {
                        mb.entries.push(e);
                        u.usage.bytes += e.size() as u64;
                        u.usage.messages += 1;
                        mb.uidnext = mb.uidnext.max(e.uid().saturating_add(1));
                    } else {
                        super::change::insert_entry(mb, &mut u.usage, e);
                    }
                }
            }
            _ => return Err("mailbox snapshot: unknown item"),
        }
        if !r.at_end() {
            return Err("mailbox snapshot: trailing bytes");
        }
        Ok(())
    }

    /// Remembers where the snapshot stopped; the token is its cursor.
    fn save(&self, pos: Option<Pos>) -> Option<u64> {
        let Some(pos) = pos else {
            self.snap.set(None);
            return None;
        };
        let token = self.snap.get().map_or(1, |(t, _)| t.wrapping_add(1));
        self.snap.set(Some((token, pos)));
        Some(token)
    }
}

impl Index for MailIndex {
    fn replay(&mut self, rec: Replayed<'_>) -> Result<(), &'static str> {
        if let Replayed::Record {
            kind: Kind::Mail,
            payload,
            ..
        } = rec
        {
            let rec = record::decode(payload)?;
            // At replay nobody holds references: recovery counts them from `refs`.
            let _ = self.apply(&rec);
        }
        Ok(())
    }

    fn refs(&self, each: &mut dyn FnMut(u64)) {
        for u in self.users.values() {
            for m in &u.mailboxes {
                for e in &m.entries {
                    each(e.message());
                }
            }
        }
    }

    fn snapshot_chunk(
        &self,
        cursor: Option<u64>,
        out: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Option<u64> {
        // A cursor this index did not give (cannot happen: one snapshot at a time)
        // starts over, which is merely longer.
        let mut pos = match (cursor, self.snap.get()) {
            (Some(c), Some((t, p))) if c == t => Some(p),
            _ => Some(Pos::User(0)),
        };
        let mut b = Vec::with_capacity(4096);
        while let Some(p) = pos {
            b.clear();
            match p {
                Pos::User(from) => {
                    let Some((&id, u)) = self.users.range(from..).next() else {
                        pos = None;
                        continue;
                    };
                    encode_user(&mut b, id, u);
                    pos = Some(Pos::Mailbox(id, 0));
                }
                Pos::Mailbox(user, from) => {
                    let Some(u) = self.users.get(&user) else {
                        pos = after_user(user);
                        continue;
                    };
                    let i = u.mailboxes.partition_point(|m| m.id < from);
                    let Some(m) = u.mailboxes.get(i) else {
                        pos = after_user(user);
                        continue;
                    };
                    encode_mailbox(&mut b, user, m);
                    pos = Some(Pos::Entries(user, m.id, 0));
                }
                Pos::Entries(user, id, from) => {
                    let Some(m) = self.users.get(&user).and_then(|u| u.by_id(id)) else {
                        pos = after_mailbox(user, id);
                        continue;
                    };
                    let k = m.entries.partition_point(|e| e.uid() < from);
                    let chunk = &m.entries[k..m.entries.len().min(k + ENTRIES_PER_ITEM)];
                    let Some(last) = chunk.last() else {
                        pos = after_mailbox(user, id);
                        continue;
                    };
                    encode_entries(&mut b, user, id, chunk);
                    pos = match last.uid().checked_add(1) {
                        Some(next) => Some(Pos::Entries(user, id, next)),
                        None => after_mailbox(user, id),
                    };
                }
            }
            if !out(&b) {
                return self.save(pos);
            }
        }
        self.save(None)
    }

    fn load(&mut self, item: &[u8]) -> Result<(), &'static str> {
        self.load_item(item)
    }

    fn clear(&mut self) {
        *self = MailIndex::default();
    }
}
