//! `contralign bench`: speed measurements that print JSON, one sub-command per workload.

use super::plan::parse_memory;
use super::precision_args::PrecisionArgs;
use super::roofline_args::RooflineArgs;
use crate::cli::stdout;
use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use contralign::checkpoint::{save_f32, Tensor};
use contralign::config::ModelConfig;
use contralign::engine::bench::{check_step_shape, time_step, BenchSetup, StepRun, StepShape};
use contralign::engine::moe_bench::{dump_moe, time_moe};
use contralign::engine::step_model::{self, Divisors};
use contralign::engine::DeviceEngine;
use contralign::loss::{batch_loss, BatchInput, LossKind, LossSpec};
use contralign::memory_plan::{RecomputePolicy, ReferenceSource, StorageDtype};
use contralign::model::layer::MoeShape;
use contralign::ops::cuda::attention_bench::{
    time_attention, BenchMask, BenchProblem, DumpedTensor,
};
use contralign::ops::cuda::device::{Device, DeviceKind};
use contralign::ops::cuda::roofline::Math;
use contralign::ops::cuda::scoring_bench::{self, ScoringBench, ScoringDump, ScoringShape};
use contralign::ops::AttentionShape;
use half::bf16;
use std::path::{Path, PathBuf};

/// Measure a workload on a device and print the figures as one JSON object.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: Workload,
}

#[derive(Subcommand, Debug)]
enum Workload {
    Attention(AttentionBenchArgs),
    Moe(MoeBenchArgs),
    Scoring(ScoringArgs),
    Step(StepArgs),
    StepModel(StepModelArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Dtype {
    Bf16,
    F32,
}

/// The losses `bench step` runs: the scoreboard's DPO and NCA rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum StepLoss {
    Dpo,
    Nca,
}

/// Time a whole training step of the device engine and print JSON: tokens/s, achieved
/// TFLOP/s, model-FLOPs utilization against the H100's 989 TFLOP/s and against a bf16 GEMM
/// rate measured on the same device in the same run, and the engine's device memory.
///
/// The model is --config (a config.json or model directory; its weights are not read) with
/// --layers of its layers, random weights made in memory; the data are --groups groups of a
/// --prompt-token prompt and --responses responses of --response-len tokens, in one
/// micro-batch; the loss --loss with a cached (made-up) reference. Default: Mistral-7B's width
/// and heads with 2 layers. On --device emu the times are the emulator's: they check the
/// command, they measure nothing about a GPU. --dump DIR also writes the model, the groups,
/// the reference and the first step's loss for the scoreboard's PyTorch side.
#[derive(Args, Debug)]
struct StepArgs {
    /// Where the step runs (emu: the emulator, for checking the command, not for timing).
    #[arg(long, value_enum, default_value = "cuda")]
    device: DeviceKind,
    /// A config.json, or a model directory holding one. Default: Mistral-7B-v0.1's
    /// (examples/configs/mistral-7b-v0.1.json, built in).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Layers of the model, in place of the config's own count (Mistral-7B's is 32).
    #[arg(long, default_value_t = 2, value_parser = crate::cli::passes::at_least_one())]
    layers: usize,
    #[command(flatten)]
    data: StepDataArgs,
    /// Timed steps (the median is reported), after one untimed step.
    #[arg(long, default_value_t = 3, value_parser = crate::cli::passes::repetitions())]
    steps: usize,
    /// The side of the square bf16 GEMM whose rate MFU is also read against.
    #[arg(long, default_value_t = 8192, value_parser = crate::cli::passes::at_least_one())]
    gemm_size: usize,
    /// A folder for the first step's inputs and loss (then every step trains on the same
    /// --groups groups).
    #[arg(long, value_name = "DIR")]
    dump: Option<PathBuf>,
    /// Plan the step for this much device memory (80GB, 79.5GiB; a bare number is GB), as
    /// `train --memory` does: a plan that does not fit prints `{"out_of_memory": why}` and
    /// runs nothing.
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    #[command(flatten)]
    precision: PrecisionArgs,
}

/// `--config`, else the built-in Mistral-7B-v0.1 config (examples/configs/), so that the
/// default runs from any directory.
fn bench_config(path: Option<&std::path::Path>) -> Result<ModelConfig> {
    match path {
        Some(p) => crate::cli::model_arg::local_config("--config", p),
        None => ModelConfig::from_json(serde_json::from_str(include_str!(
            "../../examples/configs/mistral-7b-v0.1.json"
        ))?)
        .context("the built-in Mistral-7B-v0.1 config"),
    }
}

/// The data of a benchmarked step: groups of one prompt and its responses, and the loss.
#[derive(Args, Debug)]
struct StepDataArgs {
    /// Prompt tokens of each group.
    #[arg(long, default_value_t = 512, value_parser = crate::cli::passes::at_least_one())]
    prompt: usize,
    /// Responses per group.
    #[arg(long, default_value_t = 4, value_parser = crate::cli::passes::at_least_one())]
    responses: usize,
    /// Tokens per response.
    #[arg(long, default_value_t = 256, value_parser = crate::cli::passes::at_least_one())]
    response_len: usize,
    /// Groups in the micro-batch.
    #[arg(long, default_value_t = 2, value_parser = crate::cli::passes::at_least_one())]
    groups: usize,
    /// Seed of the random weights and token ids.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The loss (dpo needs --responses 2).
    #[arg(long, value_enum, default_value = "nca")]
    loss: StepLoss,
}

impl StepDataArgs {
    fn shape(&self) -> StepShape {
        StepShape {
            prompt: self.prompt,
            responses: self.responses,
            response_len: self.response_len,
            groups: self.groups,
        }
    }

