//! The `Kind::Mail` record payload: `op u8 | user u64 | inbox_uidvalidity u32 | the
//! op's fields`, in the `codec` encoding. Every record names its user's INBOX
//! UIDVALIDITY, so that any record can (re)create the account it belongs to at replay:
//! an account exists from its first change, and its INBOX with it.
//!
//! Keywords travel by name: a record lists the `(slot, name)` pairs of the mailbox's
//! table that its entries' bitmaps use, and applying it puts them into the table.

use super::{Entry, MailboxDef, SpecialUse, ALL_FLAGS, KEYWORDS_MAX, MODSEQ_MAX};
use crate::codec::{put_bytes, Reader};

const APPEND: u8 = 1;
const SET_FLAGS: u8 = 2;
const EXPUNGE: u8 = 3;
const COPY: u8 = 4;
const MOVE: u8 = 5;
const CREATE: u8 = 6;
const RENAME: u8 = 7;
const DELETE: u8 = 8;
const SUBSCRIBE: u8 = 9;
const UNSUBSCRIBE: u8 = 10;
const ENSURE_DEFAULTS: u8 = 11;
const DROP_ACCOUNT: u8 = 12;

/// Keyword slots a record's bitmaps use: `(slot, name)`.
pub(crate) type Keywords = Vec<(u8, Box<str>)>;

/// One decoded `Kind::Mail` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rec {
    pub(crate) user: u64,
    pub(crate) inbox_uidvalidity: u32,
    pub(crate) op: Op,
}

