//! The training loop's step: the groups of the plan, split into micro-batches whose
//! gradients accumulate into the gradient of the mean loss over the step's groups, then
//! clipping and AdamW. A step whose loss or gradient is not finite is skipped.

use super::optimizer::{clip_global_norm, AdamW, AdamWConfig, FlatStep};
use super::plan::{Cursor, Length, Planner, Position, StepBudget};
use super::refcache::RefLookup;
use super::rounded::RoundedStores;
use super::schedule::{Schedule, ScheduleKind};
use crate::data::Group;
use crate::engine::ledger::StepScalars;
use crate::engine::{DeviceEngine, Moment, Update};
use crate::loss::LossSpec;
use crate::memory_plan::{MemoryPlan, PrecisionOptions, RecomputePolicy, ReferenceSource};
use crate::model::params::Params;
use crate::model::{Model, ResponseStats, StepOptions};
use crate::ops::cpu::{CpuOps, Stored};
use crate::ops::cuda::device::Device;
use crate::step::{self, Logged, RefStats};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::time::Instant;

/// Warmup of the learning-rate schedule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Warmup {
    Steps(u64),
    Ratio(f64),
}

/// Everything that decides what a run computes.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub spec: LossSpec,
    pub aux_coef: f64,
    /// What the backward recomputes of each layer's forward.
    pub recompute: RecomputePolicy,
    /// What weights, gradients, moments and activations are stored in (docs/numerics.md §7);
    /// on the CPU, bf16 is the reference's bf16-rounding mode.
    pub precision: PrecisionOptions,
    pub budget: StepBudget,
    /// The most packed tokens one forward/backward holds; a step beyond it accumulates.
    pub micro_tokens: usize,
    pub seed: u64,
    pub length: Length,
    pub adamw: AdamWConfig,
    pub schedule: ScheduleKind,
    pub lr: f64,
    pub warmup: Warmup,
    /// 0 disables clipping.
    pub max_grad_norm: f64,
    /// A run stops after this many non-finite steps in a row.
    pub max_bad_steps: u32,
}

impl TrainOptions {
    /// Every value checked on its own, before any data or model is read.
    pub fn validate(&self) -> Result<()> {
        self.spec.validate()?;
        self.adamw.validate()?;
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            bail!("--lr must be >= 0, found {}", self.lr);
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            bail!(
                "--max-grad-norm must be >= 0 (0 disables clipping), found {}",
                self.max_grad_norm
            );
        }
        if let Warmup::Ratio(ratio) = self.warmup {
            if !(0.0..=1.0).contains(&ratio) {
                bail!("--warmup-ratio must be in [0, 1], found {ratio}");
            }
        }
        if self.micro_tokens == 0 {
            bail!("--micro-tokens must be at least 1");
        }
        Ok(())
    }
}

/// Where the reference statistics come from.
pub enum Reference {
    /// The loss is reference-free.
    None,
    Model(Box<Model<Vec<f32>>>),
    Cache(RefLookup),
    /// The reference model, resident on the training device only: its host copy is freed
    /// once uploaded (29 GB in f32 for a 7B).
    OnDevice,
}

/// The resumable state of a run, besides weights and optimizer moments.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps taken (skipped ones included).
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u64,
    pub step_in_epoch: usize,
    /// The shuffle seed; the shuffle of epoch e is stream e of it.
    pub seed: u64,
    pub optimizer_step: u64,
    pub bad_steps_in_a_row: u32,
    /// The hash of the training data's token ids, so that a resume on changed data is
    /// refused.
    pub data_hash: String,
    /// The hash of its token ids and rewards (absent in the state of a run saved before it
    /// was recorded, whose resume checks the ids alone).
    #[serde(default)]
    pub training_hash: Option<String>,
    /// How the run cuts its epochs into steps, which a resume must keep (absent in the state
    /// of a run saved before it was recorded).
    #[serde(default)]
    pub budget: Option<StepBudget>,
}