    fn loss(&self) -> LossKind {
        match self.loss {
            StepLoss::Dpo => LossKind::Dpo,
            StepLoss::Nca => LossKind::Nca,
        }
    }
}

/// Model a whole training step on an A100 and an H100 and print it as a Markdown table: every
/// kernel's launches, bytes, FLOPs and roofline time, with the step's time, tokens/s and MFU.
///
/// The emulator counts six steps of the model at small shapes (--width-divisor divides the
/// heads, KV heads, hidden size, MLP width and vocabulary; --length-divisor the prompt and
/// response lengths; one and two layers, and each doubling) and extrapolates each launch by
/// shape to the target: --config with its own layers, or --layers. A model, not a
/// measurement: `bench step` on a GPU measures. Dense configs only. About 3 CPU-minutes per
/// census at the defaults (the six run in parallel threads).
#[derive(Args, Debug)]
struct StepModelArgs {
    /// A config.json, or a model directory holding one. Default: Mistral-7B-v0.1's
    /// (examples/configs/mistral-7b-v0.1.json, built in).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Layers of the target (the config's own count when not given).
    #[arg(long, value_parser = crate::cli::passes::at_least_one())]
    layers: Option<usize>,
    #[command(flatten)]
    data: StepDataArgs,
    /// What the small shapes divide the heads, KV heads, hidden size, MLP width and
    /// vocabulary by.
    #[arg(long, default_value_t = 8, value_parser = crate::cli::passes::at_least_one())]
    width_divisor: usize,
    /// What the small shapes divide the prompt, response and sliding-window lengths by.
    #[arg(long, default_value_t = 8, value_parser = crate::cli::passes::at_least_one())]
    length_divisor: usize,
    #[command(flatten)]
    precision: PrecisionArgs,
    #[command(flatten)]
    roofline: RooflineArgs,
}

fn step_model(a: StepModelArgs) -> Result<()> {
    let precision = a.precision.options(StorageDtype::Bf16)?;
    let mut target = bench_config(a.config.as_deref())?;
    if let Some(layers) = a.layers {
        target = target.with_layers(layers)?;
    }
    let shape = a.data.shape();
    check_step_shape(&shape, a.data.loss())?;
    let divisors = Divisors {
        width: a.width_divisor,
        length: a.length_divisor,
    };
    let setup = BenchSetup {
        shape,
        spec: LossSpec::new(a.data.loss()),
        precision,
        seed: a.data.seed,
        steps: 2,
    };
    let gpus = a.roofline.gpus()?;
    let censuses = step_model::count_steps(&target, &setup, divisors)?;
    let math = Math::of(precision.precision.name());
    let rows = step_model::extrapolate(&censuses, divisors, target.num_layers, &gpus, math)?;
    stdout::text(step_model::report(&target, &shape, divisors, &rows, &gpus))
}

fn step(a: StepArgs) -> Result<()> {
    check_dump_dir(a.dump.as_deref(), &["model".into(), "step.json".into()])?;
    let precision = a.precision.options(StorageDtype::Bf16)?;
    let cfg = bench_config(a.config.as_deref())?.with_layers(a.layers)?;
    let shape = a.data.shape();
    if let Some(text) = &a.memory {
        let memory = parse_memory(text)?;
        // The bench's step: the engine's precision, selective recompute, a cached reference.
        let plan = DeviceEngine::plan(
            &cfg,
            shape.tokens(),
            RecomputePolicy::Selective,
            ReferenceSource::Cached,
            precision,
        )?;
        if let Err(why) = plan.fits(memory) {
            let report = serde_json::json!({
                "bench": "step",
                "layers": cfg.num_layers,
                "plan_bytes": plan.total(),
                "memory": memory,
                "out_of_memory": format!("{why:#}"),
                "precision": precision.describe(),
            });
            stdout::line(serde_json::to_string_pretty(&report)?)?;
            return Ok(());
        }
    }
    let device = Device::open(a.device)?;
    let run = StepRun {
        steps: a.steps,
        gemm_size: a.gemm_size,
        seed: a.data.seed,
        loss: a.data.loss(),
        dump: a.dump.as_deref(),
        precision,
    };
    let timing = time_step(device, &cfg, shape, run)?;
    stdout::line(serde_json::to_string_pretty(&timing)?)?;
    Ok(())
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.what {
        Workload::Attention(a) => attention(a),
        Workload::Moe(a) => moe(a),
        Workload::Step(a) => step(a),
        Workload::StepModel(a) => step_model(a),
        Workload::Scoring(a) => scoring(a),
    }
}

fn scoring(a: ScoringArgs) -> Result<()> {
    check_dump_dir(a.dump.as_deref(), &dump_files(&["scoring".into()]))?;
    ensure!(
        a.rows > 0 && a.vocab > 0 && a.dim > 0,
        "--rows, --vocab and --dim must be positive"
    );
    ensure!(a.chunk_rows != Some(0), "--chunk-rows must be positive");
    ensure!(
        a.dump.is_none() || a.rows > scoring_bench::RESPONSE_LEN,
        "--dump needs at least 2 responses of {} rows: --rows {} holds 1",
        scoring_bench::RESPONSE_LEN,
        a.rows
    );
    let device = Device::open(a.device)?;
    let shape = ScoringShape {
        rows: a.rows,
        vocab: a.vocab,
        dim: a.dim,
        chunk_rows: a.chunk_rows,
    };
    let dumped = match (&a.dump, a.dtype) {
        (None, _) => None,
        (Some(dir), Dtype::Bf16) => Some(write_scoring_dump(
            scoring_bench::dump(&mut ScoringBench::<bf16>::new(&device, shape, 0)?)?,
            &shape,
            dir,
        )?),
        (Some(dir), Dtype::F32) => Some(write_scoring_dump(
            scoring_bench::dump(&mut ScoringBench::<f32>::new(&device, shape, 0)?)?,
            &shape,
            dir,
        )?),
    };
    let mut report = match a.dtype {
        Dtype::Bf16 => scoring_bench::report::<bf16>(&device, shape, a.reps)?,
        Dtype::F32 => scoring_bench::report::<f32>(&device, shape, a.reps)?,
    };
    if let Some(d) = dumped {
        report["dumped"] = d;
    }
    stdout::line(report)?;
    Ok(())
}

/// Time the fused LM-head scoring on random inputs and print the figures as JSON.
///
/// The fused scoring (logits by chunks, log-sum-exp and target log-probs, per-response S, A,
/// E, and the backward into dh and dW) on random inputs: the time of the fused forward
/// and forward+backward, of the same GEMMs alone (the floor), of an unfused baseline (fp32
/// logits of the whole batch, log-softmax, gather, reduce), the extra memory of each, and the
/// bandwidth of the logits passes against the measured copy bandwidth. On `--device emu` the
/// times are the emulator's (`"emulator_time": true`): they check that it runs, they measure
/// nothing about a GPU.
#[derive(Args, Debug)]
struct ScoringArgs {
    /// Prediction rows (tokens scored), cut into responses of 256 rows (the last one
    /// shorter), four to a group; --dump needs at least two responses (more than 256 rows).
    #[arg(long, default_value_t = 8192, value_parser = crate::cli::passes::at_least_one())]
    rows: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 32000, value_parser = crate::cli::passes::at_least_one())]
    vocab: usize,
    /// Hidden width.
    #[arg(long, default_value_t = 4096, value_parser = crate::cli::passes::at_least_one())]
    dim: usize,
    /// Storage of h, the LM head and the logits.
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: Dtype,
    /// Rows per chunk of logits [default: as many as 256 MiB hold].
    #[arg(long, value_parser = crate::cli::passes::at_least_one())]
    chunk_rows: Option<usize>,
    /// Timed repetitions of each case (the median is printed), after one warm-up.
    #[arg(long, default_value_t = 5, value_parser = crate::cli::passes::repetitions())]
    reps: usize,
    /// Where it runs.
    #[arg(long, value_enum, default_value = "cuda")]
    device: DeviceKind,
    /// A folder for the batch's inputs, the responses' sums and their DPO loss (the same
    /// inputs as the timed cases: seed 0).
    #[arg(long, value_name = "DIR")]
    dump: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum MaskKind {
    /// One causal sequence.
    Causal,
    /// Groups of one prompt and its responses (--prompt, --responses, --response-len).
    Packed,
}

