//! `governor report`: turns a control log into one picture: target vs actual rate, allocated
//! workers, efficiency, utilization (with the pushback share) and the retry limit over time,
//! stacked on one shared time axis.
//!
//! The output format follows the file name: `.svg` or `.png`. Both lay text out with a TrueType
//! font found at run time (`GOVERNOR_FONT`, or DejaVu Sans / Liberation Sans / Noto Sans in the
//! usual places; install `fonts-dejavu-core` if there is none).

use std::path::Path;

use anyhow::{Context, bail};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Deserialize;

/// One control-log line, the fields the report draws (missing fields read as 0).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Tick {
    /// Unix time of the decision.
    pub time: f64,
    /// Target from the schedule.
    pub target: f64,
    /// Effective rate given to the pacer (target x backpressure).
    pub rate: f64,
    /// Attempts ended per second.
    pub throughput: f64,
    /// Delivered per second.
    pub delivered_per_s: f64,
    /// Ready workers.
    pub workers: f64,
    /// Starting workers.
    pub starting: f64,
    /// Desired workers.
    pub desired: f64,
    /// Efficiency E.
    pub efficiency: f64,
    /// Smoothed busy-worker efficiency.
    pub e_busy: Option<f64>,
    /// Utilization U.
    pub utilization: f64,
    /// Share of 4xx/421/refused replies.
    pub pushback_rate: f64,
    /// Retry limit in force.
    pub retry_limit: f64,
    /// Length of the window, s.
    pub period_s: f64,
}

/// Reads a control log (JSON lines); lines that do not parse are skipped with a count.
pub fn read_log(path: &Path) -> anyhow::Result<Vec<Tick>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("while reading the control log {}", path.display()))?;
    let mut ticks = Vec::new();
    let mut bad = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Tick>(line) {
            Ok(t) => ticks.push(t),
            Err(_) => bad += 1,
        }
    }
    if ticks.is_empty() {
        bail!(
            "{}: no control-log records ({bad} unreadable lines)",
            path.display()
        );
    }
    if bad > 0 {
        log::warn!("{}: skipped {bad} unreadable lines", path.display());
    }
    Ok(ticks)
}

/// Draws `ticks` to `out` (`.svg` or `.png`), `width` x `height` pixels.
pub fn render(ticks: &[Tick], out: &Path, title: &str) -> anyhow::Result<()> {
    let size = (1200u32, 1400u32);
    match out.extension().and_then(|e| e.to_str()) {
        Some("svg") => {
            // text is measured for layout even in SVG
            register_font()?;
            let root = SVGBackend::new(out, size).into_drawing_area();
            draw(root, ticks, title)
        }
        Some("png") => {
            register_font()?;
            let root = BitMapBackend::new(out, size).into_drawing_area();
            draw(root, ticks, title)
        }
        _ => bail!("{}: the output must end in .svg or .png", out.display()),
    }
    .with_context(|| format!("while drawing {}", out.display()))
}

/// Reads the log and draws it: the `governor report` subcommand.
pub fn run(log: &Path, out: &Path) -> anyhow::Result<()> {
    let ticks = read_log(log)?;
    let title = format!("governor control log: {}", log.display());
    render(&ticks, out, &title)
}

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

