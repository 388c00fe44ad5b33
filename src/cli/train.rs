use crate::cli::config_file::args_to_toml;
use crate::cli::data_args::DataArgs;
use crate::cli::device_args::Backend;
use crate::cli::loss_args::{note_reference_free, InputArgs};
use crate::cli::plan::parse_memory;
use crate::cli::precision_args::PrecisionArgs;
use crate::cli::size_arg::parse_size;
use anyhow::{bail, Context, Result};
use clap::Args;
use contralign::checkpoint::parse_dtype;
use contralign::config::ModelConfig;
use contralign::data::Group;
use contralign::engine::DeviceEngine;
use contralign::memory_plan::{
    human_bytes, MemoryPlan, PrecisionOptions, RecomputePolicy, ReferenceSource, StorageDtype,
};
use contralign::model::Model;
use contralign::ops::cpu::CpuOps;
use contralign::ops::cuda::device::{Device, DeviceKind};
use contralign::step::check_reference;
use contralign::train::held_out::{HeldOut, EVAL_PREFIX};
use contralign::train::optimizer::AdamWConfig;
use contralign::train::plan::{Length, StepBudget};
use contralign::train::refcache::RefCache;
use contralign::train::run_dir::{load_checkpoint, RunDir, SaveOptions, CONFIG};
use contralign::train::schedule::ScheduleKind;
use contralign::train::session::{self, Outcome};
use contralign::train::trainer::{
    longest_pass, Reference, TrainOptions, Trainer, Warmup, HELD_OUT_NEEDS_A_MODEL,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Train a policy with a contrastive loss and write a run directory.
///
/// RUN_DIR (--out) receives metrics.jsonl (one JSON object per optimizer step: step, epoch,
/// loss, lr, grad_norm, tokens_per_s, and the metrics of `eval`), checkpoint-STEP/ every
/// --save-every steps and at the last step — a Hugging Face model directory (config.json,
/// safetensors, tokenizer files) plus the optimizer and trainer state a resume needs —,
/// final/ (the last checkpoint's model alone), train.toml (the run's configuration) and the
/// plots of metrics.jsonl. Ctrl-C saves a checkpoint and exits (status 130);
/// `--resume RUN_DIR` continues from the newest checkpoint with the saved configuration
/// (flags given again override it and are saved with it; the models cannot change). One process writes a run at a time (RUN_DIR/train.lock). Every flag can also be set in a
/// TOML file given by --config, under the flag's name (`tokens-per-step = 4096`); flags on
/// the command line win.
#[derive(Args, Clone, Debug, Serialize)]
#[command(allow_negative_numbers = true, args_override_self = true)]
#[serde(rename_all = "kebab-case")]
pub struct TrainArgs {
    #[command(flatten)]
    #[serde(flatten)]
    inputs: InputArgs,
    /// Reference statistics precomputed by `contralign precompute-ref` for this data and
    /// reference model, instead of running --ref-model at every step. The cache is checked
    /// against --ref-model's weights, or the policy's when --ref-model is not given: name the
    /// model it was made with.
    #[arg(long, value_name = "FILE")]
    ref_logps: Option<PathBuf>,
    /// The run directory (created if missing; must not hold another run).
    #[arg(long, value_name = "RUN_DIR", required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Optimizer steps to take. Default: one epoch.
    #[arg(long, value_name = "N", conflicts_with = "epochs", value_parser = clap::value_parser!(u64).range(..=crate::cli::SAVED_INT_MAX))]
    steps: Option<u64>,
    /// Passes over the data set (each reshuffled). Default 1.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(..=crate::cli::SAVED_INT_MAX))]
    epochs: Option<u64>,
    /// Packed tokens per optimizer step: groups are added while they fit (a step holds at
    /// least one group).
    #[arg(long, value_name = "N", conflicts_with = "groups_per_step", value_parser = crate::cli::passes::saved_count(0))]
    tokens_per_step: Option<usize>,
    /// Groups per optimizer step. Default 8 (TRL's per-device batch size).
    #[arg(long, value_name = "N", value_parser = crate::cli::passes::saved_count(0))]
    groups_per_step: Option<usize>,
    /// Most packed tokens in one forward/backward; larger steps accumulate gradients over
    /// micro-batches (the loss stays the mean over the step's groups).
    #[arg(long, value_name = "N", default_value_t = 8192, value_parser = crate::cli::passes::saved_count(1))]
    micro_tokens: usize,
    /// Peak learning rate (the default is TRL's DPO default).
    #[arg(long, value_name = "F", default_value = "1e-6")]
    lr: f64,
    /// AdamW betas.
    #[arg(long, value_name = "B1,B2", default_value = "0.9,0.999")]
    betas: String,
    /// AdamW epsilon.
    #[arg(long, value_name = "F", default_value = "1e-8")]
    eps: f64,
    /// Decoupled weight decay (transformers' default 0).
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    weight_decay: f64,
    /// Learning-rate schedule after warmup.
    #[arg(long, value_name = "NAME", default_value = "linear", value_parser = clap::builder::PossibleValuesParser::new(ScheduleKind::NAMES))]
    schedule: String,
    /// Linear warmup steps from 0 to --lr.
    #[arg(long, value_name = "N", conflicts_with = "warmup_ratio", value_parser = clap::value_parser!(u64).range(..=crate::cli::SAVED_INT_MAX))]
    warmup_steps: Option<u64>,
    /// Warmup as a fraction of all steps (rounded up).
    #[arg(long, value_name = "F")]
    warmup_ratio: Option<f64>,
    /// Clip the global gradient norm to this (0 disables clipping).
    #[arg(long, value_name = "F", default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Save checkpoint-STEP every N steps (0: only at the last step, with final/).
    #[arg(long, value_name = "N", default_value_t = 500, value_parser = clap::value_parser!(u64).range(..=crate::cli::SAVED_INT_MAX))]
    save_every: u64,
    /// Keep only the newest N checkpoint-STEP directories (Hugging Face's save_total_limit);
    /// the newest and the one a run resumed from are never removed. Default: keep all.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=crate::cli::SAVED_INT_MAX))]
    save_total_limit: Option<u64>,
    /// dtype of saved weights: float32, bfloat16 or float16. Default: as loaded.
    #[arg(long, value_name = "DTYPE")]
    save_dtype: Option<String>,
    /// Largest safetensors shard, in bytes or with a unit (5GB, 500MB); bigger models are
    /// sharded with an index, as transformers does.
    #[arg(long, value_name = "SIZE", default_value = "5GB")]
    max_shard_size: String,
    /// Keep every activation instead of recomputing each layer in the backward (the same as
    /// --recompute none).
    #[arg(long)]
    no_checkpointing: bool,
    /// What the backward recomputes of each layer. none: keep every activation (the most
    /// memory). full: keep each layer's input and recompute the layer (the least memory,
    /// about 8N FLOPs per token instead of 6N). selective: keep the GEMM and attention
    /// outputs, recompute the norms and SwiGLU (about 6N). The gradients are the same bits
    /// under all three. Default: on a device, selective where the memory plan fits, else
    /// full (the run then names the largest --micro-tokens at which selective fits); on the
    /// CPU, full.
    #[arg(
        long,
        value_enum,
        value_name = "POLICY",
        conflicts_with = "no_checkpointing"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    recompute: Option<RecomputePolicy>,
    /// Where the policy trains. cpu: the reference backend. emu: the device engine in the
    /// CUDA emulator on the host (slow; for checking). cuda: the device engine on a GPU (a
    /// build with --features cuda). On emu and cuda the weights, gradients and AdamW's moments
    /// live on the device as flat buffers in the types of the precision flags (the norm and
    /// AdamW with the clipping folded in are one launch each); attention, the
    /// LM-head scoring, MoE dispatch and the loss run there too; a --ref-model is resident on
    /// the device beside the policy (--ref-logps saves its memory).
    #[arg(long, value_enum, default_value = "cpu")]
    device: Backend,
    #[command(flatten)]
    #[serde(flatten)]
    precision: PrecisionArgs,
    /// The device memory the run may plan for (80GB, 79.5GiB; a bare number is GB). Default:
    /// on cuda the GPU's free memory once the driver, the kernels and cuBLAS are loaded, less
    /// 512 MiB for the kernels cuBLAS loads at its first GEMMs; no limit on emu. The run's memory plan (`contralign plan`
    /// with the same flags) must fit, or the run stops before loading any weight, naming the
    /// flag to change.
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// Stop (after saving a checkpoint) when this many steps in a row have a non-finite
    /// loss or gradient; such steps are skipped and logged.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    max_bad_steps: u32,
    /// Held-out data (TRL's eval_dataset): a file, a folder or a data set id, read with the
    /// data flags above; scored every --eval-every steps and at the end, its metrics logged
    /// to metrics.jsonl under TRL's eval_ names (eval_loss, eval_rewards/accuracies, ...).
    #[arg(long, value_name = "FILE|DIR|ID")]
    eval_data: Option<PathBuf>,
    /// The split of --eval-data.
    #[arg(long, value_name = "NAME", default_value = "test")]
    eval_split: String,
    /// Evaluate --eval-data every N steps (TRL's eval_steps; 0: only at the end).
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u64).range(..=crate::cli::SAVED_INT_MAX))]
    eval_every: u64,
    /// Read flags from a TOML file (keys are the flags' names); command-line flags win.
    #[arg(long, value_name = "FILE.toml")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Continue the run in RUN_DIR from its newest checkpoint, with its saved configuration.
    #[arg(long, value_name = "RUN_DIR")]
    #[serde(skip)]
    resume: Option<PathBuf>,
}

