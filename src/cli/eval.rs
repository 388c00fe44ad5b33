use crate::cli::device_args::{DeviceArgs, OnOps};
use crate::cli::loss_args::InputArgs;
use crate::cli::passes::{groups_bar, PassArgs};
use crate::cli::stdout;
use anyhow::Result;
use clap::Args;
use contralign::step;
use contralign::step::LossOps;

/// Evaluate a loss over a data set and print one JSON object `{"loss": L, "metrics": {...}}`.
///
/// The loss is the mean over groups of the per-group loss (plus `--aux-coef` times the
/// Mixtral load-balancing loss). Metrics follow TRL's names: rewards/chosen, rewards/rejected,
/// rewards/margins, rewards/accuracies, logps/chosen, logps/rejected, rewards/rank_1..K,
/// eos_prob, response_len. Rewards are beta·(S − S_ref) for reference-based losses and
/// beta·A for reference-free ones; for K > 2 chosen is the best-rated response and rejected
/// the worst.
#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct EvalArgs {
    #[command(flatten)]
    inputs: InputArgs,
    #[command(flatten)]
    passes: PassArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

impl OnOps for &EvalArgs {
    type Output = step::Evaluation;
    fn run<O: LossOps>(self, ops: &O) -> Result<step::Evaluation> {
        let max_tokens = self.passes.micro_tokens;
        let l = self.inputs.load(ops, max_tokens, || Ok(()))?;
        let bar = groups_bar(l.groups.len());
        let eval = step::evaluate_in_passes(
            ops,
            &l.policy,
            l.ref_stats.as_deref(),
            &l.groups,
            &l.spec,
            l.aux_coef,
            max_tokens,
            |done| bar.set_position(done as u64),
        );
        bar.finish_and_clear();
        eval
    }
}

pub fn run(args: EvalArgs) -> Result<()> {
    let eval = args.device.run(&args)?;
    let metrics: serde_json::Map<String, serde_json::Value> = eval
        .metrics
        .into_iter()
        .map(|(k, v)| (k, v.into()))
        .collect();
    stdout::line(serde_json::json!({"loss": eval.loss, "metrics": metrics}))
}
