use super::*;
use crate::shard::{Index, Replayed};
use crate::{Kind, Location};

const U: u64 = 7;

fn new(message: u64) -> NewEntry {
    NewEntry {
        message,
        size: 100,
        internal_date: 1_700_000_000,
        flags: 0,
        keywords: Vec::new(),
        cache: u64::MAX,
    }
}

/// Begins, logs (into `log`) and commits.
fn done(
    ix: &mut MailIndex,
    log: &mut Vec<Vec<u8>>,
    begin: impl FnOnce(&mut MailIndex) -> Result<Change, MailError>,
) -> Committed {
    let c = begin(ix).unwrap();
    let mut b = Vec::new();
    c.encode(&mut b);
    assert_eq!(decode_record(&b).unwrap(), c.rec, "the record round-trips");
    log.push(b);
    ix.commit(c)
}

/// A fresh index fed `log` as replay would.
fn replayed(log: &[Vec<u8>]) -> MailIndex {
    let mut ix = MailIndex::default();
    for b in log {
        ix.replay(Replayed::Record {
            at: Location {
                seq: 0,
                offset: 0,
                len: 0,
            },
            kind: Kind::Mail,
            payload: b,
        })
        .unwrap();
    }
    ix
}

/// A fresh index loaded from `ix`'s snapshot section, written a few items at a time.
fn reloaded(ix: &MailIndex) -> MailIndex {
    let mut items = Vec::new();
    let mut cursor = None;
    loop {
        let mut n = 0;
        cursor = ix.snapshot_chunk(cursor, &mut |b| {
            items.push(b.to_vec());
            n += 1;
            n < 2
        });
        if cursor.is_none() {
            break;
        }
    }
    let mut out = MailIndex::default();
    for i in &items {
        out.load(i).unwrap();
    }
    out
}

/// What a user's state is, to compare indexes.
fn state(ix: &MailIndex, user: u64) -> String {
    let mut s = format!("{:?} {:?}\n", ix.usage(user), ix.subscriptions(user));
    for m in ix.mailboxes(user) {
        s += &format!(
            "{} {} {:?} uv={} next={} hms={} noselect={}\n",
            m.id(),
            m.name(),
            m.special_use(),
            m.uidvalidity(),
            m.uidnext(),
            m.highestmodseq(),
            m.is_noselect()
        );
        for e in m.entries() {
            s += &format!("  {:?} {:?}\n", e, m.keyword_names(e));
        }
        s += &format!("  vanished {:?}\n", m.vanished_since(0));
    }
    s
}

#[test]
fn an_entry_is_48_bytes() {
    assert_eq!(std::mem::size_of::<Entry>(), 48);
    let e = Entry::new(3, 4, -5, ALL_FLAGS, u64::MAX, MODSEQ_MAX, 6, 7);
    assert_eq!(
        (e.uid(), e.size(), e.internal_date(), e.flags()),
        (3, 4, -5, ALL_FLAGS)
    );
    assert_eq!(
        (e.keywords(), e.modseq(), e.message(), e.cache()),
        (u64::MAX, MODSEQ_MAX, 6, 7)
    );
}

#[test]
fn names_are_checked_and_inbox_is_case_insensitive() {
    assert_eq!(normalize_name("inBox").unwrap(), "INBOX");
    assert_eq!(normalize_name("inbox/Sub").unwrap(), "INBOX/Sub");
    assert_eq!(normalize_name("Inboxes").unwrap(), "Inboxes");
    assert_eq!(normalize_name("Été/Ünï").unwrap(), "Été/Ünï");
    for bad in [
        "",
        "/a",
        "a/",
        "a//b",
        "a*",
        "a%b",
        "a\u{7}",
        &"x".repeat(256),
    ] {
        assert!(
            matches!(normalize_name(bad), Err(MailError::BadName(_))),
            "{bad:?}"
        );
    }
    let mut ix = MailIndex::default();
    let mut log = Vec::new();
    let _ = done(&mut ix, &mut log, |ix| ix_append(ix, "inbox", 1));
    assert_eq!(ix.mailbox(U, "iNbOx").unwrap().id(), INBOX_ID);
    assert_eq!(
        ix.begin_create(U, "Inbox", None).unwrap_err(),
        MailError::Exists
    );
    let _ = done(&mut ix, &mut log, |ix| ix.begin_create(U, "a/b", None));
    assert!(ix.mailbox(U, "a").is_none(), "superiors are not created");
    assert_eq!(
        ix.begin_create(U, "a/b", None).unwrap_err(),
        MailError::Exists
    );
    // A name being taken by a change in flight is taken.
    let c = ix.begin_create(U, "c", None).unwrap();
    assert_eq!(
        ix.begin_create(U, "c", None).unwrap_err(),
        MailError::Exists
    );
    let _ = ix.abort(c);
    let _ = done(&mut ix, &mut log, |ix| ix.begin_create(U, "c", None));
}

