//! Training curves of a run directory: `RUN_DIR/metrics.jsonl` drawn as PNG figures.
//!
//! `metrics.jsonl` holds one JSON object per optimizer step (`{"step": 1, "loss": 0.69,
//! "lr": 5e-7, ...}`) and possibly eval lines (`{"step": 10, "eval_loss": ...}`, TRL's names). Keys may be
//! missing and values null; a non-numeric value is skipped, not an error. The run may still be
//! writing the file, so an unparsable last line is ignored; an unparsable line before it is an
//! error naming `file:line`.
//!
//! Figures, 1000 pixels wide (the last 200 a legend), 400 per panel; series colored in the
//! order of matplotlib's `tab10` palette; an `eval_` series is drawn in its training series'
//! color, thinner and with a dot per point:
//! - `loss.png`: panels `loss`, `lr`, `grad_norm`;
//! - `rewards.png`: panels `rewards/rank_1..K` (the NCA paper's Figure 5) and
//!   `rewards/accuracies`;
//! - `logps.png`: `logps/chosen` and `logps/rejected` (the NCA paper's Figure 2).
//!
//! A panel without values is left out and a figure without panels is not drawn (with a note
//! on stderr); it is an error only when no figure can be drawn.

use crate::train::held_out::EVAL_PREFIX;
use anyhow::{anyhow, bail, ensure, Context, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const WIDTH: u32 = 1000;
const PANEL_HEIGHT: u32 = 400;
const LEGEND_WIDTH: u32 = 200;

/// matplotlib's `tab10`, the colors of a panel's series in order.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Every numeric metric of a run: name (`eval_` names included) to `(step, value)` points in
/// file order.
type Metrics = BTreeMap<String, Vec<(f64, f64)>>;

/// One line of a panel: a training series, or an `eval_` one (thinner, dotted, same color).
struct Series<'a> {
    label: String,
    points: &'a [(f64, f64)],
    color: RGBColor,
    eval: bool,
}

struct Panel {
    title: &'static str,
    y_label: &'static str,
    keys: Vec<String>,
}

/// Reads `RUN_DIR/metrics.jsonl` and writes `loss.png`, `rewards.png` and `logps.png` into
/// `RUN_DIR` (each atomically); returns the paths written.
pub fn plot_run(run_dir: &Path) -> Result<Vec<PathBuf>> {
    ensure!(
        run_dir.is_dir(),
        "run directory {} does not exist or is not a directory",
        run_dir.display()
    );
    let file = run_dir.join("metrics.jsonl");
    ensure!(
        file.is_file(),
        "{}: {}",
        file.display(),
        crate::fsutil::not_a_file(&file)
    );
    let metrics = read_metrics(&file)?;
    register_font()?;
    let mut written = Vec::new();
    for (name, panels) in figures(&metrics) {
        let panels: Vec<Panel> = panels
            .into_iter()
            .filter(|p| p.keys.iter().any(|k| has_values(&metrics, k)))
            .collect();
        let path = run_dir.join(name);
        if panels.is_empty() {
            // A figure of an earlier plot would show curves these metrics no longer have.
            let stale = path.is_file() && std::fs::remove_file(&path).is_ok();
            eprintln!(
                "note: {name} not drawn: no numeric values of its metrics in {}{}",
                file.display(),
                if stale {
                    "; the earlier one removed"
                } else {
                    ""
                }
            );
            continue;
        }
        draw_figure(&metrics, &panels, &path)?;
        written.push(path);
    }
    ensure!(
        !written.is_empty(),
        "nothing to plot: {} has no numeric values of loss, lr, grad_norm, rewards/rank_*, \
         rewards/accuracies or logps/*",
        file.display()
    );
    Ok(written)
}

/// The largest magnitude a point is drawn at: an axis's span stays finite (plotters never
/// finishes an axis whose span overflows), and a value beyond it is drawn at the edge.
const AXIS_LIMIT: f64 = 1e300;

