//! One shard's message store: the log, the id counter, the handle map, references,
//! snapshots and compaction by liveness.
//!
//! A stored message is named by its [`Handle`] (shard and id) for its whole life; the
//! shard maps each id to where its record is now ([`Resolved`]). A message lives while
//! something refers to it: each index built on the log (the queue: a message with a
//! recipient not delivered or failed yet; the mailboxes later) holds references, and
//! a message whose count reaches zero is garbage. References are never logged on
//! their own: they are derived from the indexes, which are rebuilt from the log (and
//! the snapshot), so recovery recomputes the counts exactly.
//!
//! Recovery loads the newest snapshot (the map of referenced messages, the id
//! reservation and every index's section) and replays the log from the snapshot's
//! position only, so it scales with what is live plus what was written since, not
//! with history. Replay over a snapshot that already holds some of the records after
//! its position must be idempotent: an index applies records as "last writer wins",
//! and a message record for a known id is a location update.
//!
//! Compaction only looks at segments wholly before the durable snapshot's position:
//! everything in them is either a message record (live while referenced) or a record
//! whose effect the snapshot holds. A segment without a live message and without a
//! reader pin is deleted; one whose live share is below a third has its live records
//! copied forward (as [`Kind::Copy`] records, the payload as it is) and is deleted once
//! the copies are durable. Segments mostly full of mail that stays are left alone, so
//! old mail is not copied again and again.

use crate::handle::{Handle, Pins, Resolved};
use crate::log::{BodySource, LogBytes, LogConfig, LogError, ShardLog, Ticket};
use crate::message;
use crate::record::{self, Kind, RECORD_HEADER_BYTES};
use crate::segment::{self, Location, Mode, RecoveryOptions, RecoveryReport, Tail};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// The id counter lives in the low 56 bits; the shard in the top 8 (shards ≤ 256).
pub const COUNTER_BITS: u32 = Handle::SHARD_SHIFT;
pub const COUNTER_MASK: u64 = (1 << COUNTER_BITS) - 1;
/// One past the last counter: a checkpoint never reserves beyond it.
pub const COUNTER_LIMIT: u64 = 1 << COUNTER_BITS;
/// Ids are reserved this many at a time; a restart skips what was left of the block.
pub const ID_BLOCK: u64 = 4096;

pub fn make_id(shard: u32, counter: u64) -> u64 {
    debug_assert!(counter < 1 << COUNTER_BITS);
    ((shard as u64) << COUNTER_BITS) | counter
}

/// The payload of a `Checkpoint` record of the id counter: every counter below
/// `next` may have been handed out (replay continues at `next` or later).
pub fn encode_id_checkpoint(out: &mut Vec<u8>, next: u64) {
    out.push(1);
    out.extend_from_slice(&next.to_le_bytes());
}

/// The `next` of a `Checkpoint` payload.
pub fn decode_id_checkpoint(payload: &[u8]) -> Option<u64> {
    match payload {
        [1, rest @ ..] if rest.len() == 8 => Some(u64::from_le_bytes(rest.try_into().unwrap())),
        _ => None,
    }
}

/// Where the block after one ending at `reserved` ends: never past the last counter
/// (equal to `reserved` once there is none left).
fn next_block(reserved: u64) -> u64 {
    reserved
        .saturating_add(ID_BLOCK)
        .min(COUNTER_LIMIT)
        .max(reserved)
}

/// What an index is handed at replay.
pub enum Replayed<'a> {
    /// A message record (not a compaction copy: the store applies those itself).
    /// The id may be known already (replay over a snapshot, or a copy written by an
    /// older version as a plain message record): then only its place changed.
    Message {
        resolved: Resolved,
        decoded: &'a message::Decoded<'a>,
    },
    /// Any other record the store does not consume itself (recipient updates; the
    /// mailbox records later).
    Record {
        at: Location,
        kind: Kind,
        payload: &'a [u8],
    },
}

/// An in-memory index built on the log (the queue; the mailboxes later). Recovery
/// feeds it the snapshot's section and then every record after the snapshot's
/// position, in one pass shared by all indexes.
pub trait Index {
    /// Applies one replayed record. Must be idempotent over a snapshot that already
    /// holds the record's effect. An error is counted as damage.
    fn replay(&mut self, rec: Replayed<'_>) -> Result<(), &'static str>;
    /// Calls `each` once per reference the index holds (an id may come several times).
    fn refs(&self, each: &mut dyn FnMut(u64));
    /// Part of the index's snapshot section: the items (each handed to `load` again)
    /// after `cursor` (`None`: from the first), in a stable order, each passed to
    /// `out` until it returns false (its chunk is full). Returns the cursor to go on
    /// from, `None` once the last item was passed. The index may change between
    /// calls (the snapshot is written while sessions run): an item may then be
    /// missed or come in its newer state, which is safe, as everything after the
    /// snapshot's position is replayed over it.
    fn snapshot_chunk(
        &self,
        cursor: Option<u64>,
        out: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Option<u64>;
    /// One item of the index's section of the snapshot.
    fn load(&mut self, item: &[u8]) -> Result<(), &'static str>;
    /// Forgets what `load` gave it: the snapshot turned out damaged half-way, and
    /// recovery goes on from an older one.
    fn clear(&mut self);
}

/// Stands in for an index whose snapshot section and records a reader does not
/// need (sections are numbered by place: `accounts::cli` reads only the accounts).
pub struct Ignore;

impl Index for Ignore {
    fn replay(&mut self, _: Replayed<'_>) -> Result<(), &'static str> {
        Ok(())
    }
    fn refs(&self, _: &mut dyn FnMut(u64)) {}
    fn snapshot_chunk(&self, _: Option<u64>, _: &mut dyn FnMut(&[u8]) -> bool) -> Option<u64> {
        None
    }
    fn load(&mut self, _: &[u8]) -> Result<(), &'static str> {
        Ok(())
    }
    fn clear(&mut self) {}
}

/// What the handle map keeps per referenced message: 24 bytes (with its 8-byte key,
/// 32 a slot: the budget for the map and the counts is 100 bytes a message,
/// and a hash table's slots are up to half empty right after it grows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub seq: u32,
    /// Bytes of the record, framing included.
    pub len: u32,
    pub offset: u64,
    /// Where the body starts, counted from the start of the record. The body is the
    /// record's last field, so it runs to the record's end: its length is not kept.
    pub body_offset: u32,
    pub refs: u32,
}

impl Entry {
    fn resolved(&self, id: u64) -> Resolved {
        Resolved {
            handle: Handle::of_id(id),
            seq: self.seq as u64,
            offset: self.offset,
            len: self.len,
            body_offset: self.body_offset,
            body_len: self.body_len(),
        }
    }

    /// Body bytes (from `body_offset` to the record's end).
    pub fn body_len(&self) -> u32 {
        self.len - self.body_offset
    }

