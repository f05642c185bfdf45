//! `ringmail mailbox list ADDRESS [--mailbox NAME] [--json]`: a user's entries, read
//! from the log and snapshots without a server (read-only recovery of shard 0 for
//! the account, then of the user's home shard), so it works offline and after a
//! SIGKILL as well as beside a running server.

use ringmail_store::accounts::{home_shard, AccountIndex};
use ringmail_store::mailbox::{self as flag, MailIndex};
use ringmail_store::shard::{recover, Ignore};
use ringmail_store::Mode;
use std::io::{self, Write};
use std::path::Path;

/// One line of `mailbox list --json` (docs/contracts.md).
#[derive(serde::Serialize)]
struct Line<'a> {
    mailbox: &'a str,
    uid: u32,
    size: u32,
    flags: Vec<String>,
    internal_date: String,
}

/// The IMAP names of the system flags set in `bits`, in a fixed order.
pub fn flag_names(bits: u8) -> Vec<&'static str> {
    [
        (flag::SEEN, "\\Seen"),
        (flag::ANSWERED, "\\Answered"),
        (flag::FLAGGED, "\\Flagged"),
        (flag::DELETED, "\\Deleted"),
        (flag::DRAFT, "\\Draft"),
    ]
    .into_iter()
    .filter(|(b, _)| bits & b != 0)
    .map(|(_, n)| n)
    .collect()
}

pub fn run(
    data: &Path,
    address: &str,
    only: Option<&str>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), String> {
    let (user, _, index) = load_user(data, address)?;
    let mailboxes = index.mailboxes(user);
    if let Some(name) = only {
        if index.mailbox(user, name).is_none() {
            return Err(format!("{address} has no mailbox {name}"));
        }
    }
    let write = |out: &mut dyn Write, line: &str| -> Result<(), String> {
        writeln!(out, "{line}").map_err(|e: io::Error| e.to_string())
    };
    if !json {
        write(
            out,
            &format!(
                "{:<24} {:>8} {:>10} {:<20} FLAGS",
                "MAILBOX", "UID", "SIZE", "DATE"
            ),
        )?;
    }
    for mb in mailboxes {
        if only.is_some_and(|n| index.mailbox(user, n).map(|m| m.id()) != Some(mb.id())) {
            continue;
        }
        for e in mb.entries() {
            let mut flags: Vec<String> = flag_names(e.flags())
                .into_iter()
                .map(String::from)
                .collect();
            flags.extend(mb.keyword_names(e).into_iter().map(String::from));
            let date = chrono::DateTime::from_timestamp(e.internal_date(), 0)
                .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                .unwrap_or_default();
            if json {
                let line = Line {
                    mailbox: mb.name(),
                    uid: e.uid(),
                    size: e.size(),
                    flags,
                    internal_date: date,
                };
                write(
                    out,
                    &serde_json::to_string(&line).map_err(|e| e.to_string())?,
                )?;
            } else {
                write(
                    out,
                    &format!(
                        "{:<24} {:>8} {:>10} {:<20} {}",
                        mb.name(),
                        e.uid(),
                        e.size(),
                        date,
                        flags.join(" ")
                    ),
                )?;
            }
        }
    }
    Ok(())
}

/// The account and the home shard's index of `address`, recovered read-only.
fn load_user(data: &Path, address: &str) -> Result<(u64, String, MailIndex), String> {
    let manifest = ringmail_store::manifest::read(data)
        .map_err(|e| format!("data directory {}: {e}", data.display()))?;
    let mut accounts = AccountIndex::default();
    recover(data, 0, Mode::ReadOnly, &mut [&mut Ignore, &mut accounts])
        .map_err(|e| format!("shard 0: {e}"))?;
    let dir = accounts.directory(0);
    let user = dir
        .user(address)
        .ok_or_else(|| format!("no such user: {address}"))?
        .clone();
    let home = home_shard(user.id, manifest.shards);
    let mut index = MailIndex::default();
    // Sections by place, as the server keeps them: queue, accounts, mailboxes.
    recover(
        data,
        home,
        Mode::ReadOnly,
        &mut [&mut Ignore, &mut Ignore, &mut index],
    )
    .map_err(|e| format!("shard {home}: {e}"))?;
    Ok((user.id, user.address.to_string(), index))
}

/// The message of entry `uid` of `address`'s mailbox `mailbox`, as a mailbox serves
/// it (per-entry prefix, trace prefix, body): `ringmail mailbox show`.
pub fn show(data: &Path, address: &str, mailbox: &str, uid: u32) -> Result<Vec<u8>, String> {
    let (user, canonical, index) = load_user(data, address)?;
    let mb = index
        .mailbox(user, mailbox)
        .ok_or_else(|| format!("{address} has no mailbox {mailbox}"))?;
    let e = mb
        .entries()
        .iter()
        .find(|e| e.uid() == uid)
        .ok_or_else(|| format!("{mailbox} has no message with UID {uid}"))?;
    let handle = ringmail_store::Handle::of_id(e.message());
    let rec = recover(data, handle.shard, Mode::ReadOnly, &mut [])
        .map_err(|e| format!("shard {}: {e}", handle.shard))?;
    let at = rec
        .map
        .get(&e.message())
        .ok_or_else(|| format!("the message of UID {uid} is not in shard {}", handle.shard))?;
    let dir = ringmail_store::segment::shard_dir(data, handle.shard);
    let file = std::fs::File::open(ringmail_store::segment::segment_path(&dir, at.seq as u64))
        .map_err(|e| e.to_string())?;
    let mut record = vec![0; at.len as usize];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut record, at.offset)
        .map_err(|e| e.to_string())?;
    let payload = &record[ringmail_store::record::RECORD_HEADER_BYTES..];
    let d = ringmail_store::message::decode(payload).map_err(|e| e.to_string())?;
    let mut out = crate::delivery::local::entry_prefix(&d.envelope.from, &canonical).into_bytes();
    out.extend_from_slice(d.prefix);
    out.extend_from_slice(d.body);
    Ok(out)
}
