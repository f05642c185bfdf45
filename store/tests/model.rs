//! Model-based test of the store (`Shard`): random appends, reference adds and drops,
//! snapshots, compactions, reader pins, reads from a second executor while the
//! operations after them run (compactions included), and restarts, clean or crashed (a torn tail
//! after the last durable batch, a crash between copy-forward and delete while a
//! reader pins the old segment, a crash between a snapshot and the records after it),
//! checked against a plain in-memory model: every referenced message reads back
//! byte-identical at the place its handle resolves to, an unreferenced message never
//! resolves again, and handles never change.

use event_listener::Event;
use glommio::channels::shared_channel::{self, ConnectedReceiver, ConnectedSender};
use proptest::prelude::*;
use ringmail_store::message::{self, Envelope};
use ringmail_store::reader::SegmentFiles;
use ringmail_store::shard::{Index, Replayed, Shard};
use ringmail_store::Resolved;
use ringmail_store::{record, segment, Handle, Kind, LogConfig};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::rc::Rc;

/// The test's index: how many references it holds per message. Its records (logged
/// as `RcptUpdate` kind, which the store hands on unread) carry the absolute count,
/// so replaying one twice changes nothing; a message record starts a count of one
/// (the writer's reference), as the queue does.
#[derive(Default)]
struct Counts(BTreeMap<u64, u32>);

fn count_record(id: u64, n: u32) -> Vec<u8> {
    let mut b = id.to_le_bytes().to_vec();
    b.extend_from_slice(&n.to_le_bytes());
    b
}

impl Index for Counts {
    fn replay(&mut self, rec: Replayed<'_>) -> Result<(), &'static str> {
        match rec {
            Replayed::Message { decoded, .. } => {
                self.0.entry(decoded.envelope.id).or_insert(1);
            }
            Replayed::Record {
                kind: Kind::RcptUpdate,
                payload,
                ..
            } => {
                if payload.len() != 12 {
                    return Err("bad count record");
                }
                let id = u64::from_le_bytes(payload[..8].try_into().unwrap());
                let n = u32::from_le_bytes(payload[8..].try_into().unwrap());
                if n == 0 {
                    self.0.remove(&id);
                } else if let Some(c) = self.0.get_mut(&id) {
                    *c = n;
                }
            }
            Replayed::Record { .. } => {}
        }
        Ok(())
    }

    fn refs(&self, each: &mut dyn FnMut(u64)) {
        for (id, n) in &self.0 {
            for _ in 0..*n {
                each(*id);
            }
        }
    }

    fn snapshot_chunk(
        &self,
        cursor: Option<u64>,
        out: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Option<u64> {
        use std::ops::Bound::{Excluded, Unbounded};
        let from = cursor.map_or(Unbounded, Excluded);
        for (id, n) in self.0.range((from, Unbounded)) {
            if !out(&count_record(*id, *n)) {
                return Some(*id);
            }
        }
        None
    }

    fn clear(&mut self) {
        self.0.clear();
    }

    fn load(&mut self, item: &[u8]) -> Result<(), &'static str> {
        if item.len() != 12 {
            return Err("bad count item");
        }
        let id = u64::from_le_bytes(item[..8].try_into().unwrap());
        self.0
            .insert(id, u32::from_le_bytes(item[8..].try_into().unwrap()));
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum Op {
    Append {
        len: usize,
        seed: u8,
    },
    AddRef(usize),
    DropRef(usize),
    Snapshot,
    Compact,
    /// Pins the segment of a referenced message for the rest of the run (a reader
    /// that was reading when the process died).
    Pin(usize),
    /// A reader on another executor reads a referenced message (resolving and
    /// pinning it through the owner, over a channel) while the next operations run.
    Read(usize),
    Restart(Crash),
    /// Damages the newest snapshot file, then restarts as after a kill: recovery
    /// falls back to the older snapshot, whose replay position compaction respected.
    DamageSnapshot,
}

#[derive(Debug, Clone, Copy)]
enum Crash {
    /// Shutdown: log closed, snapshot written.
    Clean,
    /// Killed after the last durable batch: no snapshot.
    Kill,
    /// Killed while a batch was half written: garbage after the durable end.
    TornTail,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1usize..3000, any::<u8>()).prop_map(|(len, seed)| Op::Append { len, seed }),
        2 => any::<usize>().prop_map(Op::AddRef),
        6 => any::<usize>().prop_map(Op::DropRef),
        1 => Just(Op::Snapshot),
        3 => Just(Op::Compact),
        1 => any::<usize>().prop_map(Op::Pin),
        3 => any::<usize>().prop_map(Op::Read),
        1 => Just(Op::DamageSnapshot),
        1 => prop_oneof![Just(Crash::Clean), Just(Crash::Kill), Just(Crash::TornTail)]
            .prop_map(Op::Restart),
    ]
}

fn body(id: u64, len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64 ^ id).wrapping_mul(31).wrapping_add(seed as u64) as u8)
        .collect()
}