/// What one step did, for metrics.jsonl.
#[derive(Clone, Debug)]
pub struct StepRecord {
    pub step: u64,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub groups: usize,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub metrics: Vec<(String, f64)>,
    pub aux_loss: Option<f64>,
    /// Why the update was skipped, if it was.
    pub skipped: Option<String>,
}

impl StepRecord {
    /// One line of metrics.jsonl; non-finite numbers become null.
    pub fn to_json(&self) -> serde_json::Value {
        let num = |x: f64| {
            serde_json::Number::from_f64(x)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null)
        };
        let mut m = serde_json::Map::new();
        m.insert("step".into(), self.step.into());
        m.insert("epoch".into(), num(self.epoch));
        if let Some(reason) = &self.skipped {
            m.insert("skipped".into(), reason.clone().into());
        }
        m.insert("loss".into(), num(self.loss));
        m.insert("lr".into(), num(self.lr));
        m.insert("grad_norm".into(), num(self.grad_norm));
        m.insert("tokens_per_s".into(), num(self.tokens_per_s));
        m.insert("groups".into(), self.groups.into());
        m.insert("tokens".into(), self.tokens.into());
        for (k, v) in &self.metrics {
            m.insert(k.clone(), num(*v));
        }
        if let Some(aux) = self.aux_loss {
            m.insert("aux_loss".into(), num(aux));
        }
        serde_json::Value::Object(m)
    }
}

/// Why held-out groups cannot be evaluated against a cache of reference log-probs.
pub const HELD_OUT_NEEDS_A_MODEL: &str = "--eval-data with --ref-logps: the reference \
    statistics cover the training data only; give --ref-model DIR for the held-out groups";

/// The most packed tokens a pass over `groups` in micro-batches of `micro_tokens` holds: a
/// longer group runs alone.
pub fn longest_pass(groups: &[Group], micro_tokens: usize) -> usize {
    groups
        .iter()
        .map(Group::packed_len)
        .fold(micro_tokens, usize::max)
}

/// Why a step's update is dropped, if it is.
fn skip_reason(loss: f64, grad_norm: f64) -> Option<String> {
    if !loss.is_finite() {
        Some("non-finite loss".to_string())
    } else if !grad_norm.is_finite() {
        Some("non-finite gradient".to_string())
    } else {
        None
    }
}

pub struct Trainer {
    pub opts: TrainOptions,
    pub policy: Model<Vec<f32>>,
    reference: Reference,
    groups: Vec<Group>,
    planner: Planner,
    cursor: Cursor,
    pub schedule: Schedule,
    pub optimizer: AdamW,
    /// Optimizer steps taken (skipped ones included).
    pub step: u64,
    pub bad_steps_in_a_row: u32,
    /// [`TrainerState::data_hash`] and [`TrainerState::training_hash`] of its groups.
    data_hash: String,
    training_hash: String,
    /// Where the policy trains when not on the CPU; `policy` then holds the weights as of
    /// the last [`Trainer::sync_weights_to_host`], and `optimizer` its step count, its moments
    /// only after a [`Trainer::sync_to_host`].
    engine: Option<DeviceEngine>,
    /// On the CPU with bf16 stores: the bf16-rounding mode's stores.
    rounded: Option<RoundedStores>,
    /// The most packed tokens one pass on a device holds, which its memory plan is made for:
    /// `--micro-tokens`, or the longest group that runs as a pass of its own.
    pass_tokens: usize,
    /// On a device, the step queued last whose scalars are not read yet.
    in_flight: Option<QueuedStep>,
    /// The record of a step read when the step after it failed to queue, for the next
    /// [`Trainer::flush`]: a failed step loses no record of the steps before it.
    unreported: Option<StepRecord>,
    /// When the host last read a step's scalars: the start of the next step's time on a
    /// device that runs the steps back to back.
    last_read: Option<Instant>,
}

/// What the host knows of a queued step before its scalars are read.
struct QueuedStep {
    step: u64,
    epoch: f64,
    lr: f64,
    groups: usize,
    tokens: usize,
    queued_at: Instant,
}

