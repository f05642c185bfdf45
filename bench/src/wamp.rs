//! The plot of `ringmail-wamp` (bin/ringmail-wamp.rs): what the server wrote so far and
//! the data directory's size, against time.

/// Seconds, bytes written so far, data directory bytes.
pub type Sample = (f64, u64, u64);

pub fn svg(samples: &[Sample], title: &str) -> Result<String, String> {
    use plotters::prelude::*;
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let tmax = samples.iter().map(|s| s.0).fold(1.0, f64::max);
    let top = samples
        .iter()
        .map(|s| mib(s.1.max(s.2)))
        .fold(1.0, f64::max)
        * 1.1;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (900, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(14)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..tmax, 0f64..top)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("MiB")
            .draw()
            .map_err(|e| e.to_string())?;
        type Get = fn(&Sample) -> u64;
        let lines: [(&str, Get, RGBColor); 2] = [
            ("written by the server", |s| s.1, BLUE),
            ("data directory", |s| s.2, RED),
        ];
        for (name, get, color) in lines {
            chart
                .draw_series(LineSeries::new(
                    samples.iter().map(|s| (s.0, mib(get(s)))),
                    color.stroke_width(2),
                ))
                .map_err(|e| e.to_string())?
                .label(name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(e)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn plots_both_lines() {
        let s = super::svg(
            &[
                (0.0, 0, 0),
                (1.0, 4 << 20, 2 << 20),
                (2.0, 9 << 20, 3 << 20),
            ],
            "t",
        )
        .unwrap();
        assert!(s.starts_with("<svg"));
        assert!(s.contains("written by the server") && s.contains("data directory"));
    }
}
