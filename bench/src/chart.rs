//! The pipeline benchmark's chart: one SVG with the throughput of each
//! scenario (bars) and its latency percentiles (p50, p99, p99.9 on a log
//! scale, one line per scenario). Plotters' SVG backend writes text as SVG
//! `<text>`, so no font or system library is needed.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// What the chart shows of one scenario.
pub struct Bar {
    pub scenario: String,
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
}

const PERCENTILES: [&str; 3] = ["p50", "p99", "p99.9"];
/// One colour per scenario, the same in both panels.
const COLOURS: [RGBColor; 6] = [
    RGBColor(90, 90, 90),
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
];

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// Writes the chart of `bars` to `path`, titled `title`.
pub fn write(path: &Path, title: &str, subtitle: &str, bars: &[Bar]) -> anyhow::Result<()> {
    draw(path, title, subtitle, bars)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("write the chart {}", path.display()))
}

fn draw(
    path: &Path,
    title: &str,
    subtitle: &str,
    bars: &[Bar],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1100, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let (head, body) = root.split_vertically(64);
    head.draw(&Text::new(title, (20, 10), ("sans-serif", 22).into_font()))?;
    head.draw(&Text::new(
        subtitle,
        (20, 40),
        ("sans-serif", 14).into_font().color(&RGBColor(80, 80, 80)),
    ))?;
    let (left, right) = body.split_horizontally(500);
    throughput(&left, bars)?;
    latency(&right, bars)?;
    root.present()?;
    Ok(())
}

fn throughput(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    bars: &[Bar],
) -> Result<(), Box<dyn std::error::Error>> {
    let n = bars.len();
    let top = bars.iter().map(|b| b.rate).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption("throughput, draining a backlog", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(72)
        // A segmented 0..k has k + 1 segments.
        .build_cartesian_2d((0..n.max(1) - 1).into_segmented(), 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 15))
        .x_labels(n.max(1))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => {
                bars.get(*i).map(|b| b.scenario.clone()).unwrap_or_default()
            }
            _ => String::new(),
        })
        .y_desc("messages per second")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), b.rate),
            ],
            colour(i).filled(),
        );
        bar.set_margin(0, 0, 14, 14);
        bar
    }))?;
    let label =
        TextStyle::from(("sans-serif", 15).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
        Text::new(
            format!("{:.0}", b.rate),
            (SegmentValue::CenterOf(i), b.rate),
            label.clone(),
        )
    }))?;
    Ok(())
}

fn latency(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    bars: &[Bar],
) -> Result<(), Box<dyn std::error::Error>> {
    let values = |b: &Bar| [b.p50_ms, b.p99_ms, b.p999_ms];
    let all = bars.iter().flat_map(values).filter(|v| *v > 0.0);
    let (low, high) = all.fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (low, high) = if high > 0.0 {
        (low / 2.0, high * 2.0)
    } else {
        (0.1, 10.0)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(
            "end-to-end latency (publish → app) on a paced stream",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(72)
        .build_cartesian_2d(
            (0..PERCENTILES.len() - 1).into_segmented(),
            (low..high).log_scale(),
        )?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 15))
        .x_labels(PERCENTILES.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => PERCENTILES.get(*i).copied().unwrap_or("").to_string(),
            _ => String::new(),
        })
        .y_desc("milliseconds (log scale)")
        .y_label_formatter(&|v| format!("{v}"))
        .draw()?;
    for (i, b) in bars.iter().enumerate() {
        let points: Vec<_> = values(b)
            .into_iter()
            .enumerate()
            .map(|(p, v)| (SegmentValue::CenterOf(p), v.max(low)))
            .collect();
        let style = colour(i).stroke_width(2);
        chart
            .draw_series(std::iter::once(PathElement::new(points.clone(), style)))?
            .label(b.scenario.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 4, colour(i).filled())),
        )?;
    }
    chart
        .configure_series_labels()
        // Lower right: p99.9 is each line's highest point, so the corner
        // under it stays clear.
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .label_font(("sans-serif", 15))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_names_every_scenario_and_its_throughput() {
        let bars: Vec<Bar> = [
            ("raw", 22905.0, 1.2),
            ("idemq", 17566.0, 1.5),
            ("naive", 3126.0, 900.0),
        ]
        .into_iter()
        .map(|(scenario, rate, p50)| Bar {
            scenario: scenario.into(),
            rate,
            p50_ms: p50,
            p99_ms: p50 * 3.0,
            p999_ms: p50 * 6.0,
        })
        .collect();
        let path = std::env::temp_dir().join(format!("idemq-chart-{}.svg", std::process::id()));
        write(&path, "idemq pipeline benchmark: rabbitmq", "a test", &bars).expect("written");
        let svg = std::fs::read_to_string(&path).expect("read back");
        let _ = std::fs::remove_file(&path);
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        // Each label is a <text> element of its own.
        for text in ["raw", "idemq", "naive", "22905", "17566", "3126", "p99.9"] {
            assert!(
                svg.contains(&format!(">\n{text}\n</text>")),
                "no label {text}"
            );
        }
    }
}