/// The device of `--device` and the memory the run's plans must fit in.
struct PlannedDevice {
    device: Device,
    /// `--memory`, else the GPU's; `None` on the emulator without `--memory`.
    memory: Option<u64>,
}

/// The memory plan of the run for passes of `tokens` packed tokens under `recompute`: the
/// model's config.json and the flags alone, before any weight is read. A --ref-logps cache is
/// looked up on the host; a --ref-model lives on the device beside the policy (the trainer's
/// choice, Trainer::device_plan).
fn plan_for(
    args: &TrainArgs,
    opts: &TrainOptions,
    tokens: usize,
    recompute: RecomputePolicy,
) -> Result<MemoryPlan> {
    let cfg = ModelConfig::load(&args.inputs.model)?;
    let reference = match (opts.spec.kind.needs_reference(), &args.ref_logps) {
        (false, _) => ReferenceSource::None,
        (true, Some(_)) => ReferenceSource::Cached,
        (true, None) => ReferenceSource::Resident,
    };
    DeviceEngine::plan(&cfg, tokens, recompute, reference, opts.precision)
}

/// The device of `--device`, once the run's memory plan is known to fit in it (`--memory`,
/// else the GPU's memory): checked from the model's config.json alone, before any weight is
/// read.
///
/// Without a recompute flag, the run recomputes selectively where that plan fits, else in
/// full (`opts.recompute` says which).
fn open_planned_device(
    kind: DeviceKind,
    args: &TrainArgs,
    opts: &mut TrainOptions,
) -> Result<PlannedDevice> {
    let device = Device::open(kind)?;
    eprintln!("device: {}", device.describe());
    eprintln!("precision: {}", opts.precision.describe());
    let memory = match &args.memory {
        Some(text) => Some(parse_memory(text)?),
        None => device.plannable_memory()?,
    };
    let mut why = String::new();
    if args.recompute.is_none() && !args.no_checkpointing {
        let selective = plan_for(args, opts, opts.micro_tokens, RecomputePolicy::Selective)?;
        match memory {
            Some(m) if selective.total() > m => {
                let hint = selective.selective_hint(m)?;
                let hint = hint.map(|h| format!("; {h}")).unwrap_or_default();
                why = format!(" (selective does not fit{hint})");
            }
            _ => opts.recompute = RecomputePolicy::Selective,
        }
    }
    eprintln!("recompute: {}{why}", opts.recompute.name());
    let plan = plan_for(args, opts, opts.micro_tokens, opts.recompute)?;
    if let Some(memory) = memory {
        plan.fits(memory).with_context(|| {
            format!(
                "the run ({}) does not fit on the device",
                opts.precision.describe()
            )
        })?;
        eprintln!(
            "memory plan: {} of {}",
            human_bytes(plan.total()),
            human_bytes(memory)
        );
    }
    Ok(PlannedDevice { device, memory })
}

