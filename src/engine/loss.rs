//! The loss library ([`crate::loss`]) on a device: `cuda/loss.cu` computes each group's loss,
//! the gradients `dL/dS, dL/dA, dL/dE` of every response (scaled for the batch mean, as
//! [`crate::loss::batch_loss`] returns them), the batch loss and the metrics of
//! [`crate::loss::metrics::batch_metrics`], from statistics already on the device in the
//! tables of the fused scoring (cuda/scoring.cu): `(S, A, E)` and `(start, len, has_eos)` per
//! response in, `(dL/dS, dL/dA, dL/dE)` per response out, as `scoring_row_coef` reads them.
//! All in f64, formula for formula the CPU's (the kernel file says why).

use super::bench::random_stats;
use crate::data::packing::Batch;
use crate::data::Group;
use crate::loss::metrics::{metric_names, MetricTotals};
use crate::loss::{check_group, BatchInput, BatchOutput, LossKind, LossSpec};
use crate::model::{Model, StatsLoss};
use crate::ops::cuda::device::{AsView, Device, View};
use crate::ops::cuda::emu::{KernelArgs, LaunchConfig};
use crate::ops::cuda::lists::{ListSource, Uploads};
use crate::ops::cuda::ops::{DeviceOps, DeviceTable};
use crate::ops::cuda::pool::{Leased, Pool, Tensor};
use crate::ops::ExtraList;
use crate::step::{batch_metric_counts, LossOps, LossReport, RefStats};
use anyhow::{ensure, Context, Result};
use std::rc::Rc;

/// The hyperparameters of `loss_groups_f64` (`struct LossParams` in cuda/loss.cu, field for
/// field).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossParams {
    /// [`LossKind`] as its declaration order numbers it.
    pub kind: i32,
    pub p: i32,
    pub one_vs_all: i32,
    pub normalize: i32,
    pub beta: f64,
    pub alpha: f64,
    pub gamma: f64,
    /// `ln(gamma)`, computed here as the CPU's REFA computes it.
    pub ln_gamma: f64,
    pub lambda: f64,
    pub label_smoothing: f64,
    pub sft_weight: f64,
}

impl LossParams {
    pub fn new(spec: &LossSpec) -> Self {
        let kind = match spec.kind {
            LossKind::Infonca => 0,
            LossKind::Nca => 1,
            LossKind::Dpo => 2,
            LossKind::NcaPair => 3,
            LossKind::Simpo => 4,
            LossKind::Refa => 5,
            LossKind::InfoncaFree => 6,
            LossKind::Sft => 7,
        };
        LossParams {
            kind,
            p: spec.p as i32,
            one_vs_all: spec.one_vs_all as i32,
            normalize: spec.normalize as i32,
            beta: spec.beta,
            alpha: spec.alpha,
            gamma: spec.gamma,
            ln_gamma: spec.gamma.ln(),
            lambda: spec.lambda,
            label_smoothing: spec.label_smoothing,
            sft_weight: spec.sft_weight,
        }
    }
}

/// How a batch's responses fall into groups: group `g` is responses `offsets[g]..offsets[g +
/// 1]`. Built once per batch from the host's packed layout; the kernels read the device copy.
pub struct GroupLayout {
    offsets: Vec<usize>,
    device_offsets: Rc<Leased<i32>>,
    /// `file:line` of each group, for errors.
    sources: Vec<String>,
}

impl GroupLayout {
    /// `offsets` uploaded into a region of `pool` ([`GroupLayout::from_source`]).
    pub fn new(
        device: &Device,
        pool: &Pool,
        offsets: &[usize],
        sources: &[String],
    ) -> Result<Self> {
        GroupLayout::from_source(offsets, sources, &Uploads { device, pool })
    }

    /// The groups of `offsets`, their device copy from `source`; `sources` names each group.
    pub fn from_source(
        offsets: &[usize],
        sources: &[String],
        source: &impl ListSource,
    ) -> Result<Self> {
        let device_offsets = GroupLayout::host_offsets(offsets)?;
        ensure!(
            sources.len() == offsets.len() - 1,
            "{} sources for {} groups",
            sources.len(),
            offsets.len() - 1
        );
        Ok(GroupLayout {
            offsets: offsets.to_vec(),
            device_offsets: source.list(&device_offsets)?,
            sources: sources.to_vec(),
        })
    }