    fn of(r: &Resolved, refs: u32) -> Entry {
        assert_eq!(
            r.body_offset as u64 + r.body_len as u64,
            r.len as u64,
            "a message's body ends its record"
        );
        Entry {
            seq: u32::try_from(r.seq).expect("segment sequence numbers fit 32 bits"),
            len: r.len,
            offset: r.offset,
            body_offset: r.body_offset,
            refs,
        }
    }
}

/// What replaying a shard gives.
pub struct Recovered {
    /// Every message replay found, with the references this shard's indexes hold
    /// (zero for one only another shard's index may refer to: kept until the shard
    /// settles, see [`Shard::settle_foreign`]).
    pub map: HashMap<u64, Entry>,
    /// The references this shard's indexes hold to other shards' messages: target
    /// shard -> ids (an id once per reference). The owners count them
    /// (docs/mailboxes.md, "Message handles and references across shards").
    pub foreign: HashMap<u32, Vec<u64>>,
    pub tail: Tail,
    pub report: RecoveryReport,
    /// The first id counter never used or reserved in the shard.
    pub next_counter: u64,
    /// The snapshot recovery started from: its position and size.
    pub snapshot: Option<((u64, u64), u64)>,
    /// The replay position of the snapshot kept beside it (`snapshot.prev`), when
    /// recovery started from the newest and the older one's header reads.
    pub older_snapshot: Option<(u64, u64)>,
}

const SNAPSHOT_MAGIC: &[u8; 8] = b"RMSNAP01";
const SNAPSHOT_HEADER_BYTES: usize = 8 + 4 + 8 + 8 + 8 + 4;
const TAG_ENTRY: u8 = 1;
const TAG_INDEX: u8 = 2;
const TAG_END: u8 = 0xFF;

pub fn snapshot_path(dir: &Path) -> PathBuf {
    dir.join("snapshot")
}

/// The snapshot before the newest: recovery falls back to it when the newest is
/// damaged, and compaction keeps every segment from its position on.
pub fn older_snapshot_path(dir: &Path) -> PathBuf {
    dir.join("snapshot.prev")
}

fn snapshot_temp_path(dir: &Path) -> PathBuf {
    dir.join("snapshot.tmp")
}

/// Created by the operator in a shard directory to start even though no snapshot
/// can be loaded and compaction deleted segments (see [`recover`]).
pub fn replay_whole_log_path(dir: &Path) -> PathBuf {
    dir.join("replay-whole-log")
}

/// Snapshot bytes serialised before they are written out: memory is bounded by it,
/// and the executor runs sessions between chunks.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// Frames one snapshot item like a record: `len u32 | crc32c u32 | tag | payload`.
fn put_item(out: &mut Vec<u8>, tag: u8, payload: &[u8]) {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&[tag]), payload);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.push(tag);
    out.extend_from_slice(payload);
}

struct SnapshotHeader {
    shard: u32,
    at: (u64, u64),
    reserved: u64,
}

fn encode_snapshot_header(h: &SnapshotHeader) -> [u8; SNAPSHOT_HEADER_BYTES] {
    let mut b = [0u8; SNAPSHOT_HEADER_BYTES];
    b[0..8].copy_from_slice(SNAPSHOT_MAGIC);
    b[8..12].copy_from_slice(&h.shard.to_le_bytes());
    b[12..20].copy_from_slice(&h.at.0.to_le_bytes());
    b[20..28].copy_from_slice(&h.at.1.to_le_bytes());
    b[28..36].copy_from_slice(&h.reserved.to_le_bytes());
    let crc = crc32c::crc32c(&b[..36]);
    b[36..40].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode_snapshot_header(b: &[u8; SNAPSHOT_HEADER_BYTES]) -> Option<SnapshotHeader> {
    let u64at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    if &b[0..8] != SNAPSHOT_MAGIC
        || crc32c::crc32c(&b[..36]) != u32::from_le_bytes(b[36..40].try_into().unwrap())
    {
        return None;
    }
    Some(SnapshotHeader {
        shard: u32::from_le_bytes(b[8..12].try_into().unwrap()),
        at: (u64at(12), u64at(20)),
        reserved: u64at(28),
    })
}

/// Reads the items of a snapshot file one at a time (memory: the largest item).
struct ItemReader<R> {
    r: R,
    buf: Vec<u8>,
}

impl<R: Read> ItemReader<R> {
    /// The next item, `None` at a clean end of file; an error for a torn or corrupt one.
    fn next(&mut self) -> io::Result<Option<(u8, &[u8])>> {
        let mut head = [0u8; RECORD_HEADER_BYTES];
        let mut got = 0;
        while got < head.len() {
            match self.r.read(&mut head[got..])? {
                0 if got == 0 => return Ok(None),
                0 => return Err(bad("torn snapshot item")),
                n => got += n,
            }
        }
        let len = u32::from_le_bytes(head[0..4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(head[4..8].try_into().unwrap());
        if len > record::RECORD_PAYLOAD_BYTES_MAX {
            return Err(bad("snapshot item length out of range"));
        }
        self.buf.clear();
        self.buf.resize(len, 0);
        self.r.read_exact(&mut self.buf)?;
        if crc32c::crc32c_append(crc32c::crc32c(&[head[8]]), &self.buf) != crc {
            return Err(bad("snapshot item checksum mismatch"));
        }
        Ok(Some((head[8], &self.buf)))
    }
}

fn bad(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn decode_entry(p: &[u8]) -> Option<(u64, Entry)> {
    if p.len() != 32 {
        return None;
    }
    let u32at = |i: usize| u32::from_le_bytes(p[i..i + 4].try_into().unwrap());
    let u64at = |i: usize| u64::from_le_bytes(p[i..i + 8].try_into().unwrap());
    Some((
        u64at(0),
        Entry {
            seq: u32at(8),
            len: u32at(12),
            offset: u64at(16),
            body_offset: u32at(24),
            refs: 0,
        },
    ))
    .filter(|(_, e)| e.body_offset <= e.len && u32at(28) == e.body_len())
}

fn encode_entry(out: &mut Vec<u8>, id: u64, e: &Entry) {
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&e.seq.to_le_bytes());
    out.extend_from_slice(&e.len.to_le_bytes());
    out.extend_from_slice(&e.offset.to_le_bytes());
    out.extend_from_slice(&e.body_offset.to_le_bytes());
    out.extend_from_slice(&e.body_len().to_le_bytes());
}

/// Whether a snapshot read failed on its bytes (torn, corrupt): recovery then falls
/// back to an older one. Any other error (EIO, EACCES, EMFILE) says nothing about
/// the file, and fails the recovery instead of costing it the snapshot.
fn is_damage(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
    )
}

/// Loads a snapshot file in one streaming pass, straight into `map` and `indexes`:
/// `Ok(None)` when there is none; on an error the caller clears what was loaded.
/// Returns its header, its size and the items that did not decode.
fn load_snapshot(
    path: &Path,
    shard: u32,
    map: &mut HashMap<u64, Entry>,
    indexes: &mut [&mut dyn Index],
) -> io::Result<Option<(SnapshotHeader, u64, u64)>> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let size = f.metadata()?.len();
    let mut r = io::BufReader::with_capacity(1 << 20, f);
    let mut head = [0u8; SNAPSHOT_HEADER_BYTES];
    r.read_exact(&mut head)?;
    let h = decode_snapshot_header(&head).ok_or_else(|| bad("bad snapshot header"))?;
    if h.shard != shard {
        return Err(bad("snapshot of another shard"));
    }
    let mut items = ItemReader { r, buf: Vec::new() };
    let (mut count, mut bad_items) = (0u64, 0u64);
    while let Some((tag, payload)) = items.next()? {
        match tag {
            TAG_ENTRY => match decode_entry(payload) {
                Some((id, e)) => {
                    map.insert(id, e);
                }
                None => bad_items += 1,
            },
            TAG_INDEX => {
                let ok = match payload.split_first() {
                    Some((&n, item)) => indexes
                        .get_mut(n as usize)
                        .is_some_and(|ix| ix.load(item).is_ok()),
                    None => false,
                };
                if !ok {
                    bad_items += 1;
                }
            }
            TAG_END => {
                let want = payload.try_into().ok().map(u64::from_le_bytes);
                if want != Some(count) || items.next()?.is_some() {
                    return Err(bad("snapshot item count mismatch"));
                }
                return Ok(Some((h, size, bad_items)));
            }
            _ => bad_items += 1,
        }
        count += 1;
    }
    Err(bad("snapshot without its end"))
}

/// The replay position in a snapshot file's header, if it reads.
fn snapshot_position_of(path: &Path) -> Option<(u64, u64)> {
    let mut head = [0u8; SNAPSHOT_HEADER_BYTES];
    std::fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    decode_snapshot_header(&head).map(|h| h.at)
}

/// Whether compaction deleted segments of the shard: one is missing between the
/// oldest and the newest, or the oldest had a predecessor.
fn log_compacted(dir: &Path) -> io::Result<Option<String>> {
    let mut seqs: Vec<u64> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()
                    .and_then(segment::parse_segment_name)
            })
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    seqs.sort_unstable();
    let Some(&first) = seqs.first() else {
        return Ok(None);
    };
    if let Some(w) = seqs.windows(2).find(|w| w[1] != w[0] + 1) {
        return Ok(Some(format!(
            "segments {} to {} are deleted",
            w[0] + 1,
            w[1] - 1
        )));
    }
    if segment::read_header(dir, first)?.is_some_and(|h| h.prev_valid_len.is_some()) {
        return Ok(Some(format!("the segments before {first} are deleted")));
    }
    Ok(None)
}

