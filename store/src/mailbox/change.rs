//! Changes: `begin_*` checks and reserves, `commit` applies (in the order the changes
//! of a user were begun), `abort` gives up. [`MailIndex::apply`] is the one function
//! that changes the state, for commits and for replay alike.

use super::record::{self, InboxMove, Keywords, Op, Rec};
use super::{
    is_child, normalize_name, Entry, FlagOp, MailError, MailIndex, Mailbox, MailboxDef, NewEntry,
    Notice, NoticeKind, Quota, SpecialUse, Tombstone, Usage, User, ALL_FLAGS, INBOX, INBOX_ID,
    KEYWORDS_MAX, MODSEQ_MAX, TOMBSTONES_MAX,
};

/// A change begun: its record (see [`Change::encode`]) and what it reserved. Commit
/// or abort every change exactly once: the user's later changes wait for it.
#[derive(Debug)]
#[must_use = "a change must be committed or aborted, or the user's later changes wait forever"]
pub struct Change {
    pub(crate) rec: Rec,
    /// Its place in the user's queue; `None`: nothing to do (need not be logged).
    seq: Option<u64>,
    add_refs: Vec<u64>,
    new_uids: Vec<u32>,
    source_uids: Vec<u32>,
    modified: Vec<u32>,
    uidvalidity: u32,
    mailbox: u32,
    modseq: Option<u64>,
    reserved: Usage,
    names: Vec<Box<str>>,
    /// Keys of the user's pending flag states this change set.
    flags_set: Vec<(u32, u32)>,
}

impl Change {
    fn new(rec: Rec) -> Change {
        Change {
            rec,
            seq: None,
            add_refs: Vec::new(),
            new_uids: Vec::new(),
            source_uids: Vec::new(),
            modified: Vec::new(),
            uidvalidity: 0,
            mailbox: 0,
            modseq: None,
            reserved: Usage::default(),
            names: Vec::new(),
            flags_set: Vec::new(),
        }
    }

    /// Writes the `Kind::Mail` record payload. Append it to the log before the next
    /// `begin_*` on the same index (see the module doc).
    pub fn encode(&self, out: &mut Vec<u8>) {
        record::encode(&self.rec, out);
    }

    /// Nothing to change (a STORE that changes no flag, an EXPUNGE of nothing, a
    /// subscription as it is): logging it is harmless but not needed; commit it.
    pub fn is_noop(&self) -> bool {
        self.seq.is_none()
    }

    pub fn user(&self) -> u64 {
        self.rec.user
    }

    /// Message ids the caller must add a reference to now (the copies' entries), and
    /// drop again if it aborts the change.
    pub fn add_refs(&self) -> &[u64] {
        &self.add_refs
    }

    /// UIDs the new entries got (APPENDUID, COPYUID), in the order of
    /// [`Change::source_uids`] for a copy or move.
    pub fn new_uids(&self) -> &[u32] {
        &self.new_uids
    }

    /// The UIDs a copy or move copies, ascending; an expunge's UIDs; a STORE's changed.
    pub fn source_uids(&self) -> &[u32] {
        &self.source_uids
    }

    /// The UIDVALIDITY of the mailbox the new entries went to (or that was created).
    pub fn uidvalidity(&self) -> u32 {
        self.uidvalidity
    }

    /// The mailbox the change is about (the destination of a copy; the new one of a
    /// create or an INBOX rename).
    pub fn mailbox(&self) -> u32 {
        self.mailbox
    }

    /// The mailboxes the change creates: (id, name).
    pub fn created(&self) -> Vec<(u32, &str)> {
        match &self.rec.op {
            Op::Create { def, .. } => vec![(def.id, &*def.name)],
            Op::EnsureDefaults { defs } => defs.iter().map(|d| (d.id, &*d.name)).collect(),
            Op::Rename { inbox: Some(m), .. } => vec![(m.to.id, &*m.to.name)],
            _ => Vec::new(),
        }
    }

    /// The MODSEQ the change's entries get.
    pub fn modseq(&self) -> Option<u64> {
        self.modseq
    }

    /// UIDs an UNCHANGEDSINCE STORE left alone because they changed after it (the
    /// MODIFIED response code, RFC 7162 §3.1.3); the rest were stored.
    pub fn modified(&self) -> &[u32] {
        &self.modified
    }
}

/// What applying changes did.
#[derive(Debug, Default, PartialEq, Eq)]
#[must_use = "drop_refs must be dropped"]
pub struct Committed {
    pub notices: Vec<Notice>,
    /// Message ids whose reference the caller drops now: entries removed (expunge,
    /// move source, delete, account drop), and entries a change could not place
    /// because their mailbox went meanwhile.
    pub drop_refs: Vec<u64>,
}

impl Committed {
    fn extend(&mut self, o: Committed) {
        self.notices.extend(o.notices);
        self.drop_refs.extend(o.drop_refs);
    }
}

#[derive(Debug)]
pub(crate) struct Slot {
    seq: u64,
    ready: Option<Change>,
}

/// UIDVALIDITY for a mailbox made now: above every one the account gave, and at
/// least the time in seconds, so an account re-created under the same address (a new
/// user id) does not give a client's cached UIDs a meaning again.
fn take_uidvalidity(u: &mut User) -> u32 {
    let v = u.next_uidvalidity.max(now_secs()).max(1);
    u.next_uidvalidity = v.saturating_add(1);
    v
}

fn now_secs() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs().min(u32::MAX as u64) as u32)
}