fn ix_append(ix: &mut MailIndex, mailbox: &str, message: u64) -> Result<Change, MailError> {
    ix.begin_append(U, mailbox, new(message), Quota::default())
}

#[test]
fn renaming_inbox_moves_its_messages_and_leaves_it_empty() {
    let mut ix = MailIndex::default();
    let mut log = Vec::new();
    for m in 1..=3 {
        let _ = done(&mut ix, &mut log, |ix| ix_append(ix, INBOX, m));
    }
    let _ = done(&mut ix, &mut log, |ix| {
        ix.begin_create(U, "INBOX/kid", None)
    });
    let _ = done(&mut ix, &mut log, |ix| ix.begin_expunge(U, INBOX_ID, &[2]));
    let before = ix.mailbox(U, INBOX).unwrap().clone();
    let r = done(&mut ix, &mut log, |ix| ix.begin_rename(U, "inbox", "Old"));
    assert!(
        r.drop_refs.is_empty(),
        "the references move with the entries"
    );
    let inbox = ix.mailbox(U, INBOX).unwrap();
    assert!(inbox.is_empty());
    assert_eq!(inbox.uidvalidity(), before.uidvalidity());
    assert_eq!(inbox.uidnext(), 4, "UIDs are not given again");
    assert_eq!(inbox.vanished_since(before.highestmodseq()), vec![1..=3]);
    let old = ix.mailbox(U, "Old").unwrap();
    assert_ne!(old.uidvalidity(), before.uidvalidity());
    let uids: Vec<u32> = old.entries().iter().map(|e| e.uid()).collect();
    assert_eq!(uids, [1, 3]);
    assert!(ix.mailbox(U, "INBOX/kid").is_some(), "children stay");
    assert_eq!(ix.usage(U).messages, 2);
    // New mail goes to the (empty) INBOX, UIDs going on.
    let c = ix_append(&mut ix, INBOX, 9).unwrap();
    assert_eq!(c.new_uids(), [4]);
    let _ = ix.commit(c);
    assert_eq!(
        ix.begin_rename(U, "Old", "INBOX").unwrap_err(),
        MailError::Exists
    );
}

#[test]
fn renaming_a_parent_renames_its_children() {
    let mut ix = MailIndex::default();
    let mut log = Vec::new();
    for n in ["a", "a/b", "a/b/c", "ab"] {
        let _ = done(&mut ix, &mut log, |ix| ix.begin_create(U, n, None));
    }
    assert!(matches!(
        ix.begin_rename(U, "a", "a/b/x"),
        Err(MailError::BadName(_))
    ));
    let _ = done(&mut ix, &mut log, |ix| ix.begin_rename(U, "a", "z"));
    let names: Vec<&str> = ix.mailboxes(U).iter().map(|m| m.name()).collect();
    assert_eq!(names, ["INBOX", "ab", "z", "z/b", "z/b/c"]);
    assert_eq!(state(&replayed(&log), U), state(&ix, U));
}