impl PlannedDevice {
    /// Where `flag`'s data has a group longer than `--micro-tokens` (`pass_tokens` packed
    /// tokens, a pass of its own): says so, and returns the recompute policy under which the
    /// plan for such passes (`plan_with`), which the engine then allocates, fits: `recompute`,
    /// or full recompute where the run chose selective itself (`auto`) and only full fits.
    fn plan_longer_pass(
        &self,
        flag: &str,
        (pass_tokens, micro_tokens): (usize, usize),
        (recompute, auto): (RecomputePolicy, bool),
        plan_with: impl Fn(RecomputePolicy) -> Result<MemoryPlan>,
    ) -> Result<RecomputePolicy> {
        let plan = plan_with(recompute)?;
        eprintln!(
            "memory plan: {flag} has a group of {pass_tokens} packed tokens, more than \
             --micro-tokens {micro_tokens}: planned for passes of {pass_tokens} tokens, {}",
            human_bytes(plan.total())
        );
        let Some(memory) = self.memory.filter(|&m| plan.total() > m) else {
            return Ok(recompute);
        };
        if auto && recompute == RecomputePolicy::Selective {
            let full = plan_with(RecomputePolicy::Full)?;
            if full.total() <= memory {
                eprintln!(
                    "recompute: full (a pass of {pass_tokens} tokens fits only with it), {}",
                    human_bytes(full.total())
                );
                return Ok(RecomputePolicy::Full);
            }
        }
        plan.fits(memory).with_context(|| {
            format!(
                "{flag}'s group of {pass_tokens} packed tokens does not fit on the device as a \
                 pass of its own (--max-len shortens the groups)"
            )
        })?;
        Ok(recompute)
    }
}