impl QueuedStep {
    /// The step's record, from what it logged, whether its update was dropped and the
    /// seconds it took.
    fn record(
        &self,
        logged: Logged,
        grad_norm: f64,
        skipped: Option<String>,
        seconds: f64,
    ) -> StepRecord {
        StepRecord {
            step: self.step,
            epoch: self.epoch,
            loss: logged.loss,
            lr: self.lr,
            grad_norm,
            groups: self.groups,
            tokens: self.tokens,
            tokens_per_s: self.tokens as f64 / seconds,
            metrics: logged.metrics.means(),
            aux_loss: logged.aux_loss,
            skipped,
        }
    }
}

/// A step's gradients on the CPU: f32, or in the bf16-rounding mode's stores.
enum HostGrads {
    Exact(Params<Vec<f32>>),
    Rounded(Params<Stored>),
}

impl Trainer {
    /// A fresh run. `groups` are the groups the loss sees (pairs already cut).
    pub fn new(
        opts: TrainOptions,
        mut policy: Model<Vec<f32>>,
        reference: Reference,
        groups: Vec<Group>,
    ) -> Result<Self> {
        opts.validate()?;
        if opts.spec.kind.needs_reference() && matches!(reference, Reference::None) {
            bail!(
                "--loss {} compares the policy with a reference model: give --ref-model DIR \
                 or --ref-logps FILE",
                opts.spec.kind.name()
            );
        }
        for g in &groups {
            g.check_vocab(policy.cfg.vocab_size)?;
        }
        let planner = Planner::new(
            groups.iter().map(Group::packed_len).collect(),
            opts.seed,
            opts.budget,
        )?;
        let total_steps = planner.total_steps(opts.length)?;
        if total_steps == 0 {
            bail!("the run has no steps: give --steps N or --epochs N with N >= 1");
        }
        let schedule = match opts.warmup {
            Warmup::Steps(w) => Schedule {
                kind: opts.schedule,
                lr: opts.lr,
                warmup_steps: w,
                total_steps,
            },
            Warmup::Ratio(r) => {
                Schedule::with_warmup_ratio(opts.schedule, opts.lr, r, total_steps)?
            }
        };
        let sizes: Vec<usize> = policy.params.iter().iter().map(|p| p.len()).collect();
        let optimizer = AdamW::new(opts.adamw.clone(), &sizes);
        let cursor = Cursor::new(&planner, Position::default());
        let data_hash = super::refcache::data_hash(&groups);
        let training_hash = super::refcache::training_data_hash(&groups);
        let pass_tokens = longest_pass(&groups, opts.micro_tokens);
        let rounded = (opts.precision != PrecisionOptions::all_f32())
            .then(|| RoundedStores::new(opts.precision, &mut policy));
        Ok(Trainer {
            opts,
            policy,
            reference,
            groups,
            planner,
            cursor,
            schedule,
            optimizer,
            step: 0,
            bad_steps_in_a_row: 0,
            data_hash,
            training_hash,
            engine: None,
            rounded,
            pass_tokens,
            in_flight: None,
            unreported: None,
            last_read: None,
        })
    }

    pub fn total_steps(&self) -> u64 {
        self.schedule.total_steps
    }

    pub fn done(&self) -> bool {
        self.step >= self.total_steps()
    }

    /// Whether the run must stop because too many steps in a row were not finite.
    pub fn too_many_bad_steps(&self) -> bool {
        self.bad_steps_in_a_row >= self.opts.max_bad_steps
    }

    pub fn state(&self) -> TrainerState {
        TrainerState {
            step: self.step,
            total_steps: self.total_steps(),
            epoch: self.cursor.position.epoch,
            step_in_epoch: self.cursor.position.step_in_epoch,
            seed: self.opts.seed,
            optimizer_step: self.optimizer.step,
            bad_steps_in_a_row: self.bad_steps_in_a_row,
            data_hash: self.data_hash.clone(),
            training_hash: Some(self.training_hash.clone()),
            budget: Some(self.opts.budget),
        }
    }

