//! `contralign plot`: figures drawn from a synthetic `metrics.jsonl`, decoded and inspected
//! pixel by pixel; malformed and missing inputs are errors, never panics.

mod common;

use contralign::plot::plot_run;
use rand::Rng;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use tempfile::TempDir;

const WIDTH: usize = 1000;
const PANEL: usize = 400;

/// matplotlib's tab10 blue, orange, green, red, purple: the first five series of a panel.
const TAB10: [[u8; 3]; 5] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
];

struct Image {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
}

impl Image {
    fn load(path: &Path) -> Image {
        let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        let mut reader = png::Decoder::new(file).read_info().unwrap();
        let mut rgb = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut rgb).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb, "{path:?}");
        assert_eq!(info.bit_depth, png::BitDepth::Eight, "{path:?}");
        rgb.truncate(info.buffer_size());
        Image {
            width: info.width as usize,
            height: info.height as usize,
            rgb,
        }
    }

    fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = 3 * (y * self.width + x);
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }

    /// The pixels of rows `rows` and columns `cols` that satisfy `f`, as `(x, y)`.
    fn find(
        &self,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        f: impl Fn([u8; 3]) -> bool,
    ) -> Vec<(usize, usize)> {
        rows.flat_map(|y| cols.clone().map(move |x| (x, y)))
            .filter(|&(x, y)| f(self.pixel(x, y)))
            .collect()
    }
}

/// Asserts that panel `panel` of `image` holds a line of `color` spanning most of the
/// plotting width: far more pixels than a legend swatch, from the left to the right part.
fn assert_series(image: &Image, what: &str, panel: usize, color: [u8; 3]) {
    let hits = image.find(panel * PANEL..(panel + 1) * PANEL, 0..image.width, |p| {
        p == color
    });
    let (lo, hi) = hits
        .iter()
        .fold((usize::MAX, 0), |(lo, hi), &(x, _)| (lo.min(x), hi.max(x)));
    assert!(
        hits.len() >= 300 && lo < 200 && hi > 700,
        "{what}, panel {panel}: {} pixels of {color:?} spanning x = {lo}..{hi}",
        hits.len()
    );
}

/// Asserts that the title band of each panel holds text: dark anti-aliased glyph pixels.
fn assert_titles(image: &Image, what: &str) {
    for panel in 0..image.height / PANEL {
        let top = panel * PANEL;
        let dark = image.find(top..top + 40, 0..image.width, |p| p.iter().all(|&c| c < 90));
        let gray = image.find(top..top + 40, 0..image.width, |p| {
            p[0] == p[1] && p[1] == p[2] && (90..200).contains(&p[0])
        });
        assert!(
            dark.len() > 100 && !gray.is_empty(),
            "{what}, panel {panel}: title band has {} dark and {} gray pixels",
            dark.len(),
            gray.len()
        );
    }
}

fn assert_mostly_white(image: &Image, what: &str) {
    let white = image.rgb.chunks_exact(3).filter(|p| p == &[255; 3]).count();
    let total = image.width * image.height;
    assert!(
        white > total / 2 && white < total,
        "{what}: {white} of {total} pixels white"
    );
}

/// A random walk of `steps` training lines: K of 2 to 4 responses (4 over the last
/// 20 steps), a skipped step 7 with a null loss, a null grad_norm, an eval line every 10
/// steps, Mixtral's aux_loss on odd steps.
fn synthetic_lines(rng: &mut impl Rng, steps: u64, with_eval: bool) -> Vec<String> {
    let mut walk = |x: &mut f64, scale: f64| {
        *x += rng.gen_range(-scale..scale);
        *x
    };
    let (mut loss, mut grad, mut chosen, mut rejected) = (0.69, 3.0, -120.0, -130.0);
    let mut ranks = [0.01, 0.0, -0.02, -0.03];
    let mut lines = Vec::new();
    for step in 1..=steps {
        if step == 7 {
            lines.push(json!({"step": 7, "skipped": "non-finite loss", "loss": null}).to_string());
            continue;
        }
        let k = if step > steps - 20 {
            4
        } else {
            2 + (step % 3) as usize
        };
        let mut line = json!({
            "step": step,
            "epoch": step as f64 / steps as f64,
            "loss": walk(&mut loss, 0.02).abs(),
            "lr": 5e-7 * (step as f64 / 10.0).min(1.0),
            "grad_norm": if step == 12 { None } else { Some(walk(&mut grad, 0.3).abs()) },
            "tokens_per_s": 8000.0 + walk(&mut 0.0, 100.0),
            "rewards/accuracies": (0.5 + walk(&mut 0.0, 0.3)).clamp(0.0, 1.0),
            "logps/chosen": walk(&mut chosen, 2.0),
            "logps/rejected": walk(&mut rejected, 2.0),
        });
        for (j, r) in ranks.iter_mut().enumerate().take(k) {
            line[format!("rewards/rank_{}", j + 1)] = json!(walk(r, 0.01));
        }
        if step % 2 == 1 {
            line["aux_loss"] = json!(0.02);
        }
        lines.push(line.to_string());
        if with_eval && step % 10 == 0 {
            lines.push(
                json!({"step": step, "eval_loss": loss + 0.05, "eval_rewards/accuracies": 0.55})
                    .to_string(),
            );
        }
    }
    lines
}

