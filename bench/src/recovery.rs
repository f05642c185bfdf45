//! Recovery against the number of stored messages (`ringmail-recovery`, behind
//! `bench/recovery.sh`): the measured points, their Markdown table and their plot. The
//! orchestration (fill, drop the page cache, restart) is in `bin/ringmail-recovery.rs`.

use serde_json::{json, Value};

/// One cold restart of `ringmail serve`: exec until its `ringmail ready` line.
#[derive(Debug, Clone, PartialEq)]
pub struct Restart {
    pub seconds: f64,
    /// `VmRSS` and `VmHWM` when ready.
    pub rss_bytes: u64,
    pub hwm_bytes: u64,
    /// User + system CPU until ready.
    pub cpu_seconds: f64,
}

/// One offline `ringmail queue list` with a cold page cache.
#[derive(Debug, Clone, PartialEq)]
pub struct Listing {
    pub seconds: f64,
    pub user_seconds: f64,
    pub system_seconds: f64,
    pub max_rss_bytes: u64,
}

/// One data directory: `live` queued messages, behind `history` finished ones.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub live: u64,
    pub history: u64,
    pub size: usize,
    pub data_bytes: u64,
    /// The first start after the fill: nothing but the log to recover from.
    pub first: Restart,
    /// A second start, after the first one stopped cleanly (a server that snapshots
    /// its indexes at shutdown recovers from the snapshot).
    pub again: Restart,
    pub listing: Listing,
}

impl Point {
    /// Resident bytes per stored (live) message when ready, over what an empty data
    /// directory's server holds in the same run.
    pub fn bytes_per_message(&self, r: &Restart, empty_rss: u64) -> f64 {
        r.rss_bytes.saturating_sub(empty_rss) as f64 / self.live.max(1) as f64
    }

    pub fn to_json(&self, empty_rss: u64) -> Value {
        let restart = |r: &Restart| {
            json!({
                "seconds": r.seconds, "vm_rss_bytes": r.rss_bytes, "vm_hwm_bytes": r.hwm_bytes,
                "cpu_seconds": r.cpu_seconds,
                "rss_bytes_per_message": r.rss_bytes as f64 / self.live.max(1) as f64,
                "rss_over_empty_bytes_per_message": self.bytes_per_message(r, empty_rss),
            })
        };
        json!({
            "live_messages": self.live, "history_messages": self.history,
            "body_bytes": self.size, "data_bytes": self.data_bytes,
            "first_restart": restart(&self.first),
            "restart_after_clean_stop": restart(&self.again),
            "queue_list": {
                "seconds": self.listing.seconds, "user_seconds": self.listing.user_seconds,
                "system_seconds": self.listing.system_seconds,
                "max_rss_bytes": self.listing.max_rss_bytes,
            },
        })
    }
}

fn mib(b: u64) -> String {
    format!("{:.0}", b as f64 / (1 << 20) as f64)
}

