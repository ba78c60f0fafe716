//! Line charts as standalone SVG, for docs/benchmarks.md: written from the measured series, never
//! drawn by hand. No dependency: a chart is axes with round ticks, one polyline per series, an
//! optional marker per scenario, and a legend.

use std::fmt::Write;

/// One line of a chart.
pub struct Series {
    pub label: String,
    /// (x, y), x ascending.
    pub points: Vec<(f64, f64)>,
    /// A bound or reference line rather than a measurement.
    pub dashed: bool,
}

/// A vertical marker: where a scenario starts.
pub struct Marker {
    pub x: f64,
    pub label: String,
}

pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub markers: Vec<Marker>,
}

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 360.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 48.0;
const LEGEND_LINE: f64 = 16.0;
/// Colours that stay apart for the common kinds of colour blindness (Okabe–Ito).
const PALETTE: [&str; 7] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
];

/// A round step that cuts `span` into about five parts: 1, 2 or 5 times a power of ten.
pub fn tick_step(span: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / 5.0;
    let power = 10f64.powf(raw.log10().floor());
    let fraction = raw / power;
    let nice = if fraction <= 1.0 {
        1.0
    } else if fraction <= 2.0 {
        2.0
    } else if fraction <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * power
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn label(value: f64) -> String {
    if value == value.trunc() && value.abs() < 1e9 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

impl Chart {
    /// The chart as an SVG document.
    pub fn svg(&self) -> String {
        let points = self.series.iter().flat_map(|s| s.points.iter());
        let (mut x_max, mut y_max) = (0f64, 0f64);
        for &(x, y) in points {
            if x.is_finite() {
                x_max = x_max.max(x);
            }
            if y.is_finite() {
                y_max = y_max.max(y);
            }
        }
        let (x_step, y_step) = (tick_step(x_max), tick_step(y_max));
        // Axes end on a tick at or beyond the largest value.
        let x_end = (x_max / x_step).ceil().max(1.0) * x_step;
        let y_end = (y_max / y_step).ceil().max(1.0) * y_step;
        let plot_w = WIDTH - LEFT - RIGHT;
        let plot_h = HEIGHT - TOP - BOTTOM;
        // The legend goes under the chart, one line per series, so it never hides a line.
        let height = HEIGHT + 12.0 + LEGEND_LINE * self.series.len() as f64;
        let px = |x: f64| LEFT + x / x_end * plot_w;
        let py = |y: f64| TOP + plot_h - y / y_end * plot_h;

        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="20" text-anchor="middle" font-size="14">{}</text>"#,
            WIDTH / 2.0,
            escape(&self.title)
        );
        // Grid and ticks.
        let mut x = 0.0;
        while x <= x_end + x_step / 2.0 {
            let _ = writeln!(
                svg,
                r##"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="#ddd"/><text x="{0:.1}" y="{3}" text-anchor="middle">{4}</text>"##,
                px(x),
                TOP,
                TOP + plot_h,
                TOP + plot_h + 16.0,
                label(x)
            );
            x += x_step;
        }
        let mut y = 0.0;
        while y <= y_end + y_step / 2.0 {
            let _ = writeln!(
                svg,
                r##"<line x1="{0}" y1="{1:.1}" x2="{2}" y2="{1:.1}" stroke="#ddd"/><text x="{3}" y="{4:.1}" text-anchor="end">{5}</text>"##,
                LEFT,
                py(y),
                LEFT + plot_w,
                LEFT - 6.0,
                py(y) + 4.0,
                label(y)
            );
            y += y_step;
        }
        let _ = writeln!(
            svg,
            r#"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>"#
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            LEFT + plot_w / 2.0,
            HEIGHT - 10.0,
            escape(&self.x_label)
        );
        let _ = writeln!(
            svg,
            r#"<text x="16" y="{0}" text-anchor="middle" transform="rotate(-90 16 {0})">{1}</text>"#,
            TOP + plot_h / 2.0,
            escape(&self.y_label)
        );
        for (index, marker) in self.markers.iter().enumerate() {
            let _ = writeln!(
                svg,
                r##"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="#999" stroke-dasharray="2 3"/><text x="{3:.1}" y="{4}" fill="#555" font-size="10">{5}</text>"##,
                px(marker.x),
                TOP,
                TOP + plot_h,
                px(marker.x) + 3.0,
                // Staggered, so that scenarios close together stay readable.
                TOP + 12.0 + 11.0 * (index % 3) as f64,
                escape(&marker.label)
            );
        }
        for (index, series) in self.series.iter().enumerate() {
            let colour = PALETTE[index % PALETTE.len()];
            let path: Vec<String> = series
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            if path.is_empty() {
                continue;
            }
            let dash = if series.dashed {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            };
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5"{dash} points="{}"/>"#,
                path.join(" ")
            );
            let lx = LEFT;
            let ly = HEIGHT + 6.0 + LEGEND_LINE * index as f64;
            let _ = writeln!(
                svg,
                r#"<line x1="{0}" y1="{1:.1}" x2="{2}" y2="{1:.1}" stroke="{colour}" stroke-width="2"{dash}/><text x="{3}" y="{4:.1}">{5}</text>"#,
                lx,
                ly,
                lx + 24.0,
                lx + 30.0,
                ly + 4.0,
                escape(&series.label)
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_steps_of_about_a_fifth() {
        assert_eq!(tick_step(100.0), 20.0);
        assert_eq!(tick_step(42.0), 10.0);
        assert_eq!(tick_step(7.0), 2.0);
        assert_eq!(tick_step(0.0), 1.0);
    }

    #[test]
    fn a_chart_is_one_svg_document_with_a_line_per_series_and_escaped_text() {
        let chart = Chart {
            title: "Ready <objects>".into(),
            x_label: "s".into(),
            y_label: "objects".into(),
            series: vec![
                Series {
                    label: "Ready".into(),
                    points: vec![(0.0, 0.0), (1.0, 10.0), (2.0, 20.0)],
                    dashed: false,
                },
                Series {
                    label: "bound".into(),
                    points: vec![(0.0, 0.0), (2.0, 25.0)],
                    dashed: true,
                },
            ],
            markers: vec![Marker {
                x: 1.0,
                label: "steady".into(),
            }],
        };
        let svg = chart.svg();
        assert!(svg.starts_with("<svg "));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("Ready &lt;objects&gt;"));
        assert!(svg.contains("stroke-dasharray=\"6 4\""));
        assert!(svg.contains(">steady<"));
    }
}
