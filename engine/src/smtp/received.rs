//! The `Received:` trace header ringmail adds (RFC 5321 §4.4). It is stored beside the
//! body as a prefix and sent before the body's bytes; the body is never rewritten.

use std::net::IpAddr;

/// What the trace header says.
pub struct Trace<'a> {
    /// The client's EHLO/HELO argument.
    pub helo: &'a str,
    pub peer: IpAddr,
    /// This server's name.
    pub hostname: &'a str,
    /// `with`: ESMTP, ESMTPS, ESMTPSA… (RFC 3848).
    pub protocol: &'a str,
    pub id: &'a str,
    /// The recipient, named only when there is one.
    pub single_rcpt: Option<&'a str>,
    /// The account the client authenticated as (as Postfix's
    /// smtpd_sasl_authenticated_header shows it).
    pub authenticated: Option<&'a str>,
    /// An RFC 5322 date-time (the caller owns the clock).
    pub date: &'a str,
}

/// Builds the header.
pub fn received_header(t: &Trace<'_>) -> String {
    let Trace {
        helo,
        peer,
        hostname,
        protocol,
        id,
        single_rcpt,
        authenticated,
        date,
    } = *t;
    let literal = match peer {
        IpAddr::V4(v4) => format!("[{v4}]"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("[{v4}]"),
            None => format!("[IPv6:{v6}]"),
        },
    };
    // What could end the comment or the clause early (or the header: `;` starts
    // its date) becomes `?`; the rest is as the client said it.
    let helo: String = helo
        .chars()
        .map(|c| {
            let breaks = matches!(c, '(' | ')' | ';' | '\\');
            if (c.is_ascii_graphic() || !c.is_ascii()) && !breaks && !c.is_control() {
                c
            } else {
                '?'
            }
        })
        .take(255)
        .collect();
    let mut h = format!("Received: from {helo} ({literal})\r\n");
    if let Some(login) = authenticated {
        let login: String = login
            .chars()
            .filter(|c| !c.is_control() && *c != ')' && *c != '(')
            .take(255)
            .collect();
        h.push_str(&format!("\t(Authenticated sender: {login})\r\n"));
    }
    h.push_str(&format!(
        "\tby {hostname} (ringmail) with {protocol} id {id}"
    ));
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
        let t = Trace {
            helo: "client.example",
            peer: "127.0.0.1".parse().unwrap(),
            hostname: "mx.local",
            protocol: "ESMTP",
            id: "0100000000000001",
            single_rcpt: Some("a@b"),
            authenticated: None,
            date: "Sat, 28 Nov 2026 01:00:00 +0000",
        };
        let h = received_header(&t);
        assert_eq!(
            h,
            "Received: from client.example ([127.0.0.1])\r\n\tby mx.local (ringmail) with ESMTP id 0100000000000001\r\n\tfor <a@b>; Sat, 28 Nov 2026 01:00:00 +0000\r\n"
        );
        let h6 = received_header(&Trace {
            helo: "x",
            peer: "::1".parse().unwrap(),
            hostname: "h",
            protocol: "SMTP",
            id: "1",
            single_rcpt: None,
            authenticated: None,
            date: "D",
        });
        assert!(h6.starts_with("Received: from x ([IPv6:::1])"));
        assert!(h6.ends_with("id 1; D\r\n"));
        let a = received_header(&Trace {
            protocol: "ESMTPSA",
            authenticated: Some("bob@b (x)\r\nX-Evil: 1"),
            ..t
        });
        assert!(
            a.starts_with("Received: from client.example ([127.0.0.1])\r\n\t(Authenticated sender: bob@b xX-Evil: 1)\r\n\tby mx.local (ringmail) with ESMTPSA id"),
            "{a}"
        );
        // A HELO argument cannot close the comment, start the date or fold the line.
        let h = received_header(&Trace {
            helo: "evil) (by x; Sat\\",
            ..t
        });
        assert!(
            h.starts_with("Received: from evil???by?x??Sat? ([127.0.0.1])\r\n"),
            "{h}"
        );
    }
}