fn take_modseq(u: &mut User) -> Result<u64, MailError> {
    if u.modseq >= MODSEQ_MAX {
        return Err(MailError::Exhausted);
    }
    u.modseq += 1;
    Ok(u.modseq)
}

/// An IMAP flag-keyword atom (RFC 3501 `flag-keyword`): no specials, no `\`.
fn valid_keyword(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 255
        && k.bytes()
            .all(|b| b > b' ' && b < 0x7f && !br#"(){%*"\]"#.contains(&b))
}

/// Bits for `names` in `mb`'s table, adding the ones it lacks (a reservation: slots
/// are never given back). All or nothing.
fn intern(mb: &mut Mailbox, names: &[impl AsRef<str>]) -> Result<u64, MailError> {
    let mut missing: Vec<&str> = Vec::new();
    for n in names {
        let n = n.as_ref();
        if !valid_keyword(n) {
            return Err(MailError::BadKeyword);
        }
        if mb.keyword_bit(n).is_none() && !missing.iter().any(|m| m.eq_ignore_ascii_case(n)) {
            missing.push(n);
        }
    }
    if mb.keywords.len() + missing.len() > KEYWORDS_MAX {
        return Err(MailError::TooManyKeywords);
    }
    mb.keywords.extend(missing.into_iter().map(Box::from));
    Ok(names
        .iter()
        .map(|n| mb.keyword_bit(n.as_ref()).unwrap())
        .fold(0, |a, b| a | b))
}

/// The `(slot, name)` pairs of `bits` in `mb`'s table, for a record.
fn keywords_of(mb: &Mailbox, bits: u64) -> Keywords {
    (0..mb.keywords.len())
        .filter(|i| bits & (1 << i) != 0)
        .map(|i| (i as u8, mb.keywords[i].clone()))
        .collect()
}

/// Puts a record's keyword slots into the table.
fn set_keywords(mb: &mut Mailbox, kw: &Keywords) {
    for (slot, name) in kw {
        let slot = *slot as usize;
        if mb.keywords.len() <= slot {
            mb.keywords.resize(slot + 1, Box::from(""));
        }
        mb.keywords[slot] = name.clone();
    }
}

/// Inserts (or, at replay over a newer snapshot, replaces) an entry by UID.
pub(crate) fn insert_entry(mb: &mut Mailbox, usage: &mut Usage, e: Entry) {
    match mb.position(e.uid) {
        Ok(i) => {
            usage.bytes = usage.bytes - mb.entries[i].size as u64 + e.size as u64;
            mb.entries[i] = e;
        }
        Err(i) => {
            mb.entries.insert(i, e);
            usage.bytes += e.size as u64;
            usage.messages += 1;
        }
    }
    mb.uidnext = mb.uidnext.max(e.uid.saturating_add(1));
    mb.highestmodseq = mb.highestmodseq.max(e.modseq());
}

/// Removes the entries `uids` (those present) and keeps their tombstones; returns the
/// UIDs removed.
fn expunge(
    mb: &mut Mailbox,
    usage: &mut Usage,
    uids: &[u32],
    modseq: u64,
    drop_refs: &mut Vec<u64>,
) -> Vec<u32> {
    let mut uids = uids.to_vec();
    uids.sort_unstable();
    uids.dedup();
    let uids = &uids[..];
    let mut gone = Vec::new();
    mb.entries.retain(|e| {
        let hit = uids.binary_search(&e.uid).is_ok();
        if hit {
            usage.bytes -= e.size as u64;
            usage.messages -= 1;
            drop_refs.push(e.message);
            gone.push(e.uid);
        }
        !hit
    });
    mb.highestmodseq = mb.highestmodseq.max(modseq);
    add_tombstones(mb, uids, modseq);
    gone
}

/// Tombstones for the expunge of `uids` (sorted) at `modseq`: runs of UIDs with no
/// entry left between them make one range. Kept once per MODSEQ (replay over a
/// snapshot that holds them adds nothing), and never below the vanished floor.
fn add_tombstones(mb: &mut Mailbox, uids: &[u32], modseq: u64) {
    if uids.is_empty() || modseq <= mb.vanished_floor {
        return;
    }
    let at = mb.tombstones.partition_point(|t| t.modseq < modseq);
    if mb.tombstones.get(at).is_some_and(|t| t.modseq == modseq) {
        return;
    }
    let mut ranges: Vec<Tombstone> = Vec::new();
    for &u in uids {
        match ranges.last_mut() {
            Some(t)
                if {
                    let next = mb.entries.partition_point(|e| e.uid <= t.hi);
                    mb.entries.get(next).is_none_or(|e| e.uid > u)
                } =>
            {
                t.hi = u
            }
            _ => ranges.push(Tombstone {
                lo: u,
                hi: u,
                modseq,
            }),
        }
    }
    mb.tombstones.splice(at..at, ranges);
    if mb.tombstones.len() > TOMBSTONES_MAX {
        // A tenth more than needed, so that folding is not paid on every expunge.
        let cut = mb.tombstones.len() - TOMBSTONES_MAX + TOMBSTONES_MAX / 10;
        mb.vanished_floor = mb.vanished_floor.max(mb.tombstones[cut - 1].modseq);
        mb.tombstones.drain(..cut);
    }
}

impl MailIndex {
    /// The user, made (with INBOX) when absent; refused while its drop is in flight.
    fn user_or_new(&mut self, user: u64) -> Result<&mut User, MailError> {
        let u = self
            .users
            .entry(user)
            .or_insert_with(|| User::new(now_secs().max(1)));
        if u.dropping {
            return Err(MailError::NoSuchUser);
        }
        Ok(u)
    }

    fn user_mut(&mut self, user: u64) -> Result<&mut User, MailError> {
        match self.users.get_mut(&user) {
            Some(u) if !u.dropping => Ok(u),
            _ => Err(MailError::NoSuchUser),
        }
    }

    /// Queues a change that does something (its place in the user's order).
    fn enqueue(&mut self, mut c: Change) -> Change {
        let seq = self.next_change;
        self.next_change += 1;
        c.seq = Some(seq);
        self.inflight
            .entry(c.rec.user)
            .or_default()
            .push_back(Slot { seq, ready: None });
        c
    }

    /// Queues `c` as taking `modseq` for the entries `source_uids`; one that touches no
    /// entry is a no-op, handed back unqueued and without a MODSEQ.
    fn enqueue_touching(&mut self, mut c: Change, source_uids: Vec<u32>, modseq: u64) -> Change {
        if source_uids.is_empty() {
            return c;
        }
        c.source_uids = source_uids;
        c.modseq = Some(modseq);
        self.enqueue(c)
    }

    fn rec(&self, user: u64, op: Op) -> Rec {
        Rec {
            user,
            inbox_uidvalidity: self.users.get(&user).map_or(1, |u| u.inbox_uidvalidity()),
            op,
        }
    }

    /// Appends a message to mailbox `mailbox` (a delivery: INBOX), creating the user
    /// and its INBOX when absent. The caller already holds the entry's reference; on
    /// abort it keeps (and drops) it.
    pub fn begin_append(
        &mut self,
        user: u64,
        mailbox: &str,
        new: NewEntry,
        quota: Quota,
    ) -> Result<Change, MailError> {
        let fresh = !self.users.contains_key(&user);
        let r = self.append(user, mailbox, new, quota);
        self.forget_if_fresh(user, fresh, r)
    }

    /// A user made by a `begin_*` that then failed (or has nothing to log) is not kept:
    /// no record would make it again after a restart.
    fn forget_if_fresh(
        &mut self,
        user: u64,
        fresh: bool,
        r: Result<Change, MailError>,
    ) -> Result<Change, MailError> {
        if fresh && r.as_ref().map_or(true, |c| c.is_noop()) {
            self.users.remove(&user);
        }
        r
    }

    fn append(
        &mut self,
        user: u64,
        mailbox: &str,
        new: NewEntry,
        quota: Quota,
    ) -> Result<Change, MailError> {
        let name = normalize_name(mailbox)?;
        let u = self.user_or_new(user)?;
        let over = |used: u64, reserved: u64, add: u64, limit: u64| {
            limit > 0 && used + reserved + add > limit
        };
        if over(
            u.usage.bytes,
            u.reserved.bytes,
            new.size as u64,
            quota.bytes,
        ) || over(u.usage.messages, u.reserved.messages, 1, quota.messages)
        {
            return Err(MailError::OverQuota);
        }
        let modseq_next = u.modseq.checked_add(1).filter(|m| *m <= MODSEQ_MAX);
        let i = u
            .mailboxes
            .iter()
            .position(|m| *m.name == *name)
            .ok_or(MailError::NoSuchMailbox)?;
        let mb = &mut u.mailboxes[i];
        if mb.noselect {
            return Err(MailError::NoSelect);
        }
        if mb.uidnext == u32::MAX || modseq_next.is_none() {
            return Err(MailError::Exhausted);
        }
        let bits = intern(mb, &new.keywords)?;
        let uid = mb.uidnext;
        mb.uidnext += 1;
        let (id, uidvalidity) = (mb.id, mb.uidvalidity);
        let kw = keywords_of(mb, bits);
        let modseq = take_modseq(u)?;
        u.reserved.bytes += new.size as u64;
        u.reserved.messages += 1;
        let e = Entry::new(
            uid,
            new.size,
            new.internal_date,
            new.flags & ALL_FLAGS,
            bits,
            modseq,
            new.message,
            new.cache,
        );
        let mut c = Change::new(self.rec(
            user,
            Op::Append {
                mailbox: id,
                entries: vec![e],
                kw,
            },
        ));
        c.new_uids = vec![uid];
        c.uidvalidity = uidvalidity;
        c.mailbox = id;
        c.modseq = Some(modseq);
        c.reserved = Usage {
            bytes: new.size as u64,
            messages: 1,
        };
        Ok(self.enqueue(c))
    }

    /// STORE: flags and keywords of the entries `uids` (absent ones are skipped). With
    /// `unchanged_since`, entries changed after it are left alone and listed in
    /// [`Change::modified`]. An entry a change in flight sets is judged by the state
    /// that change gives it.
    #[allow(clippy::too_many_arguments)]
    pub fn begin_set_flags(
        &mut self,
        user: u64,
        mailbox_id: u32,
        uids: &[u32],
        op: FlagOp,
        flags: u8,
        keywords: &[String],
        unchanged_since: Option<u64>,
    ) -> Result<Change, MailError> {
        let u = self.user_mut(user)?;
        let i = u
            .mailboxes
            .binary_search_by_key(&mailbox_id, |m| m.id)
            .map_err(|_| MailError::NoSuchMailbox)?;
        let mb = &mut u.mailboxes[i];
        if mb.noselect {
            return Err(MailError::NoSelect);
        }
        let bits = match op {
            FlagOp::Remove => keywords
                .iter()
                .filter_map(|k| mb.keyword_bit(k))
                .fold(0, |a, b| a | b),
            FlagOp::Add | FlagOp::Replace => intern(mb, keywords)?,
        };
        let flags = flags & ALL_FLAGS;
        let mut want: Vec<u32> = uids.to_vec();
        want.sort_unstable();
        want.dedup();
        let (mut set, mut modified) = (Vec::new(), Vec::new());
        let mut used_bits = 0u64;
        for uid in want {
            let Some(e) = mb.entry(uid) else { continue };
            let (m, f, k) = u.pending_flags.get(&(mailbox_id, uid)).copied().unwrap_or((
                e.modseq(),
                e.flags(),
                e.keywords(),
            ));
            if unchanged_since.is_some_and(|since| m > since) {
                modified.push(uid);
                continue;
            }
            let (nf, nk) = match op {
                FlagOp::Replace => (flags, bits),
                FlagOp::Add => (f | flags, k | bits),
                FlagOp::Remove => (f & !flags, k & !bits),
            };
            if (nf, nk) != (f, k) {
                used_bits |= nk;
                set.push((uid, nf, nk));
            }
        }
        let kw = keywords_of(mb, used_bits);
        let uidvalidity = mb.uidvalidity;
        // A change that sets nothing keeps the current MODSEQ.
        let modseq = if set.is_empty() {
            u.modseq
        } else {
            take_modseq(u)?
        };
        for &(uid, f, k) in &set {
            u.pending_flags.insert((mailbox_id, uid), (modseq, f, k));
        }
        let flags_set: Vec<(u32, u32)> = set.iter().map(|s| (mailbox_id, s.0)).collect();
        let source_uids = set.iter().map(|s| s.0).collect();
        let mut c = Change::new(self.rec(
            user,
            Op::SetFlags {
                mailbox: mailbox_id,
                modseq,
                set,
                kw,
            },
        ));
        c.modified = modified;
        c.mailbox = mailbox_id;
        c.uidvalidity = uidvalidity;
        c.flags_set = flags_set;
        Ok(self.enqueue_touching(c, source_uids, modseq))
    }

    /// EXPUNGE (or UID EXPUNGE) of the entries `uids` that are present.
    pub fn begin_expunge(
        &mut self,
        user: u64,
        mailbox_id: u32,
        uids: &[u32],
    ) -> Result<Change, MailError> {
        let u = self.user_mut(user)?;
        let mb = u.by_id(mailbox_id).ok_or(MailError::NoSuchMailbox)?;
        if mb.noselect {
            return Err(MailError::NoSelect);
        }
        let mut present: Vec<u32> = uids
            .iter()
            .copied()
            .filter(|uid| mb.entry(*uid).is_some())
            .collect();
        present.sort_unstable();
        present.dedup();
        let uidvalidity = mb.uidvalidity;
        let modseq = if present.is_empty() {
            u.modseq
        } else {
            take_modseq(u)?
        };
        let mut c = Change::new(self.rec(
            user,
            Op::Expunge {
                mailbox: mailbox_id,
                modseq,
                uids: present.clone(),
            },
        ));
        c.mailbox = mailbox_id;
        c.uidvalidity = uidvalidity;
        Ok(self.enqueue_touching(c, present, modseq))
    }

    /// COPY of the entries `uids` (those present) from `from_id` into `to_id`.
    pub fn begin_copy(
        &mut self,
        user: u64,
        from_id: u32,
        uids: &[u32],
        to_id: u32,
    ) -> Result<Change, MailError> {
        self.begin_copy_or_move(user, from_id, uids, to_id, false)
    }

    /// MOVE (RFC 6851): a copy and the expunge of its sources in one change.
    pub fn begin_move(
        &mut self,
        user: u64,
        from_id: u32,
        uids: &[u32],
        to_id: u32,
    ) -> Result<Change, MailError> {
        self.begin_copy_or_move(user, from_id, uids, to_id, true)
    }

    fn begin_copy_or_move(
        &mut self,
        user: u64,
        from_id: u32,
        uids: &[u32],
        to_id: u32,
        moved: bool,
    ) -> Result<Change, MailError> {
        let u = self.user_mut(user)?;
        let from = u.by_id(from_id).ok_or(MailError::NoSuchMailbox)?;
        let to = u.by_id(to_id).ok_or(MailError::NoSuchMailbox)?;
        if from.noselect || to.noselect {
            return Err(MailError::NoSelect);
        }
        let mut want: Vec<u32> = uids.to_vec();
        want.sort_unstable();
        want.dedup();
        // The sources as the changes in flight leave them, keywords by name.
        let mut sources: Vec<(Entry, u8, Vec<&str>)> = Vec::new();
        for uid in want {
            let Some(e) = from.entry(uid) else { continue };
            let (_, f, k) = u.pending_flags.get(&(from_id, uid)).copied().unwrap_or((
                e.modseq(),
                e.flags(),
                e.keywords(),
            ));
            let names = (0..from.keywords.len())
                .filter(|i| k & (1 << i) != 0)
                .map(|i| &*from.keywords[i])
                .collect();
            sources.push((*e, f, names));
        }
        let to_uidvalidity = to.uidvalidity;
        if sources.is_empty() {
            let modseq = u.modseq;
            let mut c = Change::new(self.rec(
                user,
                Op::Copy {
                    from: from_id,
                    to: to_id,
                    modseq,
                    entries: Vec::new(),
                    kw: Vec::new(),
                    moved,
                    uids: Vec::new(),
                },
            ));
            c.mailbox = to_id;
            c.uidvalidity = to_uidvalidity;
            return Ok(c);
        }
        let to = u.by_id(to_id).unwrap();
        if to.uidnext as u64 + sources.len() as u64 > u32::MAX as u64 || u.modseq >= MODSEQ_MAX {
            return Err(MailError::Exhausted);
        }
        // Every keyword the copies need, interned into the destination at once.
        let mut all: Vec<Box<str>> = Vec::new();
        for (_, _, names) in &sources {
            for n in names {
                if !all.iter().any(|a| a.eq_ignore_ascii_case(n)) {
                    all.push((*n).into());
                }
            }
        }
        let sources: Vec<(Entry, u8, Vec<Box<str>>)> = sources
            .into_iter()
            .map(|(e, f, n)| (e, f, n.into_iter().map(Box::from).collect()))
            .collect();
        let modseq = u.modseq + 1;
        let to = u.by_id_mut(to_id).unwrap();
        intern(to, &all)?;
        let mut entries = Vec::with_capacity(sources.len());
        let mut used = 0u64;
        for (e, f, names) in &sources {
            let bits = names
                .iter()
                .map(|n| to.keyword_bit(n).unwrap())
                .fold(0, |a, b| a | b);
            used |= bits;
            entries.push(Entry::new(
                to.uidnext,
                e.size(),
                e.internal_date(),
                *f,
                bits,
                modseq,
                e.message(),
                e.cache(),
            ));
            to.uidnext += 1;
        }
        let kw = keywords_of(to, used);
        u.modseq = modseq;
        let added = Usage {
            bytes: entries.iter().map(|e| e.size() as u64).sum(),
            messages: entries.len() as u64,
        };
        if !moved {
            u.reserved.bytes += added.bytes;
            u.reserved.messages += added.messages;
        }
        let source_uids: Vec<u32> = sources.iter().map(|s| s.0.uid()).collect();
        let mut c = Change::new(self.rec(
            user,
            Op::Copy {
                from: from_id,
                to: to_id,
                modseq,
                entries: entries.clone(),
                kw,
                moved,
                uids: if moved {
                    source_uids.clone()
                } else {
                    Vec::new()
                },
            },
        ));
        c.add_refs = entries.iter().map(|e| e.message()).collect();
        c.new_uids = entries.iter().map(|e| e.uid()).collect();
        c.source_uids = source_uids;
        c.uidvalidity = to_uidvalidity;
        c.mailbox = to_id;
        c.modseq = Some(modseq);
        if !moved {
            c.reserved = added;
        }
        Ok(self.enqueue(c))
    }

    /// Whether `name` is taken or being taken; a `\Noselect` name counts only with
    /// `noselect_too` (CREATE replaces one, RENAME does not).
    fn name_taken(u: &User, name: &str, noselect_too: bool) -> bool {
        u.by_name(name).is_some_and(|m| noselect_too || !m.noselect)
            || u.pending_names.iter().any(|n| **n == *name)
    }

    /// CREATE. A `\Noselect` mailbox of that name (one deleted while it had children)
    /// is replaced by a new one. Superior names are not created: LIST shows a missing
    /// parent as `\NonExistent`.
    pub fn begin_create(
        &mut self,
        user: u64,
        name: &str,
        special_use: Option<SpecialUse>,
    ) -> Result<Change, MailError> {
        let fresh = !self.users.contains_key(&user);
        let r = self.create_mailbox(user, name, special_use);
        self.forget_if_fresh(user, fresh, r)
    }

    fn create_mailbox(
        &mut self,
        user: u64,
        name: &str,
        special_use: Option<SpecialUse>,
    ) -> Result<Change, MailError> {
        let name = normalize_name(name)?;
        let u = self.user_or_new(user)?;
        if name == INBOX || Self::name_taken(u, &name, false) {
            return Err(MailError::Exists);
        }
        if u.next_mailbox == u32::MAX {
            return Err(MailError::Exhausted);
        }
        let replaces = u.by_name(&name).map(|m| m.id);
        let id = u.next_mailbox;
        u.next_mailbox += 1;
        let def = MailboxDef {
            id,
            name: name.as_str().into(),
            special_use,
            uidvalidity: take_uidvalidity(u),
            modseq: u.modseq,
        };
        u.pending_names.push(def.name.clone());
        let uidvalidity = def.uidvalidity;
        let mut c = Change::new(self.rec(user, Op::Create { def, replaces }));
        c.names = vec![name.into()];
        c.mailbox = id;
        c.uidvalidity = uidvalidity;
        Ok(self.enqueue(c))
    }

    /// RENAME (RFC 3501 6.3.5): the mailbox and its children get the new names.
    /// Renaming INBOX moves its entries to a new mailbox of that name and leaves INBOX
    /// there, empty, with its children; superior names are not created.
    pub fn begin_rename(&mut self, user: u64, old: &str, new: &str) -> Result<Change, MailError> {
        let old = normalize_name(old)?;
        let new = normalize_name(new)?;
        let u = self.user_mut(user)?;
        let src = u.by_name(&old).ok_or(MailError::NoSuchMailbox)?;
        if new == INBOX || Self::name_taken(u, &new, true) {
            return Err(MailError::Exists);
        }
        if old == INBOX {
            if u.next_mailbox == u32::MAX || u.modseq >= MODSEQ_MAX {
                return Err(MailError::Exhausted);
            }
            let below = src.uidnext;
            let id = u.next_mailbox;
            u.next_mailbox += 1;
            let modseq = take_modseq(u)?;
            let to = MailboxDef {
                id,
                name: new.as_str().into(),
                special_use: None,
                uidvalidity: take_uidvalidity(u),
                modseq,
            };
            let uidvalidity = to.uidvalidity;
            u.pending_names.push(to.name.clone());
            let mut c = Change::new(self.rec(
                user,
                Op::Rename {
                    renames: Vec::new(),
                    inbox: Some(InboxMove { to, modseq, below }),
                },
            ));
            c.names = vec![new.into()];
            c.mailbox = id;
            c.uidvalidity = uidvalidity;
            c.modseq = Some(modseq);
            return Ok(self.enqueue(c));
        }
        if is_child(&new, &old) {
            return Err(MailError::BadName(
                "a mailbox cannot be renamed into itself",
            ));
        }
        let mut renames: Vec<(u32, Box<str>)> = vec![(src.id, new.as_str().into())];
        for m in &u.mailboxes {
            if is_child(&m.name, &old) {
                let to = format!("{new}{}", &m.name[old.len()..]);
                if to.len() > super::NAME_BYTES_MAX {
                    return Err(MailError::BadName("longer than 255 bytes"));
                }
                if Self::name_taken(u, &to, true) {
                    return Err(MailError::Exists);
                }
                renames.push((m.id, to.into()));
            }
        }
        let names: Vec<Box<str>> = renames.iter().map(|r| r.1.clone()).collect();
        u.pending_names.extend(names.iter().cloned());
        let id = renames[0].0;
        let mut c = Change::new(self.rec(
            user,
            Op::Rename {
                renames,
                inbox: None,
            },
        ));
        c.names = names;
        c.mailbox = id;
        Ok(self.enqueue(c))
    }

    /// DELETE (RFC 3501 6.3.4). A mailbox with children is emptied and kept as a
    /// `\Noselect` name (so the children stay reachable); deleting a `\Noselect` one
    /// that still has children is refused; one without children goes. INBOX cannot be
    /// deleted. Subscriptions stay (RFC 3501 6.3.9).
    pub fn begin_delete(&mut self, user: u64, name: &str) -> Result<Change, MailError> {
        let name = normalize_name(name)?;
        if name == INBOX {
            return Err(MailError::Inbox);
        }
        let u = self.user_mut(user)?;
        let mb = u.by_name(&name).ok_or(MailError::NoSuchMailbox)?;
        let children = u.mailboxes.iter().any(|m| is_child(&m.name, &name));
        if children && mb.noselect {
            return Err(MailError::HasChildren);
        }
        let id = mb.id;
        let mut c = Change::new(self.rec(
            user,
            Op::Delete {
                id,
                noselect: children,
            },
        ));
        c.mailbox = id;
        Ok(self.enqueue(c))
    }

    /// SUBSCRIBE / UNSUBSCRIBE: the name need not exist (RFC 3501 6.3.6).
    pub fn begin_subscribe(
        &mut self,
        user: u64,
        name: &str,
        on: bool,
    ) -> Result<Change, MailError> {
        let fresh = !self.users.contains_key(&user);
        let r = self.subscribe(user, name, on);
        self.forget_if_fresh(user, fresh, r)
    }

    fn subscribe(&mut self, user: u64, name: &str, on: bool) -> Result<Change, MailError> {
        let name = normalize_name(name)?;
        let u = self.user_or_new(user)?;
        let has = u
            .subscriptions
            .binary_search_by(|s| (**s).cmp(&name))
            .is_ok();
        let c = Change::new(self.rec(
            user,
            Op::Subscribe {
                name: name.into(),
                on,
            },
        ));
        Ok(if has == on { c } else { self.enqueue(c) })
    }

    /// Creates what a first login needs: INBOX (with the account) and each of the five
    /// special-use mailboxes no mailbox has the attribute of, under its default name
    /// unless that name is taken. `None`: nothing to do.
    pub fn begin_ensure_defaults(&mut self, user: u64) -> Result<Option<Change>, MailError> {
        let fresh = !self.users.contains_key(&user);
        let u = self.user_or_new(user)?;
        let mut defs = Vec::new();
        for s in SpecialUse::ALL {
            if u.mailboxes.iter().any(|m| m.special_use == Some(s))
                || Self::name_taken(u, s.default_name(), true)
                || u.next_mailbox == u32::MAX
            {
                continue;
            }
            let id = u.next_mailbox;
            u.next_mailbox += 1;
            defs.push(MailboxDef {
                id,
                name: s.default_name().into(),
                special_use: Some(s),
                uidvalidity: take_uidvalidity(u),
                modseq: u.modseq,
            });
        }
        if defs.is_empty() && !fresh {
            return Ok(None);
        }
        let names: Vec<Box<str>> = defs.iter().map(|d| d.name.clone()).collect();
        u.pending_names.extend(names.iter().cloned());
        let mut c = Change::new(self.rec(user, Op::EnsureDefaults { defs }));
        c.names = names;
        Ok(Some(self.enqueue(c)))
    }

    /// Removes the account's data (the account is gone from the directory). No change
    /// of the user may begin while it is in flight.
    pub fn begin_drop_account(&mut self, user: u64) -> Result<Change, MailError> {
        let u = self.user_mut(user)?;
        u.dropping = true;
        let c = Change::new(self.rec(user, Op::DropAccount));
        Ok(self.enqueue(c))
    }

    /// Applies a change whose record is durable, once the user's changes begun before
    /// it are applied or aborted (then with them: what they did is in the result too).
    pub fn commit(&mut self, c: Change) -> Committed {
        let Some(seq) = c.seq else {
            return Committed::default();
        };
        let user = c.rec.user;
        match self.slot(user, seq) {
            Some(i) => self.inflight.get_mut(&user).unwrap()[i].ready = Some(c),
            None => {
                debug_assert!(false, "commit of a change not in flight");
                return Committed::default();
            }
        }
        self.drain(user)
    }

    /// Gives up a change whose record failed: its UIDs, MODSEQ and keyword slots are
    /// burnt, nothing is applied. Returns what changes it held back did.
    pub fn abort(&mut self, c: Change) -> Committed {
        let Some(seq) = c.seq else {
            return Committed::default();
        };
        let user = c.rec.user;
        if let Some(i) = self.slot(user, seq) {
            self.inflight.get_mut(&user).unwrap().remove(i);
        }
        self.release(&c);
        if let (Op::DropAccount, Some(u)) = (&c.rec.op, self.users.get_mut(&user)) {
            u.dropping = false;
        }
        self.drain(user)
    }

    fn slot(&self, user: u64, seq: u64) -> Option<usize> {
        self.inflight.get(&user)?.iter().position(|s| s.seq == seq)
    }

    /// Applies the user's committed changes that no earlier change holds back.
    fn drain(&mut self, user: u64) -> Committed {
        let mut out = Committed::default();
        while let Some(q) = self.inflight.get_mut(&user) {
            if q.front().is_none_or(|s| s.ready.is_none()) {
                if q.is_empty() {
                    self.inflight.remove(&user);
                }
                break;
            }
            let c = q.pop_front().unwrap().ready.unwrap();
            self.release(&c);
            out.extend(self.apply(&c.rec));
        }
        out
    }

    /// Gives back what a change reserved (it is applied or aborted).
    fn release(&mut self, c: &Change) {
        let Some(u) = self.users.get_mut(&c.rec.user) else {
            return;
        };
        u.reserved.bytes -= c.reserved.bytes;
        u.reserved.messages -= c.reserved.messages;
        for n in &c.names {
            if let Some(i) = u.pending_names.iter().position(|p| p == n) {
                u.pending_names.swap_remove(i);
            }
        }
        if let Some(m) = c.modseq {
            for k in &c.flags_set {
                if u.pending_flags.get(k).is_some_and(|p| p.0 == m) {
                    u.pending_flags.remove(k);
                }
            }
        }
    }

    /// Applies one record: at commit and at replay, the same way. Total (a record that
    /// names what is not there changes what is), so that replay over a snapshot newer
    /// than the record converges to the state the records after it give.
    pub(crate) fn apply(&mut self, rec: &Rec) -> Committed {
        let mut out = Committed::default();
        let user_id = rec.user;
        let note = |out: &mut Committed, mailbox: u32, kind: NoticeKind| {
            out.notices.push(Notice {
                user: user_id,
                mailbox,
                kind,
            })
        };
        if let Op::DropAccount = rec.op {
            if let Some(u) = self.users.remove(&user_id) {
                for m in u.mailboxes {
                    out.drop_refs.extend(m.entries.iter().map(|e| e.message));
                }
                note(&mut out, 0, NoticeKind::AccountDropped);
            }
            return out;
        }
        let u = self
            .users
            .entry(user_id)
            .or_insert_with(|| User::new(rec.inbox_uidvalidity));
        match &rec.op {
            Op::Append {
                mailbox,
                entries,
                kw,
            } => {
                let Some(i) = selectable(&u.mailboxes, *mailbox) else {
                    out.drop_refs.extend(entries.iter().map(|e| e.message));
                    return out;
                };
                let mb = &mut u.mailboxes[i];
                set_keywords(mb, kw);
                for e in entries {
                    insert_entry(mb, &mut u.usage, *e);
                    u.modseq = u.modseq.max(e.modseq());
                    note(&mut out, *mailbox, NoticeKind::Appended { uid: e.uid });
                }
            }
            Op::SetFlags {
                mailbox,
                modseq,
                set,
                kw,
            } => {
                u.modseq = u.modseq.max(*modseq);
                let Some(i) = selectable(&u.mailboxes, *mailbox) else {
                    return out;
                };
                let mb = &mut u.mailboxes[i];
                set_keywords(mb, kw);
                if !set.is_empty() {
                    mb.highestmodseq = mb.highestmodseq.max(*modseq);
                }
                for &(uid, flags, keywords) in set {
                    if let Ok(p) = mb.position(uid) {
                        mb.entries[p].set_state(flags, keywords, *modseq);
                        let modseq = *modseq;
                        note(&mut out, *mailbox, NoticeKind::FlagsChanged { uid, modseq });
                    }
                }
            }
            Op::Expunge {
                mailbox,
                modseq,
                uids,
            } => {
                u.modseq = u.modseq.max(*modseq);
                if let Some(i) = selectable(&u.mailboxes, *mailbox) {
                    let mb = &mut u.mailboxes[i];
                    let gone = expunge(mb, &mut u.usage, uids, *modseq, &mut out.drop_refs);
                    if !gone.is_empty() {
                        note(&mut out, *mailbox, NoticeKind::Expunged { uids: gone });
                    }
                }
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
                u.modseq = u.modseq.max(*modseq);
                let Some(i) = selectable(&u.mailboxes, *to) else {
                    // The destination went meanwhile: nothing is copied, nor moved.
                    out.drop_refs.extend(entries.iter().map(|e| e.message));
                    return out;
                };
                let mb = &mut u.mailboxes[i];
                set_keywords(mb, kw);
                if !entries.is_empty() {
                    mb.highestmodseq = mb.highestmodseq.max(*modseq);
                }
                for e in entries {
                    insert_entry(mb, &mut u.usage, *e);
                    note(&mut out, *to, NoticeKind::Appended { uid: e.uid });
                }
                if let Some(j) = selectable(&u.mailboxes, *from).filter(|_| *moved) {
                    let mb = &mut u.mailboxes[j];
                    let gone = expunge(mb, &mut u.usage, uids, *modseq, &mut out.drop_refs);
                    if !gone.is_empty() {
                        note(&mut out, *from, NoticeKind::Expunged { uids: gone });
                    }
                }
            }
            Op::Create { def, replaces } => {
                if let Some(old) = replaces.filter(|old| *old != def.id) {
                    if let Ok(j) = u.mailboxes.binary_search_by_key(&old, |m| m.id) {
                        if u.mailboxes[j].noselect {
                            u.mailboxes.remove(j);
                        }
                    }
                }
                create(u, def);
                note(&mut out, def.id, NoticeKind::MailboxCreated);
            }
            Op::EnsureDefaults { defs } => {
                for def in defs {
                    create(u, def);
                    note(&mut out, def.id, NoticeKind::MailboxCreated);
                }
            }
            Op::Rename { renames, inbox } => {
                for (id, name) in renames {
                    if let Some(m) = u.by_id_mut(*id).filter(|_| *id != INBOX_ID) {
                        m.name = name.clone();
                        let name = name.to_string();
                        note(&mut out, *id, NoticeKind::MailboxRenamed { name });
                    }
                }
                if let Some(m) = inbox {
                    u.modseq = u.modseq.max(m.modseq);
                    let Some(inbox) = u.by_id_mut(INBOX_ID) else {
                        return out;
                    };
                    let k = inbox.entries.partition_point(|e| e.uid < m.below);
                    let rest = inbox.entries.split_off(k);
                    let taken = std::mem::replace(&mut inbox.entries, rest);
                    let table = inbox.keywords.clone();
                    inbox.highestmodseq = inbox.highestmodseq.max(m.modseq);
                    // Every UID below `below` is gone from INBOX now, and never comes
                    // back: also one an aborted append burned, which no record tells
                    // a replay of.
                    inbox.uidnext = inbox.uidnext.max(m.below);
                    if m.below > 1 {
                        let first = taken.first().map_or(1, |e| e.uid);
                        add_tombstones(inbox, &[first, m.below - 1], m.modseq);
                    }
                    let uids: Vec<u32> = taken.iter().map(|e| e.uid).collect();
                    let created = u.by_id(m.to.id).is_none();
                    create(u, &m.to);
                    let i = u
                        .mailboxes
                        .binary_search_by_key(&m.to.id, |x| x.id)
                        .expect("just created");
                    let to = &mut u.mailboxes[i];
                    if to.keywords.len() < table.len() {
                        to.keywords = table;
                    }
                    to.uidnext = to.uidnext.max(m.below);
                    for e in taken {
                        // Moved within the account: out of the usage, and back in.
                        u.usage.bytes -= e.size as u64;
                        u.usage.messages -= 1;
                        insert_entry(to, &mut u.usage, e);
                    }
                    if !uids.is_empty() {
                        note(&mut out, INBOX_ID, NoticeKind::Expunged { uids });
                    }
                    if created {
                        note(&mut out, m.to.id, NoticeKind::MailboxCreated);
                    }
                }
            }
            Op::Delete { id, noselect } => {
                let Ok(j) = u.mailboxes.binary_search_by_key(id, |m| m.id) else {
                    return out;
                };
                if *id == INBOX_ID {
                    return out;
                }
                let entries = if *noselect {
                    let mb = &mut u.mailboxes[j];
                    mb.noselect = true;
                    mb.special_use = None;
                    mb.keywords = Vec::new();
                    mb.tombstones = Vec::new();
                    std::mem::take(&mut mb.entries)
                } else {
                    u.mailboxes.remove(j).entries
                };
                for e in &entries {
                    u.usage.bytes -= e.size as u64;
                    u.usage.messages -= 1;
                    out.drop_refs.push(e.message);
                }
                note(&mut out, *id, NoticeKind::MailboxDeleted);
            }
            Op::Subscribe { name, on } => {
                let subs = &mut u.subscriptions;
                match (subs.binary_search(name), on) {
                    (Err(i), true) => subs.insert(i, name.clone()),
                    (Ok(i), false) => {
                        subs.remove(i);
                    }
                    _ => {}
                }
                let (name, on) = (name.to_string(), *on);
                note(&mut out, 0, NoticeKind::Subscribed { name, on });
            }
            Op::DropAccount => unreachable!("handled above"),
        }
        out
    }
}

/// The index of selectable mailbox `id`.
fn selectable(mailboxes: &[Mailbox], id: u32) -> Option<usize> {
    mailboxes
        .binary_search_by_key(&id, |m| m.id)
        .ok()
        .filter(|&i| !mailboxes[i].noselect)
}

/// Makes (or, at replay over a newer snapshot, renames) mailbox `def`.
fn create(u: &mut User, def: &MailboxDef) {
    u.next_mailbox = u.next_mailbox.max(def.id.saturating_add(1));
    u.next_uidvalidity = u.next_uidvalidity.max(def.uidvalidity.saturating_add(1));
    u.modseq = u.modseq.max(def.modseq);
    match u.mailboxes.binary_search_by_key(&def.id, |m| m.id) {
        Ok(i) => {
            let m = &mut u.mailboxes[i];
            m.name = def.name.clone();
            m.special_use = def.special_use;
            m.uidvalidity = def.uidvalidity;
        }
        Err(i) => u.mailboxes.insert(i, Mailbox::new(def)),
    }
}
