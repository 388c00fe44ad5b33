use crate::cli::data_args::DataArgs;
use anyhow::Result;
use clap::Args;
use contralign::fsutil::check_writable_file;
use contralign::model::Model;
use contralign::ops::cpu::CpuOps;
use contralign::train::refcache::RefCache;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

/// Score every response of a data set under the frozen reference model once and write a
/// cache for `train --ref-logps FILE`.
///
/// The cache is keyed by the token ids of the data (after truncation) and by the contents
/// of the model directory (config.json and weights); `train` refuses a cache made for other
/// data or another model, and says which.
#[derive(Args, Debug)]
pub struct PrecomputeArgs {
    /// The reference model: a Hugging Face model directory.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// The cache file to write (JSON, atomically).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Most packed tokens scored at once.
    #[arg(long, value_name = "N", default_value_t = 8192)]
    micro_tokens: usize,
}

pub fn run(args: PrecomputeArgs) -> Result<()> {
    check_writable_file(&args.out, "--out")?;
    let groups = args.data.load(&args.model)?;
    let model = Model::load(&CpuOps, &args.model)?;
    let bar = ProgressBar::new(groups.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "groups {pos}/{len} [{bar:30}] {elapsed_precise} ETA {eta_precise}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    let cache = RefCache::compute(
        &CpuOps,
        &model,
        &args.model,
        &groups,
        &args.data.data,
        args.micro_tokens.max(1),
        |done| bar.set_position(done as u64),
    )?;
    bar.finish_and_clear();
    cache.save(&args.out)?;
    eprintln!(
        "scored {} groups under {}; wrote {}",
        groups.len(),
        args.model.display(),
        args.out.display()
    );
    Ok(())
}