    /// `offsets` checked and as the kernels read them.
    fn host_offsets(offsets: &[usize]) -> Result<Vec<i32>> {
        ensure!(
            offsets.len() >= 2 && offsets[0] == 0,
            "a batch needs at least one group and offsets starting at 0, found {offsets:?}"
        );
        ensure!(
            offsets.windows(2).all(|w| w[0] <= w[1]),
            "group offsets must not decrease, found {offsets:?}"
        );
        offsets
            .iter()
            .map(|&o| i32::try_from(o).context("more responses than a kernel indexes"))
            .collect()
    }

    pub fn groups(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn responses(&self) -> usize {
        self.offsets[self.groups()]
    }

    /// The largest group: the number of `rewards/rank_j` metrics.
    pub fn max_k(&self) -> usize {
        self.offsets
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0)
    }
}

/// `S^ref` per response on the device.
#[derive(Clone, Copy)]
pub enum Reference {
    /// One value per response (a reference cache, uploaded).
    Column(View<f64>),
    /// The reference model's `[responses, 3] = (S, A, E)` statistics table (its S).
    Stats(View<f64>),
}

impl Reference {
    fn is_on_host(&self) -> bool {
        match self {
            Reference::Column(b) | Reference::Stats(b) => b.is_on_host(),
        }
    }

    fn buffer_and_stride(self) -> (&'static str, u64, usize, usize) {
        match self {
            Reference::Column(b) => ("S_ref", b.device_ptr(), b.len(), 1),
            Reference::Stats(b) => ("reference stats", b.device_ptr(), b.len(), 3),
        }
    }
}

/// A batch's statistics on the device, in the scoring's tables (cuda/scoring.cu).
#[derive(Clone, Copy)]
pub struct LossInputs {
    /// `[responses, 3] = (S, A, E)`; E is read only where the span has an EOS.
    pub stats: View<f64>,
    /// `[responses, 3] = (start, len, has_eos)`: len is n (for `response_len`).
    pub spans: View<i32>,
    /// Needed by the reference-based losses only.
    pub s_ref: Option<Reference>,
    pub rewards: View<f64>,
}

/// What the loss kernels leave on the device, in regions of the pool.
pub struct LossOutputs {
    /// Each group's loss (not scaled).
    pub per_group: Leased<f64>,
    /// `[responses, 3] = (dL/dS, dL/dA, dL/dE)`, already times 1 / groups: what
    /// `scoring_row_coef` reads.
    pub grads: Leased<f64>,
    /// The batch loss, then the values of [`metric_names`]`(max_k)` in order.
    pub summary: Leased<f64>,
}

/// Threads per block of the per-group kernel (one thread per group).
const GROUP_BLOCK: u32 = 128;
/// The per-group metric values `loss_groups_f64` keeps (`enum GroupMetric`).
const GROUP_METRICS: usize = 6;

