//! One loss-and-gradient evaluation over a list of groups: packing, the reference model's
//! statistics, the per-group loss and the model's backward.

use crate::data::packing::Batch;
use crate::data::Group;
use crate::loss::metrics::batch_metrics;
use crate::loss::{batch_loss, BatchInput, LossSpec};
use crate::model::{Model, ResponseStats, StatsGrad, StepOptions, StepOutput};
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
pub fn check_reference<B>(policy: &Model<B>, reference: &Model<B>) -> Result<()> {
    if policy.cfg.vocab_size != reference.cfg.vocab_size {
        bail!(
            "the reference model's vocab_size ({}) differs from the policy's ({})",
            reference.cfg.vocab_size,
            policy.cfg.vocab_size
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
    fn new(
        batch: &Batch,
        groups: &[Group],
        stats: &[ResponseStats],
        ref_stats: Option<&[ResponseStats]>,
    ) -> Self {
        Columns {
            s: stats.iter().map(|x| x.logp_sum).collect(),
            a: stats.iter().map(|x| x.logp_mean).collect(),
            e: stats.iter().map(|x| x.eos_logp).collect(),
            s_ref: ref_stats.map(|r| r.iter().map(|x| x.logp_sum).collect()),
            rewards: groups
                .iter()
                .flat_map(|g| g.rewards.iter().copied())
                .collect(),
            offsets: batch.group_offsets.clone(),
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

/// The reference model's statistics when the loss needs them.
fn reference_stats<O: Ops>(
    ops: &O,
    policy: &Model<O::Buf>,
    reference: Option<&Model<O::Buf>>,
    batch: &Batch,
    spec: &LossSpec,
) -> Result<Option<Vec<ResponseStats>>> {
    match (spec.kind.needs_reference(), reference) {
        (true, None) => bail!(
            "loss {} compares the policy with a reference model: give --ref-model DIR",
            spec.kind.name()
        ),
        (true, Some(r)) => {
            check_reference(policy, r)?;
            Ok(Some(r.score(ops, batch)))
        }
        (false, _) => Ok(None),
    }
}

/// Validates `spec`, packs `groups` and scores them under the reference when the loss
/// needs it.
fn prepare<O: Ops>(
    ops: &O,
    policy: &Model<O::Buf>,
    reference: Option<&Model<O::Buf>>,
    groups: &[Group],
    spec: &LossSpec,
) -> Result<(Batch, Option<Vec<ResponseStats>>)> {
    spec.validate()?;
    let batch = pack(policy, groups)?;
    let ref_stats = reference_stats(ops, policy, reference, &batch, spec)?;
    Ok((batch, ref_stats))
}

/// The loss of `spec` over `groups` (mean over groups, plus `aux_coef · aux`) and its
/// gradient for every parameter of `policy`.
pub fn loss_and_grads<O: Ops>(
    ops: &O,
    policy: &Model<O::Buf>,
    reference: Option<&Model<O::Buf>>,
    groups: &[Group],
    spec: &LossSpec,
    opts: &StepOptions,
) -> Result<StepOutput<O::Buf>> {
    let (batch, ref_stats) = prepare(ops, policy, reference, groups, spec)?;
    policy
        .loss_and_grads(
            ops,
            &batch,
            |stats: &[ResponseStats]| {
                let columns = Columns::new(&batch, groups, stats, ref_stats.as_deref());
                let out = batch_loss(spec, &columns.input())?;
                Ok(StatsGrad {
                    loss: out.loss,
                    d_s: out.d_s,
                    d_a: out.d_a,
                    d_e: out.d_e,
                })
            },
            opts,
        )
        .context("computing the loss")
}

/// The loss of a batch (no gradients) and its metrics (losses.md §5).
pub struct Evaluation {
    pub loss: f64,
    pub aux_loss: Option<f64>,
    pub metrics: Vec<(String, f64)>,
}

/// Scores `groups` under the policy (and the reference when the loss needs it) and
/// evaluates the objective `loss + aux_coef · aux` with its metrics.
pub fn evaluate<O: Ops>(
    ops: &O,
    policy: &Model<O::Buf>,
    reference: Option<&Model<O::Buf>>,
    groups: &[Group],
    spec: &LossSpec,
    aux_coef: f64,
) -> Result<Evaluation> {
    let (batch, ref_stats) = prepare(ops, policy, reference, groups, spec)?;
    let (stats, aux_loss) = policy.score_with_aux(ops, &batch);
    let columns = Columns::new(&batch, groups, &stats, ref_stats.as_deref());
    let out = batch_loss(spec, &columns.input())?;
    let loss = out.loss + aux_coef * aux_loss.unwrap_or(0.0);
    let mut metrics = batch_metrics(spec, &columns.input(), &stats);
    metrics.insert(0, ("loss".to_string(), loss));
    if let Some(aux) = aux_loss {
        metrics.push(("aux_loss".to_string(), aux));
    }
    Ok(Evaluation {
        loss,
        aux_loss,
        metrics,
    })
}
