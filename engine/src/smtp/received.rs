//! The `Received:` trace header ringmail adds (RFC 5321 §4.4). It is stored beside the
//! body as a prefix and sent before the body's bytes; the body is never rewritten.

use std::net::IpAddr;

/// Builds the header. `date` is an RFC 5322 date-time (the caller owns the clock).
pub fn received_header(
    helo: &str,
    peer: IpAddr,
    hostname: &str,
    protocol: &str,
    id: &str,
    single_rcpt: Option<&str>,
    date: &str,
) -> String {
    let literal = match peer {
        IpAddr::V4(v4) => format!("[{v4}]"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("[{v4}]"),
            None => format!("[IPv6:{v6}]"),
        },
    };
    let helo: String = helo
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || !c.is_ascii() {
                c
            } else {
                '?'
            }
        })
        .take(255)
        .collect();
    let mut h = format!(
        "Received: from {helo} ({literal})\r\n\tby {hostname} (ringmail) with {protocol} id {id}"
    );
    // Naming the recipient is only safe when there is one: with several it would
    // disclose the others' addresses to each of them.
    if let Some(rcpt) = single_rcpt {
        h.push_str(&format!("\r\n\tfor <{rcpt}>"));
    }
    h.push_str(&format!("; {date}\r\n"));
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape() {
        let h = received_header(
            "client.example",
            "127.0.0.1".parse().unwrap(),
            "mx.local",
            "ESMTP",
            "0100000000000001",
            Some("a@b"),
            "Sat, 28 Nov 2026 01:00:00 +0000",
        );
        assert_eq!(
            h,
            "Received: from client.example ([127.0.0.1])\r\n\tby mx.local (ringmail) with ESMTP id 0100000000000001\r\n\tfor <a@b>; Sat, 28 Nov 2026 01:00:00 +0000\r\n"
        );
        let h6 = received_header("x", "::1".parse().unwrap(), "h", "SMTP", "1", None, "D");
        assert!(h6.starts_with("Received: from x ([IPv6:::1])"));
        assert!(h6.ends_with("id 1; D\r\n"));
    }
}
