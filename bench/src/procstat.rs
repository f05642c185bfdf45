//! What the benchmarks read about a server process and its disk, from /proc and /sys:
//! resident memory, CPU time, bytes written, and the counters the server logs. Parsing
//! is separate from reading so the tests can feed recorded text.

use std::path::Path;
use std::time::Duration;

/// A `Name:   value kB` field of /proc/PID/status, in bytes.
pub fn status_bytes(status: &str, field: &str) -> Option<u64> {
    let line = status
        .lines()
        .find(|l| l.split(':').next() == Some(field))?;
    let mut words = line.split(':').nth(1)?.split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => Some(n * 1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// Resident memory now and at its peak (`VmRSS`, `VmHWM`), in bytes.
pub fn rss(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some((status_bytes(&s, "VmRSS")?, status_bytes(&s, "VmHWM")?))
}

/// User and system CPU time from the text of /proc/PID/stat (every thread of the
/// process, as the kernel sums them), in clock ticks.
pub fn stat_ticks(stat: &str) -> Option<(u64, u64)> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of stat(5), utime 14 and stime 15.
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

/// The process's CPU time so far (user + system).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (u, k) = stat_ticks(&s)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(Duration::from_secs_f64((u + k) as f64 / hz))
}

/// `write_bytes` of /proc/PID/io: what the process caused to be sent to the block
/// layer (O_DIRECT writes included; page-cache writes when they are written back).
pub fn io_write_bytes(io: &str) -> Option<u64> {
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))?
        .trim()
        .parse()
        .ok()
}

pub fn write_bytes(pid: u32) -> Option<u64> {
    io_write_bytes(&std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?)
}

/// The last `body_copies=N` in a server's log: the user-space copies of message bodies
/// the server made since it started (cumulative, logged by the server at shutdown or
/// at any time: the last value wins). None while the server does not count them.
pub fn body_copies(log: &str) -> Option<u64> {
    const KEY: &str = "body_copies=";
    let at = log.rfind(KEY)? + KEY.len();
    let digits: String = log[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The numeric `key=N` fields of the server's last process-wide `stopped` line (not
/// the `executor stopped` ones): its counters of bytes written by cause
/// (`log_record_bytes`, `zero_bytes`, ...; see ringmail_store::stats). None when the
/// log has no such line (the server was killed, or predates the counters).
pub fn stopped_counters(log: &str) -> Option<std::collections::BTreeMap<String, u64>> {
    let line = log.lines().rev().find(|l| {
        l.contains(" stopped") && !l.contains("executor stopped") && l.contains("written_bytes=")
    })?;
    Some(
        line.split_whitespace()
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect(),
    )
}

/// Sectors written from the text of /sys/block/DEV/stat (the 7th field), in bytes.
pub fn block_stat_written(stat: &str) -> Option<u64> {
    let n: u64 = stat.split_whitespace().nth(6)?.parse().ok()?;
    Some(n * 512)
}

/// Bytes written so far to the block device holding `path` (every process's writes,
/// journal and metadata included: on a shared machine, a noisy upper bound).
pub fn device_written(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    let (maj, min) = (libc::major(dev), libc::minor(dev));
    let s = std::fs::read_to_string(format!("/sys/dev/block/{maj}:{min}/stat")).ok()?;
    block_stat_written(&s)
}

/// Apparent and allocated bytes of every file under `dir`.
pub fn dir_bytes(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut apparent = 0;
    let mut allocated = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                apparent += m.len();
                allocated += m.blocks() * 512;
            }
        }
    }
    (apparent, allocated)
}

/// Writes back every dirty page and drops the page cache (needs root), so the next
/// read of the data directory comes from the disk.
pub fn drop_caches() -> Result<(), String> {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .map_err(|e| format!("cannot drop the page cache (root needed): {e}"))
}

/// What wait4(2) says about a child that ended: its exit status and resource use
/// (every thread of it: peak RSS, CPU, blocks written).
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    pub status: i32,
    pub user: Duration,
    pub system: Duration,
    pub max_rss_bytes: u64,
    /// `ru_oublock` in bytes: the same accounting as /proc/PID/io `write_bytes`.
    pub written_bytes: u64,
}