    /// That a run of `state` can continue with this trainer's data and seed.
    pub fn check_resumable(&self, state: &TrainerState) -> Result<()> {
        let (then, now, what) = match &state.training_hash {
            Some(saved) => (saved, &self.training_hash, "its token ids and rewards"),
            None => (&state.data_hash, &self.data_hash, "its token ids"),
        };
        if then != now {
            bail!(
                "the training data differs from the data the run was started with (hash of \
                 {what} {}… then, {}… now): a resume must see the same data",
                &then[..12.min(then.len())],
                &now[..12]
            );
        }
        if let Some(saved) = state.budget.filter(|b| *b != self.opts.budget) {
            bail!(
                "{} differs from the run's {}: a resume continues the run's cut of its epochs \
                 into steps (start a new run to change it)",
                self.opts.budget.flag(),
                saved.flag()
            );
        }
        if state.seed != self.opts.seed {
            bail!(
                "--seed {} differs from the run's seed {}: a resume must shuffle the same way",
                self.opts.seed,
                state.seed
            );
        }
        Ok(())
    }

    /// Continues a run from its state (the weights are already in `policy`) and its AdamW
    /// moments, `moments(which, index)` giving each tensor in checkpoint order: on a device
    /// ([`Trainer::use_device`] first) they go up one tensor at a time, never all on the host.
    pub fn restore(
        &mut self,
        state: &TrainerState,
        mut moments: impl FnMut(Moment, usize) -> Result<Vec<f32>>,
    ) -> Result<()> {
        self.check_resumable(state)?;
        self.step = state.step;
        self.bad_steps_in_a_row = state.bad_steps_in_a_row;
        self.cursor = Cursor::new(
            &self.planner,
            Position {
                epoch: state.epoch,
                step_in_epoch: state.step_in_epoch,
            },
        );
        self.optimizer.step = state.optimizer_step;
        let tensors = self.policy.params.iter().len();
        match &mut self.engine {
            Some(engine) => {
                for which in [Moment::ExpAvg, Moment::ExpAvgSq] {
                    for i in 0..tensors {
                        engine.set_moment(which, i, &moments(which, i)?)?;
                    }
                }
            }
            None => {
                let mut all = |which| -> Result<Vec<Vec<f32>>> {
                    (0..tensors).map(|i| moments(which, i)).collect()
                };
                self.optimizer.exp_avg = all(Moment::ExpAvg)?;
                self.optimizer.exp_avg_sq = all(Moment::ExpAvgSq)?;
            }
        }
        Ok(())
    }

    /// The most packed tokens one pass on a device holds: `--micro-tokens`, or more where a
    /// group is longer (it runs as a pass of its own), training or held-out
    /// ([`Trainer::plan_passes_of`]).
    pub fn pass_tokens(&self) -> usize {
        self.pass_tokens
    }

    /// Makes the device plan hold a pass over each of `groups` too (held-out groups, which
    /// the device evaluates in passes of `--micro-tokens`, a longer group alone), so that no
    /// pass needs more than the plan; before [`Trainer::use_device`].
    pub fn plan_passes_of(&mut self, groups: &[Group]) -> Result<()> {
        if self.engine.is_some() {
            bail!("the device's memory is planned already: plan the passes before using it");
        }
        self.pass_tokens = self
            .pass_tokens
            .max(longest_pass(groups, self.opts.micro_tokens));
        Ok(())
    }

    /// The memory plan of this run on a device ([`DeviceEngine::plan`]), for passes of
    /// [`Trainer::pass_tokens`].
    pub fn device_plan(&self) -> Result<MemoryPlan> {
        DeviceEngine::plan(
            &self.policy.cfg,
            self.pass_tokens,
            self.opts.recompute,
            self.reference_source(),
            self.opts.precision,
        )
    }

    /// Where the device engine takes the reference's statistics from: a reference model is
    /// resident on the device beside the policy, a cache is looked up on the host.
    fn reference_source(&self) -> ReferenceSource {
        match &self.reference {
            _ if !self.opts.spec.kind.needs_reference() => ReferenceSource::None,
            Reference::Model(_) | Reference::OnDevice => ReferenceSource::Resident,
            Reference::Cache(_) | Reference::None => ReferenceSource::Cached,
        }
    }