/// The batch loss of `spec` over `layout`'s groups on the device. The groups are checked as
/// the CPU's `batch_loss` checks them (the same errors); nothing is read back.
pub fn device_batch_loss(
    device: &Device,
    pool: &Pool,
    spec: &LossSpec,
    layout: &GroupLayout,
    inputs: &LossInputs,
) -> Result<LossOutputs> {
    let (groups, n) = (layout.groups(), layout.responses());
    for (g, w) in layout.offsets.windows(2).enumerate() {
        check_group(spec, w[1] - w[0], inputs.s_ref.is_some())
            .map_err(|e| e.context(layout.sources[g].clone()))?;
    }
    let reference = inputs.s_ref.map(Reference::buffer_and_stride);
    let lens = [
        ("stats", inputs.stats.len(), 3 * n),
        ("spans", inputs.spans.len(), 3 * n),
        ("rewards", inputs.rewards.len(), n),
    ]
    .into_iter()
    .chain(reference.map(|(what, _, len, stride)| (what, len, stride * n)));
    for (what, len, want) in lens {
        ensure!(
            len == want,
            "loss: {what} holds {len} values, {n} responses need {want}"
        );
    }
    let max_k = layout.max_k();
    let out = LossOutputs {
        per_group: pool.lease(device, groups)?,
        grads: pool.lease(device, 3 * n)?,
        summary: pool.lease(device, 1 + metric_names(max_k).len())?,
    };
    let scratch = pool.lease::<f64>(device, 2 * n)?;
    let rank_reward = pool.lease::<f64>(device, n)?;
    let group_metrics = pool.lease::<f64>(device, GROUP_METRICS * groups)?;
    let (ref_ptr, ref_stride) = reference.map_or((0, 1), |(_, ptr, _, stride)| (ptr, stride));
    // The reference's memory is checked as a buffer argument's is.
    let ref_home: Vec<bool> = inputs.s_ref.iter().map(|r| r.is_on_host()).collect();
    let mut args = KernelArgs::new();
    args.buffer(&inputs.stats)
        .buffer(&inputs.spans)
        .arg_holding(ref_ptr, &ref_home)
        .arg(ref_stride as i32)
        .buffer(&inputs.rewards)
        .buffer(&layout.device_offsets)
        .arg(groups as i32)
        .arg(n as i32)
        .arg(LossParams::new(spec))
        .buffer(&scratch)
        .buffer(&out.per_group)
        .buffer(&out.grads)
        .buffer(&rank_reward)
        .buffer(&group_metrics);
    let grid = (groups as u32).div_ceil(GROUP_BLOCK);
    // SAFETY: live buffers of `device` of the lengths checked above: 3 values per response in
    // the tables and gradients, groups + 1 offsets, 2n scratch, 6 metric values per group.
    unsafe {
        device.launch(
            "loss_groups_f64",
            LaunchConfig::new(grid, GROUP_BLOCK, 0),
            &args,
        )?
    };
    let mut args = KernelArgs::new();
    args.buffer(&out.per_group)
        .buffer(&group_metrics)
        .buffer(&rank_reward)
        .buffer(&layout.device_offsets)
        .buffer(&inputs.stats)
        .buffer(&inputs.spans)
        .arg(groups as i32)
        .arg(n as i32)
        .arg(max_k as i32)
        .buffer(&out.summary);
    // SAFETY: as above; summary holds 1 + 6 + max_k + 2 values.
    unsafe { device.launch("loss_finish_f64", LaunchConfig::new(1, 32, 0), &args)? };
    Ok(out)
}

/// [`device_batch_loss`] on host data: uploads `b` (and each response's token count), runs
/// the kernels and returns what the CPU's `batch_loss` and `batch_metrics` return.
pub fn host_batch_loss(
    device: &Device,
    spec: &LossSpec,
    b: &BatchInput,
    tokens: &[usize],
) -> Result<(BatchOutput, Vec<(String, f64)>)> {
    let pool = Pool::default();
    let layout = GroupLayout::new(device, &pool, b.offsets, b.sources)?;
    ensure!(
        tokens.len() == b.s.len(),
        "{} token counts for {} responses",
        tokens.len(),
        b.s.len()
    );
    let mut stats = Vec::with_capacity(3 * b.s.len());
    let mut spans = Vec::with_capacity(3 * b.s.len());
    for (i, &n) in tokens.iter().enumerate() {
        stats.extend([b.s[i], b.a[i], b.e[i].unwrap_or(f64::NAN)]);
        let n = i32::try_from(n).context("a response too long for the loss kernels")?;
        // The loss reads no start.
        spans.extend([0, n, b.e[i].is_some() as i32]);
    }
    let s_ref = b.s_ref.map(|r| pool.upload(device, r)).transpose()?;
    let (stats, spans, rewards) = (
        pool.upload(device, &stats)?,
        pool.upload(device, &spans)?,
        pool.upload(device, b.rewards)?,
    );
    let inputs = LossInputs {
        stats: stats.view(),
        spans: spans.view(),
        s_ref: s_ref.as_ref().map(|r| Reference::Column(r.view())),
        rewards: rewards.view(),
    };
    let out = device_batch_loss(device, &pool, spec, &layout, &inputs)?;
    let summary = device.download(&out.summary)?;
    let grads = device.download(&out.grads)?;
    let column = |c: usize| -> Vec<f64> { grads.iter().skip(c).step_by(3).copied().collect() };
    let metrics = summary_means(layout.max_k(), &summary)?;
    Ok((
        BatchOutput {
            loss: summary[0],
            per_group: device.download(&out.per_group)?,
            d_s: column(0),
            d_a: column(1),
            d_e: column(2),
        },
        metrics,
    ))
}

