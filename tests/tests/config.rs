//! The settings as the command line sees them: `serve` refusing a setting out of range
//! before it starts, `config check` and `config show` (docs/configuration.md).

use ringmail_tests::binary;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Runs `ringmail ARGS` to its end; a process still running after 30 s is killed and
/// fails the test (a `serve` that was not refused would run for ever).
fn run(args: &[&str]) -> Output {
    let child = Command::new(binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ringmail");
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: kill(2) on the child this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("ringmail {args:?} did not exit");
        }
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn serve_refuses_a_message_size_above_the_record_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let smtp = "127.0.0.1:0".to_string();
    // The new name and the old spelling scripts use.
    for flag in ["--message-size-max", "--max-message-size"] {
        let out = run(&[
            "serve",
            "--data",
            data.to_str().unwrap(),
            "--smtp",
            &smtp,
            "--dns",
            "127.0.0.1:9",
            flag,
            "999999999999",
        ]);
        assert!(!out.status.success(), "{flag}: {}", stderr(&out));
        assert!(
            stderr(&out)
                .contains("`message-size-max` must be at most 263229824 bytes, not 999999999999"),
            "{flag}: {}",
            stderr(&out)
        );
        assert!(!data.exists(), "refused before the data directory is made");
    }
}

#[test]
fn config_check_names_the_bad_key() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("bad.toml");
    std::fs::write(&file, "smtp = \"127.0.0.1:2525\"\nmx-prot = 25\n").unwrap();
    let out = run(&["config", "check", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("unknown key `mx-prot`"),
        "{}",
        stderr(&out)
    );
    std::fs::write(&file, "cores = \"four\"\n").unwrap();
    let out = run(&["config", "check", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("`cores` must be integer (found string)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn config_show_applies_flags_over_the_file_and_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("in.toml");
    std::fs::write(
        &file,
        "hostname = \"mx1.example.test\"\nmx-port = 2600\nlocal-domains = [\"a.test\"]\n\
         route = [\"b.test=127.0.0.2:2525\"]\ndns = [\"127.0.0.1:9\"]\n",
    )
    .unwrap();
    let out = run(&[
        "config",
        "show",
        "--config",
        file.to_str().unwrap(),
        "--mx-port",
        "2700",
        "--destination-rate",
        "5",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = String::from_utf8(out.stdout).unwrap();
    for line in [
        "hostname = \"mx1.example.test\"\n",
        "mx-port = 2700\n",
        "local-domain = [\"a.test\"]\n",
        "route = [\"b.test=127.0.0.2:2525\"]\n",
        "destination-rate = 5.0\n",
        "message-size-max = 52428800\n",
    ] {
        assert!(shown.contains(line), "{line:?} missing from\n{shown}");
    }
    let again = tmp.path().join("shown.toml");
    std::fs::write(&again, &shown).unwrap();
    let out = run(&["config", "check", again.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run(&["config", "show", "--config", again.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), shown);
}

#[test]
fn the_readme_example_passes_config_check() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find("    data = \"/var/spool/ringmail\"")
        .expect("README has the example file");
    let end = start + readme[start..].find("\n\n").unwrap();
    let example: String = readme[start..end]
        .lines()
        .map(|l| format!("{}\n", l.trim_start()))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("readme.toml");
    std::fs::write(&file, &example).unwrap();
    let out = run(&["config", "check", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}