impl MaskKind {
    fn name(self) -> &'static str {
        match self {
            MaskKind::Causal => "causal",
            MaskKind::Packed => "packed",
        }
    }
}

/// Time attention forward and backward (cuda/attention.cu) on random inputs made in memory,
/// for every combination of --tokens and --mask, and print JSON: per case the time and the
/// achieved TFLOP/s (4·hd FLOPs per visible (query, key) pair and head forward, 10·hd
/// backward). The defaults are Mistral-7B's shapes.
#[derive(Args, Debug)]
pub struct AttentionBenchArgs {
    /// Where the kernels run (emu: the emulator, for checking the command, not for timing).
    #[arg(long, value_enum, default_value = "cuda")]
    device: DeviceKind,
    /// Storage of Q, K, V and the outputs (bf16: tensor cores, the engine's default; f32: the
    /// path checked against the CPU exactly).
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: Dtype,
    /// Stream lengths; a packed case holds as many whole groups as fit (at least one).
    #[arg(long, value_delimiter = ',', default_value = "2048,8192", value_parser = crate::cli::passes::at_least_one())]
    tokens: Vec<usize>,
    /// Which attention patterns to time.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "causal,packed"
    )]
    mask: Vec<MaskKind>,
    /// Query heads.
    #[arg(long, default_value_t = 32, value_parser = crate::cli::passes::at_least_one())]
    heads: usize,
    /// Key/value heads (grouped-query attention: a divisor of --heads).
    #[arg(long, default_value_t = 8, value_parser = crate::cli::passes::at_least_one())]
    kv_heads: usize,
    /// Dimension of each head.
    #[arg(long, default_value_t = 128, value_parser = crate::cli::passes::at_least_one())]
    head_dim: usize,
    /// Prompt tokens of a packed group.
    #[arg(long, default_value_t = 512, value_parser = crate::cli::passes::at_least_one())]
    prompt: usize,
    /// Responses per packed group.
    #[arg(long, default_value_t = 8, value_parser = crate::cli::passes::at_least_one())]
    responses: usize,
    /// Tokens per response.
    #[arg(long, default_value_t = 256, value_parser = crate::cli::passes::at_least_one())]
    response_len: usize,
    /// Timed runs per case (the median is reported), after one warm-up.
    #[arg(long, default_value_t = 10, value_parser = crate::cli::passes::repetitions())]
    reps: usize,
    /// A folder for each case's inputs, outputs, gradients and loss Σ out·dout
    /// (`attention-MASK-TOKENS.{safetensors,json}`).
    #[arg(long, value_name = "DIR")]
    dump: Option<PathBuf>,
}

