//! References across shards (docs/mailboxes.md, "Message handles and references
//! across shards"), model-based: shard A's index refers to messages stored on shard B,
//! B's own index holds local references, and random appends, reference adds and drops
//! on both sides, snapshots, compactions and restarts (clean or killed) run against a
//! plain model. At every restart both shards recover unsettled, A's foreign references
//! are applied to B (what the engine's store service does between executors), then
//! both settle. Checked: a message only A refers to survives every restart, whatever
//! B's snapshots and compactions did; one nobody refers to is gone once B settled, and
//! after two snapshot-and-compact rounds not even a fresh recovery finds it; a local
//! count reaching zero before the foreign references arrive loses nothing.

use proptest::prelude::*;
use ringmail_store::message::{self, Envelope};
use ringmail_store::shard::{Index, Replayed, Shard};
use ringmail_store::{record, segment, Handle, Kind, LogConfig, Mode};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::path::Path;

const A: u32 = 0;
const B: u32 = 1;

/// An index of reference counts. Its records (of `kind`) carry the absolute count of
/// one id, so replaying one twice changes nothing. On B (`message_ref`) a message
/// record starts a count of one, the writer's, as the queue does; on A the ids are
/// B's, added by records only, as a mailbox's entries are.
struct Counts {
    kind: Kind,
    message_ref: bool,
    map: BTreeMap<u64, u32>,
}

impl Counts {
    fn local() -> Counts {
        Counts {
            kind: Kind::RcptUpdate,
            message_ref: true,
            map: BTreeMap::new(),
        }
    }

    fn foreign() -> Counts {
        Counts {
            kind: Kind::Mail,
            message_ref: false,
            map: BTreeMap::new(),
        }
    }

    fn set(&mut self, id: u64, n: u32) {
        if n == 0 {
            self.map.remove(&id);
        } else {
            self.map.insert(id, n);
        }
    }
}

fn count_record(id: u64, n: u32) -> Vec<u8> {
    let mut b = id.to_le_bytes().to_vec();
    b.extend_from_slice(&n.to_le_bytes());
    b
}

fn decode_count(p: &[u8]) -> Result<(u64, u32), &'static str> {
    if p.len() != 12 {
        return Err("bad count record");
    }
    Ok((
        u64::from_le_bytes(p[..8].try_into().unwrap()),
        u32::from_le_bytes(p[8..].try_into().unwrap()),
    ))
}

impl Index for Counts {
    fn replay(&mut self, rec: Replayed<'_>) -> Result<(), &'static str> {
        match rec {
            Replayed::Message { decoded, .. } if self.message_ref => {
                self.map.entry(decoded.envelope.id).or_insert(1);
            }
            Replayed::Record { kind, payload, .. } if kind == self.kind => {
                let (id, n) = decode_count(payload)?;
                self.set(id, n);
            }
            _ => {}
        }
        Ok(())
    }

    fn refs(&self, each: &mut dyn FnMut(u64)) {
        for (id, n) in &self.map {
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
        for (id, n) in self.map.range((from, Unbounded)) {
            if !out(&count_record(*id, *n)) {
                return Some(*id);
            }
        }
        None
    }

    fn load(&mut self, item: &[u8]) -> Result<(), &'static str> {
        let (id, n) = decode_count(item)?;
        self.map.insert(id, n);
        Ok(())
    }

    fn clear(&mut self) {
        self.map.clear();
    }
}

fn cfg() -> LogConfig {
    LogConfig {
        segment_bytes_max: 8 << 10,
        ..LogConfig::default()
    }
}

fn body(id: u64, len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64 ^ id).wrapping_mul(31).wrapping_add(seed as u64) as u8)
        .collect()
}

/// Per message on B: its body, the references B's index holds, those A's holds.
#[derive(Default)]
struct Model {
    messages: BTreeMap<u64, (Vec<u8>, u32, u32)>,
}