fn cfg() -> LogConfig {
    LogConfig {
        segment_bytes_max: 8 << 10,
        ..LogConfig::default()
    }
}

struct Model {
    /// Every message ever appended: its body and the references the model holds.
    messages: BTreeMap<u64, (Vec<u8>, u32)>,
    /// Messages that had references once and lost them all.
    dropped: Vec<u64>,
}

/// Stores `body` as a new message and waits until it is durable; the one reference
/// the store hands out is the caller's.
async fn store_message(shard: &Shard, body: &[u8]) -> u64 {
    let id = shard.next_id().await.unwrap();
    let env = Envelope {
        id,
        ..Envelope::default()
    };
    let t = shard
        .append_message(id, body.len(), |out| message::encode(out, &env, b"", body))
        .unwrap();
    shard.durable_message(&t).await.unwrap();
    id
}

async fn open(data: &Path) -> (Shard, Counts) {
    let mut ix = Counts::default();
    let shard = Shard::open(data, 0, cfg(), &mut [&mut ix]).await.unwrap();
    // One shard: no other shard's index can refer to its messages.
    assert!(shard.take_foreign().is_empty());
    shard.settle_foreign();
    (shard, ix)
}

/// Writes a snapshot (the index is only borrowed between the snapshot's chunks).
async fn snapshot(shard: &Shard, ix: &mut Counts) {
    let cell = std::cell::RefCell::new(std::mem::take(ix));
    assert!(shard.snapshot(&[&cell]).await.unwrap());
    *ix = cell.into_inner();
}

fn check(shard: &Shard, ix: &Counts, model: &Model, data: &Path) {
    let dir = segment::shard_dir(data, 0);
    for (&id, (b, refs)) in &model.messages {
        if *refs == 0 {
            assert_eq!(shard.resolve(id), None, "{id:X} has no references left");
            assert!(!ix.0.contains_key(&id));
            continue;
        }
        assert_eq!(shard.refs(id), *refs, "{id:X}");
        assert_eq!(ix.0.get(&id), Some(refs));
        let r = shard.resolve(id).unwrap_or_else(|| panic!("{id:X} lost"));
        assert_eq!(r.handle, Handle::of_id(id), "handles never change");
        let f = std::fs::File::open(segment::segment_path(&dir, r.seq)).unwrap();
        let mut rec = vec![0u8; r.len as usize];
        f.read_exact_at(&mut rec, r.offset).unwrap();
        let got = record::decode(&rec).unwrap();
        assert!(matches!(got.kind, Kind::Message | Kind::Copy));
        let d = message::decode(got.payload).unwrap();
        assert_eq!(d.envelope.id, id);
        assert_eq!(d.body, &b[..], "{id:X} reads back byte-identical");
        let s = r.body_offset as usize;
        assert_eq!(&rec[s..s + r.body_len as usize], &b[..], "body range");
    }
    for id in &model.dropped {
        assert_eq!(shard.resolve(*id), None);
    }
    assert_eq!(
        shard.len(),
        model.messages.values().filter(|m| m.1 > 0).count()
    );
}

/// Reader -> owner.
enum ToOwner {
    Resolve(u64),
    Unpin(u64),
    /// A read resolved and pinned this segment, read its first piece, and waits for
    /// the owner's go to read the rest.
    Started(u64),
    /// A read finished: the body was byte-identical, or what went wrong.
    Done(u64, Result<(), String>),
}

/// What the owner hands the reader: a message to read and the body it must find.
struct Job {
    id: u64,
    body: Vec<u8>,
}

/// The reader executor: for each job, resolve and pin through the owner, read the
/// body in small pieces with its own segment files (so a read spans many awaits, and
/// the owner's operations run meanwhile), compare, unpin.
async fn reader(
    data: std::path::PathBuf,
    jobs: ConnectedReceiver<Job>,
    answers: ConnectedReceiver<Option<Resolved>>,
    go: ConnectedReceiver<()>,
    tx: ConnectedSender<ToOwner>,
) {
    let files = SegmentFiles::new(&data, 8);
    while let Some(job) = jobs.recv().await {
        let send = |m| tx.send(m);
        send(ToOwner::Resolve(job.id)).await.ok().unwrap();
        let found = answers.recv().await.expect("the owner answers");
        let result = match found {
            None => Err(format!("{:X} referenced but not resolved", job.id)),
            Some(r) => {
                let mut got = Vec::new();
                let mut err = None;
                match files.pieces(&r, 0..r.body_len as u64, READ_PIECE) {
                    Ok(mut pieces) => {
                        let mut first = true;
                        while let Some(p) = pieces.next().await {
                            if std::mem::take(&mut first) && pieces.remaining() > 0 {
                                send(ToOwner::Started(r.seq)).await.ok().unwrap();
                                go.recv().await.expect("the owner says go");
                            }
                            match p {
                                Ok(p) => got.extend_from_slice(&p),
                                Err(e) => err = Some(e.to_string()),
                            }
                        }
                    }
                    Err(e) => err = Some(e.to_string()),
                }
                send(ToOwner::Unpin(r.seq)).await.ok().unwrap();
                match err {
                    Some(e) => Err(format!("{:X}: {e}", job.id)),
                    None if got != job.body => Err(format!("{:X} read back different", job.id)),
                    None => Ok(()),
                }
            }
        };
        send(ToOwner::Done(job.id, result)).await.ok().unwrap();
    }
}