fn attention(a: AttentionBenchArgs) -> Result<()> {
    let stems: Vec<String> = (a.tokens.iter())
        .flat_map(|&t| a.mask.iter().map(move |&kind| attention_dump_name(kind, t)))
        .collect();
    check_dump_dir(a.dump.as_deref(), &dump_files(&stems))?;
    if a.tokens.contains(&0) {
        bail!("--tokens: every stream needs at least one token");
    }
    let device = Device::open(a.device)?;
    let shape = AttentionShape {
        heads: a.heads,
        kv_heads: a.kv_heads,
        head_dim: a.head_dim,
    };
    let mut cases = Vec::new();
    let mut dumps = Vec::new();
    for &tokens in &a.tokens {
        for &kind in &a.mask {
            let mask = match kind {
                MaskKind::Causal => BenchMask::Causal,
                MaskKind::Packed => BenchMask::Packed {
                    prompt: a.prompt,
                    responses: a.responses,
                    response_len: a.response_len,
                },
            };
            if let Some(dir) = &a.dump {
                let name = attention_dump_name(kind, tokens);
                let tensors = match a.dtype {
                    Dtype::Bf16 => {
                        BenchProblem::<bf16>::new(&device, mask, tokens, shape)?.dump(&device)?
                    }
                    Dtype::F32 => {
                        BenchProblem::<f32>::new(&device, mask, tokens, shape)?.dump(&device)?
                    }
                };
                let loss = write_attention_dump(&tensors, mask, shape, dir, &name)?;
                dumps.push(serde_json::json!({"name": name, "loss": loss}));
            }
            cases.push(match a.dtype {
                Dtype::Bf16 => time_attention::<bf16>(&device, mask, tokens, shape, a.reps)?,
                Dtype::F32 => time_attention::<f32>(&device, mask, tokens, shape, a.reps)?,
            });
        }
    }
    let report = serde_json::json!({
        "bench": "attention",
        "device": device.describe(),
        "cases": cases,
        "dumps": dumps,
    });
    stdout::line(serde_json::to_string_pretty(&report)?)?;
    Ok(())
}

