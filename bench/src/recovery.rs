//! Recovery against the number of stored messages (`ringmail-recovery`, behind
//! `bench/recovery.sh`): the measured points, their Markdown table and their plot. The
//! orchestration (fill, drop the page cache, restart) is in `bin/ringmail-recovery.rs`.
//!
//! The mailbox case (docs/mailboxes.md): [`fill_mailboxes`] writes a data directory of
//! users and their INBOXes offline, laid out as the server lays it out, and
//! [`open_mailboxes`] recovers it as the server's executors do (one thread per shard,
//! each shard's foreign references counted by their owner, then every shard
//! settled), for a restart figure that needs no server.

use ringmail::queue::Spool;
use ringmail_store::accounts::{home_shard, AccountIndex, AccountRecord};
use ringmail_store::mailbox::{MailIndex, NewEntry, Quota, INBOX};
use ringmail_store::message::{self, Envelope, RcptStatus, RcptUpdate, Recipient};
use ringmail_store::{Index, Kind, LogConfig};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;

/// One cold restart of `ringmail serve`: exec until its `ringmail ready` line.
#[derive(Debug, Clone, PartialEq)]
pub struct Restart {
    pub seconds: f64,
    /// `VmRSS` and `VmHWM` when ready.
    pub rss_bytes: u64,
    pub hwm_bytes: u64,
    /// User + system CPU until ready.
    pub cpu_seconds: f64,
}

/// One offline `ringmail queue list` with a cold page cache.
#[derive(Debug, Clone, PartialEq)]
pub struct Listing {
    pub seconds: f64,
    pub user_seconds: f64,
    pub system_seconds: f64,
    pub max_rss_bytes: u64,
}

/// One data directory: `live` queued messages, behind `history` finished ones.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub live: u64,
    pub history: u64,
    pub size: usize,
    pub data_bytes: u64,
    /// The first start after the fill: nothing but the log to recover from.
    pub first: Restart,
    /// A second start, after the first one stopped cleanly (a server that snapshots
    /// its indexes at shutdown recovers from the snapshot).
    pub again: Restart,
    pub listing: Listing,
}

impl Point {
    /// Resident bytes per stored (live) message when ready, over what an empty data
    /// directory's server holds in the same run.
    pub fn bytes_per_message(&self, r: &Restart, empty_rss: u64) -> f64 {
        r.rss_bytes.saturating_sub(empty_rss) as f64 / self.live.max(1) as f64
    }

    pub fn to_json(&self, empty_rss: u64) -> Value {
        let restart = |r: &Restart| {
            json!({
                "seconds": r.seconds, "vm_rss_bytes": r.rss_bytes, "vm_hwm_bytes": r.hwm_bytes,
                "cpu_seconds": r.cpu_seconds,
                "rss_bytes_per_message": r.rss_bytes as f64 / self.live.max(1) as f64,
                "rss_over_empty_bytes_per_message": self.bytes_per_message(r, empty_rss),
            })
        };
        json!({
            "live_messages": self.live, "history_messages": self.history,
            "body_bytes": self.size, "data_bytes": self.data_bytes,
            "first_restart": restart(&self.first),
            "restart_after_clean_stop": restart(&self.again),
            "queue_list": {
                "seconds": self.listing.seconds, "user_seconds": self.listing.user_seconds,
                "system_seconds": self.listing.system_seconds,
                "max_rss_bytes": self.listing.max_rss_bytes,
            },
        })
    }
}

fn mib(b: u64) -> String {
    format!("{:.0}", b as f64 / (1 << 20) as f64)
}