/// The loss's own host inputs of a batch: its group offsets, the rewards, and the
/// reference's S when it comes from the host.
struct LossLists {
    offsets: Vec<i32>,
    rewards: Vec<f64>,
    s_ref: Option<Vec<f64>>,
}

impl LossLists {
    fn new(batch: &Batch, groups: &[Group], reference: RefStats<'_, DeviceTable>) -> Result<Self> {
        Ok(LossLists {
            offsets: GroupLayout::host_offsets(&batch.group_offsets)?,
            rewards: groups
                .iter()
                .flat_map(|g| g.rewards.iter().copied())
                .collect(),
            s_ref: match reference {
                RefStats::Host(r) => Some(r.iter().map(|x| x.logp_sum).collect()),
                RefStats::None | RefStats::Table(_) => None,
            },
        })
    }

    fn extra(&self) -> Vec<ExtraList<'_>> {
        let mut extra = vec![ExtraList::I32(&self.offsets), ExtraList::F64(&self.rewards)];
        extra.extend(self.s_ref.as_deref().map(ExtraList::F64));
        extra
    }
}

/// A micro-batch's loss and metrics where the loss kernels left them: the summary on the
/// device (the loss, then the means of [`metric_names`]`(max_k)`), and how to read it.
pub struct DeviceReport {
    pub summary: Leased<f64>,
    pub shape: ReportShape,
}

/// What the host knows of a loss summary from the batch: its largest group and the metrics'
/// counts.
pub struct ReportShape {
    pub max_k: usize,
    pub counts: Vec<f64>,
}

impl ReportShape {
    /// The report from the summary's values, once on the host.
    pub fn read(&self, summary: &[f64]) -> Result<LossReport> {
        let means = summary_means(self.max_k, summary)?;
        Ok(LossReport {
            loss: summary[0],
            metrics: MetricTotals::new(means, &self.counts),
        })
    }
}

/// The metrics' means of a loss summary (the loss, then the means of
/// [`metric_names`]`(max_k)`), named.
fn summary_means(max_k: usize, summary: &[f64]) -> Result<Vec<(String, f64)>> {
    let names = metric_names(max_k);
    ensure!(
        summary.len() == 1 + names.len(),
        "the loss summary holds {} values, {} metrics need {}",
        summary.len(),
        names.len(),
        1 + names.len()
    );
    Ok(names
        .into_iter()
        .zip(summary[1..].iter().copied())
        .collect())
}

