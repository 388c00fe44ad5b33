//! One loss-and-gradient evaluation over a list of groups: packing, the reference model's
//! statistics, the per-group loss and the model's backward.

use crate::data::packing::Batch;
use crate::data::Group;
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
    spec.validate()?;
    let batch = pack(policy, groups)?;
    let ref_stats = match (spec.kind.needs_reference(), reference) {
        (true, None) => bail!(
            "loss {:?} compares the policy with a reference model: give --ref-model DIR",
            spec.kind
        ),
        (true, Some(r)) => {
            check_reference(policy, r)?;
            Some(r.score(ops, &batch))
        }
        (false, _) => None,
    };
    let rewards: Vec<f64> = groups
        .iter()
        .flat_map(|g| g.rewards.iter().copied())
        .collect();
    let sources: Vec<String> = groups.iter().map(|g| g.source.clone()).collect();
    policy
        .loss_and_grads(
            ops,
            &batch,
            |stats: &[ResponseStats]| {
                let s: Vec<f64> = stats.iter().map(|x| x.logp_sum).collect();
                let a: Vec<f64> = stats.iter().map(|x| x.logp_mean).collect();
                let e: Vec<Option<f64>> = stats.iter().map(|x| x.eos_logp).collect();
                let s_ref: Option<Vec<f64>> = ref_stats
                    .as_ref()
                    .map(|r| r.iter().map(|x| x.logp_sum).collect());
                let out = batch_loss(
                    spec,
                    &BatchInput {
                        s: &s,
                        a: &a,
                        e: &e,
                        s_ref: s_ref.as_deref(),
                        rewards: &rewards,
                        offsets: &batch.group_offsets,
                        sources: &sources,
                    },
                )?;
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
