//! The data directory's manifest: fixes the shard count when the directory is created.
//!
//! `DATA/MANIFEST` is a small text file (`ringmail-data 1` then `shards N`), written to
//! a temporary name, synced and renamed, so it is either absent or whole.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

const FILE: &str = "MANIFEST";
const FORMAT_LINE: &str = "ringmail-data 1";
pub const SHARDS_MAX: u32 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Manifest {
    pub shards: u32,
}

/// Reads the manifest of an existing data directory.
pub fn read(data: &Path) -> io::Result<Manifest> {
    let path = data.join(FILE);
    let text = fs::read_to_string(&path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot read {}: {e} (is this a ringmail data directory?)",
                path.display()
            ),
        )
    })?;
    parse(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a ringmail manifest", path.display()),
        )
    })
}

fn parse(text: &str) -> Option<Manifest> {
    let mut lines = text.lines();
    if lines.next()? != FORMAT_LINE {
        return None;
    }
    let shards: u32 = lines.next()?.strip_prefix("shards ")?.parse().ok()?;
    (1..=SHARDS_MAX)
        .contains(&shards)
        .then_some(Manifest { shards })
}

/// Opens the data directory, creating it with `shards` shards if it has no manifest.
pub fn open_or_create(data: &Path, shards: u32) -> io::Result<Manifest> {
    match read(data) {
        Ok(m) => return Ok(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    assert!(
        (1..=SHARDS_MAX).contains(&shards),
        "shard count out of range"
    );
    fs::create_dir_all(data)?;
    let tmp = data.join("MANIFEST.tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        write!(f, "{FORMAT_LINE}\nshards {shards}\n")?;
        f.sync_all()?;
    }
    fs::rename(&tmp, data.join(FILE))?;
    crate::segment::sync_dir(data)?;
    Ok(Manifest { shards })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_reopen_keeps_the_shard_count() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(open_or_create(d.path(), 3).unwrap().shards, 3);
        assert_eq!(open_or_create(d.path(), 8).unwrap().shards, 3);
        assert_eq!(read(d.path()).unwrap().shards, 3);
    }

    #[test]
    fn rejects_foreign_files() {
        assert_eq!(parse("hello\nshards 2\n"), None);
        assert_eq!(parse("ringmail-data 1\nshards 0\n"), None);
        assert_eq!(
            parse("ringmail-data 1\nshards 2\n"),
            Some(Manifest { shards: 2 })
        );
    }
}