fn parse_betas(text: &str) -> Result<(f64, f64)> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    if let [b1, b2] = parts[..] {
        if let (Ok(b1), Ok(b2)) = (b1.parse(), b2.parse()) {
            return Ok((b1, b2));
        }
    }
    bail!("--betas expects two numbers B1,B2 such as 0.9,0.999; found {text:?}")
}

impl TrainArgs {
    /// The arguments with every path absolute, as the run directory saves them, so that a
    /// resume from another working directory finds the same files.
    fn with_absolute_paths(&self) -> Result<TrainArgs> {
        // A data set id is kept as written; models are directories by now.
        let abs = |p: &PathBuf| -> Result<PathBuf> {
            if !p.exists() {
                return Ok(p.clone());
            }
            std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display()))
        };
        let mut args = self.clone();
        args.inputs.model = abs(&self.inputs.model)?;
        args.inputs.data.data = abs(&self.inputs.data.data)?;
        args.eval_data = self.eval_data.as_ref().map(abs).transpose()?;
        args.inputs.ref_model = self.inputs.ref_model.as_ref().map(abs).transpose()?;
        args.ref_logps = self.ref_logps.as_ref().map(abs).transpose()?;
        args.out = self.out.as_ref().map(abs).transpose()?;
        Ok(args)
    }

    fn options(&self) -> Result<TrainOptions> {
        let spec = self.inputs.loss.spec()?;
        let adamw = AdamWConfig {
            betas: parse_betas(&self.betas)?,
            eps: self.eps,
            weight_decay: self.weight_decay,
        };
        adamw.validate()?;
        let budget = match (self.tokens_per_step, self.groups_per_step) {
            (Some(t), _) => StepBudget::Tokens(t),
            (None, g) => StepBudget::Groups(g.unwrap_or(8)),
        };
        let length = match (self.steps, self.epochs) {
            (Some(s), _) => Length::Steps(s),
            (None, e) => Length::Epochs(e.unwrap_or(1)),
        };
        let warmup = match (self.warmup_steps, self.warmup_ratio) {
            (_, Some(r)) => Warmup::Ratio(r),
            (s, None) => Warmup::Steps(s.unwrap_or(0)),
        };
        // The CPU is the reference: f32 unless asked for its bf16-rounding mode.
        let default_precision = match self.device {
            Backend::Cpu => StorageDtype::F32,
            Backend::Emu | Backend::Cuda => StorageDtype::Bf16,
        };
        Ok(TrainOptions {
            spec,
            precision: self.precision.options(default_precision)?,
            aux_coef: 0.0,
            recompute: match (self.recompute, self.no_checkpointing) {
                (Some(policy), _) => policy,
                (None, true) => RecomputePolicy::None,
                (None, false) => RecomputePolicy::Full,
            },
            budget,
            micro_tokens: self.micro_tokens,
            seed: self.inputs.loss.seed,
            length,
            adamw,
            schedule: ScheduleKind::parse(&self.schedule)?,
            lr: self.lr,
            warmup,
            max_grad_norm: self.max_grad_norm,
            max_bad_steps: self.max_bad_steps,
        })
    }
}