/// Parses a `metrics.jsonl`. Non-finite numbers, nulls and non-numbers are left out; a
/// `step` that is not a number is an error.
fn read_metrics(file: &Path) -> Result<Metrics> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let lines: Vec<(usize, &[u8])> = bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace))
        .collect();
    let mut metrics = Metrics::new();
    for (i, &(number, line)) in lines.iter().enumerate() {
        let source = format!("{}:{}", file.display(), number + 1);
        let object = match serde_json::from_slice::<serde_json::Value>(line) {
            Ok(serde_json::Value::Object(object)) => object,
            // The run appends while we read: its last line may be half written (a line is
            // complete once its newline is there).
            _ if i + 1 == lines.len() && !bytes.ends_with(b"\n") => break,
            Ok(other) => bail!("{source}: expected a JSON object, found {other}"),
            Err(e) => return Err(anyhow!(e).context(format!("{source}: invalid JSON"))),
        };
        let step = object
            .get("step")
            .and_then(serde_json::Value::as_f64)
            .with_context(|| format!("{source}: field `step`: expected a number"))?;
        for (key, value) in &object {
            match value.as_f64() {
                Some(v) if key != "step" && v.is_finite() => {
                    metrics.entry(key.clone()).or_default().push((
                        step.clamp(-AXIS_LIMIT, AXIS_LIMIT),
                        v.clamp(-AXIS_LIMIT, AXIS_LIMIT),
                    ))
                }
                _ => {}
            }
        }
    }
    ensure!(!metrics.is_empty(), "{} holds no metrics", file.display());
    Ok(metrics)
}

/// The files a run's figures are written to.
pub const FIGURES: [&str; 3] = ["loss.png", "rewards.png", "logps.png"];

fn figures(metrics: &Metrics) -> Vec<(&'static str, Vec<Panel>)> {
    let keys = |names: &[&str]| names.iter().map(|s| s.to_string()).collect();
    vec![
        (
            FIGURES[0],
            vec![
                Panel {
                    title: "Training loss",
                    y_label: "loss",
                    keys: keys(&["loss"]),
                },
                Panel {
                    title: "Learning rate",
                    y_label: "lr",
                    keys: keys(&["lr"]),
                },
                Panel {
                    title: "Gradient norm",
                    y_label: "grad_norm",
                    keys: keys(&["grad_norm"]),
                },
            ],
        ),
        (
            FIGURES[1],
            vec![
                Panel {
                    title: "Implicit reward of the j-th best-rated response",
                    y_label: "reward",
                    keys: rank_keys(metrics),
                },
                Panel {
                    title: "Reward accuracy",
                    y_label: "accuracy",
                    keys: keys(&["rewards/accuracies"]),
                },
            ],
        ),
        (
            FIGURES[2],
            vec![Panel {
                title: "Log-probability of the chosen and rejected responses",
                y_label: "log-probability",
                keys: keys(&["logps/chosen", "logps/rejected"]),
            }],
        ),
    ]
}

/// The `rewards/rank_j` logged (training or eval), in rank order: only those there, so that
/// one stray key (`rank_100000000`) makes one curve, not a hundred million.
fn rank_keys(metrics: &Metrics) -> Vec<String> {
    let ranks: std::collections::BTreeSet<usize> = metrics
        .keys()
        .filter_map(|key| {
            key.trim_start_matches(EVAL_PREFIX)
                .strip_prefix("rewards/rank_")?
                .parse::<usize>()
                .ok()
        })
        .collect();
    ranks
        .into_iter()
        .map(|j| format!("rewards/rank_{j}"))
        .collect()
}

fn has_values(metrics: &Metrics, key: &str) -> bool {
    metrics.contains_key(key) || metrics.contains_key(&format!("{EVAL_PREFIX}{key}"))
}

fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .is_ok()
    });
    ensure!(ok, "the embedded DejaVu Sans font cannot be parsed");
    Ok(())
}

