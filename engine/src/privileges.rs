//! Running as an unprivileged user (`user = "ringmail"`): started as root to bind
//! port 25, the server hands the data directory to the user, then drops to its uid,
//! gid and supplementary groups for good, before any executor starts.

use std::ffi::CString;
use std::path::Path;

/// A user's ids, from the password database.
struct Ids {
    uid: libc::uid_t,
    gid: libc::gid_t,
}

fn lookup(user: &str) -> Result<Ids, String> {
    let name = CString::new(user).map_err(|_| format!("user `{user}`: a NUL in the name"))?;
    // SAFETY: getpwnam with a NUL-terminated name; the fields are copied out before
    // any other call can reuse its static buffer (start-up is single-threaded here).
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(format!("user `{user}` does not exist"));
    }
    // SAFETY: non-null, as just checked.
    let pw = unsafe { &*pw };
    Ok(Ids {
        uid: pw.pw_uid,
        gid: pw.pw_gid,
    })
}

/// Gives `data` (and everything in it) to the user, then becomes the user. As that
/// user already: nothing to do. As another one but root: an error.
pub fn drop_to(user: &str, data: &Path) -> Result<(), String> {
    let ids = lookup(user)?;
    // SAFETY: plain getters.
    let (uid, euid) = unsafe { (libc::getuid(), libc::geteuid()) };
    if uid == ids.uid && euid == ids.uid {
        return Ok(());
    }
    if euid != 0 {
        return Err(format!(
            "`user = \"{user}\"` needs the server started as root (or as {user})"
        ));
    }
    chown_tree(data, &ids)?;
    let name = CString::new(user).expect("checked by lookup");
    // SAFETY: the calls take plain ids and a NUL-terminated name. glibc applies them
    // to every thread of the process.
    let failed = unsafe {
        libc::initgroups(name.as_ptr(), ids.gid) != 0
            || libc::setgid(ids.gid) != 0
            || libc::setuid(ids.uid) != 0
    };
    if failed {
        return Err(format!(
            "cannot become user {user}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // A dropped root must not be able to come back.
    // SAFETY: as above.
    if unsafe { libc::setuid(0) } == 0 {
        return Err(format!(
            "dropping to {user} did not stick: uid 0 is still reachable"
        ));
    }
    tracing::info!(
        user,
        uid = ids.uid,
        gid = ids.gid,
        "running as an unprivileged user"
    );
    Ok(())
}

fn chown_tree(path: &Path, ids: &Ids) -> Result<(), String> {
    std::os::unix::fs::lchown(path, Some(ids.uid), Some(ids.gid))
        .map_err(|e| format!("cannot give {} to the user: {e}", path.display()))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))? {
            let entry = entry.map_err(|e| e.to_string())?;
            chown_tree(&entry.path(), ids)?;
        }
    }
    Ok(())
}