    /// Moves the training onto `device`: the weights and moments as they are now (fresh, or
    /// restored), in the device engine from here on, allocated as [`Trainer::device_plan`].
    pub fn use_device(&mut self, device: Device) -> Result<()> {
        let resident = match (&self.reference, self.reference_source()) {
            (Reference::Model(m), ReferenceSource::Resident) => Some(m.as_ref()),
            _ => None,
        };
        let mut engine = DeviceEngine::new(device, &self.policy, resident, &self.device_plan()?)?;
        // A fresh optimizer's moments are the engine's zeros already: uploading them would
        // read (and fault in) two host copies of the parameters' size (58 GB for 7B).
        if self.optimizer.step > 0 {
            engine.set_moments(&self.optimizer.exp_avg, &self.optimizer.exp_avg_sq)?;
        }
        // The moments live on the device from here on: the host's copies (58 GB in f32 for a
        // 7B after a resume) are freed; `sync_to_host` brings them back where wanted.
        self.optimizer.exp_avg = Vec::new();
        self.optimizer.exp_avg_sq = Vec::new();
        if engine.has_reference() {
            self.reference = Reference::OnDevice;
        }
        self.engine = Some(engine);
        self.rounded = None;
        Ok(())
    }

    /// The device the run trains on, if not the CPU.
    pub fn device(&self) -> Option<&Device> {
        self.engine.as_ref().map(DeviceEngine::device)
    }

    /// Bytes of device memory the engine holds, when the run is on a device.
    pub fn device_bytes(&self) -> Option<usize> {
        self.engine.as_ref().map(DeviceEngine::device_bytes)
    }

    /// The most bytes of the device engine's workspace leased at once, when the run is on a
    /// device.
    pub fn workspace_peak(&self) -> Option<usize> {
        self.engine.as_ref().map(DeviceEngine::workspace_peak)
    }

    /// On a device, the policy as the last step left it, brought back (`policy` there holds
    /// the last checkpoint's weights); `None` on the CPU, where `policy` is current.
    pub fn device_policy(&self) -> Result<Option<Model<Vec<f32>>>> {
        self.settled("the device's policy")?;
        let Some(engine) = &self.engine else {
            return Ok(None);
        };
        let mut weights = engine.weights()?.into_iter();
        let params = Params::build(&self.policy.cfg, |name, _| {
            weights
                .next()
                .with_context(|| format!("the device engine holds no tensor for {name}"))
        })?;
        Ok(Some(Model {
            cfg: self.policy.cfg.clone(),
            params,
            dtype: self.policy.dtype,
        }))
    }

    /// The policy's evaluation of held-out `groups` (no gradient), in passes of the run's
    /// micro-batch tokens, under the weights the last step left: on the device where the run
    /// trains there (only statistics come back), else on the CPU.
    pub fn evaluate(
        &self,
        groups: &[Group],
        ref_stats: Option<&[ResponseStats]>,
    ) -> Result<step::Evaluation> {
        self.settled("a held-out evaluation")?;
        let (spec, aux_coef) = (&self.opts.spec, self.opts.aux_coef);
        let max_tokens = self.opts.micro_tokens.max(1);
        match &self.engine {
            Some(engine) => {
                engine.evaluate_in_passes(ref_stats, groups, spec, aux_coef, max_tokens)
            }
            // The bf16-rounding mode evaluates the weights as the engine stores them.
            None => match &self.rounded {
                Some(stores) => step::evaluate_in_passes(
                    &stores.ops(),
                    &stores.model(&self.policy),
                    ref_stats,
                    groups,
                    spec,
                    aux_coef,
                    max_tokens,
                    |_| {},
                ),
                None => step::evaluate_in_passes(
                    &CpuOps,
                    &self.policy,
                    ref_stats,
                    groups,
                    spec,
                    aux_coef,
                    max_tokens,
                    |_| {},
                ),
            },
        }
    }