/// Replays a shard: the snapshot (if any), then the log from the snapshot's position,
/// feeding every index; then derives the reference counts from the indexes.
pub fn recover(
    data: &Path,
    shard: u32,
    mode: Mode,
    indexes: &mut [&mut dyn Index],
) -> io::Result<Recovered> {
    recover_with(data, shard, mode, RecoveryOptions::default(), indexes)
}

/// How often a read-only replay starts over when a file vanished under it.
const READ_ONLY_ATTEMPTS: usize = 5;

/// [`recover`] with explicit read options (`opts.start` is set from the snapshot).
///
/// A read-only replay may run beside a live server whose compaction deletes segments
/// (and replaces the snapshot) between our listing a file and opening it. What the
/// server deletes is covered by a newer snapshot, so a replay that starts over reads
/// it: a file that is gone (`NotFound`) makes the replay start over, a few times.
pub fn recover_with(
    data: &Path,
    shard: u32,
    mode: Mode,
    opts: RecoveryOptions,
    indexes: &mut [&mut dyn Index],
) -> io::Result<Recovered> {
    let mut attempt = 1;
    loop {
        match recover_once(data, shard, mode, opts, indexes) {
            Err(e)
                if mode == Mode::ReadOnly
                    && e.kind() == io::ErrorKind::NotFound
                    && attempt < READ_ONLY_ATTEMPTS =>
            {
                attempt += 1;
                for ix in indexes.iter_mut() {
                    ix.clear();
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

fn recover_once(
    data: &Path,
    shard: u32,
    mode: Mode,
    mut opts: RecoveryOptions,
    indexes: &mut [&mut dyn Index],
) -> io::Result<Recovered> {
    let dir = segment::shard_dir(data, shard);
    let mut map: HashMap<u64, Entry> = HashMap::new();
    let mut max_counter: Option<u64> = None;
    let mut damaged = Vec::new();
    let mut snapshot = None;
    let mut older_snapshot = None;
    // The newest snapshot, else the one before it: compaction kept every segment
    // from the older one's position on, so falling back loses nothing.
    let candidates = [snapshot_path(&dir), older_snapshot_path(&dir)];
    let mut unusable: Vec<(&PathBuf, String)> = Vec::new();
    for (n, path) in candidates.iter().enumerate() {
        match load_snapshot(path, shard, &mut map, indexes) {
            Ok(None) => {}
            Ok(Some((h, size, bad_items))) => {
                if bad_items > 0 {
                    damaged.push(format!(
                        "{}: {bad_items} items did not decode",
                        path.display()
                    ));
                }
                max_counter = h.reserved.checked_sub(1);
                opts.start = h.at;
                snapshot = Some((h.at, size));
                if n == 0 {
                    older_snapshot = snapshot_position_of(&candidates[1]).filter(|p| *p <= h.at);
                }
                break;
            }
            Err(e) if is_damage(&e) => {
                map.clear();
                for ix in indexes.iter_mut() {
                    ix.clear();
                }
                unusable.push((path, e.to_string()));
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot read {}: {e}", path.display()),
                ))
            }
        }
    }
    // Without a snapshot the log is replayed from its start: exact unless compaction
    // deleted segments, whose messages (live ones included) and recipient updates
    // would then be lost or undone. The server does not start so; the operator can
    // restore a snapshot or accept duplicates (see `replay_whole_log_path`).
    let from_start = snapshot.is_none();
    if from_start {
        if let Some(gap) = log_compacted(&dir)? {
            let files = if unusable.is_empty() {
                "no snapshot file".to_string()
            } else {
                unusable
                    .iter()
                    .map(|(p, e)| format!("{} ({e})", p.display()))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let allow = replay_whole_log_path(&dir);
            if mode == Mode::Repair && !allow.exists() {
                return Err(io::Error::other(format!(
                    "shard {shard}: no snapshot can be loaded ({files}) and the log in {} \
                     has been compacted ({gap}): replaying it from the start could lose \
                     queued mail and deliver mail again. Restore a snapshot, or create {} \
                     to replay the log from its start anyway (stored copies are kept; \
                     some mail may be delivered twice)",
                    dir.display(),
                    allow.display()
                )));
            }
            damaged.push(format!(
                "no snapshot can be loaded ({files}) and the log has been compacted \
                 ({gap}): replayed from its start, copies of messages kept, updates \
                 in deleted segments missing"
            ));
        }
    }
    for (path, e) in &unusable {
        damaged.push(format!("{}: damaged ({e}), not used", path.display()));
        if mode == Mode::Repair {
            let mut set_aside = path.as_os_str().to_owned();
            set_aside.push(".damaged");
            std::fs::rename(path, set_aside)?;
        }
    }
    let mut bad_records = 0u64;
    let (tail, mut report) =
        segment::recover_shard_with(&dir, shard, mode, opts, |loc, rec| match rec.kind {
            // Over a snapshot, a copy of a message it does not know is garbage: the
            // message's record lies before the snapshot's position (copies are made
            // of live messages only), so its references went away before the
            // snapshot. From the log's start it is unknown only because compaction
            // deleted the original: then it is a message (a duplicate beats a loss).
            Kind::Message | Kind::Copy => match message::decode(rec.payload) {
                Ok(d) => {
                    let id = d.envelope.id;
                    if rec.kind == Kind::Copy && (!from_start || map.contains_key(&id)) {
                        if let Some(e) = map.get_mut(&id) {
                            e.seq = loc.seq as u32;
                            e.offset = loc.offset;
                            e.len = loc.len;
                        }
                        return;
                    }
                    max_counter = max_counter.max(Some(id & COUNTER_MASK));
                    let resolved = Resolved {
                        handle: Handle::of_id(id),
                        seq: loc.seq,
                        offset: loc.offset,
                        len: loc.len,
                        body_offset: (RECORD_HEADER_BYTES + d.body_offset) as u32,
                        body_len: d.body.len() as u32,
                    };
                    map.insert(id, Entry::of(&resolved, 0));
                    for ix in indexes.iter_mut() {
                        if ix
                            .replay(Replayed::Message {
                                resolved,
                                decoded: &d,
                            })
                            .is_err()
                        {
                            bad_records += 1;
                        }
                    }
                }
                Err(_) => bad_records += 1,
            },
            Kind::Checkpoint => match decode_id_checkpoint(rec.payload) {
                Some(next) => max_counter = max_counter.max(next.checked_sub(1)),
                None => bad_records += 1,
            },
            kind => {
                for ix in indexes.iter_mut() {
                    if ix
                        .replay(Replayed::Record {
                            at: loc,
                            kind,
                            payload: rec.payload,
                        })
                        .is_err()
                    {
                        bad_records += 1;
                    }
                }
            }
        })?;
    // References are what the indexes hold, whatever the snapshot or the records said.
    // Those to other shards' messages are counted by their owners; messages with no
    // reference from here stay in the map, as another shard's index may hold one
    // (the shard drops them once it knows, `Shard::settle_foreign`).
    let mut unknown = 0u64;
    let mut foreign: HashMap<u32, Vec<u64>> = HashMap::new();
    for ix in indexes.iter() {
        ix.refs(&mut |id| {
            let target = Handle::of_id(id).shard;
            if target != shard {
                foreign.entry(target).or_default().push(id);
                return;
            }
            match map.get_mut(&id) {
                Some(e) => e.refs += 1,
                None => unknown += 1,
            }
        });
    }
    report.damaged.extend(damaged);
    if bad_records > 0 {
        report.damaged.push(format!(
            "{bad_records} records did not decode or named no stored message"
        ));
    }
    if unknown > 0 {
        report.damaged.push(format!(
            "{unknown} references to messages whose records are gone"
        ));
    }
    Ok(Recovered {
        map,
        foreign,
        tail,
        report,
        next_counter: max_counter.map_or(1, |c| c + 1),
        snapshot,
        older_snapshot,
    })
}

/// A message record appended but not yet durable (see [`Shard::append_message`]).
pub struct MessageTicket {
    pub ticket: Ticket,
    id: u64,
    body_len: u32,
}

/// What one compaction round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Compacted {
    pub deleted: usize,
    /// The segments deleted (readers on other executors close their files of them).
    pub deleted_seqs: Vec<u64>,
    pub copied: usize,
    pub copied_bytes: u64,
}

/// Live share below which a segment's live records are copied forward: copying then
/// costs at most half of what deleting the segment frees.
const COPY_SHARE_DIVISOR: u64 = 3;
/// At most this many bytes of live messages are copied forward per compaction.
const COPY_BYTES_PER_ROUND: u64 = 64 << 20;
/// No snapshot is written before the log grew by this much since the last one.
const SNAPSHOT_LOG_BYTES_MIN: u64 = 4 << 10;

/// A checkpoint on its way to the disk: the task that waits for it.
type Reservation = glommio::task::JoinHandle<Result<Location, LogError>>;

/// The durable snapshot: its replay position, its size in bytes, and
/// `Shard::appended` when it was taken.
type SnapState = ((u64, u64), u64, u64);

/// One shard's store, on its executor.
pub struct Shard {
    shard: u32,
    dir: PathBuf,
    log: ShardLog,
    next_counter: Cell<u64>,
    /// The first counter this process handed out: ids below it are of messages
    /// stored before the last start.
    first_counter: u64,
    /// Counters below this are covered by a durable checkpoint: only those are handed
    /// out, so a restart never gives an id again, whatever became of its message.
    /// Shared with the task that waits for the half-way checkpoint.
    reserved: Rc<Cell<u64>>,
    /// The checkpoint reserving the next block, appended before the current block
    /// runs out so it rides along with a batch that is being written anyway.
    /// (A task, so that the ticket is let go as soon as its batch is written: a held
    /// ticket would keep snapshots from moving past the batch.)
    pending_reservation: RefCell<Option<(Reservation, u64)>>,
    map: RefCell<HashMap<u64, Entry>>,
    /// Bytes of referenced message records per segment.
    live: RefCell<BTreeMap<u32, u64>>,
    pins: Pins,
    /// Record bytes appended through this shard since it opened.
    appended: Cell<u64>,
    /// The durable snapshot: its replay position, its size, and `appended` then.
    snap: Cell<Option<SnapState>>,
    /// The replay position of the snapshot kept beside the durable one
    /// (`snapshot.prev`): compaction deletes only segments wholly before it, so a
    /// recovery that finds the newest damaged replays from it over a complete log.
    older: Cell<Option<(u64, u64)>>,
    snapshotting: Cell<bool>,
    /// `appended` when `snapshot_due` was last asked (see there).
    appended_when_asked: Cell<u64>,
    /// Until every shard's foreign references to this one were counted (see
    /// [`Shard::settle_foreign`]), a count of zero is no proof of garbage: entries at
    /// zero stay, and nothing is snapshotted or compacted.
    unsettled: Cell<bool>,
    /// What this shard's indexes refer to on other shards, from recovery, until the
    /// store service takes it ([`Shard::take_foreign`]).
    foreign: RefCell<HashMap<u32, Vec<u64>>>,
}

impl Shard {
    /// Recovers the shard (repairing a torn tail), feeding `indexes`, and opens its
    /// log for appending.
    pub async fn open(
        data: &Path,
        shard: u32,
        cfg: LogConfig,
        indexes: &mut [&mut dyn Index],
    ) -> io::Result<Shard> {
        let rec = recover(data, shard, Mode::Repair, indexes)?;
        if rec.report.truncated_bytes > 0 || !rec.report.damaged.is_empty() {
            tracing::warn!(shard, truncated_bytes = rec.report.truncated_bytes, damaged = ?rec.report.damaged, "recovery repaired the log");
        }
        tracing::info!(
            shard,
            segments = rec.report.segments,
            records = rec.report.records,
            messages = rec.map.len(),
            unreferenced = rec.map.values().filter(|e| e.refs == 0).count(),
            foreign_refs = rec.foreign.values().map(Vec::len).sum::<usize>(),
            snapshot = rec.snapshot.is_some(),
            "shard recovered"
        );
        Self::open_recovered(data, shard, cfg, rec).await
    }

    async fn open_recovered(
        data: &Path,
        shard: u32,
        cfg: LogConfig,
        rec: Recovered,
    ) -> io::Result<Shard> {
        let dir = segment::shard_dir(data, shard);
        let log = ShardLog::open(&dir, shard, rec.tail, cfg).await?;
        let counter = rec.next_counter;
        // The first block of ids, durable before any of it is handed out.
        let reserved = next_block(counter);
        let ticket = log
            .append(Kind::Checkpoint, |out| encode_id_checkpoint(out, reserved))
            .map_err(|e| io::Error::other(e.to_string()))?;
        log.durable(ticket)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        let mut live = BTreeMap::new();
        for e in rec.map.values() {
            *live.entry(e.seq).or_default() += e.len as u64;
        }
        Ok(Shard {
            shard,
            dir,
            log,
            next_counter: Cell::new(counter),
            first_counter: counter,
            reserved: Rc::new(Cell::new(reserved)),
            pending_reservation: RefCell::new(None),
            map: RefCell::new(rec.map),
            live: RefCell::new(live),
            pins: Pins::default(),
            appended: Cell::new(0),
            snap: Cell::new(rec.snapshot.map(|(at, size)| (at, size, 0))),
            older: Cell::new(rec.older_snapshot),
            snapshotting: Cell::new(false),
            appended_when_asked: Cell::new(0),
            unsettled: Cell::new(true),
            foreign: RefCell::new(rec.foreign),
        })
    }

    pub fn shard(&self) -> u32 {
        self.shard
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log(&self) -> &ShardLog {
        &self.log
    }

    /// Reader pins of this shard's segments.
    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// Where message `id` is now, if something refers to it (before the shard
    /// settles: if it is stored).
    pub fn resolve(&self, id: u64) -> Option<Resolved> {
        self.map.borrow().get(&id).map(|e| e.resolved(id))
    }

    /// Whether message `id` was stored before this process opened the shard (then,
    /// after a crash, what was done with it may not all be on record).
    pub fn stored_before_open(&self, id: u64) -> bool {
        id & COUNTER_MASK < self.first_counter
    }

    /// References held on message `id` (0: not stored, or garbage).
    pub fn refs(&self, id: u64) -> u32 {
        self.map.borrow().get(&id).map_or(0, |e| e.refs)
    }

    /// Segments holding live (referenced) message records, and those records' bytes.
    pub fn live_figures(&self) -> (u64, u64) {
        let live = self.live.borrow();
        (
            live.values().filter(|b| **b > 0).count() as u64,
            live.values().sum(),
        )
    }

    /// Messages referenced now (before the shard settles: stored, referenced or not).
    pub fn len(&self) -> usize {
        self.map.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.borrow().is_empty()
    }

    /// Takes the next id of this shard. Ids are handed out only from a block a
    /// durable checkpoint has reserved, so no id is ever given twice, not even one
    /// whose message was answered 451 and never logged. Waits only when a block is
    /// used up before the next one's checkpoint (appended at half-way) is durable.
    /// Fails once the shard's 2^56 counters are used up: an id past them would carry
    /// into the shard bits and name another shard's message.
    pub async fn next_id(&self) -> Result<u64, LogError> {
        loop {
            let c = self.next_counter.get();
            let reserved = self.reserved.get();
            if c < reserved {
                self.next_counter.set(c + 1);
                let target = next_block(reserved);
                if target > reserved
                    && reserved - c <= ID_BLOCK / 2
                    && self.pending_reservation.borrow().is_none()
                {
                    // An append fails only when the log is closing: the next call
                    // tries again, and the block's end waits for it.
                    if let Ok(t) =
                        self.append(Kind::Checkpoint, |out| encode_id_checkpoint(out, target))
                    {
                        let log = self.log.clone();
                        let reserved = self.reserved.clone();
                        let task = glommio::spawn_local(async move {
                            let r = log.durable_ref(&t).await;
                            // Raised before the ticket goes: a snapshot whose position
                            // passes the checkpoint must hold its reservation.
                            if r.is_ok() {
                                reserved.set(reserved.get().max(target));
                            }
                            drop(t);
                            r
                        })
                        .detach();
                        *self.pending_reservation.borrow_mut() = Some((task, target));
                    }
                }
                return Ok(make_id(self.shard, c));
            }
            let target = next_block(reserved);
            if target == reserved {
                return Err(LogError::Io(format!(
                    "shard {} has used all {COUNTER_BITS}-bit queue ids",
                    self.shard
                )));
            }
            let pending = self.pending_reservation.borrow_mut().take();
            let reached = match pending {
                Some((task, t)) => match task.await {
                    Some(Ok(_)) => t,
                    // The batch that carried it failed, maybe thousands of ids ago:
                    // its error is stale and the disk may be healthy again, so one
                    // fresh checkpoint decides.
                    _ => self.reserve(target).await?,
                },
                None => self.reserve(target).await?,
            };
            self.reserved.set(self.reserved.get().max(reached));
        }
    }

    /// Whether a checkpoint of the next block is appended and not yet durable.
    pub fn reservation_pending(&self) -> bool {
        self.pending_reservation.borrow().is_some()
    }

    /// Makes a checkpoint reserving every counter below `target` durable.
    pub async fn reserve(&self, target: u64) -> Result<u64, LogError> {
        let t = self.append(Kind::Checkpoint, |out| encode_id_checkpoint(out, target))?;
        self.log.durable_ref(&t).await?;
        // Applied before the ticket goes: a snapshot past the checkpoint holds it.
        self.reserved.set(self.reserved.get().max(target));
        Ok(target)
    }

    /// Appends a record that is not a message (its indexes' records): keep the ticket
    /// until its effect is applied in memory.
    pub fn append(&self, kind: Kind, write: impl FnOnce(&mut Vec<u8>)) -> Result<Ticket, LogError> {
        let t = self.log.append(kind, write)?;
        self.appended.set(self.appended.get() + t.len() as u64);
        Ok(t)
    }

    /// Appends message `id`'s record; `write` encodes the payload (see
    /// `message::encode`), whose last `body_len` bytes are the body.
    pub fn append_message(
        &self,
        id: u64,
        body_len: usize,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Result<MessageTicket, LogError> {
        Ok(MessageTicket {
            ticket: self.append(Kind::Message, write)?,
            id,
            body_len: body_len as u32,
        })
    }

    /// Appends message `id`'s record: what `head` writes (see `message::encode_head`),
    /// then `body`, copied once from its pieces into the log's write buffer with its
    /// CRC32C in the same pass (returned with the ticket).
    pub fn append_message_with_body(
        &self,
        id: u64,
        head: impl FnOnce(&mut Vec<u8>),
        body: &dyn BodySource,
    ) -> Result<(MessageTicket, u32), LogError> {
        let (ticket, crc) = self.log.append_with_body(Kind::Message, head, body)?;
        self.appended.set(self.appended.get() + ticket.len() as u64);
        let t = MessageTicket {
            ticket,
            id,
            body_len: body.len() as u32,
        };
        Ok((t, crc))
    }

    /// [`Shard::durable_message`], and the body's bytes in the buffer the batch was
    /// written from (no copy, no read).
    pub async fn durable_message_bytes(
        &self,
        t: &MessageTicket,
    ) -> Result<(Resolved, LogBytes), LogError> {
        let (_, bytes) = self.log.durable_bytes(&t.ticket).await?;
        let r = self.durable_message(t).await?;
        Ok((r, bytes.suffix(t.body_len as usize)))
    }

    /// Waits until a message record is durable; it then is in the handle map with
    /// one reference, the caller's (which it hands to an index, or drops).
    pub async fn durable_message(&self, t: &MessageTicket) -> Result<Resolved, LogError> {
        let loc = self.log.durable_ref(&t.ticket).await?;
        let r = Resolved {
            handle: Handle::of_id(t.id),
            seq: loc.seq,
            offset: loc.offset,
            len: loc.len,
            body_offset: loc.len - t.body_len,
            body_len: t.body_len,
        };
        let old = self.map.borrow_mut().insert(t.id, Entry::of(&r, 1));
        debug_assert!(old.is_none(), "message {:X} stored twice", t.id);
        *self.live.borrow_mut().entry(r.seq as u32).or_default() += r.len as u64;
        Ok(r)
    }

    /// Waits until a record is durable; the caller keeps the ticket until applied.
    pub async fn durable(&self, t: &Ticket) -> Result<Location, LogError> {
        self.log.durable_ref(t).await
    }

    /// The references this shard's indexes held to other shards' messages at
    /// recovery (target shard -> ids), for the owners to count; empty once taken.
    pub fn take_foreign(&self) -> HashMap<u32, Vec<u64>> {
        std::mem::take(&mut *self.foreign.borrow_mut())
    }

    /// Whether the shard still waits for other shards' references (see
    /// [`Shard::settle_foreign`]).
    pub fn is_settled(&self) -> bool {
        !self.unsettled.get()
    }

    /// Every other shard's references to this one are counted now (their indexes
    /// were recovered and their foreign references applied): what nobody refers to is
    /// garbage. Drops those entries, and from now on a count reaching zero does, and
    /// snapshots and compaction run. Returns the messages dropped (0 when settled
    /// already).
    pub fn settle_foreign(&self) -> usize {
        if !self.unsettled.replace(false) {
            return 0;
        }
        let mut map = self.map.borrow_mut();
        let mut live = self.live.borrow_mut();
        let before = map.len();
        map.retain(|_, e| {
            if e.refs > 0 {
                return true;
            }
            if let Some(b) = live.get_mut(&e.seq) {
                *b -= e.len as u64;
                if *b == 0 {
                    live.remove(&e.seq);
                }
            }
            false
        });
        // Replay may have seen many more messages than live on (the history after
        // the snapshot): the table keeps its peak size unless told.
        map.shrink_to_fit();
        let dropped = before - map.len();
        tracing::info!(
            shard = self.shard,
            dropped,
            messages = map.len(),
            "references settled"
        );
        dropped
    }

    /// One more reference to a stored message; false if it is not stored (any more).
    /// Before the shard settles a message at zero references is still stored.
    pub fn add_ref(&self, id: u64) -> bool {
        match self.map.borrow_mut().get_mut(&id) {
            Some(e) => {
                e.refs += 1;
                true
            }
            None => false,
        }
    }

    /// Drops a reference; at zero the message is garbage: it no longer resolves and
    /// compaction reclaims its bytes. Returns the references left. Before the shard
    /// settles a message at zero stays (another shard's reference may be on its way).
    pub fn drop_ref(&self, id: u64) -> u32 {
        let mut map = self.map.borrow_mut();
        let Some(e) = map.get_mut(&id).filter(|e| e.refs > 0) else {
            debug_assert!(false, "drop_ref of {id:X}, which is not referenced");
            return 0;
        };
        e.refs -= 1;
        let left = e.refs;
        if left == 0 && !self.unsettled.get() {
            let e = map.remove(&id).unwrap();
            let mut live = self.live.borrow_mut();
            if let Some(b) = live.get_mut(&e.seq) {
                *b -= e.len as u64;
                if *b == 0 {
                    live.remove(&e.seq);
                }
            }
        }
        left
    }

    /// Whether the log grew enough since the last snapshot for a new one: at least
    /// twice the last snapshot's size, so snapshots cost at most half of the log.
    /// Also while only one snapshot is kept: compaction waits for a second. And once
    /// the log has gone quiet (nothing appended since the last time this was asked,
    /// compaction asks every round) while the older snapshot lies segments behind the
    /// newest: compaction stops at the older snapshot, so without this the segments
    /// between the two would stay until mail flows again. That takes two snapshots
    /// in a quiet spell when the newest was taken while mail flowed (the first makes
    /// the newest the older one), and then none: both lie in the last segment.
    pub fn snapshot_due(&self) -> bool {
        let appended = self.appended.get();
        let quiet = self.appended_when_asked.replace(appended) == appended;
        if self.unsettled.get() {
            return false;
        }
        let Some((at, size, then)) = self.snap.get() else {
            return appended >= SNAPSHOT_LOG_BYTES_MIN;
        };
        let Some(older) = self.older.get() else {
            return true;
        };
        appended - then >= (2 * size).max(SNAPSHOT_LOG_BYTES_MIN) || (quiet && older.0 < at.0)
    }

    /// Writes a snapshot of the handle map, the id reservation and `indexes` (in the
    /// order recovery is given them), then keeps the one it replaces as the older
    /// snapshot. Its position is fixed first; then it is serialised a chunk at a
    /// time, each written off the executor, so memory is bounded by a chunk (and the
    /// list of ids, 8 bytes a message) and sessions run meanwhile: a message that
    /// goes or moves meanwhile is written as it is then, or not at all, which replay
    /// from the position makes right. Returns false, writing nothing, while another
    /// snapshot is being written or the shard is not settled (its map then holds
    /// messages that may be garbage, and compaction waits anyway).
    pub async fn snapshot(&self, indexes: &[&RefCell<dyn Index>]) -> io::Result<bool> {
        struct Done<'a>(&'a Cell<bool>);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.set(false);
            }
        }
        if self.unsettled.get() || self.snapshotting.replace(true) {
            return Ok(false);
        }
        let _done = Done(&self.snapshotting);
        // Synchronous up to the first await: the position, the reservation and the
        // ids are of one instant, and every record after the position is replayed.
        let at = self.log.replay_start();
        let reserved = self.reserved.get();
        let appended = self.appended.get();
        let ids: Vec<u64> = self.map.borrow().keys().copied().collect();
        let mut out = SnapshotOut::create(&self.dir).await?;
        out.buf
            .extend_from_slice(&encode_snapshot_header(&SnapshotHeader {
                shard: self.shard,
                at,
                reserved,
            }));
        let mut count = 0u64;
        let mut item = Vec::with_capacity(64);
        for chunk in ids.chunks(SNAPSHOT_CHUNK_BYTES / 41) {
            {
                let map = self.map.borrow();
                for id in chunk {
                    if let Some(e) = map.get(id) {
                        item.clear();
                        encode_entry(&mut item, *id, e);
                        put_item(&mut out.buf, TAG_ENTRY, &item);
                        count += 1;
                    }
                }
            }
            out.flush_if_full().await?;
        }
        drop(ids);
        for (n, ix) in indexes.iter().enumerate() {
            let mut cursor = None;
            loop {
                cursor = ix.borrow().snapshot_chunk(cursor, &mut |b| {
                    item.clear();
                    item.push(n as u8);
                    item.extend_from_slice(b);
                    put_item(&mut out.buf, TAG_INDEX, &item);
                    count += 1;
                    out.buf.len() < SNAPSHOT_CHUNK_BYTES
                });
                out.flush_if_full().await?;
                if cursor.is_none() {
                    break;
                }
            }
        }
        put_item(&mut out.buf, TAG_END, &count.to_le_bytes());
        let size = out.finish().await?;
        // Counted here, on the executor: the writes ran on the blocking thread, whose
        // counters nobody reads.
        crate::stats::add(|c| c.snapshot_bytes += size);
        self.older.set(self.snap.get().map(|(p, _, _)| p));
        self.snap.set(Some((at, size, appended)));
        tracing::debug!(shard = self.shard, bytes = size, at = ?at, "snapshot written");
        Ok(true)
    }

    /// Replay position of the durable snapshot, if any.
    pub fn snapshot_position(&self) -> Option<(u64, u64)> {
        self.snap.get().map(|(at, _, _)| at)
    }

    /// Replay position of the older snapshot kept beside it: compaction reclaims
    /// only segments wholly before it.
    pub fn compaction_position(&self) -> Option<(u64, u64)> {
        self.older.get()
    }

    /// Reclaims space (see the module doc): deletes the segments before the older
    /// snapshot's position that hold no live message and no reader pin, after copying
    /// forward the live records of those whose live share is below a third.
    /// Nothing before the shard settles.
    pub async fn compact(&self) -> io::Result<Compacted> {
        let mut done = Compacted::default();
        if self.unsettled.get() {
            return Ok(done);
        }
        let Some((p_seq, _)) = self.compaction_position() else {
            return Ok(done);
        };
        let dir = self.dir.clone();
        let segs = off_executor(move || list_sealed(&dir, p_seq)).await?;
        let mut dead = Vec::new();
        let mut copy_from = Vec::new();
        {
            let live = self.live.borrow();
            let mut budget = COPY_BYTES_PER_ROUND;
            for &(seq, size) in &segs {
                let l = live.get(&(seq as u32)).copied().unwrap_or(0);
                if l == 0 {
                    if !self.pins.is_pinned(seq) {
                        dead.push(seq);
                    }
                } else if l * COPY_SHARE_DIVISOR < size && l <= budget {
                    budget -= l;
                    copy_from.push(seq);
                }
            }
        }
        if !copy_from.is_empty() {
            let (n, bytes) = self.copy_forward(&copy_from).await?;
            done.copied = n;
            done.copied_bytes = bytes;
            let live = self.live.borrow();
            dead.extend(
                copy_from
                    .into_iter()
                    .filter(|s| !live.contains_key(&(*s as u32)) && !self.pins.is_pinned(*s)),
            );
        }
        if dead.is_empty() {
            return Ok(done);
        }
        dead.sort_unstable();
        done.deleted = dead.len();
        done.deleted_seqs = dead.clone();
        let dir = self.dir.clone();
        off_executor(move || delete_segments(&dir, &dead)).await?;
        tracing::info!(
            shard = self.shard,
            deleted = done.deleted,
            copied = done.copied,
            "compacted"
        );
        Ok(done)
    }

    /// Copies the live message records of segments `seqs` to the head of the log (as
    /// `Copy` records, payload as it is) and moves their handles there once durable.
    async fn copy_forward(&self, seqs: &[u64]) -> io::Result<(usize, u64)> {
        let mut todo: Vec<(u64, Entry)> = self
            .map
            .borrow()
            .iter()
            .filter(|(_, e)| seqs.contains(&(e.seq as u64)))
            .map(|(id, e)| (*id, *e))
            .collect();
        todo.sort_unstable_by_key(|(_, e)| (e.seq, e.offset));
        let log_err = |e: LogError| io::Error::other(e.to_string());
        let mut tickets = Vec::with_capacity(todo.len());
        let mut file: Option<(u64, glommio::io::DmaFile)> = None;
        for (id, e) in todo {
            if file.as_ref().is_none_or(|(s, _)| *s != e.seq as u64) {
                if let Some((_, f)) = file.take() {
                    let _ = f.close().await;
                }
                let f = glommio::io::DmaFile::open(segment::segment_path(&self.dir, e.seq as u64))
                    .await?;
                file = Some((e.seq as u64, f));
            }
            let f = &file.as_ref().unwrap().1;
            let bytes = f.read_at(e.offset, e.len as usize).await?;
            let rec = record::decode(&bytes).map_err(|err| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("record of {id:016X}: {err:?}"),
                )
            })?;
            // From this check to the append nothing awaits: a message whose last
            // reference went meanwhile is not copied.
            if self.map.borrow().get(&id).map(|x| (x.seq, x.offset)) != Some((e.seq, e.offset)) {
                continue;
            }
            let payload = rec.payload;
            let t = self
                .append(Kind::Copy, |out| out.extend_from_slice(payload))
                .map_err(log_err)?;
            crate::stats::add(|c| c.copied_bytes += e.len as u64);
            tickets.push((id, e, t));
        }
        if let Some((_, f)) = file.take() {
            let _ = f.close().await;
        }
        let (mut n, mut bytes) = (0, 0);
        for (id, old, t) in tickets {
            let loc = self.log.durable_ref(&t).await.map_err(log_err)?;
            let mut map = self.map.borrow_mut();
            let Some(e) = map.get_mut(&id) else { continue };
            if (e.seq, e.offset) != (old.seq, old.offset) {
                continue;
            }
            e.seq = loc.seq as u32;
            e.offset = loc.offset;
            let mut live = self.live.borrow_mut();
            if let Some(b) = live.get_mut(&old.seq) {
                *b -= old.len as u64;
                if *b == 0 {
                    live.remove(&old.seq);
                }
            }
            *live.entry(e.seq).or_default() += e.len as u64;
            n += 1;
            bytes += e.len as u64;
        }
        Ok((n, bytes))
    }

    /// Syncs and closes the log (shutdown); snapshot with [`Shard::snapshot`] after
    /// this if wanted.
    pub async fn close(&self) {
        self.log.close().await;
    }
}