/// A run directory whose metrics.jsonl is `lines` followed by `tail` (no final newline).
fn run_dir(lines: &[String], tail: &str) -> TempDir {
    let dir = TempDir::new().unwrap();
    let mut text = lines.join("\n");
    text.push('\n');
    text.push_str(tail);
    std::fs::write(dir.path().join("metrics.jsonl"), text).unwrap();
    dir
}

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

fn assert_mentions(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "error {text:?} does not mention {p:?}");
    }
}

fn names(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// The names in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_run_in_progress_draws_three_figures_with_their_series() {
    let mut rng = common::rng("a_run_in_progress_draws_three_figures_with_their_series");
    let lines = synthetic_lines(&mut rng, 60, true);
    let dir = run_dir(&lines, r#"{"step": 61, "loss": 0.5, "rewards/ra"#);
    let written = plot_run(dir.path()).unwrap();
    assert_eq!(names(&written), ["loss.png", "rewards.png", "logps.png"]);
    for path in &written {
        assert_eq!(path.parent(), Some(dir.path()));
    }
    assert_eq!(
        entries(dir.path()),
        ["logps.png", "loss.png", "metrics.jsonl", "rewards.png"],
        "no temporary file is left behind"
    );

    let loss = Image::load(&dir.path().join("loss.png"));
    assert_eq!((loss.width, loss.height), (WIDTH, 3 * PANEL), "loss.png");
    for panel in 0..3 {
        assert_series(&loss, "loss.png", panel, TAB10[0]);
    }
    let rewards = Image::load(&dir.path().join("rewards.png"));
    assert_eq!(
        (rewards.width, rewards.height),
        (WIDTH, 2 * PANEL),
        "rewards.png"
    );
    for color in &TAB10[..4] {
        assert_series(&rewards, "rewards.png", 0, *color);
    }
    assert!(
        rewards
            .find(0..PANEL, 0..WIDTH, |p| p == TAB10[4])
            .is_empty(),
        "rewards.png: a fifth rank is drawn though K <= 4"
    );
    assert_series(&rewards, "rewards.png", 1, TAB10[0]);
    let logps = Image::load(&dir.path().join("logps.png"));
    assert_eq!((logps.width, logps.height), (WIDTH, PANEL), "logps.png");
    assert_series(&logps, "logps.png", 0, TAB10[0]);
    assert_series(&logps, "logps.png", 0, TAB10[1]);

    for (image, what) in [
        (&loss, "loss.png"),
        (&rewards, "rewards.png"),
        (&logps, "logps.png"),
    ] {
        assert_titles(image, what);
        assert_mostly_white(image, what);
    }
}

#[test]
fn eval_points_are_drawn_in_their_training_series_color() {
    // Training loss rising from 0.6 to 0.64, eval loss at 3: with eval, the y axis reaches 3,
    // the training line keeps to the bottom and only the eval line reaches the top third;
    // without, the training line crosses the whole panel.
    let lines = |with_eval: bool| -> Vec<String> {
        (1..=40u64)
            .flat_map(|step| {
                let mut v = vec![json!({"step": step, "loss": 0.6 + 0.001 * step as f64})];
                if with_eval && step % 5 == 0 {
                    v.push(json!({"step": step, "eval_loss": 3.0}));
                }
                v
            })
            .map(|v| v.to_string())
            .collect()
    };
    // Blue pixels left of the legend in the top and middle thirds of the panel.
    let blue = |with_eval: bool| {
        let dir = run_dir(&lines(with_eval), "");
        let written = plot_run(dir.path()).unwrap();
        assert_eq!(names(&written), ["loss.png"]);
        let image = Image::load(&written[0]);
        assert_eq!((image.width, image.height), (WIDTH, PANEL));
        assert_series(&image, "loss.png", 0, TAB10[0]);
        let third = PANEL / 3;
        let count = |rows| image.find(rows, 0..WIDTH - 200, |p| p == TAB10[0]).len();
        (count(40..third), count(third..2 * third))
    };
    let (top, middle) = blue(false);
    assert!(
        top > 0 && middle > 0,
        "training alone: {top} top, {middle} middle"
    );
    let (top, middle) = blue(true);
    assert!(top >= 40, "with eval: {top} blue pixels in the top third");
    assert_eq!(middle, 0, "with eval: the training line stays low");
}

#[test]
fn a_single_step_is_a_dot_and_many_ranks_fit() {
    let mut line = json!({"step": 1, "loss": 0.69});
    for j in 1..=12 {
        line[format!("rewards/rank_{j}")] = json!(-0.01 * j as f64);
    }
    let mut eval = line.clone();
    eval["loss"] = json!(null);
    for j in 1..=12 {
        eval[format!("eval_rewards/rank_{j}")] = json!(0.01 * j as f64);
    }
    let dir = run_dir(&[line.to_string(), eval.to_string()], "");
    let written = plot_run(dir.path()).unwrap();
    assert_eq!(names(&written), ["loss.png", "rewards.png"]);
    let loss = Image::load(&written[0]);
    assert_eq!((loss.width, loss.height), (WIDTH, PANEL));
    let dot = loss.find(0..PANEL, 0..WIDTH - 200, |p| p == TAB10[0]);
    assert!(dot.len() >= 10, "loss.png: {} pixels of the dot", dot.len());
    let rewards = Image::load(&written[1]);
    assert_eq!((rewards.width, rewards.height), (WIDTH, PANEL));
    // Orange is rank 2 and rank 12 (the palette cycles), each with its eval series: four
    // legend entries, the last ones only visible if the 24 rows shrink to fit.
    let mut rows: Vec<usize> = rewards
        .find(0..PANEL, WIDTH - 200..WIDTH, |p| p == TAB10[1])
        .iter()
        .map(|&(_, y)| y)
        .collect();
    rows.sort();
    rows.dedup();
    let entries = 1 + rows.windows(2).filter(|w| w[1] - w[0] > 4).count();
    assert_eq!(entries, 4, "orange legend rows {rows:?}");
}

#[test]
fn absent_series_skip_their_figure_and_panel() {
    let lines: Vec<String> = (1..=30u64)
        .map(|s| json!({"step": s, "loss": 1.0 / s as f64, "lr": null}).to_string())
        .collect();
    let dir = run_dir(&lines, "");
    let written = plot_run(dir.path()).unwrap();
    assert_eq!(names(&written), ["loss.png"]);
    let image = Image::load(&written[0]);
    assert_eq!(
        (image.width, image.height),
        (WIDTH, PANEL),
        "one panel: loss"
    );
    assert_series(&image, "loss.png", 0, TAB10[0]);
    assert!(!dir.path().join("rewards.png").exists());
    assert!(!dir.path().join("logps.png").exists());
}

#[test]
fn a_bad_middle_line_names_file_and_line() {
    let good = |s: u64| json!({"step": s, "loss": 0.5}).to_string();
    for (bad, parts) in [
        (r#"{"step": 3, "loss": 0.5"#, &["invalid JSON"][..]),
        ("[1, 2]", &["expected a JSON object"][..]),
        (r#"{"loss": 0.5}"#, &["field `step`: expected a number"][..]),
        (r#"{"step": "3", "loss": 0.5}"#, &["field `step`"][..]),
    ] {
        let dir = run_dir(&[good(1), good(2), bad.to_string(), good(4)], "");
        let file = dir.path().join("metrics.jsonl");
        let text = err_text(plot_run(dir.path()));
        assert_mentions(&text, &[&format!("{}:3", file.display())]);
        assert_mentions(&text, parts);
        assert!(!dir.path().join("loss.png").exists(), "{bad}");
    }
}

#[test]
fn a_complete_last_line_without_step_is_an_error() {
    let dir = run_dir(
        &[json!({"step": 1, "loss": 0.5}).to_string()],
        r#"{"loss": 1}"#,
    );
    let text = err_text(plot_run(dir.path()));
    assert_mentions(&text, &["metrics.jsonl:2", "field `step`"]);
}

#[test]
fn missing_empty_and_unplottable_inputs_are_errors() {
    let dir = TempDir::new().unwrap();
    let gone = dir.path().join("no-such-run");
    assert_mentions(
        &err_text(plot_run(&gone)),
        &[&gone.display().to_string(), "does not exist"],
    );
    let metrics = dir.path().join("metrics.jsonl");
    assert_mentions(
        &err_text(plot_run(dir.path())),
        &[&format!("{}: no such file", metrics.display())],
    );
    std::fs::create_dir(&metrics).unwrap();
    assert_mentions(
        &err_text(plot_run(dir.path())),
        &[&format!("{}: not a file", metrics.display())],
    );
    std::fs::remove_dir(&metrics).unwrap();
    for (text, parts) in [
        ("", &["holds no metrics"][..]),
        ("\n\n", &["holds no metrics"][..]),
        (r#"{"step": 1, "lo"#, &["holds no metrics"][..]),
        // A last line with its newline is complete: bad, not half written.
        ("garbage\n", &["metrics.jsonl:1: invalid JSON"][..]),
        (
            "{\"step\": 1, \"loss\": null}\n{\"step\": 2, \"skipped\": \"non-finite loss\"}\n",
            &["holds no metrics"][..],
        ),
        (
            "{\"step\": 1, \"tokens_per_s\": 800.0, \"epoch\": 0.1}\n",
            &["nothing to plot"][..],
        ),
    ] {
        std::fs::write(dir.path().join("metrics.jsonl"), text).unwrap();
        let err = err_text(plot_run(dir.path()));
        assert_mentions(&err, &["metrics.jsonl"]);
        assert_mentions(&err, parts);
    }
}

#[test]
fn an_unwritable_figure_is_an_error_and_leaves_no_temporary_file() {
    let dir = run_dir(&[json!({"step": 1, "loss": 0.5}).to_string()], "");
    // A directory in the way fails the rename even for root, unlike permissions.
    std::fs::create_dir(dir.path().join("loss.png")).unwrap();
    let text = err_text(plot_run(dir.path()));
    assert_mentions(&text, &["cannot move", "loss.png"]);
    assert_eq!(entries(dir.path()), ["loss.png", "metrics.jsonl"]);
}

#[test]
fn cli_prints_the_paths_written_and_notes_skipped_figures() {
    let lines: Vec<String> = (1..=20u64)
        .map(|s| {
            json!({"step": s, "loss": 1.0 / s as f64, "logps/chosen": -(s as f64)}).to_string()
        })
        .collect();
    let dir = run_dir(&lines, "{\"st");
    // An earlier plot's rewards figure, which these metrics can no longer draw.
    std::fs::write(dir.path().join("rewards.png"), b"old").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_contralign"))
        .arg("plot")
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let printed: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    let want: Vec<String> = ["loss.png", "logps.png"]
        .iter()
        .map(|n| dir.path().join(n).display().to_string())
        .collect();
    assert_eq!(printed, want);
    assert_mentions(
        &stderr,
        &["rewards.png not drawn", "the earlier one removed"],
    );
    assert!(!dir.path().join("rewards.png").exists());
    let logps = Image::load(&dir.path().join("logps.png"));
    assert_series(&logps, "logps.png", 0, TAB10[0]);
}

#[test]
fn cli_errors_and_help() {
    let dir = run_dir(&["{\"step\": 1".to_string(), "{}".to_string()], "");
    let out = Command::new(env!("CARGO_BIN_EXE_contralign"))
        .arg("plot")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_mentions(&stderr, &["error:", "metrics.jsonl:1", "invalid JSON"]);

    let out = Command::new(env!("CARGO_BIN_EXE_contralign"))
        .args(["plot", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert_mentions(
        &help,
        &[
            "RUN_DIR",
            "metrics.jsonl",
            "loss.png",
            "rewards.png",
            "rewards/rank_1..K",
            "logps.png",
            "logps/chosen",
        ],
    );
}

#[test]
fn values_beyond_any_axis_are_drawn_at_its_edge() {
    let lines = [
        json!({"step": 1, "loss": 1e308}).to_string(),
        json!({"step": 2, "loss": -1e308}).to_string(),
        json!({"step": 3, "loss": f64::MAX}).to_string(),
    ];
    let dir = run_dir(&lines, "");
    let written = plot_run(dir.path()).unwrap();
    assert_eq!(names(&written), vec!["loss.png"]);
}

/// Rank curves are those logged: a lone `rank_100000000` is one curve, not a hundred million
/// keys built from 1 up.
#[test]
fn a_far_rank_is_one_curve() {
    let dir = run_dir(
        &[
            json!({"step": 1, "loss": 1.0, "eval_rewards/rank_100000000": 0.5}).to_string(),
            json!({"step": 2, "loss": 0.5, "eval_rewards/rank_100000000": 0.25}).to_string(),
        ],
        "",
    );
    let written = plot_run(dir.path()).unwrap();
    assert!(
        written.contains(&dir.path().join("rewards.png")),
        "{written:?}"
    );
}