/// The owner's end: answers the reader from the shard open now.
struct Serving {
    shard: RefCell<Option<Rc<Shard>>>,
    done: RefCell<Vec<(u64, Result<(), String>)>>,
    started: RefCell<Option<u64>>,
    event: Event,
}

async fn serve(
    s: Rc<Serving>,
    rx: ConnectedReceiver<ToOwner>,
    answers: ConnectedSender<Option<Resolved>>,
) {
    while let Some(m) = rx.recv().await {
        match m {
            ToOwner::Resolve(id) => {
                let shard = s.shard.borrow().clone().expect("no read across a restart");
                // Resolve and pin in one step: nothing awaits between.
                let r = shard.resolve(id);
                if let Some(r) = r {
                    shard.pins().pin(r.seq);
                }
                answers.send(r).await.ok().unwrap();
            }
            ToOwner::Unpin(seq) => {
                let shard = s.shard.borrow().clone().expect("no read across a restart");
                shard.pins().unpin(seq);
            }
            ToOwner::Started(seq) => {
                *s.started.borrow_mut() = Some(seq);
                s.event.notify(usize::MAX);
            }
            ToOwner::Done(id, result) => {
                s.done.borrow_mut().push((id, result));
                s.event.notify(usize::MAX);
            }
        }
    }
}

/// Whether the reader reads `id`'s body in one piece (then it never waits for a go).
fn body_is_one_piece(model: &Model, id: u64) -> bool {
    model.messages[&id].0.len() <= READ_PIECE
}

const READ_PIECE: usize = 701;

/// Waits until the reader has pinned and started; returns the segment it pinned.
async fn started(s: &Serving) -> u64 {
    loop {
        let listener = s.event.listen();
        if let Some(seq) = s.started.borrow_mut().take() {
            return seq;
        }
        if let Some((_, Err(e))) = s.done.borrow().iter().find(|d| d.1.is_err()) {
            panic!("a read from the other executor failed: {e}");
        }
        listener.await;
    }
}

/// Checks the reads that finished; with `all`, waits for every one still going.
async fn reads_done(s: &Serving, reading: &mut BTreeMap<u64, u32>, all: bool) {
    loop {
        let listener = s.event.listen();
        for (id, result) in s.done.borrow_mut().drain(..) {
            if let Err(e) = result {
                panic!("a read from the other executor failed: {e}");
            }
            let n = reading.get_mut(&id).expect("a read was started");
            *n -= 1;
            if *n == 0 {
                reading.remove(&id);
            }
        }
        if !all || reading.is_empty() {
            return;
        }
        listener.await;
    }
}