/// The loss where the device's statistics are: the kernels above on the scoring's tables,
/// with the rewards and the reference's S staged with the batch; the gradient table stays for
/// the backward, and the report (the loss and the metrics) on the device until it is read.
impl LossOps for DeviceOps<'_> {
    type Report = DeviceReport;

    fn stage_batch(
        &self,
        policy: &Model<Tensor>,
        batch: &Batch,
        groups: &[Group],
        reference: RefStats<'_, DeviceTable>,
    ) -> Result<()> {
        let lists = LossLists::new(batch, groups, reference)?;
        policy.stage(self, batch, &lists.extra());
        Ok(())
    }

    fn batch_loss(
        &self,
        spec: &LossSpec,
        batch: &Batch,
        groups: &[Group],
        stats: &DeviceTable,
        reference: RefStats<'_, DeviceTable>,
    ) -> Result<StatsLoss<DeviceTable, DeviceReport>> {
        let (device, pool) = (self.device(), self.pool());
        let sources: Vec<String> = groups.iter().map(|g| g.source.clone()).collect();
        let layout = GroupLayout::from_source(&batch.group_offsets, &sources, self)?;
        let lists = LossLists::new(batch, groups, reference)?;
        let rewards = self.list(&lists.rewards)?;
        let s_ref_column = lists.s_ref.as_deref().map(|c| self.list(c)).transpose()?;
        let s_ref = match (reference, &s_ref_column) {
            (RefStats::Table(t), _) => Some(Reference::Stats(t.values()?.view())),
            (_, Some(column)) => Some(Reference::Column(column.view())),
            _ => None,
        };
        let spans = self.spans(&batch.responses, batch.targets.len())?;
        let inputs = LossInputs {
            stats: stats.values()?.view(),
            spans: spans.table(),
            s_ref,
            rewards: rewards.view(),
        };
        let out = device_batch_loss(device, pool, spec, &layout, &inputs)?;
        Ok(StatsLoss {
            grads: DeviceTable::new(out.grads),
            report: DeviceReport {
                summary: out.summary,
                shape: ReportShape {
                    max_k: layout.max_k(),
                    counts: batch_metric_counts(batch),
                },
            },
        })
    }

    fn read_report(&self, report: DeviceReport) -> Result<LossReport> {
        report.shape.read(&self.device().download(&report.summary)?)
    }
}

/// Responses per group in the profile's loss case: the bench step's default K.
const PROFILE_K: usize = 4;
/// Tokens per group there: the bench step's default prompt of 512 and 4 responses of 256.
const PROFILE_GROUP_TOKENS: usize = 512 + PROFILE_K * 256;

/// The NCA loss kernels as a row of `selftest --profile` (the table lives in `ops`, which
/// cannot call up here): one group of 4 responses per 1536 tokens of the shapes (at least
/// one), random statistics. Ideal: each response's statistics, span, reference, reward read
/// and its three gradients written once, the offsets read, each group's loss and the summary
/// written.
pub fn profile_case() -> crate::ops::cuda::profile::Case {
    use crate::ops::cuda::profile::{case, Shapes};
    use rand::Rng;
    let groups = |s: &Shapes| s.tokens.div_ceil(PROFILE_GROUP_TOKENS);
    case(
        "loss nca (per group, then the batch)".into(),
        move |s| {
            let (g, n) = (groups(s) as u64, (groups(s) * PROFILE_K) as u64);
            let summary = 1 + metric_names(PROFILE_K).len() as u64;
            (
                (24 + 12 + 8 + 8 + 24) * n + 4 * (g + 1) + 8 * g + 8 * summary,
                0,
            )
        },
        move |k, s, rng| {
            let g = groups(s);
            let n = g * PROFILE_K;
            let tokens: Vec<usize> = (0..n).map(|_| rng.gen_range(16..512)).collect();
            let stats: Vec<_> = tokens.iter().map(|&t| random_stats(rng, t)).collect();
            let s_sum: Vec<f64> = stats.iter().map(|r| r.logp_sum).collect();
            let a: Vec<f64> = stats.iter().map(|r| r.logp_mean).collect();
            let e: Vec<Option<f64>> = stats.iter().map(|r| r.eos_logp).collect();
            let s_ref: Vec<f64> = s_sum.iter().map(|s| s + rng.gen_range(-1.0..1.0)).collect();
            let rewards: Vec<f64> = (0..n).map(|_| rng.gen_range(0.0..10.0)).collect();
            let offsets: Vec<usize> = (0..=g).map(|i| i * PROFILE_K).collect();
            let sources: Vec<String> = (0..g).map(|i| format!("profile group {i}")).collect();
            let input = BatchInput {
                s: &s_sum,
                a: &a,
                e: &e,
                s_ref: Some(&s_ref),
                rewards: &rewards,
                offsets: &offsets,
                sources: &sources,
            };
            host_batch_loss(k.device, &LossSpec::new(LossKind::Nca), &input, &tokens).map(drop)
        },
    )
    .excepted("a few numbers per response, one thread per group: under 0.1 µs modeled at 7B")
}
