//! Model-based test of the mailbox index on a real shard: random deliveries, appends,
//! flag changes (UNCHANGEDSINCE too), expunges, copies, moves, creates, renames (INBOX
//! too), deletes, subscriptions and default mailboxes, some held in flight and
//! committed out of order, some failed and aborted, with snapshots, compactions and
//! restarts, against a plain model. Small key spaces (3 users, 4 names with INBOX in
//! different cases, 3 keywords) so that changes collide.
//!
//! Checked: the index says what the model says (mailboxes, entries, flags, keywords,
//! subscriptions, usage), UIDs ascend and are never given again in a mailbox (across
//! restarts too), MODSEQs ascend per account, UIDVALIDITY never changes, every
//! entry's message resolves with one reference per entry, and no message outlives
//! the entries (after two compactions).

use proptest::prelude::*;
use ringmail_store::mailbox::{
    Change, Committed, FlagOp, MailError, MailIndex, NewEntry, Quota, SpecialUse, INBOX,
};
use ringmail_store::message::{self, Envelope};
use ringmail_store::{Kind, LogConfig, Shard, Ticket};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const USERS: u64 = 3;
const NAMES: [&str; 4] = ["inbox", "Work", "Work/Sub", "INBOX/Kid"];
const KEYWORDS: [&str; 3] = ["$Junk", "work", "Later"];

#[derive(Debug, Clone)]
enum Op {
    Deliver {
        user: u64,
        size: u32,
    },
    Append {
        user: u64,
        name: usize,
        flags: u8,
        kw: u8,
    },
    SetFlags {
        user: u64,
        name: usize,
        pick: u64,
        op: u8,
        flags: u8,
        kw: u8,
        since: Option<u8>,
    },
    Expunge {
        user: u64,
        name: usize,
        pick: u64,
    },
    Copy {
        user: u64,
        from: usize,
        to: usize,
        pick: u64,
        moved: bool,
    },
    Create {
        user: u64,
        name: usize,
    },
    Rename {
        user: u64,
        from: usize,
        to: usize,
    },
    Delete {
        user: u64,
        name: usize,
    },
    Subscribe {
        user: u64,
        name: usize,
        on: bool,
    },
    Defaults {
        user: u64,
    },
}