impl Model {
    fn alive(&self) -> BTreeSet<u64> {
        self.messages
            .iter()
            .filter(|(_, m)| m.1 + m.2 > 0)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The `i`-th (modulo) message that `f` picks, if any.
    fn pick(&self, i: usize, f: impl Fn(&(Vec<u8>, u32, u32)) -> bool) -> Option<u64> {
        let ids: Vec<u64> = self
            .messages
            .iter()
            .filter(|(_, m)| f(m))
            .map(|(id, _)| *id)
            .collect();
        (!ids.is_empty()).then(|| ids[i % ids.len()])
    }
}

/// Both shards, their indexes, as one process has them.
struct World {
    a: Shard,
    b: Shard,
    ax: RefCell<Counts>,
    bx: RefCell<Counts>,
}

/// Opens both shards (unsettled) and checks what holds until they settle.
async fn open_unsettled(data: &Path, model: &Model) -> World {
    let mut ax = Counts::foreign();
    let mut bx = Counts::local();
    let a = Shard::open(data, A, cfg(), &mut [&mut ax]).await.unwrap();
    let b = Shard::open(data, B, cfg(), &mut [&mut bx]).await.unwrap();
    let w = World {
        a,
        b,
        ax: RefCell::new(ax),
        bx: RefCell::new(bx),
    };
    assert!(!w.b.is_settled());
    for id in model.alive() {
        assert!(
            w.b.resolve(id).is_some(),
            "{id:X} gone before the foreign references came"
        );
    }
    assert!(
        !w.b.snapshot(&[&w.bx]).await.unwrap(),
        "a snapshot while unsettled"
    );
    assert_eq!(w.b.compact().await.unwrap().deleted, 0);
    w
}

/// What the store service does at start: A's foreign references go to B, then both
/// settle.
fn exchange(w: &World, model: &Model) {
    assert!(
        w.b.take_foreign().is_empty(),
        "B refers to nothing elsewhere"
    );
    let mut foreign = w.a.take_foreign();
    let to_b = foreign.remove(&B).unwrap_or_default();
    assert!(foreign.is_empty(), "A refers to B only: {foreign:?}");
    let want: usize = model.messages.values().map(|m| m.2 as usize).sum();
    assert_eq!(to_b.len(), want, "one id per foreign reference");
    for id in to_b {
        assert_eq!(Handle::of_id(id).shard, B);
        assert!(w.b.add_ref(id), "{id:X}: a foreign reference to nothing");
    }
    w.a.settle_foreign();
    w.b.settle_foreign();
}

async fn open(data: &Path, model: &Model) -> World {
    let w = open_unsettled(data, model).await;
    exchange(&w, model);
    w
}

async fn close(w: World, clean: bool) {
    w.a.close().await;
    w.b.close().await;
    if clean {
        assert!(w.a.snapshot(&[&w.ax]).await.unwrap());
        assert!(w.b.snapshot(&[&w.bx]).await.unwrap());
    }
}

async fn log_count(shard: &Shard, kind: Kind, id: u64, n: u32) {
    let t = shard
        .append(kind, |out| out.extend_from_slice(&count_record(id, n)))
        .unwrap();
    shard.durable(&t).await.unwrap();
}

async fn append(w: &World, model: &mut Model, len: usize, seed: u8) -> u64 {
    let id = w.b.next_id().await.unwrap();
    let b = body(id, len, seed);
    let env = Envelope {
        id,
        from: "a@b.test".into(),
        ..Envelope::default()
    };
    let t =
        w.b.append_message(id, b.len(), |out| message::encode(out, &env, b"", &b))
            .unwrap();
    w.b.durable_message(&t).await.unwrap();
    w.bx.borrow_mut().set(id, 1);
    model.messages.insert(id, (b, 1, 0));
    id
}

/// B's own index gives up (or takes) one reference.
async fn local(w: &World, model: &mut Model, id: u64, add: bool) {
    let m = model.messages.get_mut(&id).unwrap();
    m.1 = if add { m.1 + 1 } else { m.1 - 1 };
    log_count(&w.b, Kind::RcptUpdate, id, m.1).await;
    w.bx.borrow_mut().set(id, m.1);
    if add {
        assert!(w.b.add_ref(id));
    } else {
        w.b.drop_ref(id);
    }
}

/// A's index takes (or gives up) one reference to B's message: B counts it first
/// when added (the owner adds before it hands a delivery on), last when dropped.
async fn foreign(w: &World, model: &mut Model, id: u64, add: bool) {
    let m = model.messages.get_mut(&id).unwrap();
    if add {
        assert!(w.b.add_ref(id));
        m.2 += 1;
    } else {
        m.2 -= 1;
    }
    log_count(&w.a, Kind::Mail, id, m.2).await;
    w.ax.borrow_mut().set(id, m.2);
    if !add {
        w.b.drop_ref(id);
    }
}

fn check(w: &World, model: &Model, data: &Path) {
    let dir = segment::shard_dir(data, B);
    for (&id, (b, local, foreign)) in &model.messages {
        assert_eq!(w.bx.borrow().map.get(&id).copied().unwrap_or(0), *local);
        assert_eq!(w.ax.borrow().map.get(&id).copied().unwrap_or(0), *foreign);
        if local + foreign == 0 {
            assert_eq!(w.b.resolve(id), None, "{id:X}: nobody refers to it");
            continue;
        }
        assert_eq!(w.b.refs(id), local + foreign, "{id:X}");
        let r = w.b.resolve(id).unwrap_or_else(|| panic!("{id:X} lost"));
        assert_eq!(r.handle, Handle::of_id(id));
        let f = std::fs::File::open(segment::segment_path(&dir, r.seq)).unwrap();
        let mut rec = vec![0u8; r.len as usize];
        f.read_exact_at(&mut rec, r.offset).unwrap();
        let got = record::decode(&rec).unwrap();
        let d = message::decode(got.payload).unwrap();
        assert_eq!(d.envelope.id, id);
        assert_eq!(d.body, &b[..], "{id:X} reads back byte-identical");
    }
    assert_eq!(w.b.len(), model.alive().len());
}

#[derive(Debug, Clone)]
enum Op {
    Append {
        len: usize,
        seed: u8,
    },
    Local {
        i: usize,
        add: bool,
    },
    Foreign {
        i: usize,
        add: bool,
    },
    SnapshotA,
    SnapshotB,
    CompactB,
    /// Both shards restart (one process). `early`: B's index drops a reference
    /// before A's foreign references reach B.
    Restart {
        clean: bool,
        early: Option<usize>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1usize..3000, any::<u8>()).prop_map(|(len, seed)| Op::Append { len, seed }),
        5 => (any::<usize>(), any::<bool>()).prop_map(|(i, add)| Op::Local { i, add }),
        5 => (any::<usize>(), any::<bool>()).prop_map(|(i, add)| Op::Foreign { i, add }),
        1 => Just(Op::SnapshotA),
        1 => Just(Op::SnapshotB),
        3 => Just(Op::CompactB),
        2 => (any::<bool>(), proptest::option::of(any::<usize>()))
            .prop_map(|(clean, early)| Op::Restart { clean, early }),
    ]
}

