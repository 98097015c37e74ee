//! SVG plots, drawn by hand (no plotting dependency): the latency percentile spectrum and p99
//! over time, one line per target.

use super::report::RunReport;

const W: f64 = 760.0;
const H: f64 = 420.0;
const PAD: f64 = 60.0;
const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
];

fn frame(title: &str, xlabel: &str, ylabel: &str, ymax: f64, xticks: &[(f64, String)]) -> String {
    let mut s = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="20" text-anchor="middle" font-size="14">{title}</text><text x="{}" y="{}" text-anchor="middle">{xlabel}</text><text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">{ylabel}</text><line x1="{PAD}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{}" stroke="black"/>"##,
        W / 2.0,
        W / 2.0,
        H - 10.0,
        H / 2.0,
        H / 2.0,
        H - PAD,
        W - PAD,
        H - PAD,
        H - PAD
    );
    for i in 0..=5 {
        let v = ymax * i as f64 / 5.0;
        let y = H - PAD - (H - 2.0 * PAD) * i as f64 / 5.0;
        s += &format!(
            r##"<text x="{}" y="{}" text-anchor="end">{:.0}</text><line x1="{PAD}" y1="{y}" x2="{}" y2="{y}" stroke="#eee"/>"##,
            PAD - 5.0,
            y + 4.0,
            v,
            W - PAD
        );
    }
    for (x, label) in xticks {
        s += &format!(
            r##"<text x="{x}" y="{}" text-anchor="middle">{label}</text>"##,
            H - PAD + 16.0
        );
    }
    s
}

fn legend(names: &[&str]) -> String {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let y = PAD + 16.0 * i as f64;
            format!(r##"<rect x="{}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{n}</text>"##, W - PAD - 110.0, y - 9.0, COLORS[i % COLORS.len()], W - PAD - 95.0, y)
        })
        .collect()
}

fn polyline(points: &[(f64, f64)], color: &str) -> String {
    let pts: Vec<String> = points
        .iter()
        .map(|(x, y)| format!("{x:.1},{y:.1}"))
        .collect();
    format!(
        r#"<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{}"/>"#,
        pts.join(" ")
    )
}

/// Latency by percentile (x: 0, 90, 99, 99.9, 99.99 on a log scale of 1/(1-p)).
pub fn spectrum(run: &RunReport, recorders: &[super::measure::Recorder]) -> String {
    const XMAX: f64 = 4.0; // up to 99.99
    let ymax = recorders
        .iter()
        .map(|r| r.latency.value_at_quantile(0.9999) as f64)
        .fold(1.0, f64::max)
        * 1.05;
    let x_of = |lg: f64| PAD + (W - 2.0 * PAD) * lg / XMAX;
    let ticks: Vec<(f64, String)> = ["0", "90", "99", "99.9", "99.99"]
        .iter()
        .enumerate()
        .map(|(i, l)| (x_of(i as f64), format!("p{l}")))
        .collect();
    let mut s = frame(
        &format!("latency by percentile: {} at {}", run.scenario, run.load()),
        "percentile",
        "µs",
        ymax,
        &ticks,
    );
    for (i, r) in recorders.iter().enumerate() {
        if r.latency.is_empty() {
            continue;
        }
        let pts: Vec<(f64, f64)> = (0..=200)
            .map(|k| {
                let lg = XMAX * k as f64 / 200.0;
                let q = 1.0 - 10f64.powf(-lg);
                let v = r.latency.value_at_quantile(q.min(0.9999)) as f64;
                (x_of(lg), H - PAD - (H - 2.0 * PAD) * v / ymax)
            })
            .collect();
        s += &polyline(&pts, COLORS[i % COLORS.len()]);
    }
    let names: Vec<&str> = run.targets.iter().map(|t| t.name.as_str()).collect();
    s + &legend(&names) + "</svg>\n"
}

/// p99 latency per second of the run.
pub fn timeline(run: &RunReport) -> String {
    let secs = run
        .targets
        .iter()
        .map(|t| t.p99_timeline_us.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let ymax = run
        .targets
        .iter()
        .flat_map(|t| t.p99_timeline_us.iter())
        .copied()
        .max()
        .unwrap_or(1) as f64
        * 1.05;
    let x_of = |i: f64| PAD + (W - 2.0 * PAD) * i / (secs - 1) as f64;
    let ticks: Vec<(f64, String)> = (0..secs)
        .step_by((secs / 8).max(1))
        .map(|i| (x_of(i as f64), format!("{i}s")))
        .collect();
    let mut s = frame(
        &format!("p99 latency over time: {} at {}", run.scenario, run.load()),
        "second of the run",
        "µs",
        ymax.max(1.0),
        &ticks,
    );
    for (i, t) in run.targets.iter().enumerate() {
        let pts: Vec<(f64, f64)> = t
            .p99_timeline_us
            .iter()
            .enumerate()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| {
                (
                    x_of(k as f64),
                    H - PAD - (H - 2.0 * PAD) * *v as f64 / ymax.max(1.0),
                )
            })
            .collect();
        s += &polyline(&pts, COLORS[i % COLORS.len()]);
    }
    let names: Vec<&str> = run.targets.iter().map(|t| t.name.as_str()).collect();
    s + &legend(&names) + "</svg>\n"
}
