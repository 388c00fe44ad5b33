use anyhow::{bail, Context, Result};
use clap::Args;
use contralign::checkpoint::save_f32;
use contralign::data::pretokenized::read_file;
use contralign::loss::{LossKind, LossSpec};
use contralign::model::params::param_specs;
use contralign::model::{Model, StepOptions};
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
    /// The policy: a Hugging Face model directory.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// The frozen reference model, required by reference-based losses (nca, dpo).
    #[arg(long, value_name = "DIR")]
    ref_model: Option<PathBuf>,
    /// Pre-tokenized JSONL (reward groups or pairs, detected per line).
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// The loss: sft (token-mean NLL of the best response), nca (NCA, any K), dpo (K = 2,
    /// response 0 chosen).
    #[arg(long, value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(LossKind::NAMES))]
    loss: String,
    /// Inverse temperature of the implicit reward beta·(S − S_ref). Default: 0.01 for nca
    /// (NCA paper, UltraFeedback), 0.1 for dpo (DPO paper, TRL).
    #[arg(long, value_name = "F")]
    beta: Option<f64>,
    /// Reward temperature of the soft labels softmax(r/alpha); 0 puts all weight on the
    /// best-rated responses. Default 0.01 (NCA paper).
    #[arg(long, value_name = "F", default_value_t = 0.01)]
    alpha: f64,
    /// DPO label smoothing eps in [0, 0.5). Default 0.
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    label_smoothing: f64,
    /// Weight of the Mixtral load-balancing loss. Default: the config's router_aux_loss_coef
    /// when its output_router_logits is true, else 0 (as transformers does).
    #[arg(long, value_name = "F")]
    aux_coef: Option<f64>,
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
    let kind = LossKind::parse(&args.loss)?;
    let spec = LossSpec {
        kind,
        beta: args.beta.unwrap_or(kind.default_beta()),
        alpha: args.alpha,
        label_smoothing: args.label_smoothing,
    };
    spec.validate()?;
    if kind.needs_reference() && args.ref_model.is_none() {
        bail!(
            "--loss {} needs a reference model: give --ref-model DIR",
            args.loss
        );
    }
    check_writable(&args.out)?;
    let groups = read_file(&args.data)?;
    let ops = CpuOps;
    let policy = Model::load(&ops, &args.model)?;
    let reference = match &args.ref_model {
        Some(dir) if kind.needs_reference() => Some(Model::load(&ops, dir)?),
        _ => None,
    };
    let aux_coef = args.aux_coef.unwrap_or(policy.cfg.default_aux_coef());
    if !aux_coef.is_finite() || aux_coef < 0.0 {
        bail!("--aux-coef must be >= 0, found {aux_coef}");
    }
    let opts = StepOptions {
        checkpointing: !args.no_checkpointing,
        aux_coef,
    };
    let out = step::loss_and_grads(&ops, &policy, reference.as_ref(), &groups, &spec, &opts)?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = param_specs(&policy.cfg)
        .into_iter()
        .zip(out.grads.iter())
        .map(|((name, shape), g)| (name, shape, ops.download(g)))
        .collect();
    tensors.push(("loss".to_string(), vec![], vec![out.loss as f32]));
    save_f32(&args.out, &tensors)?;
    eprintln!(
        "loss {:.6} over {} groups; wrote {} gradient tensors to {}",
        out.loss,
        groups.len(),
        tensors.len() - 1,
        args.out.display()
    );
    Ok(())
}