/// A snapshot file being written: the chunk serialised so far and the temp file.
struct SnapshotOut {
    dir: PathBuf,
    file: Option<std::fs::File>,
    buf: Vec<u8>,
    written: u64,
}

impl SnapshotOut {
    async fn create(dir: &Path) -> io::Result<SnapshotOut> {
        let tmp = snapshot_temp_path(dir);
        let file = off_executor(move || std::fs::File::create(tmp)).await?;
        Ok(SnapshotOut {
            dir: dir.to_path_buf(),
            file: Some(file),
            buf: Vec::with_capacity(SNAPSHOT_CHUNK_BYTES + (64 << 10)),
            written: 0,
        })
    }

    /// Writes the chunk out (off the executor) once it is full.
    async fn flush_if_full(&mut self) -> io::Result<()> {
        if self.buf.len() >= SNAPSHOT_CHUNK_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> io::Result<()> {
        let mut f = self.file.take().expect("snapshot file open");
        let buf = std::mem::take(&mut self.buf);
        let (f, mut buf) = off_executor(move || -> io::Result<_> {
            f.write_all(&buf)?;
            Ok((f, buf))
        })
        .await?;
        self.written += buf.len() as u64;
        buf.clear();
        self.buf = buf;
        self.file = Some(f);
        Ok(())
    }

    /// Makes the file durable and the newest snapshot; the one it replaces becomes
    /// the older one. A crash between the renames leaves the older one only, which
    /// recovery loads. Returns the file's size.
    async fn finish(mut self) -> io::Result<u64> {
        self.flush().await?;
        let f = self.file.take().expect("snapshot file open");
        let dir = self.dir.clone();
        off_executor(move || -> io::Result<()> {
            f.sync_all()?;
            drop(f);
            let newest = snapshot_path(&dir);
            match std::fs::rename(&newest, older_snapshot_path(&dir)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            std::fs::rename(snapshot_temp_path(&dir), newest)?;
            segment::sync_dir(&dir)
        })
        .await?;
        Ok(self.written)
    }
}

/// Runs blocking file-system calls (directory reads, unlinks, fsyncs) on glommio's
/// blocking thread: on the executor a slow disk would stall every session of the core.
async fn off_executor<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    glommio::executor().spawn_blocking(f).await
}

/// Segments before `below` with their valid lengths (sealed: the next header says).
fn list_sealed(dir: &Path, below: u64) -> io::Result<Vec<(u64, u64)>> {
    #[cfg(test)]
    tests::note_thread(dir);
    let mut seqs: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()
                .and_then(segment::parse_segment_name)
        })
        .filter(|s| *s < below)
        .collect();
    seqs.sort_unstable();
    Ok(seqs
        .into_iter()
        .map(|s| {
            // The next segment may be gone (deleted by an earlier compaction): then the
            // file's length, which is never less than what it holds.
            let len = segment::sealed_len(dir, s).or_else(|| {
                std::fs::metadata(segment::segment_path(dir, s))
                    .ok()
                    .map(|m| m.len())
            });
            (s, len.unwrap_or(0))
        })
        .collect())
}

