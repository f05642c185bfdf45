//! `mime::analyze` (the parse done once per delivered message, on the shard that
//! took it) on a 4 KiB message (text and HTML alternatives) and a 100 KiB one (the
//! same with a base64 attachment), as a delivery hands it over: trace header first.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringmail_store::mime;

fn message(attachment: usize) -> Vec<u8> {
    let mut m = b"Received: from client.example.test (client.example.test [127.0.0.2])\r\n\tby mx.example.test with ESMTP id 1; Mon, 7 Dec 2026 10:00:00 +0000\r\n\
From: \"Alice Example\" <alice@example.test>\r\nTo: Bob <bob@example.test>, carol@example.test\r\n\
Subject: =?utf-8?q?Quarterly_r=C3=A9port?=\r\nDate: Mon, 7 Dec 2026 10:00:00 +0000\r\n\
Message-ID: <bench.1@example.test>\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"=-outer-=\"\r\n\r\n\
--=-outer-=\r\nContent-Type: multipart/alternative; boundary=\"=-alt-=\"\r\n\r\n\
--=-alt-=\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        .to_vec();
    let line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n";
    for _ in 0..24 {
        m.extend_from_slice(line);
    }
    m.extend_from_slice(
        b"\r\n--=-alt-=\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<html><body>\r\n",
    );
    for _ in 0..24 {
        m.extend_from_slice(b"<p>");
        m.extend_from_slice(line);
    }
    m.extend_from_slice(b"</body></html>\r\n--=-alt-=--\r\n");
    if attachment > 0 {
        m.extend_from_slice(b"\r\n--=-outer-=\r\nContent-Type: application/pdf; name=\"r.pdf\"\r\nContent-Disposition: attachment; filename=\"r.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n");
        let b64 = b"JVBERi0xLjQKJcOkw7zDtsOfCjIgMCBvYmoKPDwvTGVuZ3RoIDMgMCBSL0ZpbHRlci9GbGF0ZU\r\n";
        while m.len() < attachment {
            m.extend_from_slice(b64);
        }
    }
    m.extend_from_slice(b"\r\n--=-outer-=--\r\n");
    m
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("mime_analyze");
    let small = message(0);
    let large = message(100 << 10);
    assert!((3500..4700).contains(&small.len()), "{}", small.len());
    for (name, m) in [("4KiB", &small), ("100KiB", &large)] {
        g.throughput(Throughput::Bytes(m.len() as u64));
        g.bench_function(name, |b| b.iter(|| mime::analyze(std::hint::black_box(m))));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