fn run(ops: Vec<Op>) {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().to_path_buf();
    ringmail_store::manifest::open_or_create(&data, 1).unwrap();
    let (jobs_tx, jobs_rx) = shared_channel::new_bounded(128);
    let (ans_tx, ans_rx) = shared_channel::new_bounded(4);
    let (own_tx, own_rx) = shared_channel::new_bounded(16);
    let (go_tx, go_rx) = shared_channel::new_bounded(1);
    let reader_thread = glommio::LocalExecutorBuilder::default()
        .spawn({
            let data = data.clone();
            move || async move {
                let ((jobs, answers, tx), go, ()) = zip3(
                    zip3(jobs_rx.connect(), ans_rx.connect(), own_tx.connect()),
                    go_rx.connect(),
                    async {},
                )
                .await;
                reader(data, jobs, answers, go, tx).await;
            }
        })
        .unwrap();
    glommio::LocalExecutor::default().run(async move {
        let ((jobs, answers, from_reader), go, ()) = zip3(
            zip3(jobs_tx.connect(), ans_tx.connect(), own_rx.connect()),
            go_tx.connect(),
            async {},
        )
        .await;
        // A read that has pinned its segment and waits to finish until the next
        // operation (a compaction, say) is done: its segment.
        let mut held: Option<u64> = None;
        let dir = segment::shard_dir(&data, 0);
        let serving = Rc::new(Serving {
            shard: RefCell::new(None),
            done: RefCell::new(Vec::new()),
            started: RefCell::new(None),
            event: Event::new(),
        });
        glommio::spawn_local(serve(serving.clone(), from_reader, answers)).detach();
        // Messages being read now, with how many reads of each: the model keeps a
        // reference to them until the reads are done.
        let mut reading: BTreeMap<u64, u32> = BTreeMap::new();
        let mut model = Model {
            messages: BTreeMap::new(),
            dropped: Vec::new(),
        };
        let (shard, mut ix) = open(&data).await;
        let mut shard = Rc::new(shard);
        *serving.shard.borrow_mut() = Some(shard.clone());
        let mut compactions_since_drop: BTreeMap<u64, u32> = BTreeMap::new();
        let live = |model: &Model| -> Vec<u64> {
            model
                .messages
                .iter()
                .filter(|(_, m)| m.1 > 0)
                .map(|(id, _)| *id)
                .collect()
        };
        for op in ops {
            reads_done(&serving, &mut reading, false).await;
            match op {
                Op::Append { len, seed } => {
                    let id = shard.next_id().await.unwrap();
                    let b = body(id, len, seed);
                    let env = Envelope {
                        id,
                        from: "a@b.test".into(),
                        ..Envelope::default()
                    };
                    let t = shard
                        .append_message(id, b.len(), |out| message::encode(out, &env, b"", &b))
                        .unwrap();
                    let r = shard.durable_message(&t).await.unwrap();
                    assert_eq!(r.body_len as usize, b.len());
                    ix.0.insert(id, 1);
                    drop(t);
                    model.messages.insert(id, (b, 1));
                }
                Op::AddRef(i) | Op::DropRef(i) => {
                    let add = matches!(op, Op::AddRef(_));
                    let ids: Vec<u64> = live(&model)
                        .into_iter()
                        .filter(|id| add || !reading.contains_key(id))
                        .collect();
                    if ids.is_empty() {
                        continue;
                    }
                    let id = ids[i % ids.len()];
                    let n = model.messages[&id].1;
                    let n = if add { n + 1 } else { n - 1 };
                    let t = shard
                        .append(Kind::RcptUpdate, |out| {
                            out.extend_from_slice(&count_record(id, n))
                        })
                        .unwrap();
                    shard.durable(&t).await.unwrap();
                    if add {
                        assert!(shard.add_ref(id));
                        ix.0.insert(id, n);
                    } else {
                        assert_eq!(shard.drop_ref(id), n);
                        if n == 0 {
                            ix.0.remove(&id);
                            model.dropped.push(id);
                            compactions_since_drop.insert(id, 0);
                        } else {
                            ix.0.insert(id, n);
                        }
                    }
                    drop(t);
                    model.messages.get_mut(&id).unwrap().1 = n;
                }
                Op::Snapshot => {
                    snapshot(&shard, &mut ix).await;
                }
                Op::Compact => {
                    if shard.snapshot_due() {
                        snapshot(&shard, &mut ix).await;
                    }
                    let c = shard.compact().await.unwrap();
                    if std::env::var_os("MODEL_STATS").is_some() {
                        eprintln!("compacted {c:?}");
                    }
                    for n in compactions_since_drop.values_mut() {
                        *n += 1;
                    }
                }
                Op::Pin(i) => {
                    let ids = live(&model);
                    if let Some(id) = ids.get(i % ids.len().max(1)) {
                        shard.pins().pin(shard.resolve(*id).unwrap().seq);
                    }
                }
                Op::Read(i) => {
                    let ids = live(&model);
                    if ids.is_empty() {
                        continue;
                    }
                    let id = ids[i % ids.len()];
                    *reading.entry(id).or_default() += 1;
                    let body = model.messages[&id].0.clone();
                    if held.take().is_some() {
                        go.send(()).await.ok().unwrap();
                    }
                    jobs.send(Job { id, body }).await.ok().unwrap();
                    if !body_is_one_piece(&model, id) {
                        let seq = started(&serving).await;
                        // Compact under the reader (and let the next operation run
                        // under it too).
                        snapshot(&shard, &mut ix).await;
                        shard.compact().await.unwrap();
                        for n in compactions_since_drop.values_mut() {
                            *n += 1;
                        }
                        assert!(
                            segment::segment_path(&dir, seq).exists(),
                            "segment {seq} deleted under a reader"
                        );
                        held = Some(seq);
                        check(&shard, &ix, &model, &data);
                        continue;
                    }
                }
                Op::DamageSnapshot => {
                    if held.take().is_some() {
                        go.send(()).await.ok().unwrap();
                    }
                    reads_done(&serving, &mut reading, true).await;
                    *serving.shard.borrow_mut() = None;
                    shard.close().await;
                    drop(shard);
                    let path = ringmail_store::shard::snapshot_path(&segment::shard_dir(&data, 0));
                    if let Ok(f) = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                    {
                        let at = f.metadata().unwrap().len() / 2;
                        let mut b = [0u8; 1];
                        f.read_exact_at(&mut b, at).unwrap();
                        f.write_all_at(&[b[0] ^ 0x5A], at).unwrap();
                    }
                    let (s, i) = open(&data).await;
                    shard = Rc::new(s);
                    *serving.shard.borrow_mut() = Some(shard.clone());
                    ix = i;
                }
                Op::Restart(crash) => {
                    // The reader's pins are this process's: no read spans a restart.
                    if held.take().is_some() {
                        go.send(()).await.ok().unwrap();
                    }
                    reads_done(&serving, &mut reading, true).await;
                    *serving.shard.borrow_mut() = None;
                    shard.close().await;
                    match crash {
                        Crash::Clean => {
                            snapshot(&shard, &mut ix).await;
                        }
                        Crash::Kill => {}
                        Crash::TornTail => {
                            let (seq, end) = shard.log().durable_end();
                            let path = segment::segment_path(&segment::shard_dir(&data, 0), seq);
                            let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
                            // A record header promising more than follows, then junk.
                            let mut torn = Vec::new();
                            record::encode_into(&mut torn, Kind::Message, &[7u8; 3000]);
                            torn.truncate(1000);
                            f.write_all_at(&torn, end).unwrap();
                            f.sync_all().unwrap();
                        }
                    }
                    drop(shard);
                    let (s, i) = open(&data).await;
                    shard = Rc::new(s);
                    *serving.shard.borrow_mut() = Some(shard.clone());
                    ix = i;
                }
            }
            check(&shard, &ix, &model, &data);
            if let Some(seq) = held.take() {
                // The operation ran while the reader held its pin.
                assert!(
                    segment::segment_path(&dir, seq).exists(),
                    "segment {seq} deleted under a reader"
                );
                go.send(()).await.ok().unwrap();
            }
        }
        if held.take().is_some() {
            go.send(()).await.ok().unwrap();
        }
        reads_done(&serving, &mut reading, true).await;
        *serving.shard.borrow_mut() = None;
        drop(jobs);
        // And once more after a crash at the very end.
        shard.close().await;
        drop(shard);
        let (shard, mut ix) = open(&data).await;
        check(&shard, &ix, &model, &data);
        // Space: with no pins left (a fresh process), two snapshot-and-compact
        // rounds leave no segment before the snapshot's position that is mostly
        // garbage, and ids are never handed out again.
        // Segment sizes as compaction sees them: once it deletes segment N+1, N's
        // valid length is no longer written anywhere (its file is longer: zeros).
        let dir = segment::shard_dir(&data, 0);
        let seg_size = |seq: u64| {
            segment::sealed_len(&dir, seq).or_else(|| {
                std::fs::metadata(segment::segment_path(&dir, seq))
                    .ok()
                    .map(|m| m.len())
            })
        };
        let sizes: BTreeMap<u64, u64> = (0..=shard.log().durable_end().0)
            .filter_map(|seq| Some((seq, seg_size(seq)?)))
            .collect();
        for _ in 0..2 {
            snapshot(&shard, &mut ix).await;
            let c = shard.compact().await.unwrap();
            if std::env::var_os("MODEL_STATS").is_some() {
                eprintln!(
                    "final {:?} {:?} {c:?}",
                    shard.snapshot_position(),
                    shard.compaction_position()
                );
            }
        }
        check(&shard, &ix, &model, &data);
        let (p_seq, _) = shard.compaction_position().unwrap();
        let mut live_per_seg: BTreeMap<u64, u64> = BTreeMap::new();
        for (&id, m) in &model.messages {
            if m.1 > 0 {
                let r = shard.resolve(id).unwrap();
                *live_per_seg.entry(r.seq).or_default() += r.len as u64;
            }
        }
        for e in std::fs::read_dir(&dir).unwrap() {
            let name = e.unwrap().file_name();
            let Some(seq) = name.to_str().and_then(segment::parse_segment_name) else {
                continue;
            };
            if seq >= p_seq {
                continue;
            }
            let live = live_per_seg.get(&seq).copied().unwrap_or(0);
            let size = sizes[&seq];
            assert!(
                live * 3 >= size,
                "segment {seq} before the snapshot is mostly garbage: {live} of {size} live"
            );
        }
        if let Some(max) = model.messages.keys().max() {
            assert!(
                shard.next_id().await.unwrap() > *max,
                "ids are never reused"
            );
        }
        shard.close().await;
    });
    reader_thread.join().unwrap();
}