/// B's index drops one reference of the `i`-th message it refers to, while B is not
/// settled: the entry stays even at zero.
async fn early_drop(w: &World, model: &mut Model, i: usize) {
    let Some(id) = model.pick(i, |m| m.1 > 0) else {
        return;
    };
    local(w, model, id, false).await;
    assert!(w.b.resolve(id).is_some(), "{id:X} dropped while unsettled");
}

fn run(ops: Vec<Op>) {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().to_path_buf();
    ringmail_store::manifest::open_or_create(&data, 2).unwrap();
    glommio::LocalExecutor::default().run(async move {
        let mut model = Model::default();
        let mut w = open(&data, &model).await;
        for op in ops {
            match op {
                Op::Append { len, seed } => {
                    append(&w, &mut model, len, seed).await;
                }
                Op::Local { i, add } => {
                    let pick = model.pick(i, |m| if add { m.1 + m.2 > 0 } else { m.1 > 0 });
                    if let Some(id) = pick {
                        local(&w, &mut model, id, add).await;
                    }
                }
                Op::Foreign { i, add } => {
                    let pick = model.pick(i, |m| if add { m.1 + m.2 > 0 } else { m.2 > 0 });
                    if let Some(id) = pick {
                        foreign(&w, &mut model, id, add).await;
                    }
                }
                Op::SnapshotA => assert!(w.a.snapshot(&[&w.ax]).await.unwrap()),
                Op::SnapshotB => assert!(w.b.snapshot(&[&w.bx]).await.unwrap()),
                Op::CompactB => {
                    for _ in 0..2 {
                        if w.b.snapshot_due() {
                            assert!(w.b.snapshot(&[&w.bx]).await.unwrap());
                        }
                    }
                    w.b.compact().await.unwrap();
                }
                Op::Restart { clean, early } => {
                    close(w, clean).await;
                    w = open_unsettled(&data, &model).await;
                    if let Some(i) = early {
                        early_drop(&w, &mut model, i).await;
                    }
                    exchange(&w, &model);
                }
            }
            check(&w, &model, &data);
        }
        // A kill at the end, then: what nobody refers to is gone for good after two
        // snapshot-and-compact rounds, for a fresh recovery too.
        close(w, false).await;
        let w = open(&data, &model).await;
        check(&w, &model, &data);
        for _ in 0..2 {
            assert!(w.b.snapshot(&[&w.bx]).await.unwrap());
            w.b.compact().await.unwrap();
        }
        check(&w, &model, &data);
        close(w, false).await;
        let mut bx = Counts::local();
        let rec = ringmail_store::shard::recover(&data, B, Mode::ReadOnly, &mut [&mut bx]).unwrap();
        let found: BTreeSet<u64> = rec.map.keys().copied().collect();
        assert_eq!(found, model.alive(), "messages a fresh recovery finds");
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    #[test]
    fn references_across_shards_match_the_model(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops);
    }
}

/// The case the model test may take long to find, spelled out: the message only A
/// refers to sits among garbage on B, B is snapshotted and compacted twice (its
/// record copied forward), then the process is killed; and a second one's last
/// local reference goes while B is unsettled, just before A's reference arrives.
#[test]
fn a_message_only_another_shard_refers_to_survives_compaction_and_restarts() {
    let mut ops = Vec::new();
    for k in 0..30 {
        ops.push(Op::Append { len: 1500, seed: k });
    }
    // The 11th message: A takes a reference, B gives up its own.
    ops.push(Op::Foreign { i: 10, add: true });
    ops.push(Op::Local { i: 10, add: false });
    // Every other local reference goes: B is mostly garbage.
    for _ in 0..29 {
        ops.push(Op::Local { i: 0, add: false });
    }
    ops.push(Op::CompactB);
    ops.push(Op::CompactB);
    ops.push(Op::Restart {
        clean: false,
        early: None,
    });
    // One more with a local and a foreign reference; its local one goes early.
    ops.push(Op::Append { len: 100, seed: 1 });
    ops.push(Op::Foreign { i: 1, add: true });
    ops.push(Op::Restart {
        clean: true,
        early: Some(0),
    });
    ops.push(Op::CompactB);
    ops.push(Op::Restart {
        clean: false,
        early: None,
    });
    run(ops);
}