#[test]
fn deleting_a_parent_keeps_it_as_noselect() {
    let mut ix = MailIndex::default();
    let mut log = Vec::new();
    let _ = done(&mut ix, &mut log, |ix| ix.begin_create(U, "p", None));
    let _ = done(&mut ix, &mut log, |ix| ix.begin_create(U, "p/c", None));
    let p = ix.mailbox(U, "p").unwrap().id();
    let _ = done(&mut ix, &mut log, |ix| {
        ix.begin_append(U, "p", new(5), Quota::default())
    });
    let r = done(&mut ix, &mut log, |ix| ix.begin_delete(U, "p"));
    assert_eq!(r.drop_refs, [5]);
    assert!(ix.mailbox(U, "p").unwrap().is_noselect());
    assert_eq!(ix.begin_delete(U, "p").unwrap_err(), MailError::HasChildren);
    assert_eq!(
        ix.begin_append(U, "p", new(6), Quota::default())
            .unwrap_err(),
        MailError::NoSelect
    );
    assert_eq!(ix.begin_delete(U, "INBOX").unwrap_err(), MailError::Inbox);
    // CREATE over the \Noselect name makes a new mailbox.
    let _ = done(&mut ix, &mut log, |ix| ix.begin_create(U, "p", None));
    let np = ix.mailbox(U, "p").unwrap();
    assert!(!np.is_noselect() && np.id() != p);
    let _ = done(&mut ix, &mut log, |ix| ix.begin_delete(U, "p/c"));
    assert_eq!(state(&replayed(&log), U), state(&ix, U));
    assert_eq!(ix.usage(U), Usage::default());
}

#[test]
fn tombstones_answer_vanished_since_and_fold_into_the_floor() {
    let mut ix = MailIndex::default();
    let mut log = Vec::new();
    for m in 1..=10 {
        let _ = done(&mut ix, &mut log, |ix| ix_append(ix, INBOX, m));
    }
    let m0 = ix.mailbox(U, INBOX).unwrap().highestmodseq();
    // 3 and 5 with 4 still there: two ranges; 6..=8 with 7 gone before: one.
    let _ = done(&mut ix, &mut log, |ix| ix.begin_expunge(U, INBOX_ID, &[7]));
    let m1 = ix.mailbox(U, INBOX).unwrap().highestmodseq();
    let _ = done(&mut ix, &mut log, |ix| {
        ix.begin_expunge(U, INBOX_ID, &[3, 5, 6, 8])
    });
    let mb = ix.mailbox(U, INBOX).unwrap();
    assert_eq!(mb.vanished_since(m0), vec![3..=3, 5..=8]);
    assert_eq!(mb.vanished_since(m1), vec![3..=3, 5..=8]);
    assert_eq!(mb.tombstones.len(), 3);
    assert!(mb.vanished_since(mb.highestmodseq()).is_empty());
    // Past the limit the oldest fold into the floor: asking from below it gets
    // every UID not present.
    let mut ix = MailIndex::default();
    let n = TOMBSTONES_MAX as u64 + 10;
    for m in 1..=2 * n {
        let c = ix_append(&mut ix, INBOX, m).unwrap();
        let _ = ix.commit(c);
    }
    for uid in (1..=2 * n as u32).step_by(2) {
        let c = ix.begin_expunge(U, INBOX_ID, &[uid]).unwrap();
        let _ = ix.commit(c);
    }
    let mb = ix.mailbox(U, INBOX).unwrap();
    assert!(mb.tombstones.len() <= TOMBSTONES_MAX);
    assert!(mb.vanished_floor() > 0);
    let all: Vec<RangeInclusive<u32>> = (1..=2 * n as u32).step_by(2).map(|u| u..=u).collect();
    assert_eq!(
        mb.vanished_since(1),
        all,
        "below the floor: all missing UIDs"
    );
    let recent = mb.vanished_since(mb.vanished_floor());
    assert_eq!(recent.len(), mb.tombstones.len());
    assert_eq!(recent.last(), all.last());
}