#[derive(Debug, Clone)]
enum Step {
    /// Begin, log, wait durable, commit.
    Now(Op),
    /// Begin and log, commit later (out of order).
    Hold(Op),
    /// Begin, the record "fails": abort.
    Fail(Op),
    /// Commit the held change `i % held`.
    Release(usize),
    Snapshot,
    Compact,
    /// Commit everything held (in the order given), then restart; `clean`: snapshot
    /// at shutdown.
    Restart {
        clean: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let user = 0..USERS;
    let name = 0..NAMES.len();
    prop_oneof![
        4 => (user.clone(), 1u32..5000).prop_map(|(user, size)| Op::Deliver { user, size }),
        2 => (user.clone(), name.clone(), 0u8..32, 0u8..8)
            .prop_map(|(user, name, flags, kw)| Op::Append { user, name, flags, kw }),
        4 => (user.clone(), name.clone(), any::<u64>(), 0u8..3, 0u8..32, 0u8..8, proptest::option::of(0u8..6))
            .prop_map(|(user, name, pick, op, flags, kw, since)| Op::SetFlags { user, name, pick, op, flags, kw, since }),
        2 => (user.clone(), name.clone(), any::<u64>())
            .prop_map(|(user, name, pick)| Op::Expunge { user, name, pick }),
        2 => (user.clone(), name.clone(), name.clone(), any::<u64>(), any::<bool>())
            .prop_map(|(user, from, to, pick, moved)| Op::Copy { user, from, to, pick, moved }),
        2 => (user.clone(), name.clone()).prop_map(|(user, name)| Op::Create { user, name }),
        1 => (user.clone(), name.clone(), name.clone()).prop_map(|(user, from, to)| Op::Rename { user, from, to }),
        1 => (user.clone(), name.clone()).prop_map(|(user, name)| Op::Delete { user, name }),
        1 => (user.clone(), name.clone(), any::<bool>()).prop_map(|(user, name, on)| Op::Subscribe { user, name, on }),
        1 => user.prop_map(|user| Op::Defaults { user }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        12 => op().prop_map(Step::Now),
        3 => op().prop_map(Step::Hold),
        1 => op().prop_map(Step::Fail),
        3 => any::<usize>().prop_map(Step::Release),
        1 => Just(Step::Snapshot),
        2 => Just(Step::Compact),
        1 => any::<bool>().prop_map(|clean| Step::Restart { clean }),
    ]
}

/// The name as the client gives it: INBOX in a case of its own.
fn name_of(i: usize, salt: u64) -> String {
    let n = NAMES[i];
    if salt.is_multiple_of(2) {
        n.to_string()
    } else {
        n.replace("inbox", "InBoX").replace("INBOX", "iNbox")
    }
}

/// The stored form of a name.
fn norm(n: &str) -> String {
    let first = n.split('/').next().unwrap();
    if first.eq_ignore_ascii_case(INBOX) {
        format!("{INBOX}{}", &n[first.len()..])
    } else {
        n.to_string()
    }
}

fn kw_names(mask: u8) -> Vec<String> {
    (0..3)
        .filter(|b| mask & (1 << b) != 0)
        .map(|b| KEYWORDS[b].to_string())
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct MEntry {
    message: u64,
    size: u32,
    flags: u8,
    kw: BTreeSet<String>,
    modseq: u64,
}

#[derive(Debug, Clone)]
struct MBox {
    name: String,
    noselect: bool,
    special: Option<SpecialUse>,
    entries: BTreeMap<u32, MEntry>,
}

#[derive(Debug, Default, Clone)]
struct MUser {
    boxes: BTreeMap<u32, MBox>,
    subs: BTreeSet<String>,
}

impl MUser {
    fn by_name(&self, n: &str) -> Option<(u32, &MBox)> {
        self.boxes
            .iter()
            .find(|(_, b)| b.name == n)
            .map(|(i, b)| (*i, b))
    }
    fn selectable(&self, n: &str) -> Option<u32> {
        self.by_name(n).filter(|(_, b)| !b.noselect).map(|(i, _)| i)
    }
    fn has_children(&self, n: &str) -> bool {
        self.boxes
            .values()
            .any(|b| b.name.starts_with(&format!("{n}/")))
    }
}

/// The model, and what it remembers across restarts.
#[derive(Default)]
struct Model {
    users: BTreeMap<u64, MUser>,
    /// Per (user, mailbox id): the highest UID ever committed.
    max_uid: BTreeMap<(u64, u32), u32>,
    /// Per user: the highest MODSEQ ever committed.
    max_modseq: BTreeMap<u64, u64>,
    /// The same, with those of aborted changes since the process started (their
    /// reservations are burnt, but not logged: after a restart no client has seen them).
    burnt_uid: BTreeMap<(u64, u32), u32>,
    burnt_modseq: BTreeMap<u64, u64>,
    /// The change being modelled is aborted.
    failing: bool,
    /// Per (user, mailbox id): its UIDVALIDITY.
    uidvalidity: BTreeMap<(u64, u32), u32>,
    /// Every message stored.
    messages: BTreeSet<u64>,
}

impl MBox {
    /// The UIDs `pick` chooses among this mailbox's entries.
    fn picked(&self, pick: u64) -> Vec<u32> {
        let uids: Vec<u32> = self.entries.keys().copied().collect();
        pick_of(&uids, pick)
    }
}

impl Model {
    /// The id of `user`'s mailbox `NAMES[name]`, if it exists and is selectable.
    fn selectable(&self, user: u64, name: usize) -> Option<u32> {
        self.users.get(&user)?.selectable(&norm(NAMES[name]))
    }

    fn user(&mut self, u: u64) -> &mut MUser {
        self.users.entry(u).or_insert_with(|| {
            let mut m = MUser::default();
            m.boxes.insert(
                1,
                MBox {
                    name: INBOX.into(),
                    noselect: false,
                    special: None,
                    entries: BTreeMap::new(),
                },
            );
            m
        })
    }

    fn new_uids(&mut self, user: u64, id: u32, uids: &[u32]) {
        for &u in uids {
            let max = self.max_uid.get(&(user, id)).copied().unwrap_or(0);
            let burnt = self.burnt_uid.entry((user, id)).or_default();
            assert!(
                u > max.max(*burnt),
                "UID {u} given again in {user}/{id} (committed {max}, burnt {burnt})"
            );
            *burnt = u;
            if !self.failing {
                self.max_uid.insert((user, id), u);
            }
        }
    }

    fn new_modseq(&mut self, user: u64, m: u64) {
        let max = self.max_modseq.get(&user).copied().unwrap_or(0);
        let burnt = self.burnt_modseq.entry(user).or_default();
        assert!(
            m > max.max(*burnt),
            "MODSEQ {m} of {user} not above {max}/{burnt}"
        );
        *burnt = m;
        if !self.failing {
            self.max_modseq.insert(user, m);
        }
    }

    fn restarted(&mut self) {
        // A blank account may have been in memory only; if a record made it, the
        // next change finds it (and the model takes it up again).
        self.users.retain(|_, u| {
            !(u.subs.is_empty() && u.boxes.len() == 1 && u.boxes[&1].entries.is_empty())
        });
        self.burnt_uid = self.max_uid.clone();
        self.burnt_modseq = self.max_modseq.clone();
    }

    fn uidvalidity(&mut self, user: u64, id: u32, v: u32) {
        let old = *self.uidvalidity.entry((user, id)).or_insert(v);
        assert_eq!(old, v, "UIDVALIDITY of {user}/{id} changed");
        assert!(
            !self
                .uidvalidity
                .iter()
                .any(|(k, o)| k.0 == user && k.1 != id && *o == v),
            "UIDVALIDITY {v} given twice in {user}"
        );
    }
}

/// Picks some of `uids` by the bits of `pick`.
fn pick_of(uids: &[u32], pick: u64) -> Vec<u32> {
    uids.iter()
        .enumerate()
        .filter(|(i, _)| pick & (1 << (i % 64)) != 0)
        .map(|(_, u)| *u)
        .collect()
}

/// What the model says `op` must do; `None`: it must be refused. Applies it to the
/// model, given what the index answered (UIDs, MODSEQ). Returns the message stored for
/// a delivery or append.
fn model_apply(
    m: &mut Model,
    ix: &MailIndex,
    op: &Op,
    got: Result<&Change, &MailError>,
    stored: Option<(u64, u32)>,
) {
    let fail = |why: &str| -> ! { panic!("{op:?}: {why}: {got:?}") };
    match op {
        Op::Deliver { user, .. } | Op::Append { user, .. } => {
            let (name, flags, kw) = match op {
                Op::Append {
                    name, flags, kw, ..
                } => (norm(NAMES[*name]), *flags, *kw),
                _ => (INBOX.to_string(), 0, 0),
            };
            let mu = m.users.get(user).cloned().unwrap_or_default();
            let target = if m.users.contains_key(user) {
                mu.selectable(&name)
            } else {
                (name == INBOX).then_some(1)
            };
            let Some(id) = target else {
                return assert!(got.is_err(), "{op:?}: {got:?}");
            };
            let Ok(c) = got else { fail("refused") };
            let (message, size) = stored.unwrap();
            assert_eq!(c.mailbox(), id);
            m.new_uids(*user, id, c.new_uids());
            m.new_modseq(*user, c.modseq().unwrap());
            let e = MEntry {
                message,
                size,
                flags: flags & 31,
                kw: kw_names(kw).into_iter().collect(),
                modseq: c.modseq().unwrap(),
            };
            m.user(*user)
                .boxes
                .get_mut(&id)
                .unwrap()
                .entries
                .insert(c.new_uids()[0], e);
        }
        Op::SetFlags {
            user,
            name,
            pick,
            op: how,
            flags,
            kw,
            since,
        } => {
            let Some(id) = m.selectable(*user, *name) else {
                return assert!(got.is_err(), "{op:?}: {got:?}");
            };
            let Ok(c) = got else { fail("refused") };
            let mb = m.users.get_mut(user).unwrap().boxes.get_mut(&id).unwrap();
            let chosen = mb.picked(*pick);
            let since = since.map(|s| ix_since(ix, *user, id, s));
            let kws: BTreeSet<String> = kw_names(*kw).into_iter().collect();
            let (mut modified, mut changed) = (Vec::new(), Vec::new());
            for uid in chosen {
                let e = mb.entries.get_mut(&uid).unwrap();
                if since.is_some_and(|s| e.modseq > s) {
                    modified.push(uid);
                    continue;
                }
                let (f, k) = match how {
                    0 => (flags & 31, kws.clone()),
                    1 => (e.flags | (flags & 31), e.kw.union(&kws).cloned().collect()),
                    _ => (e.flags & !flags, e.kw.difference(&kws).cloned().collect()),
                };
                if (f, &k) != (e.flags, &e.kw) {
                    e.flags = f;
                    e.kw = k;
                    e.modseq = c.modseq().unwrap_or(0);
                    changed.push(uid);
                }
            }
            assert_eq!(c.modified(), modified, "{op:?}");
            assert_eq!(c.source_uids(), changed, "{op:?}");
            if let Some(ms) = c.modseq() {
                m.new_modseq(*user, ms);
            }
        }
        Op::Expunge { user, name, pick } => {
            let Some(id) = m.selectable(*user, *name) else {
                return assert!(got.is_err(), "{op:?}: {got:?}");
            };
            let Ok(c) = got else { fail("refused") };
            let mb = m.users.get_mut(user).unwrap().boxes.get_mut(&id).unwrap();
            let chosen = mb.picked(*pick);
            for u in &chosen {
                mb.entries.remove(u);
            }
            assert_eq!(c.source_uids(), chosen);
            if let Some(ms) = c.modseq() {
                m.new_modseq(*user, ms);
            }
        }
        Op::Copy {
            user,
            from,
            to,
            pick,
            moved,
        } => {
            let ids = m.selectable(*user, *from).zip(m.selectable(*user, *to));
            let Some((f, t)) = ids else {
                return assert!(got.is_err(), "{op:?}: {got:?}");
            };
            let Ok(c) = got else { fail("refused") };
            let mu = m.users.get_mut(user).unwrap();
            let chosen = mu.boxes[&f].picked(*pick);
            assert_eq!(c.source_uids(), chosen);
            assert_eq!(c.new_uids().len(), chosen.len());
            let copies: Vec<MEntry> = chosen
                .iter()
                .map(|u| MEntry {
                    modseq: c.modseq().unwrap_or(0),
                    ..mu.boxes[&f].entries[u].clone()
                })
                .collect();
            if *moved {
                for u in &chosen {
                    mu.boxes.get_mut(&f).unwrap().entries.remove(u);
                }
            }
            for (u, e) in c.new_uids().iter().zip(copies) {
                mu.boxes.get_mut(&t).unwrap().entries.insert(*u, e);
            }
            m.new_uids(*user, t, c.new_uids());
            if let Some(ms) = c.modseq() {
                m.new_modseq(*user, ms);
            }
        }
        Op::Create { user, name } => {
            let n = norm(NAMES[*name]);
            let mu = m.users.get(user).cloned().unwrap_or_default();
            let taken = n == INBOX || mu.selectable(&n).is_some();
            if taken {
                return assert_eq!(got.err(), Some(&MailError::Exists), "{op:?}");
            }
            let Ok(c) = got else { fail("refused") };
            let mu = m.user(*user);
            if let Some((old, _)) = mu.by_name(&n) {
                mu.boxes.remove(&old);
            }
            mu.boxes.insert(
                c.mailbox(),
                MBox {
                    name: n,
                    noselect: false,
                    special: None,
                    entries: BTreeMap::new(),
                },
            );
        }
        Op::Rename { user, from, to } => {
            let (old, new) = (norm(NAMES[*from]), norm(NAMES[*to]));
            let Some(mu) = m.users.get(user) else {
                return assert!(got.is_err(), "{op:?}: {got:?}");
            };
            let ok = mu.by_name(&old).is_some()
                && new != INBOX
                && mu.by_name(&new).is_none()
                && (old == INBOX || !new.starts_with(&format!("{old}/")))
                && (old == INBOX
                    || mu
                        .boxes
                        .values()
                        .filter(|b| b.name.starts_with(&format!("{old}/")))
                        .all(|b| {
                            mu.by_name(&format!("{new}{}", &b.name[old.len()..]))
                                .is_none()
                        }));
            if !ok {
                return assert!(got.is_err(), "{op:?}: {got:?}");
            }
            let Ok(c) = got else { fail("refused") };
            let mu = m.users.get_mut(user).unwrap();
            if old == INBOX {
                let entries = std::mem::take(&mut mu.boxes.get_mut(&1).unwrap().entries);
                mu.boxes.insert(
                    c.mailbox(),
                    MBox {
                        name: new,
                        noselect: false,
                        special: None,
                        entries,
                    },
                );
                m.new_modseq(*user, c.modseq().unwrap());
            } else {
                for b in mu.boxes.values_mut() {
                    if b.name == old {
                        b.name = new.clone();
                    } else if b.name.starts_with(&format!("{old}/")) {
                        b.name = format!("{new}{}", &b.name[old.len()..]);
                    }
                }
            }
        }
        Op::Delete { user, name } => {
            let n = norm(NAMES[*name]);
            let Some(mu) = m.users.get_mut(user) else {
                return assert!(got.is_err(), "{op:?}: {got:?}");
            };
            let Some((id, b)) = mu.by_name(&n) else {
                return assert!(got.is_err(), "{op:?}: {got:?}");
            };
            let kids = mu.has_children(&n);
            if n == INBOX || (kids && b.noselect) {
                return assert!(got.is_err(), "{op:?}: {got:?}");
            }
            assert!(got.is_ok(), "{op:?}: {got:?}");
            if kids {
                let b = mu.boxes.get_mut(&id).unwrap();
                b.noselect = true;
                b.special = None;
                b.entries.clear();
            } else {
                mu.boxes.remove(&id);
            }
        }
        Op::Subscribe { user, name, on } => {
            let Ok(_) = got else { fail("refused") };
            let n = norm(NAMES[*name]);
            if !on && !m.users.contains_key(user) {
                return;
            }
            let subs = &mut m.user(*user).subs;
            if *on {
                subs.insert(n);
            } else {
                subs.remove(&n);
            }
        }
        Op::Defaults { user } => {
            let Ok(c) = got else { fail("refused") };
            let mu = m.user(*user);
            let mut want = Vec::new();
            for s in SpecialUse::ALL {
                if mu.boxes.values().any(|b| b.special == Some(s))
                    || mu.by_name(s.default_name()).is_some()
                {
                    continue;
                }
                want.push(s);
            }
            let created = c.created();
            let names: Vec<&str> = created.iter().map(|c| c.1).collect();
            let wanted: Vec<&str> = want.iter().map(|s| s.default_name()).collect();
            assert_eq!(names, wanted, "{op:?}");
            for ((id, name), s) in created.into_iter().zip(want) {
                mu.boxes.insert(
                    id,
                    MBox {
                        name: name.to_string(),
                        noselect: false,
                        special: Some(s),
                        entries: BTreeMap::new(),
                    },
                );
            }
        }
    }
}

/// The threshold for UNCHANGEDSINCE: one of the mailbox's entries' MODSEQs, or 0.
fn ix_since(ix: &MailIndex, user: u64, id: u32, s: u8) -> u64 {
    let mb = ix.mailbox_by_id(user, id).unwrap();
    let mut ms: Vec<u64> = mb.entries().iter().map(|e| e.modseq()).collect();
    ms.sort_unstable();
    if s == 0 || ms.is_empty() {
        return 0;
    }
    ms[(s as usize - 1) % ms.len()]
}

fn cfg() -> LogConfig {
    LogConfig {
        segment_bytes_max: 16 << 10,
        ..LogConfig::default()
    }
}

/// Stores a message of `size` bytes; its one reference is the caller's.
async fn store_message(shard: &Shard, size: u32) -> u64 {
    let id = shard.next_id().await.unwrap();
    let env = Envelope {
        id,
        ..Envelope::default()
    };
    let body = vec![b'm'; size as usize];
    let t = shard
        .append_message(id, body.len(), |out| message::encode(out, &env, b"", &body))
        .unwrap();
    shard.durable_message(&t).await.unwrap();
    id
}

fn op_user(op: &Op) -> u64 {
    match op {
        Op::Deliver { user, .. }
        | Op::Append { user, .. }
        | Op::SetFlags { user, .. }
        | Op::Expunge { user, .. }
        | Op::Copy { user, .. }
        | Op::Create { user, .. }
        | Op::Rename { user, .. }
        | Op::Delete { user, .. }
        | Op::Subscribe { user, .. }
        | Op::Defaults { user } => *user,
    }
}

/// Begins `op` (storing an append's message first): the change, and the message
/// stored with its size.
async fn begin(
    shard: &Shard,
    ix: &RefCell<MailIndex>,
    op: &Op,
    salt: u64,
) -> (Result<Option<Change>, MailError>, Option<(u64, u32)>) {
    let id_of = |user: u64, n: usize| {
        ix.borrow()
            .mailbox(user, &name_of(n, salt))
            .map_or(u32::MAX, |m| m.id())
    };
    let some = |r: Result<Change, MailError>| r.map(Some);
    match op {
        Op::Deliver { user, .. } | Op::Append { user, .. } => {
            let (name, size, flags, kw) = match op {
                Op::Append {
                    name, flags, kw, ..
                } => (name_of(*name, salt), 100 + *kw as u32, *flags, *kw),
                Op::Deliver { size, .. } => (INBOX.to_string(), *size, 0, 0),
                _ => unreachable!(),
            };
            let id = store_message(shard, size).await;
            let new = NewEntry {
                message: id,
                size,
                internal_date: 1_700_000_000,
                flags,
                keywords: kw_names(kw),
                cache: u64::MAX,
            };
            let r = ix
                .borrow_mut()
                .begin_append(*user, &name, new, Quota::default());
            if r.is_err() {
                assert_eq!(shard.drop_ref(id), 0);
            }
            (some(r), Some((id, size)))
        }
        Op::SetFlags {
            user,
            name,
            pick,
            op: how,
            flags,
            kw,
            since,
        } => {
            let id = id_of(*user, *name);
            let (uids, since) = match ix.borrow().mailbox_by_id(*user, id) {
                Some(mb) => {
                    let uids: Vec<u32> = mb.entries().iter().map(|e| e.uid()).collect();
                    let since = since.map(|s| ix_since(&ix.borrow(), *user, id, s));
                    (pick_of(&uids, *pick), since)
                }
                None => (Vec::new(), None),
            };
            let how = [FlagOp::Replace, FlagOp::Add, FlagOp::Remove][*how as usize];
            let kws = kw_names(*kw);
            let r = ix
                .borrow_mut()
                .begin_set_flags(*user, id, &uids, how, *flags, &kws, since);
            (some(r), None)
        }
        Op::Expunge { user, name, pick } => {
            let id = id_of(*user, *name);
            let uids: Vec<u32> = ix
                .borrow()
                .mailbox_by_id(*user, id)
                .map(|mb| mb.entries().iter().map(|e| e.uid()).collect())
                .unwrap_or_default();
            let r = ix
                .borrow_mut()
                .begin_expunge(*user, id, &pick_of(&uids, *pick));
            (some(r), None)
        }
        Op::Copy {
            user,
            from,
            to,
            pick,
            moved,
        } => {
            let (f, t) = (id_of(*user, *from), id_of(*user, *to));
            let uids: Vec<u32> = ix
                .borrow()
                .mailbox_by_id(*user, f)
                .map(|mb| mb.entries().iter().map(|e| e.uid()).collect())
                .unwrap_or_default();
            let uids = pick_of(&uids, *pick);
            let mut ix = ix.borrow_mut();
            let r = if *moved {
                ix.begin_move(*user, f, &uids, t)
            } else {
                ix.begin_copy(*user, f, &uids, t)
            };
            (some(r), None)
        }
        Op::Create { user, name } => {
            let r = ix
                .borrow_mut()
                .begin_create(*user, &name_of(*name, salt), None);
            (some(r), None)
        }
        Op::Rename { user, from, to } => {
            let r = ix.borrow_mut().begin_rename(
                *user,
                &name_of(*from, salt),
                &name_of(*to, salt >> 1),
            );
            (some(r), None)
        }
        Op::Delete { user, name } => {
            let r = ix.borrow_mut().begin_delete(*user, &name_of(*name, salt));
            (some(r), None)
        }
        Op::Subscribe { user, name, on } => {
            let r = ix
                .borrow_mut()
                .begin_subscribe(*user, &name_of(*name, salt), *on);
            (some(r), None)
        }
        Op::Defaults { user } => (ix.borrow_mut().begin_ensure_defaults(*user), None),
    }
}

/// Drops the references a commit or abort gave back.
fn settle(shard: &Shard, r: Committed) {
    for id in r.drop_refs {
        shard.drop_ref(id);
    }
}

/// A change logged and durable, not yet committed.
struct Held {
    user: u64,
    change: Change,
    _ticket: Ticket,
}

fn release(shard: &Shard, ix: &RefCell<MailIndex>, h: Held) {
    let r = ix.borrow_mut().commit(h.change);
    settle(shard, r);
}

/// Whether the index holds `user` only as the empty account a failed first change
/// left in memory (no record made it).
fn is_blank(ix: &MailIndex, user: u64) -> bool {
    let boxes = ix.mailboxes(user);
    boxes.len() == 1 && boxes[0].is_empty() && ix.subscriptions(user).is_empty()
}

fn check(shard: &Shard, ix: &MailIndex, m: &mut Model) {
    let users: BTreeSet<u64> = ix.users().chain(m.users.keys().copied()).collect();
    let mut refs: BTreeMap<u64, u32> = BTreeMap::new();
    for user in users {
        let Some(mu) = m.users.get(&user).cloned() else {
            assert!(is_blank(ix, user), "user {user} is not in the model");
            continue;
        };
        let blank = mu.subs.is_empty() && mu.boxes.len() == 1 && mu.boxes[&1].entries.is_empty();
        if !ix.has_user(user) {
            assert!(blank, "user {user} lost");
            continue;
        }
        let boxes = ix.mailboxes(user);
        let ids: BTreeSet<u32> = boxes.iter().map(|b| b.id()).collect();
        assert_eq!(
            ids,
            mu.boxes.keys().copied().collect(),
            "mailboxes of {user}: {:?} vs {:?}",
            boxes.iter().map(|b| b.name()).collect::<Vec<_>>(),
            mu.boxes.values().map(|b| &b.name).collect::<Vec<_>>()
        );
        let (mut bytes, mut messages) = (0u64, 0u64);
        for mb in boxes {
            let want = &mu.boxes[&mb.id()];
            assert_eq!(mb.name(), want.name, "{user}/{}", mb.id());
            assert_eq!(mb.is_noselect(), want.noselect, "{user}/{}", mb.name());
            assert_eq!(mb.special_use(), want.special, "{user}/{}", mb.name());
            // A blank account may be one no record made: a restart forgets it.
            if !blank {
                m.uidvalidity(user, mb.id(), mb.uidvalidity());
            }
            let uids: Vec<u32> = mb.entries().iter().map(|e| e.uid()).collect();
            assert!(uids.windows(2).all(|w| w[0] < w[1]), "UIDs ascend");
            assert_eq!(
                uids,
                want.entries.keys().copied().collect::<Vec<_>>(),
                "{user}/{}",
                mb.name()
            );
            for e in mb.entries() {
                let w = &want.entries[&e.uid()];
                let kw: BTreeSet<String> =
                    mb.keyword_names(e).into_iter().map(String::from).collect();
                assert_eq!(
                    (e.message(), e.size(), e.flags(), &kw, e.modseq()),
                    (w.message, w.size, w.flags, &w.kw, w.modseq),
                    "{user}/{} uid {}",
                    mb.name(),
                    e.uid()
                );
                assert!(e.uid() < mb.uidnext());
                assert!(e.modseq() <= mb.highestmodseq());
                bytes += e.size() as u64;
                messages += 1;
                *refs.entry(e.message()).or_default() += 1;
            }
            // QRESYNC: nothing present is reported vanished.
            for r in mb.vanished_since(0) {
                assert!(mb.uid_range(r.clone()).is_empty(), "{r:?} present");
            }
        }
        assert_eq!(
            ix.usage(user),
            ringmail_store::mailbox::Usage { bytes, messages }
        );
        let subs: BTreeSet<String> = ix
            .subscriptions(user)
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(subs, mu.subs);
    }
    for &id in &m.messages {
        let want = refs.get(&id).copied().unwrap_or(0);
        assert_eq!(shard.refs(id), want, "references of {id:X}");
        assert_eq!(shard.resolve(id).is_some(), want > 0, "{id:X}");
    }
    assert_eq!(
        shard.len(),
        refs.len(),
        "messages nobody refers to are gone"
    );
}

async fn open(data: &Path) -> (Shard, RefCell<MailIndex>) {
    let mut ix = MailIndex::default();
    let shard = Shard::open(data, 0, cfg(), &mut [&mut ix]).await.unwrap();
    // One shard: no other shard's references to wait for.
    shard.settle_foreign();
    (shard, RefCell::new(ix))
}

fn run(steps: Vec<Step>) {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().to_path_buf();
    ringmail_store::manifest::open_or_create(&data, 1).unwrap();
    glommio::LocalExecutor::default().run(async move {
        let (mut shard, mut ix) = open(&data).await;
        let mut m = Model::default();
        let mut held: Vec<Held> = Vec::new();
        for (n, st) in steps.into_iter().enumerate() {
            let salt = n as u64 * 0x9E37_79B9;
            let (hold, fail) = (matches!(st, Step::Hold(_)), matches!(st, Step::Fail(_)));
            match st {
                Step::Now(op) | Step::Hold(op) | Step::Fail(op) => {
                    let user = op_user(&op);
                    // At most one change per user in flight: the model applies a
                    // change when it begins.
                    while let Some(i) = held.iter().position(|h| h.user == user) {
                        release(&shard, &ix, held.remove(i));
                    }
                    // An account an aborted first change left in memory (blank).
                    if ix.borrow().has_user(user) {
                        m.user(user);
                    }
                    let (r, stored) = begin(&shard, &ix, &op, salt).await;
                    if let Some((id, _)) = stored {
                        m.messages.insert(id);
                    }
                    let saved = fail.then(|| m.users.clone());
                    m.failing = fail;
                    match &r {
                        Ok(Some(c)) => model_apply(&mut m, &ix.borrow(), &op, Ok(c), stored),
                        Ok(None) => assert!(matches!(op, Op::Defaults { .. })),
                        Err(e) => model_apply(&mut m, &ix.borrow(), &op, Err(e), stored),
                    }
                    if let Some(users) = saved {
                        m.users = users;
                    }
                    m.failing = false;
                    let Ok(Some(c)) = r else { continue };
                    for id in c.add_refs() {
                        assert!(shard.add_ref(*id), "{id:X} resolves");
                    }
                    if fail {
                        for id in c.add_refs() {
                            shard.drop_ref(*id);
                        }
                        if let (Some((id, _)), false) = (stored, c.is_noop()) {
                            shard.drop_ref(id);
                        }
                        let r = ix.borrow_mut().abort(c);
                        settle(&shard, r);
                        continue;
                    }
                    if c.is_noop() {
                        let r = ix.borrow_mut().commit(c);
                        settle(&shard, r);
                        continue;
                    }
                    let t = shard.append(Kind::Mail, |o| c.encode(o)).unwrap();
                    shard.durable(&t).await.unwrap();
                    if hold {
                        held.push(Held {
                            user,
                            change: c,
                            _ticket: t,
                        });
                    } else {
                        let r = ix.borrow_mut().commit(c);
                        drop(t);
                        settle(&shard, r);
                    }
                }
                Step::Release(i) => {
                    if !held.is_empty() {
                        let h = held.remove(i % held.len());
                        release(&shard, &ix, h);
                    }
                }
                Step::Snapshot => {
                    assert!(shard.snapshot(&[&ix]).await.unwrap());
                }
                Step::Compact => {
                    if shard.snapshot_due() {
                        assert!(shard.snapshot(&[&ix]).await.unwrap());
                    }
                    shard.compact().await.unwrap();
                }
                Step::Restart { clean } => {
                    for h in held.drain(..) {
                        release(&shard, &ix, h);
                    }
                    check(&shard, &ix.borrow(), &mut m);
                    shard.close().await;
                    if clean {
                        assert!(shard.snapshot(&[&ix]).await.unwrap());
                    }
                    drop(shard);
                    (shard, ix) = open(&data).await;
                    m.restarted();
                }
            }
            if held.is_empty() {
                check(&shard, &ix.borrow(), &mut m);
            }
        }
        for h in held.drain(..) {
            release(&shard, &ix, h);
        }
        check(&shard, &ix.borrow(), &mut m);
        for _ in 0..2 {
            assert!(shard.snapshot(&[&ix]).await.unwrap());
            shard.compact().await.unwrap();
        }
        check(&shard, &ix.borrow(), &mut m);
        shard.close().await;
        drop(shard);
        let (shard, ix) = open(&data).await;
        check(&shard, &ix.borrow(), &mut m);
        shard.close().await;
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn the_mailbox_index_matches_the_model(steps in proptest::collection::vec(step(), 1..120)) {
        run(steps);
    }
}
