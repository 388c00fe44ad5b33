//! Properties of the CPU reference that need no golden: packed shared-prompt batches equal
//! per-sequence ones, checkpointing changes nothing, and gradients agree with finite
//! differences.

mod common;

use common::{fixture, random_groups, rel_err, rng};
use contralign::data::Group;
use contralign::loss::{LossKind, LossSpec};
use contralign::memory_plan::RecomputePolicy;
use contralign::model::params::param_specs;
use contralign::model::{Model, StatsLoss, StepOptions};
use contralign::ops::cpu::CpuOps;
use contralign::ops::Ops;
use contralign::step;
use rand::Rng;

fn load(name: &str) -> Model<Vec<f32>> {
    Model::load(&CpuOps, &fixture(name)).unwrap()
}

/// Every response as its own sequence: the prompt repeated, nothing shared.
fn unpacked(groups: &[Group]) -> Vec<Group> {
    groups
        .iter()
        .flat_map(|g| {
            g.responses.iter().zip(&g.rewards).map(|(r, &w)| Group {
                prompt: g.prompt.clone(),
                responses: vec![r.clone()],
                rewards: vec![w],
                source: g.source.clone(),
            })
        })
        .collect()
}

/// A loss linear in every statistic, with fixed random coefficients: its gradient reaches
/// every response through S, A and E.
fn linear_loss(
    coef: &[[f64; 3]],
) -> impl Fn(&Vec<f64>) -> anyhow::Result<StatsLoss<Vec<f64>, f64>> + '_ {
    move |table| {
        // E is NaN where a response has no EOS: no term there.
        let loss = table
            .chunks_exact(3)
            .zip(coef)
            .map(|(t, c)| c[0] * t[0] + c[1] * t[1] + if t[2].is_nan() { 0.0 } else { c[2] * t[2] })
            .sum();
        Ok(StatsLoss {
            grads: coef.concat(),
            report: loss,
        })
    }
}

/// Coefficients in [-1, 1) of S, A and E for each of `n` responses.
fn random_coef(rng: &mut impl Rng, n: usize) -> Vec<[f64; 3]> {
    (0..n)
        .map(|_| std::array::from_fn(|_| rng.gen_range(-1.0..1.0)))
        .collect()
}

fn grads_of(
    model: &Model<Vec<f32>>,
    groups: &[Group],
    coef: &[[f64; 3]],
    recompute: RecomputePolicy,
    aux_coef: f64,
) -> (f64, Vec<Vec<f32>>) {
    let batch = step::pack(model, groups).unwrap();
    let opts = StepOptions {
        recompute,
        aux_coef,
    };
    let (out, grads) = model
        .loss_and_grads(&CpuOps, &batch, linear_loss(coef), &opts)
        .unwrap();
    let aux = out.balance.map_or(0.0, |b| CpuOps.moe_balance_loss(&b));
    let loss = out.report + aux_coef * aux;
    (loss, grads.iter().into_iter().cloned().collect())
}

#[test]
fn packed_groups_equal_per_sequence_scoring() {
    let mut rng = rng("packed_groups_equal_per_sequence_scoring");
    for name in ["tiny-mistral", "tiny-mixtral"] {
        let model = load(name);
        // Prompts longer than Mistral's window of 6, so the window cuts into the prompt.
        let groups = random_groups(&mut rng, 5, 256, 11, 5, 9);
        let packed = model.score(&CpuOps, &step::pack(&model, &groups).unwrap());
        let single = model.score(&CpuOps, &step::pack(&model, &unpacked(&groups)).unwrap());
        assert_eq!(packed.len(), single.len());
        for (i, (p, s)) in packed.iter().zip(&single).enumerate() {
            assert_eq!(p.tokens, s.tokens);
            let tol = 1e-6 * s.logp_sum.abs();
            assert!(
                (p.logp_sum - s.logp_sum).abs() <= tol,
                "{name} response {i}: {p:?} vs {s:?}"
            );
            assert_eq!(p.eos_logp.is_some(), s.eos_logp.is_some());
            if let (Some(a), Some(b)) = (p.eos_logp, s.eos_logp) {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs(),
                    "{name} response {i} E: {a} vs {b}"
                );
            }
        }
        // The backward too: the shared prompt rows gather the gradient of all K responses.
        let coef = random_coef(&mut rng, packed.len());
        let aux = if model.cfg.moe.is_some() { 0.05 } else { 0.0 };
        let (loss_p, grads_p) = grads_of(&model, &groups, &coef, RecomputePolicy::Full, aux);
        let (loss_s, grads_s) = grads_of(
            &model,
            &unpacked(&groups),
            &coef,
            RecomputePolicy::Full,
            aux,
        );
        assert!(
            (loss_p - loss_s).abs() <= 1e-6 * loss_s.abs(),
            "{name}: {loss_p} vs {loss_s}"
        );
        for ((pname, _), (gp, gs)) in param_specs(&model.cfg)
            .iter()
            .zip(grads_p.iter().zip(&grads_s))
        {
            let gs: Vec<f64> = gs.iter().map(|&x| x as f64).collect();
            let err = rel_err(gp, &gs);
            assert!(
                err < 1e-5,
                "{name} {pname}: packed vs per-sequence gradient {err:.3e}"
            );
        }
    }
}