/// Deletes segments, then makes the deletions durable.
fn delete_segments(dir: &Path, seqs: &[u64]) -> io::Result<()> {
    #[cfg(test)]
    tests::note_thread(dir);
    for seq in seqs {
        std::fs::remove_file(segment::segment_path(dir, *seq))?;
    }
    segment::sync_dir(dir)
}

impl crate::reader::Owner for Shard {
    fn resolve(&self, id: u64) -> Option<Resolved> {
        Shard::resolve(self, id)
    }

    fn pins(&self) -> &Pins {
        Shard::pins(self)
    }

    fn add_ref(&self, id: u64) -> bool {
        Shard::add_ref(self, id)
    }

    fn drop_ref(&self, id: u64) -> u32 {
        Shard::drop_ref(self, id)
    }

    fn settle(&self) -> usize {
        self.settle_foreign()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::thread::ThreadId;

    /// The map's share of the memory budget (< 100 B a message with the
    /// counts): 24 bytes an entry, 32 a slot with its key.
    #[test]
    fn a_handle_map_entry_is_24_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 24);
        assert_eq!(std::mem::size_of::<(u64, Entry)>(), 32);
    }

    /// The threads compaction's file-system calls ran on, per shard directory.
    static FS_THREADS: Mutex<Vec<(PathBuf, ThreadId)>> = Mutex::new(Vec::new());

    pub(super) fn note_thread(dir: &Path) {
        FS_THREADS
            .lock()
            .unwrap()
            .push((dir.to_path_buf(), std::thread::current().id()));
    }

    #[test]
    fn compaction_does_its_file_system_calls_off_the_executor_thread() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().to_path_buf();
        crate::manifest::open_or_create(&data, 1).unwrap();
        let dir = segment::shard_dir(&data, 0);
        let cfg = LogConfig {
            segment_bytes_max: 8 << 10,
            ..LogConfig::default()
        };
        let (executor, done) = glommio::LocalExecutor::default().run(async move {
            let shard = Shard::open(&data, 0, cfg, &mut []).await.unwrap();
            shard.settle_foreign();
            for _ in 0..10 {
                let id = shard.next_id().await.unwrap();
                let env = message::Envelope {
                    id,
                    ..Default::default()
                };
                let body = vec![b'x'; 2000];
                let t = shard
                    .append_message(id, body.len(), |out| message::encode(out, &env, b"", &body))
                    .unwrap();
                shard.durable_message(&t).await.unwrap();
                assert_eq!(shard.drop_ref(id), 0);
            }
            // Two: compaction keeps what the older one needs.
            assert!(shard.snapshot(&[]).await.unwrap());
            assert!(shard.snapshot(&[]).await.unwrap());
            let done = shard.compact().await.unwrap();
            shard.close().await;
            (std::thread::current().id(), done)
        });
        assert!(done.deleted >= 2, "segments were deleted: {done:?}");
        let threads: Vec<ThreadId> = FS_THREADS
            .lock()
            .unwrap()
            .iter()
            .filter(|(d, _)| *d == dir)
            .map(|(_, t)| *t)
            .collect();
        // One listing, one deletion.
        assert_eq!(threads.len(), 2, "{threads:?}");
        assert!(
            threads.iter().all(|t| *t != executor),
            "a file-system call ran on the executor thread"
        );
    }
}
