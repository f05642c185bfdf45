//! The corpus is tests/interop/mime-corpus/, shared with the Dovecot comparison
//! (tests/interop/bodystructure.sh): the BODYSTRUCTUREs below are what Dovecot 2.3
//! answers for those files, but for the differences that script reports (the case of
//! type and parameter names, RFC 2231 parameters).

use super::*;

macro_rules! corpus {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_bytes!(concat!("../../../tests/interop/mime-corpus/", $name)) as &[u8])),*]
    };
}

const CORPUS: &[(&str, &[u8])] = corpus![
    "alternative.eml",
    "attachment.eml",
    "badboundary.eml",
    "eightbit.eml",
    "missing.eml",
    "nested.eml",
    "noboundary.eml",
    "nofinalcrlf.eml",
    "rfc2231.eml",
    "rfc3501.eml",
    "simple.eml",
];

fn get(name: &str) -> &'static [u8] {
    CORPUS.iter().find(|(n, _)| *n == name).unwrap().1
}

fn part<'a>(raw: &'a [u8], meta: &Meta, n: &[u32]) -> (&'a [u8], &'a [u8]) {
    let p = meta.part(n).unwrap_or_else(|| panic!("no part {n:?}"));
    (&raw[p.header.range()], &raw[p.body.range()])
}

const BODYSTRUCTURES: &[(&str, &[u8])] = &[
    (
        "alternative.eml",
        b"((\"text\" \"plain\" (\"charset\" \"utf-8\") NIL NIL \"quoted-printable\" 14 0 NIL NIL NIL NIL)((\"text\" \"html\" (\"charset\" \"utf-8\") NIL NIL \"quoted-printable\" 16 0 NIL NIL NIL NIL)(\"image\" \"png\" NIL \"<logo@example.test>\" NIL \"base64\" 12 NIL NIL NIL NIL) \"related\" (\"boundary\" \"rel\") NIL NIL NIL) \"alternative\" (\"boundary\" \"alt\") NIL NIL NIL)",
    ),
    (
        "attachment.eml",
        b"((\"text\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 13 0 NIL (\"inline\" NIL) NIL NIL)(\"application\" \"pdf\" (\"name\" \"report.pdf\") NIL NIL \"base64\" 1050 \"Q2hlY2sgSW50ZWdyaXR5IQ==\" (\"attachment\" (\"filename\" \"report.pdf\" \"size\" \"768\")) (\"en\" \"de\") \"http://example.test/report.pdf\") \"mixed\" (\"boundary\" \"=-mix-=\") NIL NIL NIL)",
    ),
    (
        "badboundary.eml",
        b"((\"text\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 0 0 NIL NIL NIL NIL) \"mixed\" (\"boundary\" \"never-here\") NIL NIL NIL)",
    ),
    (
        "eightbit.eml",
        b"(\"text\" \"plain\" (\"charset\" \"utf-8\") NIL NIL \"8bit\" 17 1 NIL NIL NIL NIL)",
    ),
    (
        "missing.eml",
        b"(\"text\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 13 1 NIL NIL NIL NIL)",
    ),
    (
        "nested.eml",
        b"((\"text\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 9 0 NIL NIL NIL NIL)(\"message\" \"rfc822\" NIL NIL \"forwarded\" \"7bit\" 323 (\"Wed, 9 Dec 2026 07:00:00 +0000\" \"inner\" ((NIL NIL \"judy\" \"example.test\")) ((NIL NIL \"judy\" \"example.test\")) ((NIL NIL \"judy\" \"example.test\")) ((NIL NIL \"heidi\" \"example.test\")) NIL NIL NIL \"<inner.5@example.test>\") ((\"text\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 10 0 NIL NIL NIL NIL)(\"text\" \"html\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 12 0 NIL NIL NIL NIL) \"alternative\" (\"boundary\" \"inner\") NIL NIL NIL) 17 NIL NIL NIL NIL)(\"message\" \"rfc822\" NIL NIL NIL \"7bit\" 73 (NIL \"single\" ((NIL NIL \"mallory\" \"example.test\")) ((NIL NIL \"mallory\" \"example.test\")) ((NIL NIL \"mallory\" \"example.test\")) NIL NIL NIL NIL NIL) (\"text\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 26 1 NIL NIL NIL NIL) 4 NIL NIL NIL NIL) \"mixed\" (\"boundary\" \"outer\") NIL NIL NIL)",
    ),
    (
        "noboundary.eml",
        b"((\"text\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 0 0 NIL NIL NIL NIL) \"mixed\" NIL NIL NIL NIL)",
    ),
    (
        "nofinalcrlf.eml",
        b"((\"text\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 5 0 NIL NIL NIL NIL)(\"text\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 21 0 NIL NIL NIL NIL) \"mixed\" (\"boundary\" \"x\") NIL NIL NIL)",
    ),
    (
        "rfc2231.eml",
        b"((\"application\" \"x-stuff\" (\"title-language\" \"en\" \"title\" \"This is even more ***fun*** isn't it!\") NIL NIL \"7bit\" 4 NIL (\"attachment\" (\"filename\" {13}\x0d\x0a\xe2\x82\xac rates.txt)) NIL NIL) \"mixed\" (\"boundary\" \"b1\") NIL NIL NIL)",
    ),
    (
        "rfc3501.eml",
        b"((\"text\" \"plain\" (\"charset\" \"US-ASCII\") NIL NIL \"7bit\" 1152 23 NIL NIL NIL NIL)(\"text\" \"plain\" (\"charset\" \"US-ASCII\" \"name\" \"cc.diff\") \"<960723163407.20117h@cac.washington.edu>\" \"Compiler diff\" \"BASE64\" 4554 73 NIL NIL NIL NIL) \"mixed\" (\"boundary\" \"----=_X\") NIL NIL NIL)",
    ),
    (
        "simple.eml",
        b"(\"text\" \"plain\" (\"charset\" \"utf-8\") NIL NIL \"7bit\" 26 2 NIL NIL NIL NIL)",
    ),
];