/// Recomputing in the backward runs the same ops on the same inputs: every policy gives the
/// gradients of keeping everything, bit for bit.
#[test]
fn recompute_policies_do_not_change_gradients() {
    let mut rng = rng("recompute_policies_do_not_change_gradients");
    for name in ["tiny-mistral", "tiny-mixtral"] {
        let model = load(name);
        let groups = random_groups(&mut rng, 4, 256, 9, 4, 8);
        let responses: usize = groups.iter().map(|g| g.responses.len()).sum();
        let coef = random_coef(&mut rng, responses);
        let aux = if model.cfg.moe.is_some() { 0.02 } else { 0.0 };
        let (loss_off, off) = grads_of(&model, &groups, &coef, RecomputePolicy::None, aux);
        for policy in [RecomputePolicy::Full, RecomputePolicy::Selective] {
            let (loss_on, on) = grads_of(&model, &groups, &coef, policy, aux);
            assert_eq!(loss_on, loss_off, "{name}: loss under {}", policy.name());
            for ((pname, _), (a, b)) in param_specs(&model.cfg).iter().zip(on.iter().zip(&off)) {
                assert!(
                    a == b,
                    "{name} {pname}: {} differs from none",
                    policy.name()
                );
            }
        }
        for ((pname, _), b) in param_specs(&model.cfg).iter().zip(&off) {
            // An expert that no token of a small random batch chose has a zero gradient.
            assert!(
                pname.contains(".experts.") || b.iter().any(|&x| x != 0.0),
                "{name} {pname}: gradient is all zeros"
            );
        }
    }
}

/// Central differences of the full objective (NCA plus the load-balancing loss on Mixtral)
/// against the analytic gradient, for the largest entries of a sample of tensors.
#[test]
fn gradients_agree_with_finite_differences() {
    let mut rng = rng("gradients_agree_with_finite_differences");
    for name in ["tiny-mistral", "tiny-mixtral"] {
        let mut policy = load(name);
        let reference = load(&format!("{name}-ref"));
        let groups = random_groups(&mut rng, 3, 256, 7, 4, 6);
        let spec = LossSpec {
            beta: 1.0,
            alpha: 0.5,
            ..LossSpec::new(LossKind::Nca)
        };
        let aux_coef = if policy.cfg.moe.is_some() { 0.5 } else { 0.0 };
        let opts = StepOptions {
            recompute: RecomputePolicy::Full,
            aux_coef,
        };
        let ref_stats =
            step::reference_stats(&CpuOps, &policy, Some(&reference), &groups, &spec).unwrap();
        let objective = |m: &Model<Vec<f32>>| {
            step::loss_and_grads(&CpuOps, m, ref_stats.as_deref(), &groups, &spec, &opts).unwrap()
        };
        let base = objective(&policy);
        let analytic: Vec<Vec<f32>> = base.grads.iter().into_iter().cloned().collect();
        let specs = param_specs(&policy.cfg);
        let (mut checked, mut at_routing_boundary) = (0, 0);
        for (t, (pname, _)) in specs.iter().enumerate() {
            if t % 3 != 0 && !pname.contains("gate.weight") && !pname.contains("norm") {
                continue;
            }
            let g = &analytic[t];
            let mut order: Vec<usize> = (0..g.len()).collect();
            order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
            let max = g[order[0]].abs() as f64;
            for &j in order
                .iter()
                .take(2)
                .chain(std::iter::once(&order[rng.gen_range(0..order.len())]))
            {
                let orig = policy.params.iter_mut()[t][j];
                // The one-sided and central differences with step h.
                let mut slopes = |h: f32| {
                    let (plus, minus) = (orig + h, orig - h);
                    policy.params.iter_mut()[t][j] = plus;
                    let up = objective(&policy).logged.loss;
                    policy.params.iter_mut()[t][j] = minus;
                    let down = objective(&policy).logged.loss;
                    policy.params.iter_mut()[t][j] = orig;
                    let (h_up, h_down) = ((plus - orig) as f64, (orig - minus) as f64);
                    let (forward, backward) = (
                        (up - base.logged.loss) / h_up,
                        (base.logged.loss - down) / h_down,
                    );
                    (forward, backward, (up - down) / (h_up + h_down))
                };
                let exact = g[j] as f64;
                let bound = 2e-2 * exact.abs() + 2e-3 * max + 1e-5;
                // A top-k routing decision that flips inside [-h, h] makes the objective
                // jump, and a difference quotient across the jump grows as the step shrinks,
                // where a smooth one settles. So a quotient at step h is trusted only where a
                // quarter of the step moves it by less than the bound (the smaller step's own
                // quotients carry more of the loss's f32 noise): the central one; else, when the
                // routing is at a tie at the point itself (a perturbation of either sign
                // flips it: every parameter upstream jumps on one side), the one-sided
                // quotient of the side that keeps the point's routing, the one the analytic
                // gradient differentiates. None settles: the point says nothing.
                let (coarse, fine) = (slopes(1e-3), slopes(2.5e-4));
                let settled = [(coarse.2, fine.2), (coarse.0, fine.0), (coarse.1, fine.1)]
                    .into_iter()
                    .find(|&(at_h, at_quarter)| (at_h - at_quarter).abs() <= bound);
                let Some((numeric, _)) = settled else {
                    at_routing_boundary += 1;
                    continue;
                };
                let err = (numeric - exact).abs();
                assert!(
                    err <= bound,
                    "{name} {pname}[{j}]: analytic {exact:.6e}, finite difference {numeric:.6e}"
                );
                checked += 1;
            }
        }
        assert!(
            at_routing_boundary <= checked / 5,
            "{name}: {at_routing_boundary} of {} points at a discontinuity",
            checked + at_routing_boundary
        );
        assert!(checked >= 20, "{name}: only {checked} entries checked");
    }
}
