use crate::cli::loss_args::InputArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use contralign::checkpoint::save_f32;
use contralign::model::params::param_specs;
use contralign::model::StepOptions;
use contralign::ops::cpu::CpuOps;
use contralign::ops::Ops;
use contralign::step;
use std::path::{Path, PathBuf};

/// Compute the gradient of a batch loss for every parameter and write it as safetensors.
///
/// The batch is the whole data file; its loss is the mean over groups of the per-group loss,
/// plus `--aux-coef` times the Mixtral load-balancing loss. The output holds one f32 tensor
/// per parameter under its checkpoint name, plus a scalar `loss`.
#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct GradsArgs {
    #[command(flatten)]
    inputs: InputArgs,
    /// Keep every activation instead of recomputing each layer in the backward
    /// (faster, more memory; gradients agree to float rounding).
    #[arg(long)]
    no_checkpointing: bool,
    /// Output safetensors file (written atomically).
    #[arg(long, value_name = "FILE.safetensors")]
    out: PathBuf,
}

/// Fails early, before any work, when `out` cannot be written.
fn check_writable(out: &Path) -> Result<()> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        bail!(
            "--out {}: directory {} does not exist",
            out.display(),
            parent.display()
        );
    }
    let probe = out.with_extension("safetensors.tmp");
    std::fs::write(&probe, b"")
        .with_context(|| format!("--out {}: cannot write there", out.display()))?;
    std::fs::remove_file(&probe).ok();
    Ok(())
}

pub fn run(args: GradsArgs) -> Result<()> {
    let l = args.inputs.load(|| check_writable(&args.out))?;
    let ops = CpuOps;
    let opts = StepOptions {
        checkpointing: !args.no_checkpointing,
        aux_coef: l.aux_coef,
    };
    let out = step::loss_and_grads(
        &ops,
        &l.policy,
        l.reference.as_ref(),
        &l.groups,
        &l.spec,
        &opts,
    )?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = param_specs(&l.policy.cfg)
        .into_iter()
        .zip(out.grads.iter())
        .map(|((name, shape), g)| (name, shape, ops.download(g)))
        .collect();
    tensors.push(("loss".to_string(), vec![], vec![out.loss as f32]));
    save_f32(&args.out, &tensors)?;
    eprintln!(
        "loss {:.6} over {} groups; wrote {} gradient tensors to {}",
        out.loss,
        l.groups.len(),
        tensors.len() - 1,
        args.out.display()
    );
    Ok(())
}
