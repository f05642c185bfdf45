//! `ringmail user …` and `ringmail alias …`: a request to the running server's
//! control socket when `DATA/lock` is held, else done here, offline, holding the
//! lock (changes open shard 0 and append; lists read it without writing).

use super::{alias_list, socket_path, try_lock, user_list, Accounts, Request};
use crate::config::Config;
use crate::queue::Spool;
use ringmail_store::accounts::AccountIndex;
use ringmail_store::segment::Mode;
use ringmail_store::shard::Ignore;
use ringmail_store::{manifest, LogConfig};
use std::cell::RefCell;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How long the CLI waits for a starting server's control socket (it holds the lock
/// while it recovers its shards, before the socket exists).
const SOCKET_WAIT: Duration = Duration::from_secs(60);

/// The password's PHC string: argon2id with the crate's default parameters and a
/// random salt.
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{phc::PasswordHash, PasswordHasher};
    let h: PasswordHash = argon2::Argon2::default()
        .hash_password(password.as_bytes())
        .map_err(|e| format!("cannot hash the password: {e}"))?;
    Ok(h.to_string())
}

/// One line of `input`, without its line end; empty is refused.
pub fn read_password(input: &mut dyn BufRead) -> Result<String, String> {
    let mut line = String::new();
    input
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the password from stdin: {e}"))?;
    let pw = line.strip_suffix('\n').unwrap_or(&line);
    let pw = pw.strip_suffix('\r').unwrap_or(pw);
    if pw.is_empty() {
        return Err("empty password (give it as one line on stdin)".into());
    }
    Ok(pw.to_string())
}

/// Runs `req` against the data directory: the reply object (`ok` removed), or the
/// error.
pub fn run(cfg: &Config, req: &Request) -> Result<serde_json::Value, String> {
    let data = &cfg.data;
    if req.is_change() {
        std::fs::create_dir_all(data)
            .map_err(|e| format!("cannot create data directory {}: {e}", data.display()))?;
    } else if !data.exists() {
        return Err(format!("{}: no such data directory", data.display()));
    }
    let deadline = Instant::now() + SOCKET_WAIT;
    loop {
        match try_lock(data) {
            Ok(Some(lock)) => {
                let r = offline(cfg, req);
                drop(lock);
                return r;
            }
            Ok(None) => {}
            Err(e) => {
                return Err(format!(
                    "cannot lock {}: {e}",
                    super::lock_path(data).display()
                ))
            }
        }
        let path = socket_path(data);
        match UnixStream::connect(&path) {
            Ok(s) => return online(s, req),
            // The server is starting (its socket is not there yet) or just stopped.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(format!(
                    "a server holds {} but its control socket {} does not answer: {e}",
                    super::lock_path(data).display(),
                    path.display()
                ))
            }
        }
    }
}

fn online(mut s: UnixStream, req: &Request) -> Result<serde_json::Value, String> {
    let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    line.push('\n');
    s.write_all(line.as_bytes())
        .map_err(|e| format!("control socket: {e}"))?;
    let mut reply = String::new();
    BufReader::new(&s)
        .read_line(&mut reply)
        .map_err(|e| format!("control socket: {e}"))?;
    let mut v: serde_json::Value = serde_json::from_str(&reply)
        .map_err(|e| format!("control socket: bad reply {reply:?}: {e}"))?;
    match v.get("ok").and_then(|ok| ok.as_bool()) {
        Some(true) => {
            if let Some(o) = v.as_object_mut() {
                o.remove("ok");
            }
            Ok(v)
        }
        _ => Err(v["error"]
            .as_str()
            .unwrap_or("the server refused")
            .to_string()),
    }
}

