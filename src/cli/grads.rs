use crate::cli::device_args::{DeviceArgs, OnOps};
use crate::cli::loss_args::InputArgs;
use crate::cli::passes::{groups_bar, PassArgs};
use anyhow::{bail, Result};
use clap::Args;
use contralign::checkpoint::{named_tensors, save_f32, Tensor};
use contralign::fsutil::{check_not_an_input, check_writable_file};
use contralign::memory_plan::RecomputePolicy;
use contralign::model::params::param_specs;
use contralign::model::StepOptions;
use contralign::step;
use contralign::step::LossOps;
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
    /// (faster, more memory; the same gradients bit for bit).
    #[arg(long)]
    no_checkpointing: bool,
    /// Output safetensors file (written atomically).
    #[arg(long, value_name = "FILE.safetensors")]
    out: PathBuf,
    #[command(flatten)]
    passes: PassArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

/// The loss, the gradients on the host in parameter order, and what they were taken over.
pub struct Gradients {
    loss: f64,
    grads: Vec<Vec<f32>>,
    cfg: contralign::config::ModelConfig,
    groups: usize,
}

impl OnOps for &GradsArgs {
    type Output = Gradients;
    fn run<O: LossOps>(self, ops: &O) -> Result<Gradients> {
        let l = self.inputs.load(ops, self.passes.micro_tokens, || {
            check_writable_file(&self.out, "--out")?;
            let inputs = &self.inputs;
            let mut read = vec![("--model", inputs.model.as_path())];
            read.extend(inputs.ref_model.as_deref().map(|p| ("--ref-model", p)));
            read.push(("--data", inputs.data.data.as_path()));
            check_not_an_input(&self.out, "--out", &read)
        })?;
        let opts = StepOptions {
            recompute: if self.no_checkpointing {
                RecomputePolicy::None
            } else {
                RecomputePolicy::Full
            },
            aux_coef: l.aux_coef,
        };
        let bar = groups_bar(l.groups.len());
        let out = step::loss_and_grads_in_passes(
            ops,
            &l.policy,
            l.ref_stats.as_deref(),
            &l.groups,
            &l.spec,
            &opts,
            self.passes.micro_tokens,
            |done| bar.set_position(done as u64),
        );
        bar.finish_and_clear();
        let out = out?;
        let grads = out
            .grads
            .iter()
            .into_iter()
            .map(|g| ops.download(g))
            .collect();
        Ok(Gradients {
            loss: out.logged.loss,
            grads,
            cfg: l.policy.cfg,
            groups: l.groups.len(),
        })
    }
}

pub fn run(args: GradsArgs) -> Result<()> {
    let out = args.device.run(&args)?;
    let data = &out.grads;
    let loss = [out.loss as f32];
    let mut tensors = named_tensors(&param_specs(&out.cfg), "", data);
    // A file of infinities is no gradient: nothing is written, and the first is named.
    let gradient = tensors.iter().find_map(|t| {
        let (i, v) = t.data.iter().enumerate().find(|(_, v)| !v.is_finite())?;
        Some(format!(
            "the gradient of {} holds {v} at element {i}",
            t.name
        ))
    });
    let loss_f32 =
        (!loss[0].is_finite()).then(|| format!("the loss is {:e} ({} in f32)", out.loss, loss[0]));
    if let Some(what) = loss_f32.or(gradient) {
        bail!(
            "{what}: not finite, so nothing was written to {} (a loss flag such as --beta may \
             be too large for f32)",
            args.out.display()
        );
    }
    tensors.push(Tensor {
        name: "loss".to_string(),
        shape: vec![],
        data: &loss,
    });
    save_f32(&args.out, &tensors)?;
    eprintln!(
        "loss {:.6} over {} groups; wrote {} gradient tensors to {}",
        out.loss,
        out.groups,
        tensors.len() - 1,
        args.out.display()
    );
    Ok(())
}
