//! Line plots as standalone SVG files, for the benchmarks' `--plot FILE.svg` (no plotting crate:
//! a few hundred bytes of markup per series, readable in any browser and on GitHub).
//!
//! Axes are linear or logarithmic (base 10), ticks at round values, one colour and marker per
//! series, a legend under the plot. Points with non-finite coordinates (or non-positive ones on a
//! log axis) are skipped.

use std::fmt::Write as _;

/// How an axis maps values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Linear.
    Linear,
    /// Base-10 logarithmic.
    Log,
}

/// One named line.
#[derive(Debug, Clone)]
pub struct Series {
    /// Its name in the legend.
    pub name: String,
    /// `(x, y)` points, drawn in order.
    pub points: Vec<(f64, f64)>,
}

/// A plot of several series on shared axes.
#[derive(Debug, Clone)]
pub struct LinePlot {
    /// Title above the plot.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// X scale.
    pub x_scale: Scale,
    /// Y scale.
    pub y_scale: Scale,
    /// The lines.
    pub series: Vec<Series>,
}

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const PLOT_BOTTOM: f64 = 340.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn usable(scale: Scale, v: f64) -> bool {
    v.is_finite() && (scale == Scale::Linear || v > 0.0)
}

fn forward(scale: Scale, v: f64) -> f64 {
    match scale {
        Scale::Linear => v,
        Scale::Log => v.log10(),
    }
}

/// Round tick values covering `[lo, hi]` (in data units).
fn ticks(scale: Scale, lo: f64, hi: f64) -> Vec<f64> {
    match scale {
        Scale::Log => {
            let (a, b) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
            (a..=b).map(|e| 10f64.powi(e)).collect()
        }
        Scale::Linear => {
            let span = (hi - lo).max(f64::EPSILON);
            let raw = span / 5.0;
            let magnitude = 10f64.powf(raw.log10().floor());
            let step = [1.0, 2.0, 2.5, 5.0, 10.0]
                .iter()
                .map(|m| m * magnitude)
                .find(|s| span / s <= 6.0)
                .unwrap_or(magnitude * 10.0);
            let first = (lo / step).floor() * step;
            (0..=12)
                .map(|i| first + i as f64 * step)
                .take_while(|v| *v <= hi + step * 0.5)
                .collect()
        }
    }
}

