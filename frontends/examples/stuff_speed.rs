//! Throughput of the RETR/TOP output transforms on a 20 MiB message (release build):
//! `cargo run --release -p ringmail-frontends --example stuff_speed`. No assertions: a
//! measurement, quoted in reports.
use ringmail_frontends::pop3::{Stuffer, Top};
use std::time::Instant;
fn main() {
    // 20 MiB of 76-column lines, one in 20 starting with a dot.
    let mut msg = Vec::new();
    let mut i = 0u64;
    while msg.len() < 20 << 20 {
        if i.is_multiple_of(20) {
            msg.push(b'.');
        }
        msg.extend_from_slice(&[b'x'; 74]);
        msg.extend_from_slice(b"\r\n");
        i += 1;
    }
    let mut out = Vec::with_capacity(msg.len() + msg.len() / 1000 + 16);
    let runs = 20;
    let t = Instant::now();
    for _ in 0..runs {
        out.clear();
        let mut s = Stuffer::new();
        for c in msg.chunks(64 << 10) {
            s.push(c, &mut out);
        }
        s.finish(&mut out);
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "Stuffer: {} MiB x {runs} in {secs:.3}s = {:.0} MiB/s",
        msg.len() >> 20,
        (msg.len() * runs) as f64 / secs / (1 << 20) as f64
    );
    let t = Instant::now();
    for _ in 0..runs {
        out.clear();
        let mut s = Top::new(u64::MAX);
        for c in msg.chunks(64 << 10) {
            s.push(c, &mut out);
        }
        s.finish(&mut out);
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "Top(all): {} MiB x {runs} in {secs:.3}s = {:.0} MiB/s",
        msg.len() >> 20,
        (msg.len() * runs) as f64 / secs / (1 << 20) as f64
    );
}