impl Rec {
    /// The account the record changes.
    pub fn user(&self) -> u64 {
        self.user
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    /// New entries (their UIDs and MODSEQ assigned) into `mailbox`.
    Append {
        mailbox: u32,
        entries: Vec<Entry>,
        kw: Keywords,
    },
    /// Entries' flags and keywords after the change, all with `modseq`.
    SetFlags {
        mailbox: u32,
        modseq: u64,
        set: Vec<(u32, u8, u64)>,
        kw: Keywords,
    },
    Expunge {
        mailbox: u32,
        modseq: u64,
        uids: Vec<u32>,
    },
    /// `entries` (new UIDs, `modseq`) into `to`; a move also expunges `uids` from `from`.
    Copy {
        from: u32,
        to: u32,
        modseq: u64,
        entries: Vec<Entry>,
        kw: Keywords,
        moved: bool,
        uids: Vec<u32>,
    },
    /// `replaces`: the `\Noselect` mailbox of that name it takes the place of.
    Create {
        def: MailboxDef,
        replaces: Option<u32>,
    },
    /// New names by id (a mailbox and its children); renaming INBOX instead moves
    /// its entries below `below` into the new mailbox `to`.
    Rename {
        renames: Vec<(u32, Box<str>)>,
        inbox: Option<InboxMove>,
    },
    /// `noselect`: it has children, so it stays as a `\Noselect` name, emptied.
    Delete {
        id: u32,
        noselect: bool,
    },
    Subscribe {
        name: Box<str>,
        on: bool,
    },
    EnsureDefaults {
        defs: Vec<MailboxDef>,
    },
    DropAccount,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InboxMove {
    pub to: MailboxDef,
    pub modseq: u64,
    /// INBOX's UIDNEXT when the rename began: the entries below it move.
    pub below: u32,
}

pub(crate) fn put_entry(out: &mut Vec<u8>, e: &Entry) {
    out.extend_from_slice(&e.uid().to_le_bytes());
    out.extend_from_slice(&e.size().to_le_bytes());
    out.extend_from_slice(&e.internal_date().to_le_bytes());
    out.push(e.flags());
    out.extend_from_slice(&e.keywords().to_le_bytes());
    out.extend_from_slice(&e.modseq().to_le_bytes());
    out.extend_from_slice(&e.message().to_le_bytes());
    out.extend_from_slice(&e.cache().to_le_bytes());
}

pub(crate) fn entry(r: &mut Reader<'_>) -> Result<Entry, &'static str> {
    let uid = r.u32()?;
    let size = r.u32()?;
    let date = r.u64()? as i64;
    let flags = r.u8()?;
    let keywords = r.u64()?;
    let modseq = r.u64()?;
    let message = r.u64()?;
    let cache = r.u64()?;
    if flags & !ALL_FLAGS != 0 {
        return Err("mail record: unknown flag bits");
    }
    if uid == 0 || modseq > MODSEQ_MAX {
        return Err("mail record: UID or MODSEQ out of range");
    }
    Ok(Entry::new(
        uid, size, date, flags, keywords, modseq, message, cache,
    ))
}

fn put_entries(out: &mut Vec<u8>, es: &[Entry]) {
    out.extend_from_slice(&(es.len() as u32).to_le_bytes());
    for e in es {
        put_entry(out, e);
    }
}

/// A count of items each at least `min` bytes long: refused if the rest is shorter,
/// so a damaged count cannot make a decoder reserve gigabytes.
pub(crate) fn count(r: &mut Reader<'_>, left: usize, min: usize) -> Result<usize, &'static str> {
    let n = r.u32()? as usize;
    if n.saturating_mul(min) > left.saturating_sub(r.pos()) {
        return Err("mail record truncated");
    }
    Ok(n)
}

fn entries(r: &mut Reader<'_>, len: usize) -> Result<Vec<Entry>, &'static str> {
    let n = count(r, len, 45)?;
    (0..n).map(|_| entry(r)).collect()
}

fn put_uids(out: &mut Vec<u8>, uids: &[u32]) {
    out.extend_from_slice(&(uids.len() as u32).to_le_bytes());
    for u in uids {
        out.extend_from_slice(&u.to_le_bytes());
    }
}

fn uids(r: &mut Reader<'_>, len: usize) -> Result<Vec<u32>, &'static str> {
    let n = count(r, len, 4)?;
    (0..n).map(|_| r.u32()).collect()
}

pub(crate) fn put_keywords(out: &mut Vec<u8>, kw: &[(u8, Box<str>)]) {
    out.push(kw.len() as u8);
    for (slot, name) in kw {
        out.push(*slot);
        put_bytes(out, name.as_bytes());
    }
}

pub(crate) fn keywords(r: &mut Reader<'_>) -> Result<Keywords, &'static str> {
    let n = r.u8()? as usize;
    if n > KEYWORDS_MAX {
        return Err("mail record: too many keywords");
    }
    (0..n)
        .map(|_| {
            let slot = r.u8()?;
            if slot as usize >= KEYWORDS_MAX {
                return Err("mail record: keyword slot out of range");
            }
            Ok((slot, r.str()?.into()))
        })
        .collect()
}

pub(crate) fn put_def(out: &mut Vec<u8>, d: &MailboxDef) {
    out.extend_from_slice(&d.id.to_le_bytes());
    put_bytes(out, d.name.as_bytes());
    out.push(d.special_use.map_or(0, |s| s as u8));
    out.extend_from_slice(&d.uidvalidity.to_le_bytes());
    out.extend_from_slice(&d.modseq.to_le_bytes());
}

pub(crate) fn def(r: &mut Reader<'_>) -> Result<MailboxDef, &'static str> {
    let id = r.u32()?;
    let name: Box<str> = r.str()?.into();
    let special_use = match r.u8()? {
        0 => None,
        v => Some(SpecialUse::from_u8(v).ok_or("mail record: unknown special use")?),
    };
    let uidvalidity = r.u32()?;
    let modseq = r.u64()?;
    if id == 0 || uidvalidity == 0 || modseq > MODSEQ_MAX {
        return Err("mail record: mailbox id, UIDVALIDITY or MODSEQ out of range");
    }
    if super::normalize_name(&name).ok().as_deref() != Some(&*name) {
        return Err("mail record: bad mailbox name");
    }
    Ok(MailboxDef {
        id,
        name,
        special_use,
        uidvalidity,
        modseq,
    })
}

fn modseq(r: &mut Reader<'_>) -> Result<u64, &'static str> {
    let m = r.u64()?;
    if m == 0 || m > MODSEQ_MAX {
        return Err("mail record: MODSEQ out of range");
    }
    Ok(m)
}

/// Appends the record's payload.
pub(crate) fn encode(rec: &Rec, out: &mut Vec<u8>) {
    let op = match &rec.op {
        Op::Append { .. } => APPEND,
        Op::SetFlags { .. } => SET_FLAGS,
        Op::Expunge { .. } => EXPUNGE,
        Op::Copy { moved: false, .. } => COPY,
        Op::Copy { moved: true, .. } => MOVE,
        Op::Create { .. } => CREATE,
        Op::Rename { .. } => RENAME,
        Op::Delete { .. } => DELETE,
        Op::Subscribe { on: true, .. } => SUBSCRIBE,
        Op::Subscribe { on: false, .. } => UNSUBSCRIBE,
        Op::EnsureDefaults { .. } => ENSURE_DEFAULTS,
        Op::DropAccount => DROP_ACCOUNT,
    };
    out.push(op);
    out.extend_from_slice(&rec.user.to_le_bytes());
    out.extend_from_slice(&rec.inbox_uidvalidity.to_le_bytes());
    match &rec.op {
        Op::Append {
            mailbox,
            entries,
            kw,
        } => {
            out.extend_from_slice(&mailbox.to_le_bytes());
            put_entries(out, entries);
            put_keywords(out, kw);
        }
        Op::SetFlags {
            mailbox,
            modseq,
            set,
            kw,
        } => {
            out.extend_from_slice(&mailbox.to_le_bytes());
            out.extend_from_slice(&modseq.to_le_bytes());
            out.extend_from_slice(&(set.len() as u32).to_le_bytes());
            for (uid, flags, k) in set {
                out.extend_from_slice(&uid.to_le_bytes());
                out.push(*flags);
                out.extend_from_slice(&k.to_le_bytes());
            }
            put_keywords(out, kw);
        }
        Op::Expunge {
            mailbox,
            modseq,
            uids,
        } => {
            out.extend_from_slice(&mailbox.to_le_bytes());
            out.extend_from_slice(&modseq.to_le_bytes());
            put_uids(out, uids);
        }
        Op::Copy {
            from,
            to,
            modseq,
            entries,
            kw,
            moved,
            uids,
        } => {
            out.extend_from_slice(&from.to_le_bytes());
            out.extend_from_slice(&to.to_le_bytes());
            out.extend_from_slice(&modseq.to_le_bytes());
            put_entries(out, entries);
            put_keywords(out, kw);
            if *moved {
                put_uids(out, uids);
            }
        }
        Op::Create { def, replaces } => {
            put_def(out, def);
            out.extend_from_slice(&replaces.unwrap_or(0).to_le_bytes());
        }
        Op::Rename { renames, inbox } => {
            out.extend_from_slice(&(renames.len() as u32).to_le_bytes());
            for (id, name) in renames {
                out.extend_from_slice(&id.to_le_bytes());
                put_bytes(out, name.as_bytes());
            }
            match inbox {
                None => out.push(0),
                Some(m) => {
                    out.push(1);
                    put_def(out, &m.to);
                    out.extend_from_slice(&m.modseq.to_le_bytes());
                    out.extend_from_slice(&m.below.to_le_bytes());
                }
            }
        }
        Op::Delete { id, noselect } => {
            out.extend_from_slice(&id.to_le_bytes());
            out.push(*noselect as u8);
        }
        Op::Subscribe { name, .. } => put_bytes(out, name.as_bytes()),
        Op::EnsureDefaults { defs } => {
            out.push(defs.len() as u8);
            for d in defs {
                put_def(out, d);
            }
        }
        Op::DropAccount => {}
    }
}

/// Decodes a `Kind::Mail` payload; any damage is an error, never a panic.
pub fn decode(payload: &[u8]) -> Result<Rec, &'static str> {
    let len = payload.len();
    let mut r = Reader::new(payload, "mail record truncated");
    let op = r.u8()?;
    let user = r.u64()?;
    let inbox_uidvalidity = r.u32()?;
    if inbox_uidvalidity == 0 {
        return Err("mail record: UIDVALIDITY 0");
    }
    let op = match op {
        APPEND => Op::Append {
            mailbox: r.u32()?,
            entries: entries(&mut r, len)?,
            kw: keywords(&mut r)?,
        },
        SET_FLAGS => {
            let mailbox = r.u32()?;
            let modseq = modseq(&mut r)?;
            let n = count(&mut r, len, 13)?;
            let set = (0..n)
                .map(|_| {
                    let uid = r.u32()?;
                    let flags = r.u8()?;
                    if flags & !ALL_FLAGS != 0 {
                        return Err("mail record: unknown flag bits");
                    }
                    Ok((uid, flags, r.u64()?))
                })
                .collect::<Result<_, _>>()?;
            Op::SetFlags {
                mailbox,
                modseq,
                set,
                kw: keywords(&mut r)?,
            }
        }
        EXPUNGE => Op::Expunge {
            mailbox: r.u32()?,
            modseq: modseq(&mut r)?,
            uids: uids(&mut r, len)?,
        },
        COPY | MOVE => {
            let from = r.u32()?;
            let to = r.u32()?;
            let modseq = modseq(&mut r)?;
            let entries = entries(&mut r, len)?;
            let kw = keywords(&mut r)?;
            let moved = op == MOVE;
            let uids = if moved {
                uids(&mut r, len)?
            } else {
                Vec::new()
            };
            Op::Copy {
                from,
                to,
                modseq,
                entries,
                kw,
                moved,
                uids,
            }
        }
        CREATE => Op::Create {
            def: def(&mut r)?,
            replaces: Some(r.u32()?).filter(|id| *id != 0),
        },
        RENAME => {
            let n = count(&mut r, len, 8)?;
            let renames = (0..n)
                .map(|_| {
                    let id = r.u32()?;
                    let name = r.str()?;
                    if super::normalize_name(name).ok().as_deref() != Some(name) {
                        return Err("mail record: bad mailbox name");
                    }
                    Ok((id, name.into()))
                })
                .collect::<Result<_, _>>()?;
            let inbox = match r.u8()? {
                0 => None,
                1 => Some(InboxMove {
                    to: def(&mut r)?,
                    modseq: modseq(&mut r)?,
                    below: r.u32()?,
                }),
                _ => return Err("bad option tag"),
            };
            Op::Rename { renames, inbox }
        }
        DELETE => Op::Delete {
            id: r.u32()?,
            noselect: match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err("mail record: bad flag"),
            },
        },
        SUBSCRIBE | UNSUBSCRIBE => Op::Subscribe {
            name: r.str()?.into(),
            on: op == SUBSCRIBE,
        },
        ENSURE_DEFAULTS => {
            let n = r.u8()?;
            Op::EnsureDefaults {
                defs: (0..n).map(|_| def(&mut r)).collect::<Result<_, _>>()?,
            }
        }
        DROP_ACCOUNT => Op::DropAccount,
        _ => return Err("mail record: unknown op"),
    };
    if !r.at_end() {
        return Err("mail record: trailing bytes");
    }
    Ok(Rec {
        user,
        inbox_uidvalidity,
        op,
    })
}