    /// The frozen reference's statistics of held-out `groups` (`None` when the loss needs
    /// none), in passes of the run's micro-batch tokens: on the device where the reference is
    /// resident there, else from the reference model on the CPU. A cache of reference
    /// log-probs covers the training data only.
    pub fn held_out_reference_stats(&self, groups: &[Group]) -> Result<Option<Vec<ResponseStats>>> {
        let (spec, max_tokens) = (&self.opts.spec, self.opts.micro_tokens.max(1));
        if let Some(engine) = self.engine.as_ref().filter(|e| e.has_reference()) {
            return engine.reference_stats_in_passes(groups, spec, max_tokens);
        }
        let reference = match &self.reference {
            Reference::Model(model) => Some(model.as_ref()),
            Reference::None => None,
            Reference::Cache(_) => bail!("{HELD_OUT_NEEDS_A_MODEL}"),
            Reference::OnDevice => bail!("the reference model is on a device the run left"),
        };
        self.host_reference_stats(reference, groups, max_tokens)
    }

    /// The reference's statistics of `groups` on the host, in passes of `max_tokens`; the
    /// bf16-rounding mode scores the reference as the engine does, in bf16.
    fn host_reference_stats(
        &self,
        reference: Option<&Model<Vec<f32>>>,
        groups: &[Group],
        max_tokens: usize,
    ) -> Result<Option<Vec<ResponseStats>>> {
        let spec = &self.opts.spec;
        match &self.rounded {
            Some(stores) => step::reference_stats_in_passes(
                &stores.ops(),
                &stores.model(&self.policy),
                reference.map(|m| stores.model(m)).as_ref(),
                groups,
                spec,
                max_tokens,
            ),
            None => step::reference_stats_in_passes(
                &CpuOps,
                &self.policy,
                reference,
                groups,
                spec,
                max_tokens,
            ),
        }
    }

    /// Brings the device's weights into `policy` (before a checkpoint is written from it);
    /// nothing to do on the CPU.
    pub fn sync_weights_to_host(&mut self) -> Result<()> {
        self.settled("bringing the weights back")?;
        if let Some(engine) = &self.engine {
            // One tensor at a time: the host never holds a second copy of the weights.
            for (i, host) in self.policy.params.iter_mut().into_iter().enumerate() {
                *host = engine.weight(i)?;
            }
        }
        Ok(())
    }

    /// Brings the device's weights and moments into `policy` and `optimizer`; nothing to do
    /// on the CPU. (A checkpoint needs only the weights: [`Trainer::moment`] streams the
    /// moments.)
    pub fn sync_to_host(&mut self) -> Result<()> {
        self.sync_weights_to_host()?;
        if let Some(engine) = &self.engine {
            let (m, v) = engine.moments()?;
            self.optimizer.exp_avg = m;
            self.optimizer.exp_avg_sq = v;
        }
        Ok(())
    }