/// Shows progress on a terminal; elsewhere prints a line now and then.
struct Progress {
    bar: ProgressBar,
    every: u64,
}

impl Progress {
    fn new(total: u64, done: u64) -> Self {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "step {pos}/{len} [{bar:30}] {msg} | {elapsed_precise} ETA {eta_precise}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_position(done);
        Progress {
            bar,
            every: (total / 20).max(1),
        }
    }

    fn step(&self, step: u64, total: u64, loss: f64, tokens_per_s: f64) {
        let msg = format!("loss {loss:.4} | {:.0} tok/s", tokens_per_s);
        self.bar.set_position(step);
        self.bar.set_message(msg.clone());
        if !std::io::stderr().is_terminal() && (step.is_multiple_of(self.every) || step == total) {
            eprintln!("step {step}/{total}: {msg}");
        }
    }
}

/// Refuses a resume whose `--model` or `--ref-model` is not the run's own: a resume continues
/// from its checkpoint's weights, and its reference statistics are the saved reference's.
fn check_same_models(args: &TrainArgs, run_dir: &Path) -> Result<()> {
    let saved_path = run_dir.join(CONFIG);
    let text = std::fs::read_to_string(&saved_path)
        .with_context(|| format!("cannot read {}", saved_path.display()))?;
    let saved: toml::Table = toml::from_str(&text)
        .with_context(|| format!("{}: malformed TOML", saved_path.display()))?;
    let now = args.with_absolute_paths()?;
    let given = [
        ("model", Some(&now.inputs.model)),
        ("ref-model", now.inputs.ref_model.as_ref()),
    ];
    for (key, path) in given {
        let before = saved
            .get(key)
            .and_then(toml::Value::as_str)
            .map(PathBuf::from);
        if before.as_ref() != path {
            bail!(
                "--resume {}: --{key} {} differs from the run's {}; a resume continues from its \
                 checkpoint with the run's models (start a new run with --model to change them)",
                run_dir.display(),
                path.map_or("(none)".into(), |p| p.display().to_string()),
                before.map_or("(none)".into(), |p| p.display().to_string()),
            );
        }
    }
    Ok(())
}

