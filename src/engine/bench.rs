//! A timed training step of the device engine at given shapes (`contralign bench step`):
//! random weights made in memory (no checkpoint on disk), random data of packed groups, a
//! cached reference (random statistics), the engine's precision, and the figures the
//! scoreboard reads: tokens/s, achieved TFLOP/s, model-FLOPs utilization against the H100's
//! dense bf16 peak and against a GEMM rate measured on the same device in the same run, and
//! the engine's device memory. With a dump folder it also writes what the scoreboard's PyTorch
//! side needs to compute the same first step (docs/cuda.md, "The scoreboard"): the model as a
//! Hugging Face directory of f32 weights, the groups, the cached reference and the loss.

use crate::checkpoint::{named_tensors, write_model_dir};
use crate::config::ModelConfig;
use crate::data::Group;
use crate::loss::{LossKind, LossSpec};
use crate::memory_plan::{PrecisionOptions, RecomputePolicy};
use crate::model::init::random_params_parallel;
use crate::model::params::Params;
use crate::model::{Model, ResponseStats};
use crate::ops::cuda::device::Device;
use crate::ops::cuda::gemm::Gemm;
use crate::ops::optimizer::AdamWConfig;
use crate::train::plan::{Length, StepBudget};
use crate::train::refcache::RefLookup;
use crate::train::schedule::ScheduleKind;
use crate::train::trainer::{Reference, TrainOptions, Trainer, Warmup};
use anyhow::{ensure, Context, Result};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// The H100 SXM's dense bf16 peak, the figure MFU is quoted against.
pub const H100_BF16_PEAK_TFLOPS: f64 = 989.0;

/// The shapes of a benchmarked step: `groups` groups of one `prompt`-token prompt and
/// `responses` responses of `response_len` tokens, in one micro-batch.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct StepShape {
    pub prompt: usize,
    pub responses: usize,
    pub response_len: usize,
    pub groups: usize,
}

impl StepShape {
    pub fn tokens(&self) -> usize {
        self.groups * (self.prompt + self.responses * self.response_len)
    }
}

/// How a benchmarked step runs: `steps` timed steps of `loss`, a bf16 GEMM of `gemm_size`,
/// the random draws of `seed`, and where the first step's inputs and loss are dumped.
#[derive(Clone, Copy, Debug)]
pub struct StepRun<'a> {
    pub steps: usize,
    pub gemm_size: usize,
    pub seed: u64,
    pub loss: LossKind,
    pub dump: Option<&'a Path>,
    /// The engine's stores.
    pub precision: PrecisionOptions,
}

#[derive(Debug, Serialize)]
pub struct StepTiming {
    pub device: String,
    pub layers: usize,
    pub parameters: usize,
    pub precision: String,
    pub loss: &'static str,
    pub shape: StepShape,
    pub tokens_per_step: usize,
    pub timed_steps: usize,
    /// The median over the timed steps (after one untimed step), run back to back as a run
    /// steps: each from the read of the step before it to its own read.
    pub seconds_per_step: f64,
    /// The loss of the untimed first step, on the initial weights.
    pub first_step_loss: f64,
    pub tokens_per_s: f64,
    /// Model FLOPs of a step: 6 per active parameter per token (forward and backward, no
    /// recompute counted) plus attention's 12·head_dim·heads per visible (query, key) pair
    /// per layer.
    pub model_tflop_per_step: f64,
    pub achieved_tflops: f64,
    pub mfu_vs_h100_peak: f64,
    /// A `[m, m] · [m, m]` bf16 GEMM with fp32 accumulation on the same device.
    pub gemm_size: usize,
    pub gemm_tflops: f64,
    pub mfu_vs_measured_gemm: f64,
    /// The engine's arena and workspace pool.
    pub device_bytes: usize,
    /// The memory plan's total (`contralign plan`'s), which the arena is allocated from:
    /// `device_used_bytes` against it is the plan's accuracy on a GPU.
    pub plan_bytes: u64,
    /// Measured on a GPU: its memory in use after the timed steps less before the engine was
    /// made (the driver's total − free: the arena, the pool, cuBLAS's workspace and what the
    /// driver keeps for them). The steps allocate nothing, so this is their peak. `None` on
    /// the emulator.
    pub device_used_bytes: Option<u64>,
    /// The plan's workspace (kept activations, recompute workspace, logits chunk, batch
    /// data), which the engine's pool is made of.
    pub workspace_plan_bytes: u64,
    /// The most of it the steps leased at once: against `workspace_plan_bytes`, how much of
    /// what the plan set aside a step used (counted by the pool on any device).
    pub workspace_peak_bytes: usize,
    pub note: &'static str,
}