    /// Tensor `index` (in checkpoint order) of one AdamW moment as the training holds it now:
    /// downloaded alone from the device, or the optimizer's on the CPU.
    pub fn moment(&self, which: Moment, index: usize) -> Result<Cow<'_, [f32]>> {
        self.settled("reading a moment")?;
        if let Some(engine) = &self.engine {
            return Ok(Cow::Owned(engine.moment(which, index)?));
        }
        let moments = match which {
            Moment::ExpAvg => &self.optimizer.exp_avg,
            Moment::ExpAvgSq => &self.optimizer.exp_avg_sq,
        };
        let tensor = moments
            .get(index)
            .with_context(|| format!("the optimizer has no moment tensor {index}"))?;
        Ok(Cow::Borrowed(tensor))
    }

    fn reference_stats(&self, groups: &[Group]) -> Result<Option<Vec<ResponseStats>>> {
        if !self.opts.spec.kind.needs_reference() {
            return Ok(None);
        }
        match &self.reference {
            Reference::None => bail!("no reference statistics"),
            Reference::Model(m) => self.host_reference_stats(Some(m), groups, usize::MAX),
            Reference::Cache(lookup) => Ok(Some(lookup.stats(groups)?)),
            // The engine scores a resident reference itself, in each micro-batch.
            Reference::OnDevice => bail!("the reference model is resident on the device"),
        }
    }

    /// Whether a step's scalars wait for their read ([`Trainer::flush`]): on a device, the
    /// step queued last until the next one reads them, or a record read but not returned
    /// because the step after it failed.
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some() || self.unreported.is_some()
    }

    /// That no step is in flight: `what` reads the weights a step left, which on a device
    /// are those of the step queued last only once its record is read.
    fn settled(&self, what: &str) -> Result<()> {
        if self.in_flight() {
            bail!("{what} while a step is in flight: flush it first");
        }
        Ok(())
    }

    /// One optimizer step. On the CPU it runs to its end and its record comes back. On a
    /// device it is queued, and what comes back is the record of the step before it, read
    /// while this one runs (none for a run's first step, or after a [`Trainer::flush`]): the
    /// host never waits for a step to end before it queues the next. The update is dropped
    /// when a loss or the gradient is not finite.
    pub fn train_step(&mut self) -> Result<Option<StepRecord>> {
        let queued_at = Instant::now();
        let (indices, epoch) = self.cursor.next_step(&self.planner);
        let step_groups: Vec<Group> = indices.iter().map(|&i| self.groups[i].clone()).collect();
        let n = step_groups.len() as f64;
        let step_opts = StepOptions {
            recompute: self.opts.recompute,
            aux_coef: self.opts.aux_coef,
        };
        let mut grads = match (&self.engine, &self.rounded) {
            (Some(engine), _) => {
                engine.zero_grads()?;
                None
            }
            (None, Some(stores)) => Some(HostGrads::Rounded(stores.zero_grads(&self.policy))),
            (None, None) => Some(HostGrads::Exact(self.policy.zeros_like(&CpuOps))),
        };
        let rounded_policy = self.rounded.as_ref().map(|s| s.model(&self.policy));
        let mut total = Logged::default();
        let mut first = 0;
        for micro in self.planner.micro_batches(&indices, self.opts.micro_tokens) {
            let groups = &step_groups[first..first + micro.len()];
            first += micro.len();
            // A reference resident on the device is scored there, by the engine.
            let refs = match &self.engine {
                Some(engine) if engine.has_reference() => None,
                _ => self.reference_stats(groups)?,
            };
            // The step's loss is the mean over its groups: each micro-batch's mean counts
            // in proportion to its groups, and so does its gradient.
            let share = groups.len() as f64 / n;
            let (spec, reference) = (&self.opts.spec, RefStats::from_host(refs.as_deref()));
            match (&mut self.engine, &mut grads) {
                (Some(engine), _) => {
                    engine.accumulate(refs.as_deref(), groups, spec, &step_opts, share)?
                }
                (None, Some(HostGrads::Exact(grads))) => {
                    let policy = &self.policy;
                    let pass = step::accumulate_and_read(
                        &CpuOps, policy, reference, groups, spec, &step_opts, share, grads,
                    )?;
                    total.add(share, pass);
                }
                (None, Some(HostGrads::Rounded(grads))) => {
                    let ops = self.rounded.as_ref().expect("rounded stores").ops();
                    let policy = rounded_policy.as_ref().expect("made with the stores");
                    let pass = step::accumulate_and_read(
                        &ops, policy, reference, groups, spec, &step_opts, share, grads,
                    )?;
                    total.add(share, pass);
                }
                (None, None) => unreachable!("CPU gradients exist without an engine"),
            }
        }
        let lr = self.schedule.lr_at(self.step);
        self.step += 1;
        let queued = QueuedStep {
            step: self.step,
            epoch,
            lr,
            groups: step_groups.len(),
            tokens: self.planner.tokens(&indices),
            queued_at,
        };
        let Some(grads) = grads else {
            // On the device: the step before is read now, while this one runs, and settles
            // the optimizer's step count that this step's AdamW launch takes.
            let previous = self.flush()?;
            let update = Update {
                config: &self.opts.adamw,
                step: self.optimizer.step + 1,
                lr,
                seed: self.opts.seed,
            };
            let engine = self.engine.as_mut().expect("no CPU gradients: on a device");
            if let Err(err) = engine.finish_step(update, self.opts.max_grad_norm) {
                self.unreported = previous;
                return Err(err);
            }
            self.in_flight = Some(queued);
            return Ok(previous);
        };
        let (grad_norm, skipped) = match grads {
            HostGrads::Exact(mut grads) => {
                let norm = clip_global_norm(&mut grads.iter_mut(), self.opts.max_grad_norm);
                let skipped = skip_reason(total.loss, norm);
                if skipped.is_none() {
                    self.optimizer
                        .update(&mut self.policy.params.iter_mut(), &grads.iter(), lr);
                }
                (norm, skipped)
            }
            HostGrads::Rounded(grads) => {
                let (norm, coef) = RoundedStores::norm_and_coef(&grads, self.opts.max_grad_norm);
                let skipped = skip_reason(total.loss, norm);
                if skipped.is_none() {
                    let (adamw, seed) = (&self.opts.adamw, self.opts.seed);
                    let step = FlatStep::new(adamw, self.optimizer.step + 1, lr, seed);
                    let stores = self.rounded.as_ref().expect("rounded stores");
                    stores.update(&mut self.policy, &mut self.optimizer, &grads, &step, coef);
                    self.optimizer.step += 1;
                }
                (norm, skipped)
            }
        };
        self.settle(skipped.is_some());
        let seconds = queued_at.elapsed().as_secs_f64();
        Ok(Some(queued.record(total, grad_norm, skipped, seconds)))
    }

    /// Reads the scalars of the step in flight on a device, waiting for its end, and returns
    /// its record; `None` when no step is in flight (always on the CPU). After a failed
    /// [`Trainer::train_step`], the record of the step before it, read or still in flight.
    pub fn flush(&mut self) -> Result<Option<StepRecord>> {
        if let Some(record) = self.unreported.take() {
            return Ok(Some(record));
        }
        let Some(queued) = self.in_flight.take() else {
            return Ok(None);
        };
        let engine = self
            .engine
            .as_mut()
            .context("a step in flight without a device")?;
        let StepScalars {
            logged,
            grad_norm,
            dropped,
        } = engine
            .read_finished_step(self.opts.aux_coef)?
            .context("the device engine holds no scalars of the step in flight")?;
        let now = Instant::now();
        // Back to back on the device, a step's time starts where the one before it ended.
        let start = self
            .last_read
            .map_or(queued.queued_at, |t| t.max(queued.queued_at));
        self.last_read = Some(now);
        // The device decided; the reason is told from the scalars it dropped the step for.
        let skipped = dropped.then(|| {
            skip_reason(logged.loss, grad_norm).unwrap_or_else(|| "non-finite loss".to_string())
        });
        if !dropped {
            self.optimizer.step += 1;
        }
        self.settle(dropped);
        let seconds = (now - start).as_secs_f64();
        Ok(Some(queued.record(logged, grad_norm, skipped, seconds)))
    }

    /// Counts a step whose update was skipped, or ran (which the optimizer counted).
    fn settle(&mut self, skipped: bool) {
        if skipped {
            self.bad_steps_in_a_row += 1;
        } else {
            self.bad_steps_in_a_row = 0;
        }
    }

    /// [`Trainer::train_step`] and, on a device, [`Trainer::flush`]: one step to its end and
    /// its record, for callers that want each step's record before the next (tests, the
    /// step benchmark's first step). Nothing may be in flight before.
    pub fn step_to_end(&mut self) -> Result<StepRecord> {
        if self.in_flight() {
            bail!("a step is in flight: flush it before stepping to the end");
        }
        match self.train_step()? {
            Some(record) => Ok(record),
            None => self
                .flush()?
                .context("a queued step left no scalars to read"),
        }
    }
}