fn register_font() -> anyhow::Result<()> {
    use std::sync::OnceLock;
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let candidates: Vec<String> = std::env::var("GOVERNOR_FONT")
            .ok()
            .into_iter()
            .chain(FONT_PATHS.iter().map(|s| s.to_string()))
            .collect();
        for p in &candidates {
            if let Ok(bytes) = std::fs::read(p) {
                // plotters keeps fonts for the life of the process
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(format!(
            "a PNG needs a TrueType font and none was found (tried {}); install fonts-dejavu-core, set GOVERNOR_FONT=/path/to/font.ttf, or write .svg",
            candidates.join(", ")
        ))
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

/// Index ranges of consecutive ticks of one run. A control log appended to by several runs
/// (a restart after a crash or a stop) has a gap between them much longer than a tick; the
/// plot must not draw a line through a time when no governor was running.
fn segments(ticks: &[Tick]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..ticks.len() {
        let gap = ticks[i].time - ticks[i - 1].time;
        if gap > 3.0 * ticks[i].period_s.max(0.05) + 1.0 {
            out.push(start..i);
            start = i;
        }
    }
    if start < ticks.len() {
        out.push(start..ticks.len());
    }
    out
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    ticks: &[Tick],
    title: &str,
) -> anyhow::Result<()> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("{e:?}");
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(err)?;
    let t0 = ticks[0].time - ticks[0].period_s;
    let x = |t: &Tick| t.time - t0;
    let x_max = ticks.iter().map(x).fold(1.0, f64::max);
    let col = |f: &dyn Fn(&Tick) -> f64| -> Vec<(f64, f64)> {
        ticks.iter().map(|t| (x(t), f(t))).collect()
    };
    let blue = RGBColor(31, 119, 180);
    let orange = RGBColor(255, 127, 14);
    let green = RGBColor(44, 160, 44);
    let red = RGBColor(214, 39, 40);
    let grey = RGBColor(110, 110, 110);
    let panels: Vec<(&str, Vec<Series>)> = vec![
        (
            "rate (msgs/s)",
            vec![
                ("target", grey, col(&|t| t.target)),
                ("effective rate (pacer)", orange, col(&|t| t.rate)),
                ("actual (attempts ended/s)", blue, col(&|t| t.throughput)),
            ],
        ),
        (
            "workers",
            vec![
                (
                    "allocated (ready + starting)",
                    blue,
                    col(&|t| t.workers + t.starting),
                ),
                ("desired", orange, col(&|t| t.desired)),
            ],
        ),
        (
            "efficiency (msgs/s per worker)",
            vec![
                ("E = R / avg workers", blue, col(&|t| t.efficiency)),
                (
                    "E busy (smoothed)",
                    orange,
                    col(&|t| t.e_busy.unwrap_or(0.0)),
                ),
            ],
        ),
        (
            "utilization, pushback share",
            vec![
                ("utilization", blue, col(&|t| t.utilization)),
                ("4xx/421/refused share", red, col(&|t| t.pushback_rate)),
            ],
        ),
        (
            "retry limit",
            vec![("retry limit", green, col(&|t| t.retry_limit))],
        ),
    ];
    let areas = root.split_evenly((panels.len(), 1));
    for (area, (name, series)) in areas.iter().zip(panels) {
        let y_max = series
            .iter()
            .flat_map(|s| s.2.iter().map(|p| p.1))
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max);
        let y_max = if y_max <= 0.0 { 1.0 } else { y_max * 1.1 };
        let mut chart = ChartBuilder::on(area)
            .caption(name, ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("time (s)")
            .light_line_style(RGBColor(235, 235, 235))
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(err)?;
        for (label, color, pts) in series {
            // One line per run: no line is drawn across a gap where no governor was running.
            for (i, seg) in segments(ticks).iter().enumerate() {
                let drawn = chart
                    .draw_series(LineSeries::new(
                        pts[seg.clone()].to_vec(),
                        color.stroke_width(2),
                    ))
                    .map_err(err)?;
                if i == 0 {
                    drawn.label(label).legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
                }
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> String {
        (0..30)
            .map(|i| {
                format!(
                    "{{\"time\":{},\"period_s\":1.0,\"target\":400,\"rate\":400,\"throughput\":{},\"workers\":{},\"starting\":0,\"desired\":20,\"efficiency\":20,\"e_busy\":22,\"utilization\":0.9,\"pushback_rate\":0,\"retry_limit\":5,\"reason\":\"hold\"}}\n",
                    1000 + i,
                    380 + i,
                    18 + i % 3
                )
            })
            .collect()
    }

    #[test]
    fn a_gap_between_runs_splits_the_lines() {
        let tick = |time: f64| Tick {
            time,
            period_s: 1.0,
            ..Tick::default()
        };
        let ticks: Vec<Tick> = [1.0, 2.0, 3.0, 30.0, 31.0]
            .iter()
            .map(|&t| tick(t))
            .collect();
        assert_eq!(segments(&ticks), vec![0..3, 3..5]);
        assert_eq!(segments(&ticks[..3]), vec![0..3]);
    }

    #[test]
    fn draws_svg_with_every_panel() {
        let dir = std::env::temp_dir().join(format!("governor-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("control.jsonl");
        std::fs::write(&input, log() + "not json\n").unwrap();
        let out = dir.join("c.svg");
        run(&input, &out).unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        for want in [
            "rate (msgs/s)",
            "workers",
            "efficiency",
            "utilization",
            "retry limit",
            "time (s)",
        ] {
            assert!(svg.contains(want), "missing {want}");
        }
        assert!(run(&input, &dir.join("c.pdf")).is_err());
        std::fs::write(&input, "").unwrap();
        assert!(run(&input, &out).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
