use crate::cli::data_args::DataArgs;
use crate::cli::device_args::{DeviceArgs, OnOps};
use crate::cli::passes::{groups_bar, PassArgs};
use crate::cli::stdout;
use anyhow::Result;
use clap::Args;
use contralign::data::Group;
use contralign::model::{Model, ResponseStats};
use contralign::step;
use contralign::step::LossOps;
use std::path::PathBuf;

/// Score every response of a data set under a model: one JSON line per response, in file
/// order, `{"group", "source", "response", "logp_sum", "tokens", "logp_mean", "eos_logp"}`
/// ("group" counts the groups scored, "source" names the record: `file:line`, or
/// `file, row N` for Parquet).
///
/// `logp_sum` is the sum of the response tokens' log-probabilities given the prompt (the
/// final EOS included), `tokens` their count, `logp_mean` their mean, and `eos_logp` the
/// log-probability of the final EOS token (null when the response does not end with EOS).
#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// Hugging Face model directory (config.json + safetensors), or a Hub id
    /// (org/name[@revision]) from the local Hugging Face cache, downloaded when missing.
    #[arg(long, value_name = "DIR|ID", value_parser = crate::cli::model_arg::parse)]
    model: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    passes: PassArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

struct Scoring<'a> {
    args: &'a ScoreArgs,
    groups: &'a [Group],
}

impl OnOps for Scoring<'_> {
    type Output = Vec<ResponseStats>;
    fn run<O: LossOps>(self, ops: &O) -> Result<Vec<ResponseStats>> {
        let model = Model::load(ops, &self.args.model)?;
        let bar = groups_bar(self.groups.len());
        let stats = step::score_groups(
            ops,
            &model,
            self.groups,
            self.args.passes.micro_tokens,
            |done| bar.set_position(done as u64),
        );
        bar.finish_and_clear();
        stats
    }
}

pub fn run(args: ScoreArgs) -> Result<()> {
    args.data.refuse_flags_a_file_ignores()?;
    let groups = args.data.load(&args.model)?;
    let stats = args.device.run(Scoring {
        args: &args,
        groups: &groups,
    })?;
    let mut out = stdout::Lines::new();
    let indices = groups
        .iter()
        .enumerate()
        .flat_map(|(g, group)| (0..group.responses.len()).map(move |r| (g, &group.source, r)));
    for ((group, source, response), s) in indices.zip(&stats) {
        let line = serde_json::json!({
            "group": group,
            "source": source,
            "response": response,
            "logp_sum": s.logp_sum,
            "tokens": s.tokens,
            "logp_mean": s.logp_mean,
            "eos_logp": s.eos_logp,
        });
        out.line(line)?;
    }
    out.finish()
}