/// Connects three channel ends at once (each waits for its peer to connect).
async fn zip3<A, B, C>(
    a: impl std::future::Future<Output = A>,
    b: impl std::future::Future<Output = B>,
    c: impl std::future::Future<Output = C>,
) -> (A, B, C) {
    let mut a = std::pin::pin!(a);
    let mut b = std::pin::pin!(b);
    let mut c = std::pin::pin!(c);
    let (mut ra, mut rb, mut rc) = (None, None, None);
    std::future::poll_fn(|cx| {
        use std::task::Poll;
        if ra.is_none() {
            if let Poll::Ready(v) = a.as_mut().poll(cx) {
                ra = Some(v);
            }
        }
        if rb.is_none() {
            if let Poll::Ready(v) = b.as_mut().poll(cx) {
                rb = Some(v);
            }
        }
        if rc.is_none() {
            if let Poll::Ready(v) = c.as_mut().poll(cx) {
                rc = Some(v);
            }
        }
        if ra.is_some() && rb.is_some() && rc.is_some() {
            Poll::Ready((ra.take().unwrap(), rb.take().unwrap(), rc.take().unwrap()))
        } else {
            Poll::Pending
        }
    })
    .await
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    #[test]
    fn the_store_matches_the_model(ops in proptest::collection::vec(op(), 1..100)) {
        run(ops);
    }
}