#[test]
fn bodystructure_of_the_corpus() {
    for (name, want) in BODYSTRUCTURES {
        let got = analyze(get(name)).bodystructure;
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(want),
            "{name}"
        );
    }
}

/// RFC 3501 §7.4.2's BODY example and §8's ENVELOPE, for the message they describe.
#[test]
fn rfc3501_examples() {
    let m = analyze(get("rfc3501.eml"));
    let body = br#"(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 1152 23)("TEXT" "PLAIN" ("CHARSET" "US-ASCII" "NAME" "cc.diff") "<960723163407.20117h@cac.washington.edu>" "Compiler diff" "BASE64" 4554 73) "MIXED")"#;
    // The RFC's names are upper case; case does not matter in them (RFC 2045 §5.1).
    assert!(
        m.body.eq_ignore_ascii_case(body),
        "{}",
        String::from_utf8_lossy(&m.body)
    );
    let envelope = br#"("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)" "IMAP4rev1 WG mtg summary and minutes" (("Terry Gray" NIL "gray" "cac.washington.edu")) (("Terry Gray" NIL "gray" "cac.washington.edu")) (("Terry Gray" NIL "gray" "cac.washington.edu")) ((NIL NIL "imap" "cac.washington.edu")) ((NIL NIL "minutes" "CNRI.Reston.VA.US")("John Klensin" NIL "KLENSIN" "MIT.EDU")) NIL NIL "<B27397-0100000@cac.washington.edu>")"#;
    assert_eq!(
        String::from_utf8_lossy(&m.envelope),
        String::from_utf8_lossy(envelope)
    );
}

#[test]
fn envelope_keeps_raw_values_groups_and_defaults() {
    let e = |name| String::from_utf8_lossy(&analyze(get(name)).envelope).into_owned();
    // Encoded-words as in the header, 8-bit as literals, folding undone.
    assert!(
        e("eightbit.eml").contains("{17}\r\nGr\u{fc}\u{df}e aus K\u{f6}ln (("),
        "{}",
        e("eightbit.eml")
    );
    assert!(e("eightbit.eml")
        .contains("((\"=?iso-8859-1?q?S=F8ren?=\" NIL \"soren\" \"example.test\"))"));
    assert!(e("alternative.eml").contains("\"=?utf-8?q?Caf=C3=A9?= menu\""));
    assert!(e("simple.eml").contains("\"Hello folded subject\""));
    // A comment names an address without a display name; a quoted comma stays.
    assert!(e("alternative.eml").contains(
        "((\"Dave\" NIL \"dave\" \"example.test\")(\"Erin E.\" NIL \"erin\" \"example.test\"))"
    ));
    assert!(e("alternative.eml").contains("((\"Carol, Q.\" NIL \"carol\" \"example.test\"))"));
    // No From, Date, Subject: NIL (and so Sender and Reply-To); groups.
    assert_eq!(
        e("missing.eml"),
        "(NIL NIL NIL NIL NIL ((NIL NIL \"undisclosed-recipients\" NIL)(NIL NIL NIL NIL)) \
         ((NIL NIL \"friends\" NIL)(NIL NIL \"nick\" \"example.test\")(\"O. Pal\" NIL \"opal\" \"example.test\")(NIL NIL NIL NIL)(NIL NIL \"peggy\" \"example.test\")) \
         NIL NIL NIL)"
    );
}