/// Parameters a token passes through: a Mixtral layer's experts count `experts_per_token` of
/// `num_experts` times.
fn active_parameters(cfg: &ModelConfig) -> f64 {
    let all = crate::model::params::param_specs(cfg);
    all.iter()
        .map(|(name, shape)| {
            let n = shape.iter().product::<usize>() as f64;
            match &cfg.moe {
                Some(moe) if name.contains(".experts.") => {
                    n * moe.experts_per_token as f64 / moe.num_experts as f64
                }
                _ => n,
            }
        })
        .sum()
}

/// Checks that `loss` can train on groups of `shape`: at least 1 group of 2 responses of 1
/// token, and 2 responses for DPO.
pub fn check_step_shape(shape: &StepShape, loss: LossKind) -> Result<()> {
    ensure!(
        shape.groups >= 1 && shape.responses >= 2 && shape.response_len >= 1,
        "a benchmarked step needs at least 1 group and 2 responses of 1 token"
    );
    ensure!(
        loss != LossKind::Dpo || shape.responses == 2,
        "--loss dpo needs --responses 2, found {}",
        shape.responses
    );
    Ok(())
}

/// Model FLOPs of a training step of `tokens` tokens whose attention computes `pairs`
/// (query, key) pairs per layer: 6 per active parameter per token (forward and backward, no
/// recompute counted) plus attention's 12·head_dim·heads per pair per layer.
pub fn model_flops(cfg: &ModelConfig, tokens: usize, pairs: usize) -> f64 {
    let attention =
        12.0 * (cfg.head_dim * cfg.num_heads) as f64 * pairs as f64 * cfg.num_layers as f64;
    6.0 * active_parameters(cfg) * tokens as f64 + attention
}

fn random_group(rng: &mut StdRng, cfg: &ModelConfig, shape: &StepShape, index: usize) -> Group {
    let vocab = cfg.vocab_size as u32;
    let eos = cfg.eos_token_ids.first().copied().unwrap_or(0);
    let mut ids = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.gen_range(0..vocab)).collect() };
    let prompt = ids(shape.prompt);
    let responses = (0..shape.responses)
        .map(|_| {
            let mut r = ids(shape.response_len);
            if let Some(last) = r.last_mut() {
                *last = eos;
            }
            r
        })
        .collect();
    Group {
        prompt,
        responses,
        // Response 0 the best, as DPO's chosen response comes first (docs/losses.md §2).
        rewards: (0..shape.responses)
            .map(|i| (shape.responses - 1 - i) as f64)
            .collect(),
        source: format!("bench group {index}"),
    }
}

/// The bench's data: `groups` and the cached reference's statistics of their responses.
pub struct BenchData {
    pub groups: Vec<Group>,
    pub stats: Vec<ResponseStats>,
}

impl BenchData {
    /// Random groups of `shape`, `shape.groups` for each of `steps` steps, and made-up
    /// reference statistics.
    pub fn random(rng: &mut StdRng, cfg: &ModelConfig, shape: &StepShape, steps: usize) -> Self {
        let groups: Vec<Group> = (0..shape.groups * steps)
            .map(|i| random_group(rng, cfg, shape, i))
            .collect();
        let stats = groups
            .iter()
            .flat_map(|g| g.responses.iter())
            .map(|r| random_stats(rng, r.len()))
            .collect();
        BenchData { groups, stats }
    }
}

/// Made-up statistics of a response of `tokens` tokens, of a trained model's magnitudes: a
/// log-probability of −1 to −3 per token, and an EOS log-probability of −0.1 to −2.
pub fn random_stats(rng: &mut StdRng, tokens: usize) -> ResponseStats {
    let logp_sum = -(tokens as f64) * rng.gen_range(1.0..3.0);
    ResponseStats {
        logp_sum,
        tokens,
        logp_mean: logp_sum / tokens as f64,
        eos_logp: Some(-rng.gen_range(0.1..2.0)),
    }
}

