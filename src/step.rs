//! One loss-and-gradient evaluation over a list of groups: packing, the reference model's
//! statistics, the per-group loss and the model's backward.

use crate::config::ModelConfig;
use crate::data::packing::Batch;
use crate::data::{token_chunks, Group};
use crate::loss::metrics::{batch_metrics, metric_counts, MetricTotals};
use crate::loss::{batch_loss, BatchInput, LossSpec};
use crate::model::params::Params;
use crate::model::{Model, PassOutput, ResponseStats, StatsLoss, StepOptions};
use crate::ops::cpu::{CpuOps, RoundedCpuOps};
use crate::ops::Ops;
use anyhow::{bail, Context, Result};

/// Packs `groups` for `model`, after checking every token id against its vocabulary.
pub fn pack<B>(model: &Model<B>, groups: &[Group]) -> Result<Batch> {
    for g in groups {
        g.check_vocab(model.cfg.vocab_size)?;
    }
    Ok(Batch::pack(groups, model.cfg.sliding_window, |t| {
        model.cfg.is_eos(t)
    }))
}

/// Checks that a reference model can score the same token ids as the policy.
pub fn check_reference(policy: &ModelConfig, reference: &ModelConfig) -> Result<()> {
    if policy.vocab_size != reference.vocab_size {
        bail!(
            "the reference model's vocab_size ({}) differs from the policy's ({})",
            reference.vocab_size,
            policy.vocab_size
        );
    }
    Ok(())
}

/// The statistics of a batch as the columns the loss library reads.
struct Columns {
    s: Vec<f64>,
    a: Vec<f64>,
    e: Vec<Option<f64>>,
    s_ref: Option<Vec<f64>>,
    rewards: Vec<f64>,
    offsets: Vec<usize>,
    sources: Vec<String>,
}

impl Columns {
    fn new(groups: &[Group], stats: &[ResponseStats], ref_stats: Option<&[ResponseStats]>) -> Self {
        let mut offsets = vec![0];
        for g in groups {
            offsets.push(offsets.last().copied().unwrap_or(0) + g.responses.len());
        }
        Columns {
            s: stats.iter().map(|x| x.logp_sum).collect(),
            a: stats.iter().map(|x| x.logp_mean).collect(),
            e: stats.iter().map(|x| x.eos_logp).collect(),
            s_ref: ref_stats.map(|r| r.iter().map(|x| x.logp_sum).collect()),
            rewards: groups
                .iter()
                .flat_map(|g| g.rewards.iter().copied())
                .collect(),
            offsets,
            sources: groups.iter().map(|g| g.source.clone()).collect(),
        }
    }

    fn input(&self) -> BatchInput<'_> {
        BatchInput {
            s: &self.s,
            a: &self.a,
            e: &self.e,
            s_ref: self.s_ref.as_deref(),
            rewards: &self.rewards,
            offsets: &self.offsets,
            sources: &self.sources,
        }
    }
}

/// A pass's loss and metrics, read on the host.
pub struct LossReport {
    pub loss: f64,
    pub metrics: MetricTotals,
}

/// What a pass (or passes combined) logs, read on the host: the objective (the loss plus
/// `aux_coef ·` the aux loss), the aux loss (Mixtral's load balancing) and the metrics.
#[derive(Default)]
pub struct Logged {
    pub loss: f64,
    pub aux_loss: Option<f64>,
    pub metrics: MetricTotals,
}

impl Logged {
    /// A training pass's: its loss function's report and its aux loss, weighted.
    pub fn new(report: LossReport, aux_loss: Option<f64>, aux_coef: f64) -> Logged {
        Logged {
            loss: report.loss + aux_coef * aux_loss.unwrap_or(0.0),
            aux_loss,
            metrics: report.metrics,
        }
    }
}

/// The loss library where a backend keeps its statistics tables: the CPU runs
/// [`batch_loss`] and [`batch_metrics`] on the host; a device runs the loss kernels on its
/// tables, and its report (the loss and the metrics) stays there until it is read
/// (`crate::engine::loss`): at once, or a step later by the training engine.
pub trait LossOps: Ops {
    /// The loss and the metrics of a pass where the backend leaves them.
    type Report;

    /// Stages `batch` for `policy`'s pass ([`Ops::stage`]), with the loss's own host inputs
    /// (the reference's statistics when they come from the host).
    fn stage_batch(
        &self,
        policy: &Model<Self::Buf>,
        batch: &Batch,
        _groups: &[Group],
        _reference: RefStats<'_, Self::Table>,
    ) -> Result<()> {
        policy.stage(self, batch, &[]);
        Ok(())
    }