#[test]
fn addresses_route_and_missing_parts() {
    let a = |s: &[u8]| {
        let mut o = Vec::new();
        addresses(&mut o, &address::parse(s));
        String::from_utf8(o).unwrap()
    };
    assert_eq!(
        a(b"Joe Q. Public <@r1,@r2:joe@x.test>"),
        "((\"Joe Q. Public\" \"@r1,@r2\" \"joe\" \"x.test\"))"
    );
    assert_eq!(a(b"nobody"), "((NIL NIL \"nobody\" \"MISSING_DOMAIN\"))");
    assert_eq!(
        a(b"<>"),
        "((NIL NIL \"MISSING_MAILBOX\" \"MISSING_DOMAIN\"))"
    );
    assert_eq!(a(b""), "NIL");
    assert_eq!(a(b"a@[127.0.0.2]"), "((NIL NIL \"a\" \"[127.0.0.2]\"))");
    assert_eq!(a(b"\"a\\\"b\" <q@x>"), "((\"a\\\"b\" NIL \"q\" \"x\"))");
}

/// The part table names exactly each part's header and body in the stored bytes.
#[test]
fn part_offsets_name_the_parts() {
    let raw = get("nested.eml");
    let m = analyze(raw);
    let numbers: Vec<_> = m.parts.iter().map(|p| p.number.clone()).collect();
    assert_eq!(
        numbers,
        [
            vec![1],
            vec![2],
            vec![2, 1],
            vec![2, 2],
            vec![3],
            vec![3, 1]
        ]
    );
    assert_eq!(
        part(raw, &m, &[1]),
        (&b"Content-Type: text/plain\r\n\r\n"[..], &b"see below"[..])
    );
    let (h, b) = part(raw, &m, &[2]);
    assert_eq!(
        h,
        b"Content-Type: message/rfc822\r\nContent-Description: forwarded\r\n\r\n"
    );
    assert!(b.starts_with(b"From: judy@example.test\r\n") && b.ends_with(b"--inner--\r\n"));
    let (nh, nt) = m.part(&[2]).unwrap().message.unwrap();
    assert!(
        raw[nh.range()].starts_with(b"From: judy")
            && raw[nh.range()].ends_with(b"boundary=inner\r\n\r\n")
    );
    assert!(
        raw[nt.range()].starts_with(b"--inner\r\n") && nt.end() == m.part(&[2]).unwrap().body.end()
    );
    assert_eq!(
        part(raw, &m, &[2, 1]),
        (&b"Content-Type: text/plain\r\n\r\n"[..], &b"inner text"[..])
    );
    assert_eq!(
        part(raw, &m, &[2, 2]),
        (
            &b"Content-Type: text/html\r\n\r\n"[..],
            &b"<b>inner</b>"[..]
        )
    );
    // A message/rfc822 whose body is single-part: 3.1 is that body, its MIME header the
    // nested message's header.
    let (h, b) = part(raw, &m, &[3, 1]);
    assert_eq!(h, b"Subject: single\r\nFrom: mallory@example.test\r\n\r\n");
    assert_eq!(b, b"single-part body\r\nline two");
    assert_eq!(
        m.part(&[3]).unwrap().message.unwrap().0,
        m.part(&[3, 1]).unwrap().header
    );
    assert!(m.part(&[4]).is_none() && m.part(&[2, 3]).is_none() && m.part(&[]).is_none());
    assert!(raw[m.header.range()].ends_with(b"boundary=outer\r\n\r\n"));
    assert_eq!(m.header.start, 0);
    assert_eq!(m.text.end(), raw.len() as u64);

    let raw = get("alternative.eml");
    let m = analyze(raw);
    assert_eq!(part(raw, &m, &[1]).1, b"Caf=C3=A9 menu");
    assert!(
        part(raw, &m, &[2]).1.starts_with(b"--rel\r\n")
            && part(raw, &m, &[2]).1.ends_with(b"--rel--\r\n")
    );
    assert_eq!(part(raw, &m, &[2, 1]).1, b"<p>Caf=C3=A9</p>");
    assert_eq!(part(raw, &m, &[2, 2]), (&b"Content-Type: image/png\r\nContent-ID: <logo@example.test>\r\nContent-Transfer-Encoding: base64\r\n\r\n"[..], &b"iVBORw0KGgo="[..]));
    assert!(raw[m.text.range()].starts_with(b"preamble text\r\n--alt\r\n"));

    let raw = get("nofinalcrlf.eml");
    let m = analyze(raw);
    assert_eq!(part(raw, &m, &[1]).1, b"first");
    assert_eq!(part(raw, &m, &[2]).1, b"last line without end");

    // Single part: 1 is the body, 1.MIME the message header.
    let raw = get("simple.eml");
    let m = analyze(raw);
    assert_eq!(m.parts.len(), 1);
    assert_eq!(m.parts[0].header, m.header);
    assert_eq!(m.parts[0].body, m.text);
    assert_eq!(&raw[m.text.range()], b"Hello Bob,\r\njust a line.\r\n");
}

