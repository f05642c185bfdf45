//! Throughput of the sans-IO SMTP server core on a realistic pipelined transaction
//! (EHLO, MAIL, 3×RCPT, DATA with a 4 KiB and a 64 KiB dot-stuffed body, QUIT),
//! fed in 16 KiB reads as the driver does.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringmail::smtp::{Config, Limits, Session, Step};
use std::rc::Rc;

fn transaction(body_bytes: usize) -> Vec<u8> {
    let mut t = b"EHLO client.example\r\nMAIL FROM:<sender@client.example> SIZE=70000 BODY=8BITMIME\r\nRCPT TO:<a@localhost>\r\nRCPT TO:<b@localhost>\r\nRCPT TO:<c@remote.example>\r\nDATA\r\n".to_vec();
    t.extend_from_slice(
        b"From: sender@client.example\r\nTo: a@localhost\r\nSubject: benchmark\r\n\r\n",
    );
    let line =
        b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n";
    let mut n = 0;
    while n < body_bytes {
        if n % (line.len() * 10) == 0 {
            t.extend_from_slice(b".stuffed line\r\n");
        }
        t.extend_from_slice(line);
        n += line.len();
    }
    t.extend_from_slice(b".\r\nQUIT\r\n");
    t
}

fn run(cfg: &Rc<Config>, input: &[u8]) -> usize {
    let mut s = Session::new(cfg.clone(), true);
    let mut stored = 0;
    for chunk in input.chunks(16 << 10) {
        let mut rest = chunk;
        while !rest.is_empty() {
            // read_buf may offer less than a whole chunk (a message's receive chunk
            // is never grown, a new one starts).
            let buf = s.read_buf();
            let n = buf.len().min(rest.len());
            buf[..n].copy_from_slice(&rest[..n]);
            s.filled(n);
            rest = &rest[n..];
        }
        loop {
            match s.process() {
                Step::NeedInput => break,
                Step::Message(tx) => {
                    stored += tx.body.len();
                    s.message_stored("0000000000000001");
                }
                // STARTTLS and AUTH are not offered.
                Step::Close | Step::StartTls | Step::Authenticate { .. } => return stored,
            }
        }
        s.clear_output();
    }
    stored
}

fn bench(c: &mut Criterion) {
    let cfg = Rc::new(Config {
        hostname: "mx.example".into(),
        local_domains: vec!["localhost".into()],
        own_addresses: vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()],
        limits: Limits::default(),
        starttls: false,
        auth: false,
        auth_without_tls: false,
        sender_login_match: true,
        submission: false,
    });
    let mut g = c.benchmark_group("smtp_server_core");
    for size in [4 << 10, 64 << 10] {
        let input = transaction(size);
        g.throughput(Throughput::Bytes(input.len() as u64));
        g.bench_function(format!("transaction_{}k", size >> 10), |b| {
            b.iter(|| run(&cfg, &input))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