/// `--dump DIR`, before any work: a folder (made if missing) where none of the entries the
/// dump writes (`names`) exists yet, so that the dump replaces nothing — least of all the
/// model that `--config` reads. Other files may be there: the GPU suite dumps several runs
/// into one folder.
fn check_dump_dir(dump: Option<&Path>, names: &[String]) -> Result<()> {
    let Some(dir) = dump else {
        return Ok(());
    };
    if dir.symlink_metadata().is_ok() && !dir.is_dir() {
        bail!("--dump {}: not a directory", dir.display());
    }
    if let Some(name) = names
        .iter()
        .find(|n| dir.join(n).symlink_metadata().is_ok())
    {
        bail!(
            "--dump {}: {name} is there already; a dump replaces nothing (move it, or dump \
             elsewhere)",
            dir.display()
        );
    }
    Ok(())
}

/// What `bench attention --dump` writes for a case: `NAME.safetensors` and `NAME.json`.
fn attention_dump_name(kind: MaskKind, tokens: usize) -> String {
    format!("attention-{}-{tokens}", kind.name())
}

/// The file names of dumps named `stems`: each one's `.safetensors` and `.json`.
fn dump_files(stems: &[String]) -> Vec<String> {
    stems
        .iter()
        .flat_map(|s| [format!("{s}.safetensors"), format!("{s}.json")])
        .collect()
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("--dump: cannot create {}", dir.display()))
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    contralign::fsutil::write_atomically(path, value.to_string().as_bytes())
        .with_context(|| format!("--dump: cannot write {}", path.display()))
}