fn label(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-3) {
        format!("{v:.0e}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl LinePlot {
    /// The plot as an SVG document.
    pub fn to_svg(&self) -> String {
        let points: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|&(x, y)| usable(self.x_scale, x) && usable(self.y_scale, y))
            .collect();
        let (mut x_lo, mut x_hi, mut y_lo, mut y_hi) = points.iter().fold(
            (
                f64::INFINITY,
                f64::NEG_INFINITY,
                f64::INFINITY,
                f64::NEG_INFINITY,
            ),
            |(a, b, c, d), &(x, y)| (a.min(x), b.max(x), c.min(y), d.max(y)),
        );
        if points.is_empty() {
            (x_lo, x_hi, y_lo, y_hi) = (1.0, 10.0, 1.0, 10.0);
        }
        if self.y_scale == Scale::Linear && y_lo > 0.0 {
            y_lo = 0.0; // bars of time start at zero
        }
        let x_ticks = ticks(self.x_scale, x_lo, x_hi);
        let y_ticks = ticks(self.y_scale, y_lo, y_hi);
        let (x_lo, x_hi) = (
            x_ticks.first().copied().unwrap_or(x_lo).min(x_lo),
            x_ticks.last().copied().unwrap_or(x_hi).max(x_hi),
        );
        let (y_lo, y_hi) = (
            y_ticks.first().copied().unwrap_or(y_lo).min(y_lo),
            y_ticks.last().copied().unwrap_or(y_hi).max(y_hi),
        );
        let map = |v: f64, scale: Scale, lo: f64, hi: f64, a: f64, b: f64| {
            let (v, lo, hi) = (forward(scale, v), forward(scale, lo), forward(scale, hi));
            let t = if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
            a + t * (b - a)
        };
        let px = |x: f64| map(x, self.x_scale, x_lo, x_hi, LEFT, WIDTH - RIGHT);
        let py = |y: f64| map(y, self.y_scale, y_lo, y_hi, PLOT_BOTTOM, TOP);

        let mut svg = String::new();
        let _ = write!(
            svg,
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
"##,
            WIDTH / 2.0,
            escape(&self.title)
        );
        for &t in &x_ticks {
            let x = px(t);
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{PLOT_BOTTOM}" stroke="#e5e5e5"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
                PLOT_BOTTOM + 16.0,
                label(t)
            );
        }
        for &t in &y_ticks {
            let y = py(t);
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                WIDTH - RIGHT,
                LEFT - 6.0,
                y + 4.0,
                label(t)
            );
        }
        let _ = writeln!(
            svg,
            r##"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="#333"/>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text transform="translate(18 {}) rotate(-90)" text-anchor="middle">{}</text>"##,
            WIDTH - RIGHT - LEFT,
            PLOT_BOTTOM - TOP,
            (LEFT + WIDTH - RIGHT) / 2.0,
            PLOT_BOTTOM + 34.0,
            escape(&self.x_label),
            (TOP + PLOT_BOTTOM) / 2.0,
            escape(&self.y_label)
        );
        for (i, series) in self.series.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let pts: Vec<(f64, f64)> = series
                .points
                .iter()
                .copied()
                .filter(|&(x, y)| usable(self.x_scale, x) && usable(self.y_scale, y))
                .map(|(x, y)| (px(x), py(y)))
                .collect();
            if pts.len() > 1 {
                let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
                let _ = writeln!(
                    svg,
                    r##"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"##,
                    path.join(" ")
                );
            }
            for (x, y) in &pts {
                let _ = writeln!(
                    svg,
                    r##"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{colour}"/>"##
                );
            }
            // Legend: two columns under the axis label.
            let (col, row) = (i % 2, i / 2);
            let lx = LEFT + col as f64 * 320.0;
            let ly = PLOT_BOTTOM + 58.0 + row as f64 * 18.0;
            let _ = writeln!(
                svg,
                r##"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="2"/><circle cx="{}" cy="{ly}" r="3.5" fill="{colour}"/><text x="{}" y="{}">{}</text>"##,
                lx + 24.0,
                lx + 12.0,
                lx + 30.0,
                ly + 4.0,
                escape(&series.name)
            );
        }
        svg.push_str("</svg>\n");
        svg
    }

    /// Writes the SVG to `path`.
    pub fn write(&self, path: &std::path::Path) -> std::io::Result<()> {
        std::fs::write(path, self.to_svg())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_every_series_and_skips_unplottable_points() {
        let plot = LinePlot {
            title: "TTFT <by> length".into(),
            x_label: "prompt tokens".into(),
            y_label: "seconds".into(),
            x_scale: Scale::Linear,
            y_scale: Scale::Log,
            series: vec![
                Series {
                    name: "stock".into(),
                    points: vec![(512.0, 5.0), (1024.0, 11.0), (2048.0, 0.0)],
                },
                Series {
                    name: "store".into(),
                    points: vec![(512.0, 0.5), (1024.0, f64::NAN)],
                },
            ],
        };
        let svg = plot.to_svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("TTFT &lt;by&gt; length"));
        // Two usable points of "stock" (0 on a log axis is skipped), one of "store": 3 markers
        // plus 2 in the legend.
        assert_eq!(svg.matches("<circle").count(), 5);
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(svg.contains(">stock<") && svg.contains(">store<"));
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(ticks(Scale::Log, 0.3, 40.0), vec![0.1, 1.0, 10.0, 100.0]);
        let t = ticks(Scale::Linear, 0.0, 6000.0);
        assert_eq!(t.first(), Some(&0.0));
        assert!(
            t.windows(2).all(|w| (w[1] - w[0] - 1000.0).abs() < 1e-9),
            "{t:?}"
        );
    }
}
