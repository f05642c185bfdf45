//! Replays the fuzz corpora (`fuzz/corpus/TARGET/`) through the fuzz targets' bodies:
//! every input the fuzzer kept, and every crash it found (saved there as a regression
//! input), runs in `cargo test`, without a fuzzer.

#[path = "../../fuzz/src/targets.rs"]
mod targets;

use std::path::Path;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let r = std::panic::catch_unwind(|| f(&data));
        assert!(r.is_ok(), "{target}: input {} fails", path.display());
        n += 1;
    }
    assert!(n > 0, "no corpus for {target} in {}", dir.display());
}

#[test]
fn smtp_session_corpus() {
    replay("smtp_session", targets::smtp_session);
}

#[test]
fn smtp_client_corpus() {
    replay("smtp_client", targets::smtp_client);
}

#[test]
fn dns_answer_corpus() {
    replay("dns_answer", targets::dns_answer);
}

#[test]
fn record_decode_corpus() {
    replay("record_decode", targets::record_decode);
}

#[test]
fn mime_analyze_corpus() {
    replay("mime_analyze", targets::mime_analyze);
}