#[test]
fn unchangedsince_stores_only_what_did_not_change() {
    let mut ix = MailIndex::default();
    let mut log = Vec::new();
    for m in 1..=3 {
        let _ = done(&mut ix, &mut log, |ix| ix_append(ix, INBOX, m));
    }
    let m0 = ix.mailbox(U, INBOX).unwrap().highestmodseq();
    let kw = vec!["$Junk".to_string()];
    let _ = done(&mut ix, &mut log, |ix| {
        ix.begin_set_flags(U, INBOX_ID, &[2], FlagOp::Add, FLAGGED, &kw, None)
    });
    let c = ix
        .begin_set_flags(U, INBOX_ID, &[1, 2, 3], FlagOp::Add, SEEN, &[], Some(m0))
        .unwrap();
    assert_eq!(c.modified(), [2]);
    assert_eq!(c.source_uids(), [1, 3]);
    let m = c.modseq().unwrap();
    let r = done(&mut ix, &mut log, |_| Ok(c));
    assert_eq!(r.notices.len(), 2);
    let mb = ix.mailbox(U, INBOX).unwrap();
    let flags: Vec<(u8, u64)> = mb
        .entries()
        .iter()
        .map(|e| (e.flags(), e.modseq()))
        .collect();
    assert_eq!(flags[0], (SEEN, m));
    assert_eq!(flags[2], (SEEN, m));
    assert_eq!(flags[1].0, FLAGGED);
    assert_eq!(mb.keyword_names(&mb.entries()[1]), ["$Junk"]);
    assert_eq!(mb.changed_since(m0).count(), 3);
    assert_eq!(mb.changed_since(m - 1).count(), 2);
    // UNCHANGEDSINCE 0 always fails (RFC 7162 §3.1.3).
    let c = ix
        .begin_set_flags(U, INBOX_ID, &[1], FlagOp::Add, DRAFT, &[], Some(0))
        .unwrap();
    assert!(c.is_noop() && c.modified() == [1]);
    let _ = ix.commit(c);
    // A change begun while another on the same entry is in flight builds on it,
    // and its UNCHANGEDSINCE sees that one's MODSEQ.
    let a = ix
        .begin_set_flags(U, INBOX_ID, &[3], FlagOp::Add, ANSWERED, &[], None)
        .unwrap();
    let b = ix
        .begin_set_flags(U, INBOX_ID, &[3], FlagOp::Add, FLAGGED, &[], None)
        .unwrap();
    let since = a.modseq().unwrap() - 1;
    let c = ix
        .begin_set_flags(U, INBOX_ID, &[3], FlagOp::Add, DRAFT, &[], Some(since))
        .unwrap();
    assert_eq!(c.modified(), [3]);
    let _ = ix.commit(c);
    let mut ba = Vec::new();
    b.encode(&mut ba);
    let mut aa = Vec::new();
    a.encode(&mut aa);
    log.push(aa);
    log.push(ba);
    // Committed out of order: b waits for a.
    assert!(ix.commit(b).notices.is_empty());
    assert_eq!(ix.commit(a).notices.len(), 2);
    let e = ix.mailbox(U, INBOX).unwrap().entry(3).copied().unwrap();
    assert_eq!(e.flags(), SEEN | ANSWERED | FLAGGED);
    assert_eq!(state(&replayed(&log), U), state(&ix, U));
}

#[test]
fn quota_counts_changes_in_flight() {
    let mut ix = MailIndex::default();
    let q = Quota {
        bytes: 250,
        messages: 0,
    };
    let a = ix.begin_append(U, INBOX, new(1), q).unwrap();
    let b = ix.begin_append(U, INBOX, new(2), q).unwrap();
    assert_eq!(
        ix.begin_append(U, INBOX, new(3), q).unwrap_err(),
        MailError::OverQuota
    );
    let _ = ix.abort(a);
    let c = ix.begin_append(U, INBOX, new(3), q).unwrap();
    assert_eq!(c.new_uids(), [3], "an aborted change's UID is burnt");
    let _ = ix.commit(b);
    let _ = ix.commit(c);
    assert_eq!(
        ix.usage(U),
        Usage {
            bytes: 200,
            messages: 2
        }
    );
}

#[test]
fn a_change_to_an_entry_expunged_meanwhile_does_not_bring_it_back() {
    let mut ix = MailIndex::default();
    let mut log = Vec::new();
    let _ = done(&mut ix, &mut log, |ix| ix_append(ix, INBOX, 1));
    let _ = done(&mut ix, &mut log, |ix| ix.begin_create(U, "B", None));
    let b = ix.mailbox(U, "B").unwrap().id();
    let x = ix.begin_expunge(U, INBOX_ID, &[1]).unwrap();
    let f = ix
        .begin_set_flags(U, INBOX_ID, &[1], FlagOp::Add, SEEN, &[], None)
        .unwrap();
    let m = ix.begin_move(U, INBOX_ID, &[1], b).unwrap();
    assert_eq!(m.add_refs(), [1]);
    for c in [&x, &f, &m] {
        let mut v = Vec::new();
        c.encode(&mut v);
        log.push(v);
    }
    let r1 = ix.commit(m);
    let r2 = ix.commit(f);
    let r3 = ix.commit(x);
    assert!(r1.drop_refs.is_empty() && r2.drop_refs.is_empty());
    // The expunge took the INBOX entry, the move's copy stays; nothing came back.
    assert_eq!(r3.drop_refs, [1]);
    assert!(ix.mailbox(U, INBOX).unwrap().is_empty());
    assert_eq!(ix.mailbox(U, "B").unwrap().len(), 1);
    assert_eq!(ix.usage(U).messages, 1);
    assert_eq!(state(&replayed(&log), U), state(&ix, U));
}