/// A snapshot taken while a batch's effect is not applied yet (its ticket held)
/// replays that batch: the replay start does not pass an unapplied record.
#[test]
fn a_snapshot_does_not_pass_a_record_whose_effect_is_not_applied() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().to_path_buf();
    ringmail_store::manifest::open_or_create(&data, 1).unwrap();
    let data2 = data.clone();
    let id = glommio::LocalExecutor::default().run(async move {
        let (shard, mut ix) = open(&data2).await;
        let id = shard.next_id().await.unwrap();
        let env = Envelope {
            id,
            ..Envelope::default()
        };
        let t = shard
            .append_message(id, 5, |out| message::encode(out, &env, b"", b"hello"))
            .unwrap();
        shard.durable_message(&t).await.unwrap();
        // Durable, but the index has not taken it yet: a snapshot now must replay it.
        snapshot(&shard, &mut ix).await;
        assert!(shard.snapshot_position().unwrap() < shard.log().durable_end());
        drop(t);
        shard.close().await;
        id
    });
    glommio::LocalExecutor::default().run(async move {
        let (shard, ix) = open(&data).await;
        assert_eq!(ix.0.get(&id), Some(&1), "replayed from before the message");
        assert!(shard.resolve(id).is_some());
        shard.close().await;
    });
}

/// Recovery with a snapshot reads only from its position: segments wholly before it
/// are not replayed (their records' effects are in the snapshot).
#[test]
fn recovery_replays_only_what_the_snapshot_does_not_hold() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().to_path_buf();
    ringmail_store::manifest::open_or_create(&data, 1).unwrap();
    let data2 = data.clone();
    glommio::LocalExecutor::default().run(async move {
        let (shard, mut ix) = open(&data2).await;
        for _ in 0..40 {
            let id = store_message(&shard, &vec![1u8; 1000]).await;
            ix.0.insert(id, 1);
        }
        shard.close().await;
        snapshot(&shard, &mut ix).await;
    });
    let mut ix = Counts::default();
    let rec =
        ringmail_store::shard::recover(&data, 0, ringmail_store::Mode::ReadOnly, &mut [&mut ix])
            .unwrap();
    assert_eq!(ix.0.len(), 40);
    assert_eq!(rec.map.len(), 40);
    assert!(
        rec.report.records <= 1,
        "replayed {} records",
        rec.report.records
    );
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(ringmail_store::shard::snapshot_path(&segment::shard_dir(
            &data, 0,
        )))
        .unwrap();
    f.write_all(b"junk").unwrap();
    // A damaged snapshot is reported, and the whole log replayed instead.
    let mut ix = Counts::default();
    let rec =
        ringmail_store::shard::recover(&data, 0, ringmail_store::Mode::ReadOnly, &mut [&mut ix])
            .unwrap();
    assert!(rec.report.damaged.iter().any(|d| d.contains("snapshot")));
    assert_eq!(ix.0.len(), 40);
}