fn offline(cfg: &Config, req: &Request) -> Result<serde_json::Value, String> {
    let data = &cfg.data;
    if !req.is_change() {
        manifest::read(data).map_err(|e| format!("data directory {}: {e}", data.display()))?;
        let mut ix = AccountIndex::default();
        // Snapshot sections are numbered by the index's place: the queue's comes
        // first on every shard, the accounts' second on shard 0 (see `runtime`).
        let rec =
            ringmail_store::shard::recover(data, 0, Mode::ReadOnly, &mut [&mut Ignore, &mut ix])
                .map_err(|e| format!("shard 0: {e}"))?;
        for d in &rec.report.damaged {
            eprintln!("ringmail: shard 0: {d}");
        }
        return Ok(match req {
            Request::UserList => serde_json::json!({ "users": user_list(&ix) }),
            _ => serde_json::json!({ "aliases": alias_list(&ix) }),
        });
    }
    manifest::open_or_create(data, crate::runtime::shard_count(cfg))
        .map_err(|e| format!("data directory {}: {e}", data.display()))?;
    let log = LogConfig {
        segment_bytes_max: cfg.segment_bytes_max,
        zero_ahead: cfg.log_zero_ahead,
    };
    let (data, local, req) = (data.to_path_buf(), cfg.local_domains.clone(), req.clone());
    glommio::LocalExecutor::default()
        .run(async move { offline_change(&data, log, &local, &req).await })
}

async fn offline_change(
    data: &Path,
    log: LogConfig,
    local_domains: &[String],
    req: &Request,
) -> Result<serde_json::Value, String> {
    let index = Rc::new(RefCell::new(AccountIndex::default()));
    let spool = Spool::open_with(
        data,
        0,
        log,
        vec![index.clone() as Rc<RefCell<dyn ringmail_store::Index>>],
    )
    .await
    .map_err(|e| format!("shard 0: cannot open its log in {}: {e}", data.display()))?;
    let accounts = Accounts::new(index, local_domains, None);
    let r = accounts.handle(&spool, req).await;
    spool.close().await;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_one_line_and_hash_to_argon2id_phc() {
        let mut input: &[u8] = b"s3cret pass\r\nignored\n";
        let pw = read_password(&mut input).unwrap();
        assert_eq!(pw, "s3cret pass");
        assert!(read_password(&mut &b"\n"[..]).is_err());
        assert!(read_password(&mut &b""[..]).is_err());
        let phc = hash_password(&pw).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$"), "{phc}");
        use argon2::password_hash::{phc::PasswordHash, PasswordVerifier};
        let parsed = PasswordHash::new(&phc).unwrap();
        let a = argon2::Argon2::default();
        assert!(a.verify_password(b"s3cret pass", &parsed).is_ok());
        assert!(a.verify_password(b"wrong", &parsed).is_err());
    }

    #[test]
    fn offline_changes_survive_and_lists_read_them_back() {
        let d = tempfile::tempdir().unwrap();
        let cfg = Config {
            data: d.path().join("data"),
            cores: Some(2),
            local_domains: vec!["a.test".into()],
            ..Config::default()
        };
        let phc = hash_password("pw").unwrap();
        let add = |a: &str| Request::UserAdd {
            address: a.into(),
            phc: phc.clone(),
            quota_bytes: 10,
            quota_messages: 0,
        };
        assert!(
            run(&cfg, &Request::UserList).is_err(),
            "no data directory yet"
        );
        let id = run(&cfg, &add("Bob@A.test")).unwrap()["id"]
            .as_u64()
            .unwrap();
        run(&cfg, &add("carol@a.test")).unwrap();
        let e = run(&cfg, &add("bob@a.test")).unwrap_err();
        assert!(e.contains("is a user already"), "{e}");
        let e = run(&cfg, &add("x@b.test")).unwrap_err();
        assert!(e.contains("not a local domain"), "{e}");
        run(
            &cfg,
            &Request::AliasAdd {
                from: "team@a.test".into(),
                targets: vec!["bob@a.test".into(), "carol@a.test".into()],
            },
        )
        .unwrap();
        let e = run(
            &cfg,
            &Request::AliasAdd {
                from: "@a.test".into(),
                targets: vec!["nobody@a.test".into()],
            },
        )
        .unwrap_err();
        assert!(e.contains("is not a user"), "{e}");
        run(
            &cfg,
            &Request::UserDel {
                address: "carol@a.test".into(),
            },
        )
        .unwrap();
        let users = run(&cfg, &Request::UserList).unwrap();
        assert_eq!(
            users,
            serde_json::json!({"users": [{"address": "bob@a.test", "id": id, "quota_bytes": 10, "quota_messages": 0}]})
        );
        let aliases = run(&cfg, &Request::AliasList).unwrap();
        assert_eq!(
            aliases,
            serde_json::json!({"aliases": [{"from": "team@a.test", "targets": ["bob@a.test", "carol@a.test"]}]})
        );
        assert_eq!(manifest::read(&cfg.data).unwrap().shards, 2);
    }
}