    /// The loss of `spec` over `groups`, packed as `batch`, from the policy's `(S, A, E)`
    /// table `stats`: its gradient table, and the report of the loss and of the metrics with
    /// their weights.
    fn batch_loss(
        &self,
        spec: &LossSpec,
        batch: &Batch,
        groups: &[Group],
        stats: &Self::Table,
        reference: RefStats<'_, Self::Table>,
    ) -> Result<StatsLoss<Self::Table, Self::Report>>;

    /// The report's values on the host.
    fn read_report(&self, report: Self::Report) -> Result<LossReport>;
}

/// What a pass logs, read now: its report, and its aux loss from the load-balancing sums.
pub fn read_pass<O: LossOps>(
    ops: &O,
    out: PassOutput<O::Report, O::Balance>,
    aux_coef: f64,
) -> Result<Logged> {
    let aux_loss = out.balance.as_ref().map(|b| ops.moe_balance_loss(b));
    ops.check()?;
    Ok(Logged::new(
        ops.read_report(out.report)?,
        aux_loss,
        aux_coef,
    ))
}

/// The reference model's statistics of a batch's responses, in order: none (a
/// reference-free loss), on the host (a cache, or a model scored elsewhere), or a table on
/// the policy's backend (a reference model resident there).
pub enum RefStats<'a, T> {
    None,
    Host(&'a [ResponseStats]),
    Table(&'a T),
}

impl<T> Clone for RefStats<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for RefStats<'_, T> {}

impl<'a, T> RefStats<'a, T> {
    pub fn from_host(stats: Option<&'a [ResponseStats]>) -> Self {
        stats.map_or(RefStats::None, RefStats::Host)
    }
}

/// The weights of a batch's metrics ([`metric_counts`]).
pub fn batch_metric_counts(batch: &Batch) -> Vec<f64> {
    let has_eos: Vec<bool> = batch.responses.iter().map(|r| r.ends_with_eos).collect();
    metric_counts(&batch.group_offsets, &has_eos)
}

/// The CPU backends' [`LossOps`]: the loss library on their host table of `(S, A, E)`.
macro_rules! host_loss_ops {
    ($($ops:ty),*) => {$(
        impl LossOps for $ops {
            type Report = LossReport;

            fn batch_loss(
                &self,
                spec: &LossSpec,
                batch: &Batch,
                groups: &[Group],
                stats: &Vec<f64>,
                reference: RefStats<'_, Vec<f64>>,
            ) -> Result<StatsLoss<Vec<f64>, LossReport>> {
                host_batch_loss(spec, batch, groups, stats, reference)
            }

            fn read_report(&self, report: LossReport) -> Result<LossReport> {
                Ok(report)
            }
        }
    )*};
}

host_loss_ops!(CpuOps, RoundedCpuOps);

/// The loss library on a host table of `(S, A, E)`: what the CPU backends' [`LossOps`] run.
fn host_batch_loss(
    spec: &LossSpec,
    batch: &Batch,
    groups: &[Group],
    stats: &[f64],
    reference: RefStats<'_, Vec<f64>>,
) -> Result<StatsLoss<Vec<f64>, LossReport>> {
    let stats = ResponseStats::from_table(&batch.responses, stats);
    let ref_stats = match reference {
        RefStats::None => None,
        RefStats::Host(r) => Some(r.to_vec()),
        RefStats::Table(t) => Some(ResponseStats::from_table(&batch.responses, t)),
    };
    let columns = Columns::new(groups, &stats, ref_stats.as_deref());
    let out = batch_loss(spec, &columns.input())?;
    let metrics = batch_metrics(spec, &columns.input(), &stats);
    let grads = (0..stats.len())
        .flat_map(|i| [out.d_s[i], out.d_a[i], out.d_e[i]])
        .collect();
    Ok(StatsLoss {
        grads,
        report: LossReport {
            loss: out.loss,
            metrics: MetricTotals::new(metrics, &batch_metric_counts(batch)),
        },
    })
}

/// Every response's statistics under `model`, in order, scored in passes of at most
/// `max_tokens` packed tokens ([`token_chunks`]); `progress` gets the groups done after each.
pub fn score_groups<O: Ops>(
    ops: &O,
    model: &Model<O::Buf>,
    groups: &[Group],
    max_tokens: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<ResponseStats>> {
    let mut stats = Vec::with_capacity(groups.iter().map(|g| g.responses.len()).sum());
    for range in token_chunks(groups, max_tokens) {
        let done = range.end;
        stats.extend(model.score(ops, &pack(model, &groups[range])?));
        ops.check()?;
        progress(done);
    }
    Ok(stats)
}

/// The reference model's statistics of every response of `groups`, in order, when the loss
/// needs them.
pub fn reference_stats<O: Ops>(
    ops: &O,
    policy: &Model<O::Buf>,
    reference: Option<&Model<O::Buf>>,
    groups: &[Group],
    spec: &LossSpec,
) -> Result<Option<Vec<ResponseStats>>> {
    reference_stats_in_passes(ops, policy, reference, groups, spec, usize::MAX)
}

/// [`reference_stats`] in passes of at most `max_tokens` packed tokens.
pub fn reference_stats_in_passes<O: Ops>(
    ops: &O,
    policy: &Model<O::Buf>,
    reference: Option<&Model<O::Buf>>,
    groups: &[Group],
    spec: &LossSpec,
    max_tokens: usize,
) -> Result<Option<Vec<ResponseStats>>> {
    match (spec.kind.needs_reference(), reference) {
        (true, None) => bail!(
            "loss {} compares the policy with a reference model: give --ref-model DIR",
            spec.kind.name()
        ),
        (true, Some(r)) => {
            check_reference(&policy.cfg, &r.cfg)?;
            Ok(Some(score_groups(ops, r, groups, max_tokens, |_| {})?))
        }
        (false, _) => Ok(None),
    }
}

/// The reference statistics of `chunk`'s responses, which start at response `*start`, when
/// there are any; moves `*start` past them.
fn ref_slice<'a>(
    ref_stats: Option<&'a [ResponseStats]>,
    chunk: &[Group],
    start: &mut usize,
) -> Option<&'a [ResponseStats]> {
    let from = *start;
    *start += chunk.iter().map(|g| g.responses.len()).sum::<usize>();
    ref_stats.map(|r| &r[from..*start])
}