/// Every corpus message: spans inside the message, header then body, parts in order.
#[test]
fn part_table_is_consistent_for_the_corpus() {
    for (name, raw) in CORPUS {
        let m = analyze(raw);
        assert_eq!(m.size, raw.len() as u64);
        assert_eq!(
            (m.header.start, m.header.end(), m.text.end()),
            (0, m.text.start, m.size),
            "{name}"
        );
        assert!(raw[m.header.range()].ends_with(b"\r\n\r\n"), "{name}");
        assert!(!m.parts.is_empty(), "{name}");
        for p in &m.parts {
            assert!(p.body.end() <= m.size, "{name} {p:?}");
            assert_eq!(p.header.end(), p.body.start, "{name} {p:?}");
            let h = &raw[p.header.range()];
            assert!(
                h.is_empty() || h.ends_with(b"\r\n\r\n") || h == b"\r\n",
                "{name} {p:?}"
            );
        }
        assert!(
            m.parts.windows(2).all(|w| w[0].number < w[1].number),
            "{name}"
        );
    }
}

/// The served message is the prefix and the stored one: shifting the stored meta gives
/// what analysing the served bytes gives.
#[test]
fn shifted_meta_is_the_meta_of_the_served_message() {
    let prefix = b"Return-Path: <a@example.test>\r\nDelivered-To: b@example.test\r\n";
    for (name, raw) in CORPUS {
        let served = [&prefix[..], raw].concat();
        let shifted = analyze(raw).shifted(prefix.len() as u64);
        assert_eq!(shifted, analyze(&served), "{name}");
        assert_eq!(shifted.size, served.len() as u64);
        assert!(served[shifted.header.range()].starts_with(b"Return-Path:"));
    }
}

#[test]
fn encode_decode_round_trip_and_bounds() {
    for (name, raw) in CORPUS {
        let m = analyze(raw);
        let mut out = Vec::new();
        m.encode(&mut out);
        assert_eq!(Meta::decode(&out).as_ref(), Ok(&m), "{name}");
        for cut in 0..out.len() {
            assert!(Meta::decode(&out[..cut]).is_err(), "{name} cut at {cut}");
        }
        let mut longer = out.clone();
        longer.push(0);
        assert!(Meta::decode(&longer).is_err());
    }
    // A span past the message is refused, so no caller slices out of bounds.
    let mut m = analyze(get("simple.eml"));
    m.parts[0].body.len += 1;
    let mut out = Vec::new();
    m.encode(&mut out);
    assert_eq!(
        Meta::decode(&out),
        Err("mime meta span outside the message")
    );
    let mut v = vec![VERSION + 1];
    v.extend_from_slice(&out[1..]);
    assert_eq!(Meta::decode(&v), Err("unknown mime meta version"));
}

