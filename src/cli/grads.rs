use crate::cli::loss_args::InputArgs;
use anyhow::Result;
use clap::Args;
use contralign::checkpoint::{save_f32, Tensor};
use contralign::fsutil::check_writable_file;
use contralign::model::params::param_specs;
use contralign::model::StepOptions;
use contralign::ops::cpu::CpuOps;
use contralign::ops::Ops;
use contralign::step;
use std::path::PathBuf;

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

pub fn run(args: GradsArgs) -> Result<()> {
    let l = args
        .inputs
        .load(|| check_writable_file(&args.out, "--out"))?;
    let ops = CpuOps;
    let opts = StepOptions {
        checkpointing: !args.no_checkpointing,
        aux_coef: l.aux_coef,
    };
    let out = step::loss_and_grads(
        &ops,
        &l.policy,
        l.ref_stats.as_deref(),
        &l.groups,
        &l.spec,
        &opts,
    )?;
    let data: Vec<Vec<f32>> = out
        .grads
        .iter()
        .into_iter()
        .map(|g| ops.download(g))
        .collect();
    let loss = [out.loss as f32];
    let mut tensors: Vec<Tensor> = param_specs(&l.policy.cfg)
        .into_iter()
        .zip(&data)
        .map(|((name, shape), data)| Tensor { name, shape, data })
        .collect();
    tensors.push(Tensor {
        name: "loss".to_string(),
        shape: vec![],
        data: &loss,
    });
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