/// The held-out groups of `--eval-data`, read with the training data's flags and cut into
/// pairs as the training data is. Their reference statistics need the reference model.
fn held_out_groups(args: &TrainArgs, path: &Path, reference: &Reference) -> Result<Vec<Group>> {
    if matches!(reference, Reference::Cache(_)) {
        bail!("{HELD_OUT_NEEDS_A_MODEL}");
    }
    let inputs = &args.inputs;
    let data = DataArgs {
        data: path.to_path_buf(),
        split: args.eval_split.clone(),
        ..inputs.data.clone()
    };
    let spec = inputs.loss.spec()?;
    inputs
        .loss
        .prepare(&spec, data.load(&inputs.model)?, data.skip_invalid)
}

pub fn run(mut args: TrainArgs) -> Result<ExitCode> {
    // The day its chat template's strftime_now renders, fixed for the run and saved with it,
    // so that a resume on another day tokenizes its data as the run did.
    args.inputs
        .data
        .template_date
        .get_or_insert_with(|| contralign::tokenizer::strftime::DateTime::today().ymd());
    let mut opts = args.options()?;
    opts.validate()?;
    args.inputs.data.refuse_flags_a_file_ignores()?;
    if args.eval_every > 0 && args.eval_data.is_none() {
        eprintln!("note: --eval-every evaluates --eval-data, which is not given; ignored");
    }
    if let Some(run_dir) = &args.resume {
        check_same_models(&args, run_dir)?;
    }
    let out = match (&args.resume, &args.out) {
        (Some(r), Some(o)) if r != o => {
            bail!(
                "--out {} differs from --resume {}: a resumed run continues in its own \
                 directory",
                o.display(),
                r.display()
            )
        }
        (_, Some(o)) => o.clone(),
        (Some(r), None) => r.clone(),
        (None, None) => bail!("give --out RUN_DIR"),
    };
    note_reference_free(
        opts.spec.kind,
        &[
            ("--ref-model", args.inputs.ref_model.is_some()),
            ("--ref-logps", args.ref_logps.is_some()),
        ],
    );
    if opts.spec.kind.needs_reference()
        && args.inputs.ref_model.is_none()
        && args.ref_logps.is_none()
    {
        bail!(
            "--loss {} compares the policy with a reference model: give --ref-model DIR or \
             --ref-logps FILE",
            opts.spec.kind.name()
        );
    }
    let device = match args.device.device_kind() {
        Some(kind) => Some(open_planned_device(kind, &args, &mut opts)?),
        None => {
            if let Some(text) = &args.memory {
                parse_memory(text)?;
                eprintln!("--memory {text}: the CPU trainer plans no device memory; ignored");
            }
            if opts.precision != PrecisionOptions::all_f32() {
                eprintln!(
                    "precision: {} (the CPU's bf16-rounding mode)",
                    opts.precision.describe()
                );
            }
            None
        }
    };
    let existed = out.exists();
    let run = RunDir::create(&out)?;
    let had_lock = run.lock_path().exists();
    let result = train_in(&args, opts, device, &run, &out);
    // A run that failed before its first step leaves nothing behind: no directory it
    // created, no lock file in one that was there.
    if result.is_err() && !run.holds_a_run().unwrap_or(true) {
        if !existed {
            std::fs::remove_dir_all(&out).ok();
        } else if !had_lock {
            std::fs::remove_file(run.lock_path()).ok();
        }
    }
    result
}