/// `dir/scoring.safetensors` (h, head) and `dir/scoring.json` (the targets, the spans, each
/// response's S and the DPO loss of consecutive responses as (chosen, rejected) pairs with a
/// zero reference: the loss TRL's sigmoid DPO computes from the same sums). Returns the
/// folder and the loss for the report.
fn write_scoring_dump(
    d: ScoringDump,
    shape: &ScoringShape,
    dir: &Path,
) -> Result<serde_json::Value> {
    // At least one: `scoring` refuses a --dump of fewer than two responses.
    let pairs = d.s.len() / 2;
    let s = &d.s[..2 * pairs];
    let spec = LossSpec::new(LossKind::Dpo);
    let zeros = vec![0.0; s.len()];
    let offsets: Vec<usize> = (0..=pairs).map(|g| 2 * g).collect();
    let sources: Vec<String> = (0..pairs).map(|g| format!("scoring pair {g}")).collect();
    let loss = batch_loss(
        &spec,
        &BatchInput {
            s,
            a: &zeros,
            e: &vec![None; s.len()],
            s_ref: Some(&zeros),
            rewards: &[1.0, 0.0].repeat(pairs),
            offsets: &offsets,
            sources: &sources,
        },
    )?
    .loss;
    create_dir(dir)?;
    save_f32(
        &dir.join("scoring.safetensors"),
        &[
            Tensor {
                name: "h".into(),
                shape: vec![shape.rows, shape.dim],
                data: &d.h,
            },
            Tensor {
                name: "head".into(),
                shape: vec![shape.vocab, shape.dim],
                data: &d.head,
            },
        ],
    )?;
    let record = serde_json::json!({
        "targets": d.targets,
        "spans": &d.spans[..2 * pairs],
        "s": s,
        "beta": spec.beta,
        "loss": loss,
    });
    write_json(&dir.join("scoring.json"), &record)?;
    Ok(serde_json::json!({"dump": dir, "loss": loss}))
}

/// `dir/NAME.safetensors` (the case's tensors) and `dir/NAME.json` (the mask, the stream
/// length, the shape and the loss `Σ out · dout` whose gradients dq, dk, dv are); returns the
/// loss.
fn write_attention_dump(
    tensors: &[DumpedTensor],
    mask: BenchMask,
    shape: AttentionShape,
    dir: &Path,
    name: &str,
) -> Result<f64> {
    let find = |n: &str| &tensors.iter().find(|t| t.name == n).expect("dumped").data;
    let loss: f64 = find("out")
        .iter()
        .zip(find("dout"))
        .map(|(&o, &g)| o as f64 * g as f64)
        .sum();
    create_dir(dir)?;
    let named: Vec<Tensor> = tensors
        .iter()
        .map(|t| Tensor {
            name: t.name.to_string(),
            shape: t.shape.clone(),
            data: &t.data,
        })
        .collect();
    save_f32(&dir.join(format!("{name}.safetensors")), &named)?;
    let record = serde_json::json!({
        "mask": mask,
        "tokens": tensors[0].shape[0],
        "heads": shape.heads,
        "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "loss": loss,
    });
    write_json(&dir.join(format!("{name}.json")), &record)?;
    Ok(loss)
}