/// The half-way checkpoint of the next id block is durable (its ticket let go) before
/// the block runs out; a snapshot then has its position past the checkpoint, so it
/// must hold that reservation itself: ids handed out after it and never logged are
/// not given again after a crash.
#[test]
fn a_snapshot_past_the_half_way_checkpoint_keeps_its_reservation() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().to_path_buf();
    ringmail_store::manifest::open_or_create(&data, 1).unwrap();
    let data2 = data.clone();
    let max = glommio::LocalExecutor::default().run(async move {
        let (shard, mut ix) = open(&data2).await;
        let mut max = 0;
        while !shard.reservation_pending() {
            max = shard.next_id().await.unwrap();
        }
        // A later record durable: the checkpoint's batch is too. Then wait for its
        // task to let the ticket go (the replay start passes it).
        let t = shard
            .append(Kind::RcptUpdate, |out| {
                out.extend_from_slice(&count_record(0, 0))
            })
            .unwrap();
        shard.durable(&t).await.unwrap();
        drop(t);
        while shard.log().replay_start() != shard.log().durable_end() {
            yield_now().await;
        }
        snapshot(&shard, &mut ix).await;
        // Past the old block's end, well short of the new block's half-way mark:
        // nothing logs these ids.
        for _ in 0..ringmail_store::shard::ID_BLOCK / 2 + 100 {
            max = shard.next_id().await.unwrap();
        }
        shard.close().await;
        max
    });
    glommio::LocalExecutor::default().run(async move {
        let (shard, _ix) = open(&data).await;
        let next = shard.next_id().await.unwrap();
        assert!(
            next > max,
            "id {next:X} given again (handed out up to {max:X})"
        );
        shard.close().await;
    });
}

/// Lets the executor run other tasks once.
async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

/// Appends `n` messages of 2000 bytes, then drops every one but the first; returns
/// the ids.
async fn fill_and_drop(shard: &Shard, ix: &mut Counts, n: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let id = store_message(shard, &vec![3u8; 2000]).await;
        ix.0.insert(id, 1);
        ids.push(id);
    }
    for &id in &ids[1..] {
        let_go(shard, id).await;
        ix.0.remove(&id);
    }
    ids
}

/// Records that the test's index let go of message `id`'s one reference, and drops it.
async fn let_go(shard: &Shard, id: u64) {
    let t = shard
        .append(Kind::RcptUpdate, |out| {
            out.extend_from_slice(&count_record(id, 0))
        })
        .unwrap();
    shard.durable(&t).await.unwrap();
    assert_eq!(shard.drop_ref(id), 0);
}

/// With both snapshots damaged and segments deleted by compaction, replaying the log
/// from its start would lose mail and bring delivered mail back: the server refuses
/// to start and names the files; read-only recovery reports it, keeping the copies.
#[test]
fn no_loadable_snapshot_over_a_compacted_log_refuses_to_start() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().to_path_buf();
    ringmail_store::manifest::open_or_create(&data, 1).unwrap();
    let data2 = data.clone();
    let kept = glommio::LocalExecutor::default().run(async move {
        let (shard, mut ix) = open(&data2).await;
        let ids = fill_and_drop(&shard, &mut ix, 20).await;
        snapshot(&shard, &mut ix).await;
        snapshot(&shard, &mut ix).await;
        let c = shard.compact().await.unwrap();
        assert!(c.deleted > 0, "{c:?}");
        shard.close().await;
        ids[0]
    });
    let dir = segment::shard_dir(&data, 0);
    for p in [
        ringmail_store::shard::snapshot_path(&dir),
        ringmail_store::shard::older_snapshot_path(&dir),
    ] {
        std::fs::write(&p, b"RMSNAP01 torn").unwrap();
    }
    let mut ix = Counts::default();
    let err = match ringmail_store::shard::recover(
        &data,
        0,
        ringmail_store::Mode::Repair,
        &mut [&mut ix],
    ) {
        Ok(_) => panic!("recovery over a compacted log without a snapshot went on"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("snapshot.prev") && err.contains("compacted"),
        "{err}"
    );
    assert!(
        ringmail_store::shard::snapshot_path(&dir).exists(),
        "nothing renamed"
    );
    let mut ix = Counts::default();
    let rec =
        ringmail_store::shard::recover(&data, 0, ringmail_store::Mode::ReadOnly, &mut [&mut ix])
            .unwrap();
    assert!(
        rec.report.damaged.iter().any(|d| d.contains("compacted")),
        "{:?}",
        rec.report.damaged
    );
    assert!(rec.map.contains_key(&kept), "the live message is kept");
}

