//! Prints what `mime::analyze` makes of each message file given, one JSON object a
//! line, bytes as `\u00XX` escapes of their octets (so any byte survives): the
//! ENVELOPE, BODY, BODYSTRUCTURE, RFC822.SIZE and every section of the part table.
//! `tests/interop/bodystructure.sh` compares this with what Dovecot answers.

use ringmail_store::mime::{self, Span};

fn json(out: &mut String, b: &[u8]) {
    out.push('"');
    for &c in b {
        match c {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(c as char),
            _ => out.push_str(&format!("\\u{c:04x}")),
        }
    }
    out.push('"');
}

fn main() {
    for path in std::env::args().skip(1) {
        let raw = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let meta = mime::analyze(&raw);
        let slice = |s: &Span| &raw[s.range()];
        let mut o = String::from("{\"file\":");
        json(&mut o, path.as_bytes());
        o.push_str(&format!(",\"size\":{}", meta.size));
        for (k, v) in [
            ("envelope", &meta.envelope[..]),
            ("body", &meta.body[..]),
            ("bodystructure", &meta.bodystructure[..]),
        ] {
            o.push_str(&format!(",\"{k}\":"));
            json(&mut o, v);
        }
        o.push_str(",\"sections\":{\"HEADER\":");
        json(&mut o, slice(&meta.header));
        o.push_str(",\"TEXT\":");
        json(&mut o, slice(&meta.text));
        for p in &meta.parts {
            let n: Vec<String> = p.number.iter().map(|n| n.to_string()).collect();
            let n = n.join(".");
            let mut sections = vec![(n.clone(), p.body), (format!("{n}.MIME"), p.header)];
            if let Some((h, t)) = p.message {
                sections.push((format!("{n}.HEADER"), h));
                sections.push((format!("{n}.TEXT"), t));
            }
            for (name, span) in sections {
                o.push(',');
                json(&mut o, name.as_bytes());
                o.push(':');
                json(&mut o, slice(&span));
            }
        }
        o.push_str("}}");
        println!("{o}");
    }
}