/// Checks that reference statistics are there when the loss needs them, one per response.
fn check_ref_stats(
    groups: &[Group],
    spec: &LossSpec,
    ref_stats: Option<&[ResponseStats]>,
) -> Result<()> {
    spec.validate()?;
    let responses: usize = groups.iter().map(|g| g.responses.len()).sum();
    match ref_stats {
        None if spec.kind.needs_reference() => bail!(
            "loss {} compares the policy with a reference model: give --ref-model DIR or \
             --ref-logps FILE",
            spec.kind.name()
        ),
        Some(r) if r.len() != responses => {
            bail!("{} reference statistics for {responses} responses", r.len())
        }
        _ => Ok(()),
    }
}

/// The loss of `spec` over `groups` (mean over groups, plus `aux_coef · aux`) and its
/// gradient for every parameter of `policy`. `ref_stats` holds the reference model's
/// statistics of every response, in order, for the losses that need them.
pub fn loss_and_grads<O: LossOps>(
    ops: &O,
    policy: &Model<O::Buf>,
    ref_stats: Option<&[ResponseStats]>,
    groups: &[Group],
    spec: &LossSpec,
    opts: &StepOptions,
) -> Result<StepOutput<O::Buf>> {
    loss_and_grads_in_passes(
        ops,
        policy,
        ref_stats,
        groups,
        spec,
        opts,
        usize::MAX,
        |_| {},
    )
}

/// [`loss_and_grads`] in passes of at most `max_tokens` packed tokens, each adding its share
/// of the groups to the loss and the gradients, as a training step's micro-batches do (the
/// Mixtral aux loss, which is not a mean over groups, combines the same way).
#[allow(clippy::too_many_arguments)]
pub fn loss_and_grads_in_passes<O: LossOps>(
    ops: &O,
    policy: &Model<O::Buf>,
    ref_stats: Option<&[ResponseStats]>,
    groups: &[Group],
    spec: &LossSpec,
    opts: &StepOptions,
    max_tokens: usize,
    mut progress: impl FnMut(usize),
) -> Result<StepOutput<O::Buf>> {
    check_ref_stats(groups, spec, ref_stats)?;
    let mut grads = policy.zeros_like(ops);
    let (mut total, mut responses) = (Logged::default(), 0);
    for range in token_chunks(groups, max_tokens) {
        let chunk = &groups[range.clone()];
        let share = chunk.len() as f64 / groups.len() as f64;
        let reference = RefStats::from_host(ref_slice(ref_stats, chunk, &mut responses));
        let pass =
            accumulate_and_read(ops, policy, reference, chunk, spec, opts, share, &mut grads)?;
        total.add(share, pass);
        progress(range.end);
    }
    Ok(StepOutput {
        logged: total,
        grads,
    })
}

/// The loss of a batch with its gradient for every parameter.
pub struct StepOutput<B> {
    pub logged: Logged,
    pub grads: Params<B>,
}

impl Logged {
    /// Adds a pass over part of the groups (a step's micro-batch, a pass of `eval` or
    /// `grads`): the loss and the aux loss weighted by the pass's share of the groups, the
    /// metrics by their counts.
    pub fn add(&mut self, share: f64, out: Logged) {
        self.loss += share * out.loss;
        if let Some(a) = out.aux_loss {
            *self.aux_loss.get_or_insert(0.0) += share * a;
        }
        self.metrics.merge(out.metrics);
    }
}