/// Time the mixture-of-experts feed-forward (the model's MoE layer on the device: routing,
/// counting sort and row moves of cuda/moe.cu, the grouped expert GEMMs of cuda/moe_gemm.cu)
/// forward and backward on
/// random inputs made in memory, and print JSON: the time and achieved TFLOP/s of each (the
/// GEMMs' FLOPs: 2·T·d·E + 6·T·k·d·F forward, twice that backward) and the dispatch's time
/// alone. The defaults are Mixtral-8x7B's shapes in bf16 (`--dtype`). On
/// --device emu use tiny shapes: the times are the emulator's, they check the command.
/// --dump DIR also writes the inputs, output and input gradient for the scoreboard's
/// PyTorch side.
#[derive(Args, Debug)]
pub struct MoeBenchArgs {
    /// Where the layer runs (emu: the emulator, for checking the command, not for timing).
    #[arg(long, value_enum, default_value = "cuda")]
    device: DeviceKind,
    /// Token rows entering the layer.
    #[arg(long, default_value_t = 4096, value_parser = crate::cli::passes::at_least_one())]
    tokens: usize,
    /// Hidden width.
    #[arg(long, default_value_t = 4096, value_parser = crate::cli::passes::at_least_one())]
    dim: usize,
    /// Width of each expert's MLP.
    #[arg(long, default_value_t = 14336, value_parser = crate::cli::passes::at_least_one())]
    ffn: usize,
    /// Experts of the layer.
    #[arg(long, default_value_t = 8, value_parser = crate::cli::passes::at_least_one())]
    experts: usize,
    /// Experts per token (1 to 4, what the device engine routes).
    #[arg(long, default_value_t = 2, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=contralign::ops::cuda::moe::MAX_K as u64))]
    top_k: usize,
    /// Storage of the weights and activations (the engine's default is bf16; f32 is the path
    /// checked against the CPU exactly).
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: Dtype,
    /// Timed runs (the median is reported), after one warm-up.
    #[arg(long, default_value_t = 5, value_parser = crate::cli::passes::repetitions())]
    reps: usize,
    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A folder for the layer's inputs (as stored), its output and input gradient and the
    /// loss Σ out·dy (`moe.safetensors`, `moe.json`: the same inputs as the timed runs).
    #[arg(long, value_name = "DIR")]
    dump: Option<PathBuf>,
}

fn moe(a: MoeBenchArgs) -> Result<()> {
    check_dump_dir(a.dump.as_deref(), &dump_files(&["moe".into()]))?;
    let device = Device::open(a.device)?;
    let shape = MoeShape {
        d: a.dim,
        ffn: a.ffn,
        experts: a.experts,
        k: a.top_k,
    };
    let storage = match a.dtype {
        Dtype::Bf16 => contralign::ops::storage::Dtype::Bf16,
        Dtype::F32 => contralign::ops::storage::Dtype::F32,
    };
    let dumped = match &a.dump {
        Some(dir) => {
            let loss = dump_moe(&device, (shape, storage), a.tokens, a.seed, dir)?;
            Some(serde_json::json!({"dump": dir, "loss": loss}))
        }
        None => None,
    };
    let timing = time_moe(&device, (shape, storage), a.tokens, a.reps, a.seed)?;
    let mut report = serde_json::json!({
        "bench": "moe",
        "device": device.describe(),
        "case": timing,
    });
    if let Some(d) = dumped {
        report["dumped"] = d;
    }
    stdout::line(serde_json::to_string_pretty(&report)?)?;
    Ok(())
}
