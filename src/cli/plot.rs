use crate::cli::stdout;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// Draw a training run's curves from RUN_DIR/metrics.jsonl into PNGs in RUN_DIR, and print
/// the paths written.
///
/// loss.png: the training loss, the learning rate and the gradient norm over steps.
///
/// rewards.png: the implicit reward of the j-th best-rated response, rewards/rank_1..K, one
/// line per rank (the NCA paper's Figure 5), and the reward accuracy.
///
/// logps.png: logps/chosen and logps/rejected (the NCA paper's Figure 2).
///
/// Eval metrics (eval_loss, eval_rewards/..., TRL's names) are drawn in their training series' color,
/// thinner and with a dot per point. Null or missing values are skipped (the line joins the
/// steps around them); a panel or figure with no values is left out with a note. The run may
/// still be writing: a half-written last line is ignored. Each PNG is written to a temporary
/// file and renamed into place.
#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Run directory holding metrics.jsonl; the figures are written beside it.
    #[arg(value_name = "RUN_DIR")]
    run_dir: PathBuf,
}

pub fn run(args: PlotArgs) -> Result<()> {
    for path in contralign::plot::plot_run(&args.run_dir)? {
        stdout::line(path.display())?;
    }
    Ok(())
}