/// As [`loss_and_grads`], adding `scale ·` the gradient into `grads` (a micro-batch's share of
/// a step), with the reference's statistics on the host or, as a table made from `groups`,
/// on the backend.
#[allow(clippy::too_many_arguments)]
pub fn accumulate_grads<O: LossOps>(
    ops: &O,
    policy: &Model<O::Buf>,
    reference: RefStats<'_, O::Table>,
    groups: &[Group],
    spec: &LossSpec,
    opts: &StepOptions,
    scale: f64,
    grads: &mut Params<O::Buf>,
) -> Result<PassOutput<O::Report, O::Balance>> {
    match reference {
        RefStats::Table(_) => spec.validate()?,
        RefStats::None => check_ref_stats(groups, spec, None)?,
        RefStats::Host(r) => check_ref_stats(groups, spec, Some(r))?,
    }
    let batch = pack(policy, groups)?;
    ops.stage_batch(policy, &batch, groups, reference)?;
    policy
        .accumulate_grads(
            ops,
            &batch,
            |stats: &O::Table| {
                // Statistics of a failed device are zeros: report the failure, not their loss.
                ops.check()?;
                ops.batch_loss(spec, &batch, groups, stats, reference)
            },
            opts,
            scale,
            grads,
        )
        .and_then(|out| ops.check().map(|()| out))
        .context("computing the loss")
}

/// [`accumulate_grads`], with what the pass logs read at once (a pass on the host, or one
/// whose caller waits for it).
#[allow(clippy::too_many_arguments)]
pub fn accumulate_and_read<O: LossOps>(
    ops: &O,
    policy: &Model<O::Buf>,
    reference: RefStats<'_, O::Table>,
    groups: &[Group],
    spec: &LossSpec,
    opts: &StepOptions,
    scale: f64,
    grads: &mut Params<O::Buf>,
) -> Result<Logged> {
    let out = accumulate_grads(ops, policy, reference, groups, spec, opts, scale, grads)?;
    read_pass(ops, out, opts.aux_coef)
}

/// The loss of a batch (no gradients) and its metrics (docs/losses.md §7).
pub struct Evaluation {
    pub loss: f64,
    pub aux_loss: Option<f64>,
    pub metrics: Vec<(String, f64)>,
}

/// Scores `groups` under the policy and evaluates the objective `loss + aux_coef · aux`
/// with its metrics. `ref_stats` as for [`loss_and_grads`].
pub fn evaluate<O: Ops>(
    ops: &O,
    policy: &Model<O::Buf>,
    ref_stats: Option<&[ResponseStats]>,
    groups: &[Group],
    spec: &LossSpec,
    aux_coef: f64,
) -> Result<Evaluation> {
    evaluate_in_passes(
        ops,
        policy,
        ref_stats,
        groups,
        spec,
        aux_coef,
        usize::MAX,
        |_| {},
    )
}

/// [`evaluate`] in passes of at most `max_tokens` packed tokens, combined as
/// [`loss_and_grads_in_passes`] combines them.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_in_passes<O: Ops>(
    ops: &O,
    policy: &Model<O::Buf>,
    ref_stats: Option<&[ResponseStats]>,
    groups: &[Group],
    spec: &LossSpec,
    aux_coef: f64,
    max_tokens: usize,
    mut progress: impl FnMut(usize),
) -> Result<Evaluation> {
    check_ref_stats(groups, spec, ref_stats)?;
    let (mut total, mut responses) = (Logged::default(), 0);
    for range in token_chunks(groups, max_tokens) {
        let chunk = &groups[range.clone()];
        let batch = pack(policy, chunk)?;
        let (stats, aux_loss) = policy.score_with_aux(ops, &batch);
        ops.check()?;
        let refs = ref_slice(ref_stats, chunk, &mut responses);
        let columns = Columns::new(chunk, &stats, refs);
        let out = batch_loss(spec, &columns.input())?;
        let metrics = batch_metrics(spec, &columns.input(), &stats);
        // The objective's aux term is added once, to the combined aux loss.
        let pass = Logged {
            loss: out.loss,
            aux_loss,
            metrics: MetricTotals::new(metrics, &batch_metric_counts(&batch)),
        };
        total.add(chunk.len() as f64 / groups.len() as f64, pass);
        progress(range.end);
    }
    let loss = total.loss + aux_coef * total.aux_loss.unwrap_or(0.0);
    let mut metrics = total.metrics.means();
    metrics.insert(0, ("loss".to_string(), loss));
    if let Some(aux) = total.aux_loss {
        metrics.push(("aux_loss".to_string(), aux));
    }
    Ok(Evaluation {
        loss,
        aux_loss: total.aux_loss,
        metrics,
    })
}