/// How the bench's trainer steps: `shape.groups` groups per step with `spec`, the engine's
/// `precision`, selective recompute, a constant tiny learning rate, for `steps` steps.
pub struct BenchSetup {
    pub shape: StepShape,
    pub spec: LossSpec,
    pub precision: PrecisionOptions,
    pub seed: u64,
    pub steps: usize,
}

impl BenchSetup {
    /// A trainer of a model of `cfg` with weights `initial` on `device`, over `data` with its
    /// cached reference.
    pub fn trainer(
        &self,
        device: Device,
        cfg: &ModelConfig,
        initial: Vec<Vec<f32>>,
        data: &BenchData,
    ) -> Result<Trainer> {
        let mut tensors = initial.into_iter();
        let params = Params::build(cfg, |_, _| Ok(tensors.next().expect("one per tensor")))?;
        let policy = Model {
            cfg: cfg.clone(),
            params,
            dtype: safetensors::Dtype::BF16,
        };
        let reference = Reference::Cache(RefLookup::from_stats(&data.groups, &data.stats));
        let opts = TrainOptions {
            spec: self.spec.clone(),
            aux_coef: cfg.default_aux_coef(),
            recompute: RecomputePolicy::Selective,
            precision: self.precision,
            budget: StepBudget::Groups(self.shape.groups),
            micro_tokens: self.shape.tokens(),
            seed: self.seed,
            length: Length::Steps(self.steps as u64),
            adamw: AdamWConfig::default(),
            schedule: ScheduleKind::Constant,
            lr: 1e-6,
            warmup: Warmup::Steps(0),
            max_grad_norm: 1.0,
            max_bad_steps: u32::MAX,
        };
        let mut trainer = Trainer::new(opts, policy, reference, data.groups.clone())?;
        trainer.use_device(device)?;
        Ok(trainer)
    }
}

/// The device's bf16 GEMM rate at `[m, m] · [m, m]`, the median of `reps` runs.
fn gemm_tflops(device: &Device, m: usize, reps: usize) -> Result<f64> {
    let a = device.alloc::<bf16>(m * m)?;
    let b = device.alloc::<bf16>(m * m)?;
    let mut c = device.alloc::<bf16>(m * m)?;
    let g = Gemm::projection(m, m, m);
    device.gemm(&g, &a, &b, &mut c)?;
    device.synchronize()?;
    let mut times = Vec::new();
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        device.gemm(&g, &a, &b, &mut c)?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(2.0 * (m as f64).powi(3) / median(&mut times) / 1e12)
}

fn median(x: &mut [f64]) -> f64 {
    x.sort_by(f64::total_cmp);
    x[x.len() / 2]
}

/// What the PyTorch side reads to compute the first step (tools/scoreboard/trl_step.py).
#[derive(Serialize)]
struct StepDump<'a> {
    loss: &'static str,
    beta: f64,
    alpha: f64,
    groups: Vec<DumpedGroup<'a>>,
    first_step_loss: f64,
}

#[derive(Serialize)]
struct DumpedGroup<'a> {
    prompt: &'a [u32],
    responses: &'a [Vec<u32>],
    rewards: &'a [f64],
    ref_logp_sum: Vec<f64>,
}

fn write_dump(dir: &Path, cfg: &ModelConfig, tensors: &[Vec<f32>], dump: StepDump) -> Result<()> {
    let model = dir.join("model");
    std::fs::create_dir_all(&model)
        .with_context(|| format!("--dump: cannot create {}", model.display()))?;
    let specs = crate::model::params::param_specs(cfg);
    let named = named_tensors(&specs, "", tensors);
    write_model_dir(
        &model,
        &cfg.raw,
        &named,
        safetensors::Dtype::F32,
        usize::MAX,
        None,
    )?;
    let path = dir.join("step.json");
    crate::fsutil::write_atomically(&path, serde_json::to_string(&dump)?.as_bytes())
        .with_context(|| format!("--dump: cannot write {}", path.display()))
}