#[test]
fn malformed_mail_gets_an_answer() {
    let cases: &[&[u8]] = &[
        b"",
        b"\r\n",
        b"no header at all",
        b"Subject: only a header",
        b"Subject: x\r\n",
        b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n",
        b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a--\r\n",
        b"Content-Type: message/rfc822\r\n\r\n",
        b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\nU3ViamVjdDogeA0KDQpi\r\n",
        b"Content-Type: text/\r\nFrom: <<<@@@>>>,,,;;;:::\r\nTo: a:b:c;d;\r\nCc: (((\r\n\r\nx",
        b"From: \"unterminated\r\nTo: (unterminated\r\n\r\n",
        b"Content-Type: multipart/mixed; boundary=\"\"\r\n\r\n----\r\n\r\n",
    ];
    for raw in cases {
        let m = analyze(raw);
        let mut out = Vec::new();
        m.encode(&mut out);
        assert_eq!(Meta::decode(&out).as_ref(), Ok(&m));
        assert!(m.part(&[1]).is_some(), "{:?}", String::from_utf8_lossy(raw));
        assert!(m.bodystructure.starts_with(b"(") && m.bodystructure.ends_with(b")"));
        for p in &m.parts {
            assert!(p.body.end() <= raw.len() as u64);
        }
    }
    // A base64 message/rfc822 is a leaf: its parts are not in the stored bytes.
    let m = analyze(cases[8]);
    assert_eq!(m.parts.len(), 1);
    assert!(
        m.bodystructure
            .starts_with(b"(\"message\" \"rfc822\" NIL NIL NIL \"base64\" 22 NIL"),
        "{}",
        String::from_utf8_lossy(&m.bodystructure)
    );
    // A multipart without parts has an empty text/plain one.
    let m = analyze(cases[6]);
    assert!(
        m.body.starts_with(
            b"((\"text\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 0 0) \"mixed\")"
        ),
        "{}",
        String::from_utf8_lossy(&m.body)
    );
}

#[test]
fn deep_nesting_is_bounded() {
    let mut raw = Vec::new();
    for _ in 0..(NESTING_MAX + 50) {
        raw.extend_from_slice(b"Content-Type: message/rfc822\r\n\r\n");
    }
    raw.extend_from_slice(b"Subject: bottom\r\n\r\nbody\r\n");
    let m = analyze(&raw);
    assert!(m.parts.len() <= NESTING_MAX + 1);
    assert_eq!(m.size, raw.len() as u64);
}

/// The header-only parse of single-part messages gives what the full parse gives.
#[test]
fn a_single_part_message_analyzed_from_its_header_is_analyzed_alike() {
    let mut cases: Vec<Vec<u8>> = CORPUS.iter().map(|(_, raw)| raw.to_vec()).collect();
    let bodies: &[&[u8]] = &[b"", b"x", b"line\r\n\r\nafter a blank line\r\n", b"\n\n\n"];
    let headers: &[&[u8]] = &[
        b"",
        b"Subject: plain\r\n",
        b"Subject: lf only\n",
        b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n",
        b"Content-Type: application/pdf; name=\"a.pdf\"\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=a.pdf\r\n",
        b"Content-Type: TEXT/PLAIN;\r\n charset=\"iso-8859-1\"\r\nContent-ID: <x@y>\r\nContent-Language: en, de\r\n",
        b"From: A <a@example.org>\r\nTo: b@example.org\r\n \r\nSubject: after a whitespace line\r\n",
        b"Content-Type: message/rfc822\r\n",
        b"Content-Type: multipart/mixed; boundary=b\r\n",
        b"Subject: =?utf-8?q?caf=C3=A9?=\r\nX-Folded: a\r\n\tb\r\n",
    ];
    for h in headers {
        for sep in [&b"\r\n"[..], b"\n", b""] {
            for b in bodies {
                cases.push([*h, sep, b].concat());
            }
        }
    }
    cases.push(
        [
            &b"Subject: 8bit\r\n\r\n"[..],
            &[0xe9, 0xff, 0x00, b'\n'][..],
        ]
        .concat(),
    );
    for raw in &cases {
        let full = analyze_parsed(raw, MessageParser::new().parse(raw));
        assert_eq!(analyze(raw), full, "{:?}", String::from_utf8_lossy(raw));
    }
}

proptest::proptest! {
    /// The same over messages made of header-ish, blank and body pieces at random.
    #[test]
    fn the_header_only_parse_agrees_on_random_messages(
        pieces in proptest::collection::vec(0usize..12, 0..24)
    ) {
        const PIECES: [&[u8]; 12] = [
            b"Subject: a\r\n", b"Content-Type: text/plain\r\n", b" \r\n", b"\r\n", b"\n",
            b"x", b":", b"\tfolded\r\n", b"Content-Type: multipart/mixed; boundary=b\r\n",
            b"--b\r\n", b"Content-Type: message/rfc822\r\n", b"\xe9\xff",
        ];
        let raw: Vec<u8> = pieces.iter().flat_map(|&i| PIECES[i].iter().copied()).collect();
        let full = analyze_parsed(&raw, MessageParser::new().parse(&raw));
        proptest::prop_assert_eq!(analyze(&raw), full);
    }
}