fn count(n: u64) -> String {
    match n {
        0 => "0".into(),
        n if n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n % 1000 == 0 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

/// The table for RESULTS.md. Targets: restart < 5 s, ≤ 400 B resident per message.
pub fn markdown(points: &[Point], empty_rss: u64) -> String {
    let mut out = String::from(
        "| queued | history | data MiB | restart (first / after clean stop) | RSS MiB (HWM) | B/msg | B/msg over empty | `queue list` | its max RSS MiB |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in points {
        let r = &p.again;
        out.push_str(&format!(
            "| {} | {} | {} | {:.2} / {:.2} s | {} ({}) | {:.0} | {:.0} | {:.2} s | {} |\n",
            count(p.live),
            count(p.history),
            mib(p.data_bytes),
            p.first.seconds,
            r.seconds,
            mib(r.rss_bytes),
            mib(r.hwm_bytes),
            r.rss_bytes as f64 / p.live.max(1) as f64,
            p.bytes_per_message(r, empty_rss),
            p.listing.seconds,
            mib(p.listing.max_rss_bytes),
        ));
    }
    out
}

/// Two panels: restart time and resident bytes per message against queued messages
/// (log scale), the history points as separate markers, the targets as dashed lines.
pub fn svg(points: &[Point], empty_rss: u64, title: &str) -> Result<String, String> {
    use plotters::prelude::*;
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    let plain: Vec<&Point> = points.iter().filter(|p| p.history == 0).collect();
    let hist: Vec<&Point> = points.iter().filter(|p| p.history > 0).collect();
    let xmin = points.iter().map(|p| p.live).min().unwrap_or(1).max(1) as f64 / 2.0;
    let xmax = points.iter().map(|p| p.live).max().unwrap_or(1).max(1) as f64 * 2.0;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (1000, 440)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let root = root.titled(title, ("sans-serif", 18)).map_err(e)?;
        let (left, right) = root.split_horizontally(500);
        type Get = fn(&Point, u64) -> f64;
        let panels: [(_, &str, Get, Get, f64); 2] = [
            (
                left,
                "cold restart until ready, s",
                |p, _| p.first.seconds,
                |p, _| p.again.seconds,
                5.0,
            ),
            (
                right,
                "resident bytes per queued message (over empty)",
                |p, e| p.bytes_per_message(&p.first, e),
                |p, e| p.bytes_per_message(&p.again, e),
                400.0,
            ),
        ];
        for (area, what, first, again, target) in panels {
            let top = points
                .iter()
                .flat_map(|p| [first(p, empty_rss), again(p, empty_rss)])
                .fold(target, f64::max)
                * 1.15;
            let mut chart = ChartBuilder::on(&area)
                .margin(14)
                .x_label_area_size(36)
                .y_label_area_size(56)
                .caption(what, ("sans-serif", 14))
                .build_cartesian_2d((xmin..xmax).log_scale(), 0f64..top)
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .x_desc("queued messages")
                .x_label_formatter(&|x| count(*x as u64))
                .draw()
                .map_err(|e| e.to_string())?;
            chart
                .draw_series(DashedLineSeries::new(
                    [(xmin, target), (xmax, target)],
                    6,
                    4,
                    RED.stroke_width(1),
                ))
                .map_err(|e| e.to_string())?
                .label(format!("target {target}"))
                .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], RED));
            let series: [(&str, &[&Point], Get, RGBColor); 4] = [
                ("first start after fill", &plain, first, BLUE),
                ("after a clean stop", &plain, again, GREEN),
                ("with history: first start", &hist, first, MAGENTA),
                ("with history: after a clean stop", &hist, again, BLACK),
            ];
            for (name, pts, get, color) in series {
                if pts.is_empty() {
                    continue;
                }
                let xy: Vec<(f64, f64)> = pts
                    .iter()
                    .map(|p| (p.live as f64, get(p, empty_rss)))
                    .collect();
                if pts[0].history == 0 {
                    chart
                        .draw_series(LineSeries::new(xy.clone(), color.stroke_width(2)))
                        .map_err(|e| e.to_string())?;
                }
                chart
                    .draw_series(
                        xy.iter()
                            .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
                    )
                    .map_err(|e| e.to_string())?
                    .label(name)
                    .legend(move |(x, y)| Circle::new((x + 8, y), 4, color.filled()));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .border_style(BLACK)
                .background_style(WHITE.mix(0.8))
                .draw()
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(e)?;
    }
    Ok(out)
}

/// One cold open of a mailbox data directory by [`open_mailboxes`] in a process of
/// its own (`ringmail-recovery --harness`), timed from exec to its ready line.
#[derive(Debug, Clone, PartialEq)]
pub struct Opened {
    pub seconds: f64,
    /// Live heap bytes when ready (a counting allocator), and their peak.
    pub heap_bytes: u64,
    pub heap_peak_bytes: u64,
    /// `VmRSS`, `VmHWM` when ready.
    pub rss_bytes: u64,
    pub hwm_bytes: u64,
    pub stored: u64,
    pub entries: u64,
}

const HARNESS_READY: &str = "ringmail-recovery harness ready";