fn draw_figure(metrics: &Metrics, panels: &[Panel], path: &Path) -> Result<()> {
    let height = PANEL_HEIGHT * panels.len() as u32;
    let mut rgb = vec![0u8; (WIDTH * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        for (area, panel) in root.split_evenly((panels.len(), 1)).iter().zip(panels) {
            draw_panel(metrics, panel, area)?;
        }
        root.present().map_err(plot_error)?;
    }
    write_png(path, &rgb, WIDTH, height)
}

fn draw_panel(
    metrics: &Metrics,
    panel: &Panel,
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
) -> Result<()> {
    let series: Vec<Series> = panel
        .keys
        .iter()
        .enumerate()
        .flat_map(|(i, key)| {
            let color = PALETTE[i % PALETTE.len()];
            let eval = format!("{EVAL_PREFIX}{key}");
            [
                metrics.get(key).map(|points| Series {
                    label: key.clone(),
                    points,
                    color,
                    eval: false,
                }),
                metrics.get(&eval).map(|points| Series {
                    label: eval,
                    points,
                    color,
                    eval: true,
                }),
            ]
        })
        .flatten()
        .collect();
    let points = || series.iter().flat_map(|s| s.points.iter());
    let x = padded_range(points().map(|p| p.0), 0.0);
    let y = padded_range(points().map(|p| p.1), 0.05);
    let x_tick = |v: &f64| tick(*v, &x);
    let y_tick = |v: &f64| tick(*v, &y);
    // The legend gets a column of its own so that it never hides a curve.
    let (plot_area, legend_area) = area.split_horizontally(WIDTH - LEGEND_WIDTH);
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(panel.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(90)
        .build_cartesian_2d(x.clone(), y.clone())
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(panel.y_label)
        .x_label_formatter(&x_tick)
        .y_label_formatter(&y_tick)
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .light_line_style(TRANSPARENT)
        .draw()
        .map_err(plot_error)?;
    // Many ranks (with their eval series) shrink the legend's rows to fit the panel.
    let row = (f64::from(PANEL_HEIGHT - 80) / series.len() as f64).min(24.0);
    let label_style = TextStyle::from(("sans-serif", (row - 4.0).min(15.0)).into_font())
        .pos(Pos::new(HPos::Left, VPos::Center));
    for (i, s) in series.iter().enumerate() {
        let style = s.color.stroke_width(if s.eval { 1 } else { 2 });
        // A lone point has no segment to draw: it gets a dot, as eval points do.
        let dots = s.eval || s.points.len() == 1;
        let line =
            LineSeries::new(s.points.iter().copied(), style).point_size(if dots { 3 } else { 0 });
        chart.draw_series(line).map_err(plot_error)?;
        let y = 60 + (row * i as f64) as i32;
        legend_area
            .draw(&PathElement::new([(0, y), (28, y)], style))
            .map_err(plot_error)?;
        if s.eval {
            legend_area
                .draw(&Circle::new((14, y), 3, style))
                .map_err(plot_error)?;
        }
        legend_area
            .draw(&Text::new(s.label.as_str(), (36, y), &label_style))
            .map_err(plot_error)?;
    }
    Ok(())
}

/// `min..max` of the values widened by `pad` of its length on each side; a single value gets
/// a range around it, as plotters cannot draw an empty range.
fn padded_range(values: impl Iterator<Item = f64>, pad: f64) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let width = hi - lo;
    if width > 1e-12 * hi.abs().max(lo.abs()) {
        lo - pad * width..hi + pad * width
    } else {
        let half = if lo == 0.0 { 1.0 } else { 0.1 * lo.abs() };
        lo - half..hi + half
    }
}

/// A tick label of an axis spanning `range`: fixed-point with the decimals its span needs, or
/// scientific notation for an axis of very small or large values; rounding noise around zero
/// reads `0`.
fn tick(v: f64, range: &std::ops::Range<f64>) -> String {
    let span = range.end - range.start;
    let magnitude = range.start.abs().max(range.end.abs());
    if v.abs() <= 1e-9 * span {
        "0".into()
    } else if (1e-3..1e6).contains(&magnitude) {
        let decimals = (2.0 - span.log10().floor()).clamp(0.0, 9.0) as usize;
        let s = format!("{v:.decimals$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').into()
        } else {
            s
        }
    } else {
        let digits = ((magnitude / span).log10().floor() + 1.0).clamp(1.0, 6.0) as usize;
        format!("{v:.digits$e}")
    }
}

fn plot_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("cannot draw the figure: {e}")
}

/// Encodes `rgb` as a PNG into a temporary file beside `path` and renames it into place, so
/// that a viewer never sees a half-written figure.
fn write_png(path: &Path, rgb: &[u8], width: u32, height: u32) -> Result<()> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Best);
    encoder.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
    encoder
        .write_header()
        .and_then(|mut w| w.write_image_data(rgb))
        .with_context(|| format!("cannot encode {}", path.display()))?;
    crate::fsutil::write_atomically(path, &bytes)
}
