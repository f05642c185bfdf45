//! The side-by-side comparison behind `bench/compare`: parsing of each tool's output,
//! medians and ratios, the Markdown table and the SVG chart. The orchestration (which
//! process runs when) is in `bin/ringmail-compare.rs`.

use serde_json::Value;
use std::collections::BTreeMap;

/// One measured run of one workload against one target.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub workload: String,
    pub target: String,
    pub rep: usize,
    pub messages: u64,
    pub errors: u64,
    pub seconds: f64,
    pub rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// The server's user + system CPU time over the run, per message (ringmail only).
    pub cpu_us_per_msg: Option<f64>,
    /// User-space copies of message bodies per message, from the server's
    /// `body_copies=N` log counter (`procstat::body_copies`); None while it logs none.
    pub copies_per_msg: Option<f64>,
}

impl Run {
    /// A run measured by ringmail-load.
    pub fn from_load(workload: &str, target: &str, rep: usize, o: &LoadOutput) -> Run {
        Run {
            workload: workload.into(),
            target: target.into(),
            rep,
            messages: o.messages,
            errors: o.errors,
            seconds: o.seconds,
            rate: o.rate,
            p50_ms: Some(o.p50_ms),
            p99_ms: Some(o.p99_ms),
            cpu_us_per_msg: None,
            copies_per_msg: None,
        }
    }

    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "workload": self.workload, "target": self.target, "rep": self.rep,
            "messages": self.messages, "errors": self.errors, "seconds": self.seconds,
            "messages_per_sec": self.rate, "p50_ms": self.p50_ms, "p99_ms": self.p99_ms,
            "cpu_us_per_message": self.cpu_us_per_msg,
            "body_copies_per_message": self.copies_per_msg,
        })
    }
}

/// What `ringmail-load ... --json` printed: its last line is one JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOutput {
    pub messages: u64,
    pub errors: u64,
    pub seconds: f64,
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

pub fn parse_load_output(stdout: &str) -> Result<LoadOutput, String> {
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .ok_or("ringmail-load printed nothing")?;
    let v: Value = serde_json::from_str(last)
        .map_err(|e| format!("ringmail-load's last line is not JSON ({e}): {last}"))?;
    let num = |k: &str| {
        v.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("ringmail-load's JSON has no number {k}: {last}"))
    };
    Ok(LoadOutput {
        messages: num("messages")? as u64,
        errors: num("errors")? as u64,
        seconds: num("seconds")?,
        rate: num("messages_per_sec")?,
        p50_ms: num("p50_ms")?,
        p99_ms: num("p99_ms")?,
    })
}

/// What `ringmail-sink` printed when stopped: its counters as one JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkOutput {
    pub accepted: u64,
    pub refused: u64,
    pub bytes: u64,
}

pub fn parse_sink_output(stdout: &str) -> Result<SinkOutput, String> {
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .ok_or("ringmail-sink printed nothing")?;
    let v: Value = serde_json::from_str(last)
        .map_err(|e| format!("ringmail-sink's output is not JSON ({e}): {last}"))?;
    let num = |k: &str| {
        v.get(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("ringmail-sink's JSON has no count {k}: {last}"))
    };
    Ok(SinkOutput {
        accepted: num("accepted")?,
        refused: num("tempfailed")? + num("permfailed")? + num("disconnected")?,
        bytes: num("bytes")?,
    })
}