fn count(n: u64) -> String {
    match n {
        0 => "0".into(),
        n if n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n % 1000 == 0 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

/// The table for RESULTS.md. Targets: restart < 5 s, ≤ 400 B resident per message.
pub fn markdown(points: &[Point], empty_rss: u64) -> String {
    let mut out = String::from(
        "| queued | history | data MiB | restart (first / after clean stop) | RSS MiB (HWM) | B/msg | B/msg over empty | `queue list` | its max RSS MiB |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in points {
        let r = &p.again;
        out.push_str(&format!(
            "| {} | {} | {} | {:.2} / {:.2} s | {} ({}) | {:.0} | {:.0} | {:.2} s | {} |\n",
            count(p.live),
            count(p.history),
            mib(p.data_bytes),
            p.first.seconds,
            r.seconds,
            mib(r.rss_bytes),
            mib(r.hwm_bytes),
            r.rss_bytes as f64 / p.live.max(1) as f64,
            p.bytes_per_message(r, empty_rss),
            p.listing.seconds,
            mib(p.listing.max_rss_bytes),
        ));
    }
    out
}

/// Two panels: restart time and resident bytes per message against queued messages
/// (log scale), the history points as separate markers, the targets as dashed lines.
pub fn svg(points: &[Point], empty_rss: u64, title: &str) -> Result<String, String> {
    use plotters::prelude::*;
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    let plain: Vec<&Point> = points.iter().filter(|p| p.history == 0).collect();
    let hist: Vec<&Point> = points.iter().filter(|p| p.history > 0).collect();
    let xmin = points.iter().map(|p| p.live).min().unwrap_or(1).max(1) as f64 / 2.0;
    let xmax = points.iter().map(|p| p.live).max().unwrap_or(1).max(1) as f64 * 2.0;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (1000, 440)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let root = root.titled(title, ("sans-serif", 18)).map_err(e)?;
        let (left, right) = root.split_horizontally(500);
        type Get = fn(&Point, u64) -> f64;
        let panels: [(_, &str, Get, Get, f64); 2] = [
            (
                left,
                "cold restart until ready, s",
                |p, _| p.first.seconds,
                |p, _| p.again.seconds,
                5.0,
            ),
            (
                right,
                "resident bytes per queued message (over empty)",
                |p, e| p.bytes_per_message(&p.first, e),
                |p, e| p.bytes_per_message(&p.again, e),
                400.0,
            ),
        ];
        for (area, what, first, again, target) in panels {
            let top = points
                .iter()
                .flat_map(|p| [first(p, empty_rss), again(p, empty_rss)])
                .fold(target, f64::max)
                * 1.15;
            let mut chart = ChartBuilder::on(&area)
                .margin(14)
                .x_label_area_size(36)
                .y_label_area_size(56)
                .caption(what, ("sans-serif", 14))
                .build_cartesian_2d((xmin..xmax).log_scale(), 0f64..top)
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .x_desc("queued messages")
                .x_label_formatter(&|x| count(*x as u64))
                .draw()
                .map_err(|e| e.to_string())?;
            chart
                .draw_series(DashedLineSeries::new(
                    [(xmin, target), (xmax, target)],
                    6,
                    4,
                    RED.stroke_width(1),
                ))
                .map_err(|e| e.to_string())?
                .label(format!("target {target}"))
                .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], RED));
            let series: [(&str, &[&Point], Get, RGBColor); 4] = [
                ("first start after fill", &plain, first, BLUE),
                ("after a clean stop", &plain, again, GREEN),
                ("with history: first start", &hist, first, MAGENTA),
                ("with history: after a clean stop", &hist, again, BLACK),
            ];
            for (name, pts, get, color) in series {
                if pts.is_empty() {
                    continue;
                }
                let xy: Vec<(f64, f64)> = pts
                    .iter()
                    .map(|p| (p.live as f64, get(p, empty_rss)))
                    .collect();
                if pts[0].history == 0 {
                    chart
                        .draw_series(LineSeries::new(xy.clone(), color.stroke_width(2)))
                        .map_err(|e| e.to_string())?;
                }
                chart
                    .draw_series(
                        xy.iter()
                            .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
                    )
                    .map_err(|e| e.to_string())?
                    .label(name)
                    .legend(move |(x, y)| Circle::new((x + 8, y), 4, color.filled()));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .border_style(BLACK)
                .background_style(WHITE.mix(0.8))
                .draw()
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(e)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(live: u64, history: u64, secs: f64, rss: u64) -> Point {
        let r = Restart {
            seconds: secs,
            rss_bytes: rss,
            hwm_bytes: rss + 10,
            cpu_seconds: secs,
        };
        Point {
            live,
            history,
            size: 512,
            data_bytes: 640 << 20,
            first: r.clone(),
            again: r,
            listing: Listing {
                seconds: 1.5,
                user_seconds: 1.0,
                system_seconds: 0.25,
                max_rss_bytes: 402 << 20,
            },
        }
    }

    #[test]
    fn table_json_and_plot() {
        let empty = 10 << 20;
        let pts = vec![
            point(10_000, 0, 0.05, empty + 6_400_000),
            point(1_000_000, 0, 1.0, empty + 640_000_000),
            point(1_000_000, 1_000_000, 2.0, empty + 640_000_000),
        ];
        assert_eq!(pts[1].bytes_per_message(&pts[1].again, empty), 640.0);
        let t = markdown(&pts, empty);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5);
        assert!(
            lines[2].starts_with("| 10k | 0 | 640 | 0.05 / 0.05 s |"),
            "{}",
            lines[2]
        );
        assert!(lines[4].starts_with("| 1M | 1M |"), "{}", lines[4]);
        assert!(lines[3].contains("| 640 | 1.50 s | 402 |"), "{}", lines[3]);
        let j = pts[1].to_json(empty);
        assert_eq!(
            j["restart_after_clean_stop"]["rss_over_empty_bytes_per_message"],
            640.0
        );
        assert_eq!(j["queue_list"]["max_rss_bytes"], 402u64 << 20);
        let s = svg(&pts, empty, "test").unwrap();
        assert!(s.starts_with("<svg") && s.contains("target 5") && s.contains("target 400"));
        assert!(s.contains("with history: first start"));
    }
}