/// A snapshot that cannot be read for a reason other than its bytes (here it is a
/// directory: EISDIR; EIO, EACCES, EMFILE alike) fails the open: it is not set aside
/// as damaged, nor is the log replayed without it.
#[test]
fn a_snapshot_read_error_fails_the_open_instead_of_dropping_the_snapshot() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().to_path_buf();
    ringmail_store::manifest::open_or_create(&data, 1).unwrap();
    let data2 = data.clone();
    glommio::LocalExecutor::default().run(async move {
        let (shard, mut ix) = open(&data2).await;
        fill_and_drop(&shard, &mut ix, 3).await;
        shard.close().await;
    });
    let dir = segment::shard_dir(&data, 0);
    std::fs::create_dir(ringmail_store::shard::snapshot_path(&dir)).unwrap();
    let mut ix = Counts::default();
    let r = ringmail_store::shard::recover(&data, 0, ringmail_store::Mode::Repair, &mut [&mut ix]);
    assert!(r.is_err(), "recovered without its snapshot");
    assert!(ringmail_store::shard::snapshot_path(&dir).is_dir());
    assert!(!dir.join("snapshot.damaged").exists());
}

/// Compaction stops at the older of the two snapshots. Once the log goes quiet, more
/// snapshots are due until both lie in the last segment (two here: the newest was
/// taken segments after the older), or the segments between the two would stay until
/// mail flows again; then none.
#[test]
fn a_quiet_log_gets_snapshots_until_compaction_can_catch_up() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().to_path_buf();
    ringmail_store::manifest::open_or_create(&data, 1).unwrap();
    glommio::LocalExecutor::default().run(async move {
        let (shard, mut ix) = open(&data).await;
        let append = |n: usize, size: usize| {
            let shard = &shard;
            async move {
                for _ in 0..n {
                    let id = store_message(shard, &vec![7u8; size]).await;
                    shard.drop_ref(id);
                }
            }
        };
        // Two snapshots, the newer segments after the older.
        append(40, 20_000).await;
        snapshot(&shard, &mut ix).await;
        append(40, 20_000).await;
        snapshot(&shard, &mut ix).await;
        assert!(shard.compaction_position().unwrap().0 < shard.snapshot_position().unwrap().0);
        // A little more (under the least log growth a snapshot waits for): not due
        // while it grows.
        append(1, 100).await;
        assert!(!shard.snapshot_due(), "due while mail flows");
        // Nothing new since it was last asked: quiet, so one more...
        assert!(shard.snapshot_due(), "never due once quiet");
        snapshot(&shard, &mut ix).await;
        // ... and one after it: the older snapshot is now the one taken while mail
        // flowed, segments behind.
        assert!(shard.compaction_position().unwrap().0 < shard.snapshot_position().unwrap().0);
        assert!(shard.snapshot_due(), "the older snapshot still lies behind");
        snapshot(&shard, &mut ix).await;
        assert_eq!(
            shard.compaction_position().unwrap().0,
            shard.snapshot_position().unwrap().0
        );
        assert!(!shard.snapshot_due());
        assert!(
            !shard.snapshot_due(),
            "a quiet log with both snapshots in its last segment needs none"
        );
        shard.close().await;
    });
}

/// An offline reader (`queue list`, `mailbox list`) replays a shard while the live
/// server snapshots and compacts it, deleting segments and replacing the snapshot
/// under the reader: every replay succeeds and sees every message still referenced.
#[test]
fn a_read_only_replay_beside_a_compacting_writer_sees_every_live_message() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().to_path_buf();
    ringmail_store::manifest::open_or_create(&data, 1).unwrap();
    let (kept_tx, kept_rx) = std::sync::mpsc::channel::<Vec<u64>>();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (data, done) = (data.clone(), done.clone());
        std::thread::spawn(move || {
            let kept = kept_rx.recv().unwrap();
            let mut replays = 0u32;
            while !done.load(std::sync::atomic::Ordering::Relaxed) || replays == 0 {
                let mut ix = Counts::default();
                ringmail_store::shard::recover(
                    &data,
                    0,
                    ringmail_store::Mode::ReadOnly,
                    &mut [&mut ix],
                )
                .unwrap_or_else(|e| panic!("replay {replays}: {e}"));
                for id in &kept {
                    assert!(ix.0.contains_key(id), "replay {replays} lost {id:X}");
                }
                replays += 1;
            }
            replays
        })
    };
    let data2 = data.clone();
    glommio::LocalExecutor::default().run(async move {
        let (shard, mut ix) = open(&data2).await;
        let mut kept = Vec::new();
        for _ in 0..20 {
            let id = store_message(&shard, &vec![7u8; 600]).await;
            ix.0.insert(id, 1);
            kept.push(id);
        }
        kept_tx.send(kept).unwrap();
        for round in 0..300 {
            // Garbage worth compacting: messages stored, then let go.
            for _ in 0..4 {
                let id = store_message(&shard, &vec![round as u8; 2000]).await;
                let_go(&shard, id).await;
            }
            snapshot(&shard, &mut ix).await;
            shard.compact().await.unwrap();
        }
        shard.close().await;
    });
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let replays = reader.join().unwrap();
    assert!(replays > 0);
}
