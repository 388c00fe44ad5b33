use crate::cli::data_args::DataArgs;
use crate::cli::device_args::{DeviceArgs, OnOps};
use crate::cli::passes::{groups_bar, PassArgs};
use anyhow::Result;
use clap::Args;
use contralign::data::Group;
use contralign::fsutil::{check_not_an_input, check_writable_file};
use contralign::model::Model;
use contralign::step::LossOps;
use contralign::train::refcache::RefCache;
use std::path::PathBuf;

/// Score every response of a data set under the frozen reference model once and write a
/// cache for `train --ref-logps FILE`.
///
/// The cache is keyed by the token ids of the data (after truncation) and by the contents
/// of the model directory (config.json and weights); `train` refuses a cache made for other
/// data or another model, and says which.
#[derive(Args, Debug)]
pub struct PrecomputeArgs {
    /// The reference model: a Hugging Face model directory, or a Hub id (org/name[@revision])
    /// from the local Hugging Face cache, downloaded when missing.
    #[arg(long, value_name = "DIR|ID", value_parser = crate::cli::model_arg::parse)]
    model: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// The cache file to write (JSON, atomically).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    #[command(flatten)]
    passes: PassArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

struct Precompute<'a> {
    args: &'a PrecomputeArgs,
    groups: &'a [Group],
}

impl OnOps for Precompute<'_> {
    type Output = RefCache;
    fn run<O: LossOps>(self, ops: &O) -> Result<RefCache> {
        let model = Model::load(ops, &self.args.model)?;
        let bar = groups_bar(self.groups.len());
        let cache = RefCache::compute(
            ops,
            &model,
            &self.args.model,
            self.groups,
            &self.args.data.data,
            self.args.passes.micro_tokens,
            |done| bar.set_position(done as u64),
        )?;
        bar.finish_and_clear();
        Ok(cache)
    }
}

pub fn run(args: PrecomputeArgs) -> Result<()> {
    check_writable_file(&args.out, "--out")?;
    check_not_an_input(
        &args.out,
        "--out",
        &[("--model", &args.model), ("--data", &args.data.data)],
    )?;
    args.data.refuse_flags_a_file_ignores()?;
    let groups = args.data.load(&args.model)?;
    let cache = args.device.run(Precompute {
        args: &args,
        groups: &groups,
    })?;
    cache.save(&args.out)?;
    eprintln!(
        "scored {} groups under {}; wrote {}",
        groups.len(),
        args.model.display(),
        args.out.display()
    );
    Ok(())
}
