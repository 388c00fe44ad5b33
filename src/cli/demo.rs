use crate::cli::stdout;
use anyhow::Result;
use clap::Args;
use contralign::demo::{self, DemoOptions, DemoReport, PhaseReport};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;

/// Alignment on a CPU in under a minute (README: 20 s on 2 cores), nothing downloaded.
///
/// A tiny Mistral, initialized from scratch with a tokenizer trained on the task, learns to
/// sort lists of 4–6 digits: first `sft` on answers of mixed quality (so it starts
/// imperfect), then NCA on groups of four answers rated by a programmatic judge (the fraction
/// of positions right; the stand-in for UltraFeedback's ratings), and for comparison DPO on
/// the same data binarized (best vs a random worse answer). Prints, for each model: the judge
/// score of greedy answers to held-out lists, the fraction sorted exactly, the reward
/// accuracy (the implicit reward ranks the best held-out answer above the worst), the change
/// of the best answer's log-likelihood from the SFT model, and training tokens/s. Writes the
/// data, tokenizer, models and the three run directories (with plots) under --out; a rerun
/// replaces them. --out must be new, empty, or a previous demo's (marked .contralign-demo).
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where the demo writes its data, models and runs.
    #[arg(long, value_name = "DIR", default_value = "runs/demo")]
    out: PathBuf,
    /// Seed of the data, the initialization and the shuffles.
    #[arg(long, value_name = "N", default_value_t = 0)]
    seed: u64,
    /// Print the table as one JSON object instead:
    /// {"sft": {"accuracy", "exact", "reward_accuracy", "chosen_logp_change", "tokens_per_s",
    /// "run_dir"}, "nca": {...}, "dpo": {...}}.
    #[arg(long)]
    json: bool,
    /// A shorter run (800 training lists, 100 held out, 100 SFT and 40 alignment steps):
    /// a first look in less than half the full run's time.
    #[arg(long)]
    quick: bool,
}

fn percent(x: Option<f64>) -> String {
    x.map_or("—".to_string(), |x| format!("{:.1}%", 100.0 * x))
}

fn row(name: &str, r: &PhaseReport) -> String {
    let change = r
        .chosen_logp_change
        .map_or("—".to_string(), |x| format!("{x:+.2}"));
    format!(
        "{name:<10} {:>11.3} {:>8} {:>11} {:>16} {:>9.0}",
        r.accuracy,
        percent(Some(r.exact)),
        percent(r.reward_accuracy),
        change,
        r.tokens_per_s
    )
}

fn table(report: &DemoReport, out: &std::path::Path) -> String {
    [
        format!(
            "{:<10} {:>11} {:>8} {:>11} {:>16} {:>9}",
            "model", "judge score", "exact", "reward acc", "Δ log p(chosen)", "tokens/s"
        ),
        row("after SFT", &report.sft),
        row("after NCA", &report.nca),
        row("after DPO", &report.dpo),
        String::new(),
        format!(
            "Runs (metrics.jsonl, final/ model, loss.png, rewards.png, logps.png): {}/sft, \
             {}/nca, {}/dpo",
            out.display(),
            out.display(),
            out.display()
        ),
        format!(
            "Data: {}/data; tokenizer and initial model: {}/init",
            out.display(),
            out.display()
        ),
    ]
    .join("\n")
}

pub fn run(args: DemoArgs) -> Result<()> {
    let opts = if args.quick {
        DemoOptions::short(args.out.clone(), args.seed)
    } else {
        DemoOptions::full(args.out.clone(), args.seed)
    };
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>4} [{bar:30}] {pos}/{len} {msg}")
        .expect("a valid template")
        .progress_chars("=> ");
    let mut phases: HashMap<String, ProgressBar> = HashMap::new();
    let terminal = std::io::stderr().is_terminal();
    let started = std::time::Instant::now();
    let report = demo::run(&opts, &mut |name, record, total| {
        let bar = phases.entry(name.to_string()).or_insert_with(|| {
            if !terminal {
                eprintln!("{name}: {total} steps");
            }
            let bar = bars.add(ProgressBar::new(total));
            bar.set_style(style.clone());
            bar.set_prefix(name.to_string());
            bar
        });
        bar.set_position(record.step);
        bar.set_message(format!("loss {:.4}", record.loss));
        if record.step == total {
            bar.finish();
            if !terminal {
                eprintln!(
                    "{name}: done, loss {:.4} ({:.0} s in)",
                    record.loss,
                    started.elapsed().as_secs_f64()
                );
            }
        }
    })?;
    if args.json {
        stdout::line(serde_json::to_string(&report)?)
    } else {
        stdout::line(table(&report, &args.out))
    }
}