/// Times `run.steps` steps of `run.loss` (after one untimed step) of a model of `cfg` with
/// random weights on `device`, and a bf16 GEMM of `run.gemm_size`. With `run.dump`, the step
/// trains on `shape.groups` groups only (every step the same ones, so that the first step's
/// loss is theirs) and the dump folder gets the model, the groups and that loss.
pub fn time_step(
    device: Device,
    cfg: &ModelConfig,
    shape: StepShape,
    run: StepRun,
) -> Result<StepTiming> {
    let StepRun {
        steps,
        gemm_size,
        seed,
        loss,
        dump,
        precision,
    } = run;
    ensure!(steps >= 1, "bench step needs at least 1 timed step");
    check_step_shape(&shape, loss)?;
    let described = device.describe();
    let emulated = matches!(device, Device::Emu);
    let gemm = gemm_tflops(&device, gemm_size, 5)?;
    let initial = random_params_parallel(cfg, seed)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let kept = dump.map(|_| initial.clone());
    let steps_drawn = if dump.is_some() { 1 } else { steps + 1 };
    let data = BenchData::random(&mut rng, cfg, &shape, steps_drawn);
    let spec = LossSpec::new(loss);
    let setup = BenchSetup {
        shape,
        spec: spec.clone(),
        precision,
        seed,
        steps: steps + 1,
    };
    let used_before = device.used_memory()?;
    let mut trainer = setup.trainer(device, cfg, initial, &data)?;
    let BenchData { groups, stats } = data;
    let first_step_loss = trainer.step_to_end()?.loss;
    if let (Some(dir), Some(tensors)) = (dump, &kept) {
        let mut refs = stats.iter();
        let dumped = groups
            .iter()
            .map(|g| DumpedGroup {
                prompt: &g.prompt,
                responses: &g.responses,
                rewards: &g.rewards,
                ref_logp_sum: refs
                    .by_ref()
                    .take(g.responses.len())
                    .map(|s| s.logp_sum)
                    .collect(),
            })
            .collect();
        let record = StepDump {
            loss: loss.name(),
            beta: spec.beta,
            alpha: spec.alpha,
            groups: dumped,
            first_step_loss,
        };
        write_dump(dir, cfg, tensors, record)?;
    }
    // Back to back, as a run steps on a device (each step's scalars read while the next
    // runs); a step's time runs from the read of the step before it to its own.
    let mut records = Vec::new();
    for _ in 0..steps {
        records.extend(trainer.train_step()?);
    }
    records.extend(trainer.flush()?);
    let mut times: Vec<f64> = records
        .iter()
        .map(|r| r.tokens as f64 / r.tokens_per_s)
        .collect();
    let seconds = median(&mut times);
    let used_after = match trainer.device() {
        Some(d) => d.used_memory()?,
        None => None,
    };
    let device_used_bytes = used_before
        .zip(used_after)
        .map(|(before, after)| after.saturating_sub(before));
    let layout = crate::step::pack(&trainer.policy, &groups[..shape.groups])?.layout;
    let pairs: usize = (0..layout.len()).map(|t| layout.keys(t).count()).sum();
    let tokens = shape.tokens();
    let flops = model_flops(cfg, tokens, pairs);
    let achieved = flops / seconds / 1e12;
    let plan = trainer.device_plan()?;
    Ok(StepTiming {
        device: described,
        layers: cfg.num_layers,
        parameters: crate::model::params::param_specs(cfg)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum(),
        precision: precision.describe(),
        loss: loss.name(),
        shape,
        tokens_per_step: tokens,
        timed_steps: steps,
        seconds_per_step: seconds,
        first_step_loss,
        tokens_per_s: tokens as f64 / seconds,
        model_tflop_per_step: flops / 1e12,
        achieved_tflops: achieved,
        mfu_vs_h100_peak: achieved / H100_BF16_PEAK_TFLOPS,
        gemm_size,
        gemm_tflops: gemm,
        mfu_vs_measured_gemm: achieved / gemm,
        device_bytes: trainer.device_bytes().unwrap_or(0),
        plan_bytes: plan.total(),
        device_used_bytes,
        workspace_plan_bytes: plan.workspace_bytes(),
        workspace_peak_bytes: trainer.workspace_peak().unwrap_or(0),
        note: if emulated {
            "the emulator's times: they check the command, they measure nothing about a GPU"
        } else {
            "wall time of whole steps: the batch's upload, forward, backward, AdamW and the \
             loss read back"
        },
    })
}