/// `smtp-source` prints nothing on success; its rate is the messages over the wall time
/// the caller measured. With `-c` it prints a running count, whose last value must match.
pub fn smtp_source_rate(stdout: &str, messages: u64, seconds: f64) -> Result<f64, String> {
    if let Some(last) = stdout
        .split(['\r', '\n'])
        .rev()
        .map(str::trim)
        .find(|s| !s.is_empty())
    {
        let n: u64 = last
            .parse()
            .map_err(|_| format!("unexpected smtp-source output: {last}"))?;
        if n != messages {
            return Err(format!(
                "smtp-source counted {n} messages, expected {messages}"
            ));
        }
    }
    if seconds <= 0.0 {
        return Err("no time measured".into());
    }
    Ok(messages as f64 / seconds)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    assert!(!v.is_empty(), "median of nothing");
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Medians by workload, then by target, in the order the runs came.
pub fn medians(runs: &[Run]) -> Vec<(String, BTreeMap<String, f64>)> {
    let mut order: Vec<String> = Vec::new();
    let mut by: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for r in runs {
        if !order.contains(&r.workload) {
            order.push(r.workload.clone());
        }
        by.entry((r.workload.clone(), r.target.clone()))
            .or_default()
            .push(r.rate);
    }
    order
        .into_iter()
        .map(|w| {
            let m = by
                .iter()
                .filter(|((bw, _), _)| *bw == w)
                .map(|((_, t), v)| (t.clone(), median(v.clone())))
                .collect();
            (w, m)
        })
        .collect()
}

/// The Markdown table: medians per target, ringmail / each peer, ringmail / limit.
pub fn markdown(runs: &[Run], subject: &str, limit: &str, peers: &[&str]) -> String {
    let mut out = format!("| workload | {limit} (limit) | {subject} |");
    for p in peers {
        out.push_str(&format!(" {p} |"));
    }
    out.push_str(&format!(" {subject} / limit |"));
    for p in peers {
        out.push_str(&format!(" {subject} / {p} |"));
    }
    out.push('\n');
    out.push_str(&"|---".repeat(3 + 2 * peers.len() + 1));
    out.push_str("|\n");
    let fmt = |v: Option<&f64>| v.map_or("–".to_string(), |v| format!("{v:.0}"));
    let ratio = |a: Option<&f64>, b: Option<&f64>| match (a, b) {
        (Some(a), Some(b)) if *b > 0.0 => format!("{:.2}", a / b),
        _ => "–".into(),
    };
    for (w, m) in medians(runs) {
        out.push_str(&format!(
            "| {w} | {} | {} |",
            fmt(m.get(limit)),
            fmt(m.get(subject))
        ));
        for p in peers {
            out.push_str(&format!(" {} |", fmt(m.get(*p))));
        }
        out.push_str(&format!(" {} |", ratio(m.get(subject), m.get(limit))));
        for p in peers {
            out.push_str(&format!(" {} |", ratio(m.get(subject), m.get(*p))));
        }
        out.push('\n');
    }
    out
}

/// Each (TLS workload, its plaintext twin): per target, the medians of both and the
/// share of the plaintext rate kept under TLS.
pub fn tls_markdown(runs: &[Run], pairs: &[(&str, &str)], targets: &[&str]) -> String {
    let mut out = String::from("| workload |");
    for t in targets {
        out.push_str(&format!(
            " {t} plaintext | {t} STARTTLS | {t} TLS / plaintext |"
        ));
    }
    out.push('\n');
    out.push_str(&"|---".repeat(1 + 3 * targets.len()));
    out.push_str("|\n");
    let m: BTreeMap<String, BTreeMap<String, f64>> = medians(runs).into_iter().collect();
    let get = |w: &str, t: &str| m.get(w).and_then(|by| by.get(t)).copied();
    for (tls, plain) in pairs {
        out.push_str(&format!("| {tls} |"));
        for t in targets {
            let (p, s) = (get(plain, t), get(tls, t));
            let fmt = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.0}"));
            let ratio = match (s, p) {
                (Some(s), Some(p)) if p > 0.0 => format!("{:.2}", s / p),
                _ => "–".into(),
            };
            out.push_str(&format!(" {} | {} | {ratio} |", fmt(p), fmt(s)));
        }
        out.push('\n');
    }
    out
}