#[test]
fn snapshots_and_replay_rebuild_the_same_state() {
    let mut ix = MailIndex::default();
    let mut log = Vec::new();
    let _ = done(&mut ix, &mut log, |ix| {
        ix.begin_ensure_defaults(U).map(|c| c.unwrap())
    });
    assert!(ix.begin_ensure_defaults(U).unwrap().is_none());
    let names: Vec<&str> = ix.mailboxes(U).iter().map(|m| m.name()).collect();
    assert_eq!(
        names,
        ["Archive", "Drafts", "INBOX", "Junk", "Sent", "Trash"]
    );
    for m in 1..=5000 {
        let mut n = new(m);
        n.keywords = vec![format!("k{}", m % 3)];
        let _ = done(&mut ix, &mut log, |ix| {
            ix.begin_append(U, INBOX, n, Quota::default())
        });
    }
    let trash = ix.mailbox(U, "Trash").unwrap().id();
    let uids: Vec<u32> = (1..=5000).step_by(7).collect();
    let r = done(&mut ix, &mut log, |ix| {
        ix.begin_copy(U, INBOX_ID, &uids, trash)
    });
    assert!(r.drop_refs.is_empty());
    let _ = done(&mut ix, &mut log, |ix| ix.begin_expunge(U, INBOX_ID, &uids));
    let _ = done(&mut ix, &mut log, |ix| {
        ix.begin_subscribe(U, "Nowhere", true)
    });
    let _ = done(&mut ix, &mut log, |ix| ix.begin_subscribe(U, "inbox", true));
    assert_eq!(ix.subscriptions(U), ["INBOX", "Nowhere"]);
    for other in [U + 1, U + 2] {
        let c = ix.begin_append(other, "INBOX", new(9), Quota::default());
        let _ = done(&mut ix, &mut log, |_| c);
    }
    let want: Vec<String> = ix.users().map(|u| state(&ix, u)).collect();
    let r = replayed(&log);
    assert_eq!(r.users().map(|u| state(&r, u)).collect::<Vec<_>>(), want);
    let s = reloaded(&ix);
    assert_eq!(s.users().map(|u| state(&s, u)).collect::<Vec<_>>(), want);
    // Replaying the whole log over the snapshot changes nothing.
    let mut s = s;
    for b in &log {
        s.replay(Replayed::Record {
            at: Location {
                seq: 0,
                offset: 0,
                len: 0,
            },
            kind: Kind::Mail,
            payload: b,
        })
        .unwrap();
    }
    assert_eq!(s.users().map(|u| state(&s, u)).collect::<Vec<_>>(), want);
    let mut refs = Vec::new();
    ix.refs(&mut |id| refs.push(id));
    assert_eq!(
        refs.len() as u64,
        (U..U + 3).map(|u| ix.usage(u).messages).sum::<u64>()
    );
    // Dropping the account gives back every reference.
    let r = done(&mut ix, &mut log, |ix| ix.begin_drop_account(U));
    assert_eq!(r.drop_refs.len(), 5000);
    assert!(!ix.has_user(U));
    assert!(!replayed(&log).has_user(U));
}

#[test]
fn damaged_records_are_refused() {
    let mut ix = MailIndex::default();
    let c = ix.begin_append(U, INBOX, new(1), Quota::default()).unwrap();
    let mut b = Vec::new();
    c.encode(&mut b);
    for cut in 0..b.len() {
        assert!(decode_record(&b[..cut]).is_err(), "cut at {cut}");
    }
    let mut long = b.clone();
    long.push(0);
    assert!(decode_record(&long).is_err());
    let _ = ix.commit(c);
}