/// Reaps `pid` (which must be a child not yet waited for).
pub fn wait4(pid: u32) -> Result<Exit, String> {
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to locals; pid is our child.
    let r = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut ru) };
    if r != pid as i32 {
        return Err(format!("wait4({pid}): {}", std::io::Error::last_os_error()));
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok(Exit {
        status,
        user: tv(ru.ru_utime),
        system: tv(ru.ru_stime),
        max_rss_bytes: ru.ru_maxrss as u64 * 1024,
        written_bytes: ru.ru_oublock as u64 * 512,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded from a running ringmail serve (trimmed).
    const STATUS: &str = "Name:\tringmail\nUmask:\t0022\nState:\tS (sleeping)\nVmPeak:\t 1293440 kB\nVmHWM:\t  441344 kB\nVmRSS:\t  431080 kB\nThreads:\t6\n";
    const STAT: &str = "4242 (ringmail (x) y) S 1 4242 4242 0 -1 4194560 1234 0 0 0 731 212 0 0 20 0 6 0 12345 1324400640 107770 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0\n";
    const IO: &str = "rchar: 123\nwchar: 456\nsyscr: 7\nsyscw: 8\nread_bytes: 4096\nwrite_bytes: 671088640\ncancelled_write_bytes: 0\n";
    const BLOCK: &str = "  146358    51311 10297346    95614  6470412  4862143 301412688  5823013        0  4167036  6600453        0        0        0        0   942341   681825\n";

    #[test]
    fn parses_proc_and_sys() {
        assert_eq!(status_bytes(STATUS, "VmRSS"), Some(431080 * 1024));
        assert_eq!(status_bytes(STATUS, "VmHWM"), Some(441344 * 1024));
        assert_eq!(status_bytes(STATUS, "Threads"), Some(6));
        assert_eq!(status_bytes(STATUS, "VmSwap"), None);
        assert_eq!(status_bytes(STATUS, "State"), None);
        assert_eq!(stat_ticks(STAT), Some((731, 212)));
        assert_eq!(stat_ticks("garbage"), None);
        assert_eq!(io_write_bytes(IO), Some(671088640));
        assert_eq!(io_write_bytes("rchar: 1\n"), None);
        assert_eq!(block_stat_written(BLOCK), Some(301412688 * 512));
    }

    #[test]
    fn reads_the_last_body_copy_count() {
        assert_eq!(body_copies("INFO ringmail: ready\nINFO stopped\n"), None);
        assert_eq!(
            body_copies("x body_copies=10 y\nINFO ringmail::runtime: stopped body_copies=2000\n"),
            Some(2000)
        );
        assert_eq!(body_copies("body_copies=\n"), None);
    }

    #[test]
    fn reads_the_process_stopped_counters() {
        let log = "INFO ringmail::runtime: executor stopped executor=0 log_record_bytes=5 written_bytes=9\n\
                   INFO ringmail::runtime: stopped bodies=2 copies_per_body_byte=1 log_record_bytes=100 zero_bytes=40 written_bytes=140\n";
        let c = stopped_counters(log).unwrap();
        assert_eq!(c["log_record_bytes"], 100);
        assert_eq!(c["zero_bytes"], 40);
        assert_eq!(c["written_bytes"], 140);
        assert!(!c.contains_key("executor"));
        assert_eq!(
            stopped_counters("INFO executor stopped written_bytes=1\n"),
            None
        );
        assert_eq!(stopped_counters("INFO stopped bodies=1\n"), None);
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let (rss, hwm) = rss(me).unwrap();
        assert!(rss > 0 && hwm >= rss);
        assert!(cpu_time(me).is_some());
        assert!(device_written(Path::new("/")).is_some() || !Path::new("/sys/dev/block").exists());
    }

    #[test]
    fn wait4_reports_a_childs_writes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        #[allow(clippy::zombie_processes)] // reaped by wait4 below
        let child = std::process::Command::new("dd")
            .args(["if=/dev/zero", "bs=1M", "count=4", "oflag=direct,sync"])
            .arg(format!("of={}", f.display()))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let exit = wait4(child.id()).unwrap();
        // O_DIRECT needs a temporary directory on a real file system (not tmpfs).
        assert_eq!(exit.status, 0, "dd failed");
        assert!(exit.written_bytes >= 4 << 20, "{exit:?}");
    }
}