/// The line the harness prints when every shard is open and settled.
pub fn harness_line(o: &Opened, shards: &[ShardOpened]) -> String {
    let sum = |f: fn(&ShardOpened) -> u64| shards.iter().map(f).sum::<u64>();
    format!(
        "{HARNESS_READY} heap_bytes={} heap_peak_bytes={} rss_bytes={} hwm_bytes={} stored={} entries={} queued={} missing={} users={} from_snapshot={}",
        o.heap_bytes,
        o.heap_peak_bytes,
        o.rss_bytes,
        o.hwm_bytes,
        sum(|s| s.stored as u64),
        sum(|s| s.entries),
        sum(|s| s.queued as u64),
        sum(|s| s.missing as u64),
        sum(|s| s.accounts as u64),
        sum(|s| u64::from(s.from_snapshot)),
    )
}

/// The `name=number` fields of a harness ready line; `None` for any other line.
pub fn parse_harness_line(line: &str) -> Option<std::collections::BTreeMap<String, u64>> {
    let rest = line.strip_prefix(HARNESS_READY)?;
    rest.split_whitespace()
        .map(|f| {
            let (k, v) = f.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// One mailbox data directory: `messages` stored in the INBOXes of `users`.
#[derive(Debug, Clone, PartialEq)]
pub struct MailboxPoint {
    pub messages: u64,
    pub users: u64,
    pub size: usize,
    pub data_bytes: u64,
    pub fill_seconds: f64,
    pub opened: Opened,
    /// The same open with the snapshots removed (a start after a crash with no
    /// snapshot yet: the whole log replayed), if measured.
    pub from_log: Option<Opened>,
    /// The server's first start after the fill and its start after a clean stop,
    /// unless skipped.
    pub server: Option<(Restart, Restart)>,
}

/// What an empty data directory costs, in the same run: the harness's and the
/// server's (if measured).
#[derive(Debug, Clone, PartialEq)]
pub struct MailboxBaseline {
    pub opened: Opened,
    pub server: Option<Restart>,
}

impl MailboxPoint {
    fn per(&self, bytes: u64, empty: u64) -> f64 {
        bytes.saturating_sub(empty) as f64 / self.messages.max(1) as f64
    }

    pub fn heap_per_message(&self, b: &MailboxBaseline) -> f64 {
        self.per(self.opened.heap_bytes, b.opened.heap_bytes)
    }

    pub fn to_json(&self, b: &MailboxBaseline) -> Value {
        let o = &self.opened;
        let restart = |r: &Restart| {
            json!({
                "seconds": r.seconds, "vm_rss_bytes": r.rss_bytes, "vm_hwm_bytes": r.hwm_bytes,
                "cpu_seconds": r.cpu_seconds,
                "rss_over_empty_bytes_per_message": b.server.as_ref().map(|e| self.per(r.rss_bytes, e.rss_bytes)),
            })
        };
        json!({
            "stored_messages": self.messages, "users": self.users, "body_bytes": self.size,
            "data_bytes": self.data_bytes, "fill_seconds": self.fill_seconds,
            "in_process_open": {
                "seconds": o.seconds, "heap_bytes": o.heap_bytes,
                "heap_peak_bytes": o.heap_peak_bytes, "vm_rss_bytes": o.rss_bytes,
                "vm_hwm_bytes": o.hwm_bytes,
                "heap_over_empty_bytes_per_message": self.heap_per_message(b),
                "rss_over_empty_bytes_per_message": self.per(o.rss_bytes, b.opened.rss_bytes),
            },
            "in_process_open_from_log": self.from_log.as_ref().map(|l| json!({
                "seconds": l.seconds, "heap_bytes": l.heap_bytes,
                "heap_peak_bytes": l.heap_peak_bytes, "vm_hwm_bytes": l.hwm_bytes,
            })),
            "server_first_restart": self.server.as_ref().map(|s| restart(&s.0)),
            "server_restart_after_clean_stop": self.server.as_ref().map(|s| restart(&s.1)),
        })
    }
}

/// The mailbox table for RESULTS.md. Targets: ready < 5 s with 1M stored messages
/// over 10k users, < 200 B of index memory per stored message.
pub fn mailbox_markdown(points: &[MailboxPoint], b: &MailboxBaseline) -> String {
    let mut out = String::from(
        "| stored | users | data MiB | fill | in-process open, cold | heap B/msg over empty (peak) | its RSS B/msg over empty | open from the log alone | server ready (first / after clean stop) | server RSS B/msg over empty |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in points {
        let o = &p.opened;
        let (ready, rss) = match (&p.server, &b.server) {
            (Some((first, again)), Some(e)) => (
                format!("{:.2} / {:.2} s", first.seconds, again.seconds),
                format!("{:.0}", p.per(again.rss_bytes, e.rss_bytes)),
            ),
            _ => ("not measured".into(), "not measured".into()),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {:.0} s | {:.2} s | {:.0} ({:.0}) | {:.0} | {} | {ready} | {rss} |\n",
            count(p.messages),
            count(p.users),
            mib(p.data_bytes),
            p.fill_seconds,
            o.seconds,
            p.heap_per_message(b),
            p.per(o.heap_peak_bytes, b.opened.heap_peak_bytes),
            p.per(o.rss_bytes, b.opened.rss_bytes),
            p.from_log
                .as_ref()
                .map_or("not measured".into(), |l| format!("{:.2} s", l.seconds)),
        ));
    }
    out
}

/// The password hash every filled user gets: the argon2id PHC string of
/// [`FILL_PASSWORD`] (fixed, so a fill hashes nothing; a test checks it verifies).
pub const FILL_PHC: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$RH/aVP+c+S+ltMWjybaMJQ$qnpYK/yh9Kt0C5W5v99RPZ2XP7pUJ6ziQmFFGUGXDP8";
pub const FILL_PASSWORD: &str = "ringmail-fill";
/// The trace prefix of every filled message.
const FILL_PREFIX: &[u8] = b"Received: from ringmail-load.test\r\n";
const FILL_SENDER: &str = "load@ringmail-load.test";

/// The address of filled user `n`.
pub fn fill_address(n: u64) -> String {
    format!("u{n}@localhost")
}

/// What [`fill_mailboxes`] writes.
#[derive(Debug, Clone)]
pub struct MailboxFill {
    pub shards: u32,
    pub users: u64,
    /// Stored messages in all, each in one user's INBOX (message `i` to user
    /// `i % users`, stored on shard `i % shards`, as ingest spreads sessions).
    pub messages: u64,
    /// Body bytes of each message.
    pub size: usize,
    /// Messages per round: their records share one group commit per shard.
    pub batch: u64,
}

/// Each shard's indexes in the server's order after the queue's (snapshot sections
/// are numbered by place): the accounts (records only on shard 0), then the
/// mailboxes homed there.
type Indexes = (Rc<RefCell<AccountIndex>>, Rc<RefCell<MailIndex>>);

async fn open_shard(data: &Path, shard: u32) -> Result<(Spool, Indexes), String> {
    let acc = Rc::new(RefCell::new(AccountIndex::default()));
    let mail = Rc::new(RefCell::new(MailIndex::default()));
    let others: Vec<Rc<RefCell<dyn Index>>> = vec![acc.clone(), mail.clone()];
    let spool = Spool::open_with(data, shard, LogConfig::default(), others)
        .await
        .map_err(|e| format!("shard {shard}: {e}"))?;
    Ok((spool, (acc, mail)))
}

/// Writes users and their INBOXes into `data` (whose manifest exists) through the
/// shards' own write paths, offline, then a snapshot of every shard, so a restart
/// loads the snapshots. Every shard is opened on this one executor.
///
/// On disk it is what the server writes for local delivery (docs/mailboxes.md,
/// "Local delivery"): an `AddUser` per user on shard 0 (its id from shard 0's
/// counter); per message a `Message` record to the user's address on its shard S, an
/// `Append` into the user's INBOX on the home shard H, and the recipient's
/// `Delivered` update on S. The queue never holds these messages here: the one
/// reference a stored message is born with is handed to its entry (as the server's
/// queue hands its own over and S adds one per entry), so S keeps it until the
/// snapshot. Across shards the snapshot's count is not what recovery uses anyway:
/// it recounts from H's mail index.
pub async fn fill_mailboxes(data: &Path, f: &MailboxFill) -> Result<(), String> {
    let shards = f.shards.max(1);
    let mut opened = Vec::new();
    for k in 0..shards {
        opened.push(open_shard(data, k).await?);
    }
    for (spool, _) in &opened {
        // Offline: nobody else refers to these shards.
        spool.store().settle_foreign();
    }
    let le = |e: ringmail_store::LogError| e.to_string();
    let batch = f.batch.max(1);
    let store0 = opened[0].0.store();
    let mut users = Vec::with_capacity(f.users as usize);
    let mut n = 0;
    while n < f.users {
        let end = (n + batch).min(f.users);
        let mut pending = Vec::new();
        for u in n..end {
            let rec = AccountRecord::AddUser {
                user_id: store0.next_id().await.map_err(le)?,
                address: fill_address(u),
                phc_hash: FILL_PHC.into(),
                quota_bytes: 0,
                quota_messages: 0,
            };
            let t = store0
                .append(Kind::Account, |o| rec.encode(o))
                .map_err(le)?;
            pending.push((t, rec));
        }
        for (t, rec) in pending {
            store0.durable(&t).await.map_err(le)?;
            if let AccountRecord::AddUser { user_id, .. } = &rec {
                users.push(*user_id);
            }
            opened[0].1 .0.borrow_mut().apply(&rec);
        }
        n = end;
    }
    if f.messages > 0 && users.is_empty() {
        return Err("messages need at least one user".into());
    }
    let body = vec![b'x'; f.size];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let mut i = 0;
    while i < f.messages {
        let end = (i + batch).min(f.messages);
        let mut stored = Vec::new();
        for j in i..end {
            let s = (j % shards as u64) as usize;
            let store = opened[s].0.store();
            let id = store.next_id().await.map_err(le)?;
            let user = (j % users.len() as u64) as usize;
            let env = Envelope {
                id,
                received_at_ms: now.as_millis() as u64,
                from: FILL_SENDER.into(),
                recipients: vec![Recipient {
                    address: fill_address(user as u64),
                    notify: 0,
                    orcpt: None,
                }],
                helo: "ringmail-load.test".into(),
                peer: "127.0.0.1".into(),
                ..Envelope::default()
            };
            let t = store
                .append_message(id, body.len(), |o| {
                    message::encode(o, &env, FILL_PREFIX, &body)
                })
                .map_err(le)?;
            stored.push((s, t, user));
        }
        let mut appends = Vec::new();
        let mut updates = Vec::new();
        for (s, t, user) in stored {
            let store = opened[s].0.store();
            let r = store.durable_message(&t).await.map_err(le)?;
            drop(t);
            let update = RcptUpdate {
                id: r.handle.id,
                rcpt: 0,
                status: RcptStatus::Delivered,
                attempts: 1,
                next_attempt_ms: 0,
                reply: "250 2.0.0 Ok: delivered to mailbox".into(),
            };
            updates.push((
                s,
                store
                    .append(Kind::RcptUpdate, |o| update.encode(o))
                    .map_err(le)?,
            ));
            let uid = users[user];
            let h = home_shard(uid, shards) as usize;
            let prefix = format!(
                "Return-Path: <{FILL_SENDER}>\r\nDelivered-To: {}\r\n",
                fill_address(user as u64)
            );
            let entry = NewEntry {
                message: r.handle.id,
                size: (prefix.len() + FILL_PREFIX.len() + body.len()) as u32,
                internal_date: now.as_secs() as i64,
                flags: 0,
                keywords: Vec::new(),
                cache: u64::MAX,
            };
            // No await between the begin and the append (MailIndex's order rule).
            let c = opened[h]
                .1
                 .1
                .borrow_mut()
                .begin_append(uid, INBOX, entry, Quota::default())
                .map_err(|e| format!("append for user {uid}: {e}"))?;
            let t = opened[h]
                .0
                .store()
                .append(Kind::Mail, |o| c.encode(o))
                .map_err(le)?;
            appends.push((h, t, c));
        }
        for (h, t, c) in appends {
            opened[h].0.store().durable(&t).await.map_err(le)?;
            let done = opened[h].1 .1.borrow_mut().commit(c);
            if !done.drop_refs.is_empty() {
                return Err(format!(
                    "an append dropped references: {:?}",
                    done.drop_refs
                ));
            }
        }
        for (s, t) in updates {
            opened[s].0.store().durable(&t).await.map_err(le)?;
        }
        i = end;
    }
    for (spool, _) in &opened {
        // Syncs the log, then writes the snapshot the restart loads.
        spool.close().await;
        if spool.store().snapshot_position().is_none() {
            return Err(format!("shard {}: no snapshot written", spool.shard));
        }
    }
    Ok(())
}

/// One shard as [`open_mailboxes`] found it, settled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardOpened {
    pub shard: u32,
    /// Messages the store keeps (referenced by some index).
    pub stored: usize,
    /// Messages the queue holds.
    pub queued: usize,
    /// Users in the account index (shard 0's).
    pub accounts: usize,
    /// Users homed here with mailbox data, and their entries in all mailboxes.
    pub mail_users: usize,
    pub entries: u64,
    /// References this shard's mail index holds to other shards' messages.
    pub foreign_refs: usize,
    /// References of other shards' indexes that found no message here.
    pub missing: usize,
    /// Whether the snapshot loaded (else the whole log was replayed).
    pub from_snapshot: bool,
}

enum FromShard {
    Foreign(u32, std::collections::HashMap<u32, Vec<u64>>),
    Ready(ShardOpened),
    Failed(String),
}

/// Recovers every shard of `data` as the server does: one thread (executor) per
/// shard opens it (`Spool::open_with`, the account and mail indexes after the
/// queue's), the references each holds to other shards' messages go to their
/// owners, every shard is settled; `at_ready` is called while all of it is still in
/// memory (to measure it), then it is dropped unwritten (no snapshot, no
/// compaction; the opens each logged an id checkpoint, as a start does).
pub fn open_mailboxes(
    data: &Path,
    at_ready: impl FnOnce(&[ShardOpened]),
) -> Result<Vec<ShardOpened>, String> {
    use std::sync::mpsc;
    let shards = ringmail_store::manifest::read(data)
        .map_err(|e| format!("{}: {e}", data.display()))?
        .shards;
    let (out_tx, out_rx) = mpsc::channel::<FromShard>();
    let mut to_shard = Vec::new();
    let mut threads = Vec::new();
    for k in 0..shards {
        let (tx, rx) = mpsc::channel::<Option<Vec<u64>>>();
        to_shard.push(tx);
        let out = out_tx.clone();
        let data = data.to_path_buf();
        threads.push(std::thread::spawn(move || {
            let fail = out.clone();
            let r = glommio::LocalExecutor::default().run(async move {
                let (spool, (acc, mail)) = open_shard(&data, k).await?;
                let foreign = spool.take_foreign();
                let foreign_refs = foreign.values().map(Vec::len).sum();
                let _ = out.send(FromShard::Foreign(k, foreign));
                let Ok(Some(refs)) = rx.recv() else {
                    return Ok(());
                };
                let missing = refs
                    .iter()
                    .filter(|id| !spool.store().add_ref(**id))
                    .count();
                spool.store().settle_foreign();
                let mail = mail.borrow();
                let entries = mail
                    .users()
                    .flat_map(|u| mail.mailboxes(u))
                    .map(|m| m.len() as u64)
                    .sum();
                let _ = out.send(FromShard::Ready(ShardOpened {
                    shard: k,
                    stored: spool.store().len(),
                    queued: spool.len(),
                    accounts: acc.borrow().users().count(),
                    mail_users: mail.users().count(),
                    entries,
                    foreign_refs,
                    missing,
                    from_snapshot: spool.store().snapshot_position().is_some(),
                }));
                // Kept until measured.
                let _ = rx.recv();
                Ok::<(), String>(())
            });
            if let Err(e) = r {
                let _ = fail.send(FromShard::Failed(e));
            }
        }));
    }
    drop(out_tx);
    let r = (|| {
        let mut incoming: Vec<Vec<u64>> = vec![Vec::new(); shards as usize];
        for _ in 0..shards {
            match out_rx.recv() {
                Ok(FromShard::Foreign(from, f)) => {
                    for (target, ids) in f {
                        match incoming.get_mut(target as usize) {
                            Some(v) => v.extend(ids),
                            None => {
                                return Err(format!(
                                    "shard {from} refers to shard {target}, which does not exist"
                                ))
                            }
                        }
                    }
                }
                Ok(FromShard::Failed(e)) => return Err(e),
                Ok(FromShard::Ready(_)) | Err(_) => return Err("a shard stopped early".into()),
            }
        }
        for (tx, refs) in to_shard.iter().zip(incoming) {
            let _ = tx.send(Some(refs));
        }
        let mut done = Vec::new();
        for _ in 0..shards {
            match out_rx.recv() {
                Ok(FromShard::Ready(s)) => done.push(s),
                Ok(FromShard::Failed(e)) => return Err(e),
                _ => return Err("a shard stopped early".into()),
            }
        }
        done.sort_by_key(|s| s.shard);
        at_ready(&done);
        Ok(done)
    })();
    // Lets every thread go (a closed channel does too, on the error paths).
    for tx in &to_shard {
        let _ = tx.send(None);
    }
    drop(to_shard);
    for t in threads {
        let _ = t.join();
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harness_line_round_trips_and_the_mailbox_table() {
        let o = Opened {
            seconds: 1.25,
            heap_bytes: 10 << 20,
            heap_peak_bytes: 12 << 20,
            rss_bytes: 40 << 20,
            hwm_bytes: 41 << 20,
            stored: 0,
            entries: 0,
        };
        let shards = [
            ShardOpened {
                stored: 6,
                entries: 4,
                accounts: 3,
                from_snapshot: true,
                ..ShardOpened::default()
            },
            ShardOpened {
                stored: 4,
                entries: 6,
                ..ShardOpened::default()
            },
        ];
        let line = harness_line(&o, &shards);
        let f = parse_harness_line(&line).unwrap();
        assert_eq!(f["heap_bytes"], 10 << 20);
        assert_eq!(f["hwm_bytes"], 41 << 20);
        assert_eq!((f["stored"], f["entries"], f["users"]), (10, 10, 3));
        assert_eq!((f["queued"], f["missing"], f["from_snapshot"]), (0, 0, 1));
        assert!(parse_harness_line("ringmail ready").is_none());
        assert!(parse_harness_line(&format!("{line} x=y")).is_none());
        let empty = MailboxBaseline {
            opened: o.clone(),
            server: None,
        };
        let mut p = MailboxPoint {
            messages: 1_000_000,
            users: 10_000,
            size: 512,
            data_bytes: 900 << 20,
            fill_seconds: 95.0,
            opened: Opened {
                heap_bytes: (10 << 20) + 150_000_000,
                heap_peak_bytes: (12 << 20) + 300_000_000,
                rss_bytes: (40 << 20) + 180_000_000,
                ..o.clone()
            },
            from_log: None,
            server: None,
        };
        assert_eq!(p.heap_per_message(&empty), 150.0);
        let t = mailbox_markdown(std::slice::from_ref(&p), &empty);
        assert!(
            t.lines().nth(2).unwrap().starts_with(
                "| 1M | 10k | 900 | 95 s | 1.25 s | 150 (300) | 180 | not measured | not measured | not measured |"
            ),
            "{t}"
        );
        let r = |secs: f64, rss: u64| Restart {
            seconds: secs,
            rss_bytes: rss,
            hwm_bytes: rss,
            cpu_seconds: secs,
        };
        let with_server = MailboxBaseline {
            server: Some(r(0.05, 30 << 20)),
            ..empty
        };
        p.from_log = Some(Opened {
            seconds: 3.5,
            ..o.clone()
        });
        p.server = Some((
            r(2.5, (30 << 20) + 190_000_000),
            r(2.0, (30 << 20) + 170_000_000),
        ));
        let t = mailbox_markdown(std::slice::from_ref(&p), &with_server);
        assert!(t.contains("| 3.50 s | 2.50 / 2.00 s | 170 |"), "{t}");
        let j = p.to_json(&with_server);
        assert_eq!(
            j["server_restart_after_clean_stop"]["rss_over_empty_bytes_per_message"],
            170.0
        );
        assert_eq!(
            j["in_process_open"]["heap_over_empty_bytes_per_message"],
            150.0
        );
    }

    #[test]
    fn the_fill_password_hash_is_argon2id_of_the_fill_password() {
        use argon2::password_hash::{phc::PasswordHash, PasswordVerifier};
        use argon2::PasswordHasher;
        let computed = argon2::Argon2::default()
            .hash_password(FILL_PASSWORD.as_bytes())
            .map(|h| h.to_string());
        let parsed = PasswordHash::new(FILL_PHC)
            .unwrap_or_else(|e| panic!("{e}; a fresh one: {computed:?}"));
        assert!(FILL_PHC.starts_with("$argon2id$v=19$"));
        let a = argon2::Argon2::default();
        assert!(a.verify_password(FILL_PASSWORD.as_bytes(), &parsed).is_ok());
        assert!(a.verify_password(b"wrong", &parsed).is_err());
    }

    fn fill_and_open(
        shards: u32,
        users: u64,
        messages: u64,
    ) -> (tempfile::TempDir, Vec<ShardOpened>) {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        ringmail_store::manifest::open_or_create(&data, shards).unwrap();
        let f = MailboxFill {
            shards,
            users,
            messages,
            size: 100,
            batch: 64,
        };
        let at = data.clone();
        glommio::LocalExecutor::default()
            .run(async move { fill_mailboxes(&at, &f).await })
            .unwrap();
        let mut seen = None;
        let opened = open_mailboxes(&data, |s| seen = Some(s.to_vec())).unwrap();
        assert_eq!(seen.as_ref(), Some(&opened));
        (d, opened)
    }

    /// Every message the fill wrote is still stored once every shard settled (so each
    /// is referenced by its entry, across shards too), in exactly one INBOX, nothing
    /// is queued and the users are on shard 0; and the log alone, without the
    /// snapshots, recovers the same.
    #[test]
    fn a_mailbox_fill_recovers_as_written_from_its_snapshots_and_from_its_log() {
        let (d, opened) = fill_and_open(3, 30, 600);
        let data = d.path().join("data");
        let sum = |o: &[ShardOpened], f: fn(&ShardOpened) -> u64| o.iter().map(f).sum::<u64>();
        let check = |o: &[ShardOpened], snapshot: bool| {
            assert_eq!(o.len(), 3);
            assert_eq!(sum(o, |s| s.stored as u64), 600, "{o:?}");
            assert_eq!(sum(o, |s| s.entries), 600, "{o:?}");
            assert_eq!(sum(o, |s| s.mail_users as u64), 30, "{o:?}");
            assert_eq!(sum(o, |s| s.queued as u64), 0, "{o:?}");
            assert_eq!(sum(o, |s| s.missing as u64), 0, "{o:?}");
            assert_eq!(o.iter().map(|s| s.accounts).collect::<Vec<_>>(), [30, 0, 0]);
            for s in o {
                assert_eq!(s.stored, 200, "round-robin over the shards: {o:?}");
                assert!(s.foreign_refs > 0, "entries on other shards: {o:?}");
                assert_eq!(s.from_snapshot, snapshot, "{o:?}");
            }
        };
        check(&opened, true);
        for k in 0..3 {
            std::fs::remove_file(ringmail_store::shard::snapshot_path(
                &ringmail_store::segment::shard_dir(&data, k),
            ))
            .unwrap();
        }
        check(&open_mailboxes(&data, |_| ()).unwrap(), false);
    }

    fn point(live: u64, history: u64, secs: f64, rss: u64) -> Point {
        let r = Restart {
            seconds: secs,
            rss_bytes: rss,
            hwm_bytes: rss + 10,
            cpu_seconds: secs,
        };
        Point {
            live,
            history,
            size: 512,
            data_bytes: 640 << 20,
            first: r.clone(),
            again: r,
            listing: Listing {
                seconds: 1.5,
                user_seconds: 1.0,
                system_seconds: 0.25,
                max_rss_bytes: 402 << 20,
            },
        }
    }

    #[test]
    fn table_json_and_plot() {
        let empty = 10 << 20;
        let pts = vec![
            point(10_000, 0, 0.05, empty + 6_400_000),
            point(1_000_000, 0, 1.0, empty + 640_000_000),
            point(1_000_000, 1_000_000, 2.0, empty + 640_000_000),
        ];
        assert_eq!(pts[1].bytes_per_message(&pts[1].again, empty), 640.0);
        let t = markdown(&pts, empty);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5);
        assert!(
            lines[2].starts_with("| 10k | 0 | 640 | 0.05 / 0.05 s |"),
            "{}",
            lines[2]
        );
        assert!(lines[4].starts_with("| 1M | 1M |"), "{}", lines[4]);
        assert!(lines[3].contains("| 640 | 1.50 s | 402 |"), "{}", lines[3]);
        let j = pts[1].to_json(empty);
        assert_eq!(
            j["restart_after_clean_stop"]["rss_over_empty_bytes_per_message"],
            640.0
        );
        assert_eq!(j["queue_list"]["max_rss_bytes"], 402u64 << 20);
        let s = svg(&pts, empty, "test").unwrap();
        assert!(s.starts_with("<svg") && s.contains("target 5") && s.contains("target 400"));
        assert!(s.contains("with history: first start"));
    }
}