/// What each message cost `subject`: medians of its CPU time and body copies per
/// message, by workload ("n/a" where the server did not report it).
pub fn cost_markdown(runs: &[Run], subject: &str) -> String {
    let mut out = String::from(
        "| workload | CPU µs per message | body copies per message |\n|---|---|---|\n",
    );
    let mut order: Vec<&str> = Vec::new();
    for r in runs.iter().filter(|r| r.target == subject) {
        if !order.contains(&r.workload.as_str()) {
            order.push(&r.workload);
        }
    }
    for w in order {
        let of = |get: fn(&Run) -> Option<f64>| {
            let v: Vec<f64> = runs
                .iter()
                .filter(|r| r.target == subject && r.workload == w)
                .filter_map(get)
                .collect();
            v
        };
        let cpu = of(|r| r.cpu_us_per_msg);
        let copies = of(|r| r.copies_per_msg);
        let fmt = |v: Vec<f64>, digits: usize| {
            if v.is_empty() {
                "n/a".to_string()
            } else {
                format!("{:.*}", digits, median(v))
            }
        };
        out.push_str(&format!("| {w} | {} | {} |\n", fmt(cpu, 0), fmt(copies, 2)));
    }
    out
}

/// A grouped bar chart of the medians (messages/s), one group per workload.
pub fn svg_chart(runs: &[Run], targets: &[&str], title: &str) -> Result<String, String> {
    use plotters::prelude::*;
    let med = medians(runs);
    let top = med
        .iter()
        .flat_map(|(_, m)| m.values().copied())
        .fold(1.0f64, f64::max)
        * 1.15;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let groups = med.len().max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..groups as f64, 0f64..top)
            .map_err(|e| e.to_string())?;
        let names: Vec<String> = med.iter().map(|(w, _)| w.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(groups * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 0.01 {
                    names.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc("messages/s (median)")
            .draw()
            .map_err(|e| e.to_string())?;
        let width = 0.8 / targets.len() as f64;
        for (ti, t) in targets.iter().enumerate() {
            let color = Palette99::pick(ti).to_rgba();
            let bars: Vec<_> = med
                .iter()
                .enumerate()
                .filter_map(|(gi, (_, m))| {
                    let v = *m.get(*t)?;
                    let x0 = gi as f64 + 0.1 + ti as f64 * width;
                    Some(Rectangle::new(
                        [(x0, 0.0), (x0 + width * 0.9, v)],
                        color.filled(),
                    ))
                })
                .collect();
            chart
                .draw_series(bars)
                .map_err(|e| e.to_string())?
                .label(*t)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded from real runs on the development machine.
    const LOAD: &str = "{\"codes\":{\"220\":32,\"221\":32,\"250\":60032,\"354\":20000},\"errors\":0,\"max_ms\":35.807,\"messages\":20000,\"messages_per_sec\":21235.061387807225,\"mib_per_sec\":84.61107228975622,\"mode\":\"smtp\",\"p50_ms\":1.226,\"p90_ms\":1.631,\"p999_ms\":33.471,\"p99_ms\":7.363,\"requested\":20000,\"seconds\":0.941838577}\n";
    const LOAD_TEXT_THEN_JSON: &str = "   12.0s     20000 messages   21235 msg/s      0 errors \n{\"messages\":5,\"errors\":1,\"seconds\":0.5,\"messages_per_sec\":10.0,\"p50_ms\":1.0,\"p99_ms\":2.0}\n";
    const SINK: &str = "ringmail-sink listening on 127.0.0.1:2702\n{\"accepted\":104000,\"bytes\":449822827,\"connections\":20088,\"crc32c_xor\":\"a5c8d71b\",\"disconnected\":0,\"permfailed\":0,\"tempfailed\":0}\n";

    #[test]
    fn parses_load_output() {
        let o = parse_load_output(LOAD).unwrap();
        assert_eq!((o.messages, o.errors), (20000, 0));
        assert!((o.rate - 21235.06).abs() < 0.01);
        assert!((o.p99_ms - 7.363).abs() < 1e-9);
        assert_eq!(parse_load_output(LOAD_TEXT_THEN_JSON).unwrap().errors, 1);
        assert!(parse_load_output("").is_err());
        assert!(parse_load_output("messages 5 of 5\n").is_err());
        assert!(parse_load_output("{\"messages\":1}")
            .unwrap_err()
            .contains("errors"));
    }

    #[test]
    fn tls_rows_set_each_target_against_its_own_plaintext_rate() {
        let runs = [
            run("plain", "ringmail", 1000.0),
            run("plain", "postfix", 100.0),
            run("tls", "ringmail", 800.0),
            run("tls", "ringmail", 600.0),
            run("tls", "ringmail", 900.0),
            run("tls", "postfix", 50.0),
        ];
        let t = tls_markdown(&runs, &[("tls", "plain")], &["ringmail", "postfix"]);
        let row = t.lines().nth(2).unwrap();
        assert_eq!(row, "| tls | 1000 | 800 | 0.80 | 100 | 50 | 0.50 |");
        let t = tls_markdown(&runs, &[("tls", "missing")], &["ringmail"]);
        assert_eq!(t.lines().nth(2).unwrap(), "| tls | – | 800 | – |");
    }

    #[test]
    fn parses_sink_output() {
        let s = parse_sink_output(SINK).unwrap();
        assert_eq!(
            s,
            SinkOutput {
                accepted: 104000,
                refused: 0,
                bytes: 449822827
            }
        );
        assert!(parse_sink_output("{\"accepted\":1}").is_err());
    }

    #[test]
    fn smtp_source_rates() {
        assert_eq!(smtp_source_rate("", 1000, 0.5).unwrap(), 2000.0);
        // With -c it prints a carriage-return counter.
        assert_eq!(
            smtp_source_rate("100\r200\r1000\r\n", 1000, 2.0).unwrap(),
            500.0
        );
        assert!(smtp_source_rate("100\r999\n", 1000, 2.0).is_err());
        assert!(smtp_source_rate("", 1000, 0.0).is_err());
    }

    fn run(w: &str, t: &str, rate: f64) -> Run {
        Run {
            workload: w.into(),
            target: t.into(),
            rep: 0,
            messages: 1,
            errors: 0,
            seconds: 1.0,
            rate,
            p50_ms: None,
            p99_ms: None,
            cpu_us_per_msg: None,
            copies_per_msg: None,
        }
    }

    #[test]
    fn cost_table() {
        let mut a = run("ingest 4k", "ringmail", 50.0);
        a.cpu_us_per_msg = Some(120.0);
        let mut b = a.clone();
        b.cpu_us_per_msg = Some(80.0);
        b.copies_per_msg = Some(1.0);
        let runs = vec![
            run("ingest 4k", "sink", 1.0),
            a,
            b,
            run("relay 4k", "ringmail", 1.0),
        ];
        let t = cost_markdown(&runs, "ringmail");
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[2], "| ingest 4k | 100 | 1.00 |");
        assert_eq!(lines[3], "| relay 4k | n/a | n/a |");
        assert_eq!(lines.len(), 4);
        assert_eq!(
            run("x", "y", 1.0).to_json()["body_copies_per_message"],
            Value::Null
        );
    }

    #[test]
    fn table_and_chart() {
        let runs = vec![
            run("ingest 4k", "sink", 100.0),
            run("ingest 4k", "ringmail", 50.0),
            run("ingest 4k", "ringmail", 70.0),
            run("ingest 4k", "ringmail", 60.0),
            run("ingest 4k", "postfix", 10.0),
            run("ingest 100k", "sink", 20.0),
            run("ingest 100k", "ringmail", 10.0),
        ];
        let t = markdown(&runs, "ringmail", "sink", &["postfix"]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "| workload | sink (limit) | ringmail | postfix | ringmail / limit | ringmail / postfix |");
        assert_eq!(lines[2], "| ingest 4k | 100 | 60 | 10 | 0.60 | 6.00 |");
        assert_eq!(lines[3], "| ingest 100k | 20 | 10 | – | 0.50 | – |");
        let svg = svg_chart(&runs, &["sink", "ringmail", "postfix"], "test").unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("ringmail") && svg.contains("<rect"));
    }
}