/// The run in `run` (the directory `out`), once it exists, on `device` when given; it holds
/// the run's lock.
fn train_in(
    args: &TrainArgs,
    mut opts: TrainOptions,
    device: Option<PlannedDevice>,
    run: &RunDir,
    out: &Path,
) -> Result<ExitCode> {
    let _lock = run.lock()?;
    let save_dtype = args
        .save_dtype
        .as_deref()
        .map(parse_dtype)
        .transpose()
        .context("--save-dtype")?;
    let max_shard_bytes = parse_size("--max-shard-size", &args.max_shard_size)? as usize;
    let inputs = &args.inputs;
    let spec = &opts.spec;
    if args.resume.is_none() {
        if run.holds_a_run()? {
            bail!(
                "--out {} already holds a run; continue it with --resume {}, or choose another \
                 directory",
                out.display(),
                out.display()
            );
        }
        let replaceable = run.replaceable_entries()?;
        if !replaceable.is_empty() {
            bail!(
                "--out {} holds {}, which a new run would replace; choose another directory",
                out.display(),
                replaceable.join(", ")
            );
        }
    }

    let data = inputs.data.load(&inputs.model)?;
    let groups = inputs
        .loss
        .prepare(spec, data.clone(), inputs.data.skip_invalid)?;
    let responses: usize = groups.iter().map(|g| g.responses.len()).sum();
    let tokens: usize = groups.iter().map(|g| g.packed_len()).sum();
    eprintln!(
        "data: {} groups, {responses} responses, {tokens} tokens packed (prompts once)",
        groups.len()
    );
    // A group longer than a micro-batch is planned for before any weight is read.
    let pass_tokens = longest_pass(&groups, opts.micro_tokens);
    let auto_recompute = args.recompute.is_none() && !args.no_checkpointing;
    if let Some(planned) = device.as_ref().filter(|_| pass_tokens > opts.micro_tokens) {
        opts.recompute = planned.plan_longer_pass(
            "--data",
            (pass_tokens, opts.micro_tokens),
            (opts.recompute, auto_recompute),
            |r| plan_for(args, &opts, pass_tokens, r),
        )?;
    }
    let resumed_from = match &args.resume {
        Some(_) => {
            let latest = run.latest_checkpoint()?;
            if latest.is_none() {
                // A run stopped before its first checkpoint: its saved configuration is all
                // there is to continue, so it starts again.
                eprintln!(
                    "--resume {}: no checkpoint yet; starting again from step 0",
                    out.display()
                );
            }
            latest
        }
        None => None,
    };
    let restored = match &resumed_from {
        Some(dir) => {
            eprintln!("resuming from {}", dir.display());
            Some(load_checkpoint(dir)?)
        }
        None => None,
    };
    let weights_storage: contralign::ops::storage::Dtype = opts.precision.precision.into();
    let (policy, restored) = match restored {
        Some(r) => (r.policy, Some((r.state, r.moments))),
        None => (
            Model::load_for(&CpuOps, &inputs.model, weights_storage)?,
            None,
        ),
    };
    let reference = if !spec.kind.needs_reference() {
        Reference::None
    } else if let Some(path) = &args.ref_logps {
        let cache = RefCache::load(path)?;
        let (model_dir, given) = match &inputs.ref_model {
            Some(dir) => {
                check_reference(&policy.cfg, &ModelConfig::load(dir)?)?;
                (dir, true)
            }
            None => (&inputs.model, false),
        };
        cache.check(path, &inputs.data.data, &data, model_dir, given)?;
        Reference::Cache(cache.lookup(&data))
    } else {
        let dir = inputs.ref_model.as_ref().expect("checked above");
        let reference = Model::load_for(&CpuOps, dir, weights_storage)?;
        check_reference(&policy.cfg, &reference.cfg)?;
        Reference::Model(Box::new(reference))
    };
    let held_out_groups = match &args.eval_data {
        // Their ids are checked against the model as they load, not at the first evaluation.
        Some(path) => Some(held_out_groups(args, path, &reference)?),
        None => None,
    };
    let aux_coef = inputs.loss.aux_coef_for(&policy.cfg);
    let micro_tokens = opts.micro_tokens;
    let mut trainer = Trainer::new(TrainOptions { aux_coef, ..opts }, policy, reference, groups)?;
    if let Some((state, _)) = &restored {
        trainer.check_resumable(state)?;
    }
    if let Some(planned) = device {
        if let Some(groups) = &held_out_groups {
            let before = trainer.pass_tokens();
            trainer.plan_passes_of(groups)?;
            let tokens = trainer.pass_tokens();
            if tokens > before {
                trainer.opts.recompute = planned.plan_longer_pass(
                    "--eval-data",
                    (tokens, micro_tokens),
                    (trainer.opts.recompute, auto_recompute),
                    |r| plan_for(args, &trainer.opts, tokens, r),
                )?;
            }
        }
        // The device first: a resume's moments then go up to it one tensor at a time.
        trainer.use_device(planned.device)?;
    }
    if let Some((state, moments)) = restored {
        trainer.restore(&state, |which, i| moments.tensor(which, i))?;
    }
    // Scored where the run trains: a resident reference on its device.
    let held_out = match held_out_groups {
        Some(groups) => {
            let ref_stats = trainer.held_out_reference_stats(&groups)?;
            Some(HeldOut::new(groups, ref_stats, args.eval_every))
        }
        None => None,
    };
    if args.resume.is_some() {
        run.truncate_metrics(trainer.step)?;
    }
    // A resume saves the flags it was given with the saved ones, so that the next resume
    // continues with them too.
    contralign::fsutil::write_atomically(
        &run.path.join(CONFIG),
        args_to_toml(&args.with_absolute_paths()?)?.as_bytes(),
    )?;
    let save = SaveOptions {
        dtype: save_dtype,
        max_shard_bytes,
        source: inputs.model.clone(),
        total_limit: args.save_total_limit.map(|n| n as usize),
        keep: resumed_from,
    };
    let total = trainer.total_steps();
    if trainer.done() {
        // A run killed between its last checkpoint and final/ (or while final/ replaced
        // the one of an earlier end) is finished here.
        let last = save
            .keep
            .as_ref()
            .context("a complete run has a checkpoint")?;
        let final_dir = run.save_final(last)?;
        if let Err(e) = contralign::plot::plot_run(&run.path) {
            eprintln!("warning: no plots: {e:#}");
        }
        eprintln!(
            "the run in {} is complete ({} of {total} steps; {} holds the model of {}); give \
             --steps N to train further",
            out.display(),
            trainer.step,
            final_dir.display(),
            last.display()
        );
        return Ok(ExitCode::SUCCESS);
    }

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                // A second Ctrl-C does not wait for the checkpoint.
                std::process::exit(130);
            }
        })
        .context("installing the Ctrl-C handler")?;
    }
    let progress = Progress::new(total, trainer.step);
    let outcome = session::run(
        &mut trainer,
        run,
        &save,
        args.save_every,
        &interrupted,
        |step| held_out.as_ref().is_some_and(|h| h.due(step, total)),
        |record, trainer| {
            if let Some(reason) = &record.skipped {
                progress.bar.suspend(|| {
                    eprintln!(
                        "step {}: {reason}; the update was skipped ({} in a row)",
                        record.step, trainer.bad_steps_in_a_row
                    )
                });
            }
            progress.step(record.step, total, record.loss, record.tokens_per_s);
            if let Some(held_out) = held_out.as_ref().filter(|h| h.due(record.step, total)) {
                let row = held_out.row(trainer, record)?;
                run.append_metrics(&row)?;
                let loss = row[format!("{EVAL_PREFIX}loss")]
                    .as_f64()
                    .unwrap_or(f64::NAN);
                progress
                    .bar
                    .suspend(|| eprintln!("step {}: {EVAL_PREFIX}loss {loss:.4}", record.step));
            }
            Ok(())
        },
    );
    progress.bar.abandon();
    match outcome? {
        Outcome::Finished(path) => {
            // The plots are a view of metrics.jsonl: failing to draw them fails no run.
            if let Err(e) = contralign::plot::plot_run(&run.path) {
                eprintln!("warning: no plots: {e:#}");
            }
            eprintln!(
                "trained {total} steps; wrote {}, its plots and {}",
                run.metrics_path().display(),
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Interrupted(path) => {
            eprintln!(
                "interrupted at step {}: saved {}; continue with `contralign train --resume {}`",
                trainer.step,
                path.display(),
                out.display()
            );
            Ok(ExitCode::from(130))
        }
    }
}
