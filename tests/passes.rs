//! `score`, `eval`, `grads` and `precompute-ref` run a data set in passes of at most
//! `--micro-tokens` packed tokens (src/step.rs, `*_in_passes`): the statistics, the losses,
//! the metrics and the gradients are those of one pass over everything, to rounding, on
//! random groups at several pass sizes; Mixtral's aux loss combines per pass, as a training
//! step's micro-batches do, so only its statistics-based figures are compared.

mod common;

use common::{fixture, random_groups, rel_err, rng};
use contralign::data::token_chunks;
use contralign::loss::{LossKind, LossSpec};
use contralign::memory_plan::RecomputePolicy;
use contralign::model::{Model, StepOptions};
use contralign::ops::cpu::CpuOps;
use contralign::step;

/// Relative error allowed between one pass and several: the same f64 sums on the CPU, in
/// another order only where metrics and losses combine over passes.
const REL: f64 = 1e-12;

fn close(what: &str, got: f64, want: f64) {
    let err = (got - want).abs() / want.abs().max(1e-300);
    assert!(
        err <= REL || (got.is_nan() && want.is_nan()),
        "{what}: {got} in passes, {want} at once (relative {err:.2e})"
    );
}

#[test]
fn token_chunks_cut_in_order_within_the_budget() {
    let mut rng = rng("token_chunks_cut_in_order_within_the_budget");
    let groups = random_groups(&mut rng, 23, 256, 9, 4, 10);
    for budget in [0, 1, 17, 40, 100, usize::MAX] {
        let chunks = token_chunks(&groups, budget);
        let mut next = 0;
        for c in &chunks {
            assert_eq!(c.start, next, "budget {budget}: chunks are consecutive");
            assert!(c.end > c.start, "budget {budget}: no empty chunk");
            let tokens: usize = groups[c.clone()].iter().map(|g| g.packed_len()).sum();
            assert!(
                tokens <= budget || c.len() == 1,
                "budget {budget}: {tokens} tokens in {} groups",
                c.len()
            );
            // Greedy: the next group would not have fitted.
            if c.end < groups.len() {
                assert!(tokens + groups[c.end].packed_len() > budget);
            }
            next = c.end;
        }
        assert_eq!(next, groups.len(), "budget {budget}: every group");
    }
}

#[test]
fn passes_give_the_statistics_losses_metrics_and_gradients_of_one_pass() {
    let mut rng = rng("passes_give_the_statistics_losses_metrics_and_gradients_of_one_pass");
    for name in ["tiny-mistral", "tiny-mixtral"] {
        let policy = Model::load(&CpuOps, &fixture(name)).unwrap();
        let reference = Model::load(&CpuOps, &fixture(&format!("{name}-ref"))).unwrap();
        let moe = policy.cfg.moe.is_some();
        let groups = random_groups(&mut rng, 9, 256, 9, 4, 10);
        let spec = LossSpec::new(LossKind::Nca);
        let opts = StepOptions {
            recompute: RecomputePolicy::Full,
            aux_coef: if moe { 0.02 } else { 0.0 },
        };
        let refs = step::reference_stats(&CpuOps, &policy, Some(&reference), &groups, &spec)
            .unwrap()
            .unwrap();
        let eval =
            step::evaluate(&CpuOps, &policy, Some(&refs), &groups, &spec, opts.aux_coef).unwrap();
        let whole =
            step::loss_and_grads(&CpuOps, &policy, Some(&refs), &groups, &spec, &opts).unwrap();
        let whole_grads: Vec<Vec<f64>> = whole
            .grads
            .iter()
            .into_iter()
            .map(|g| g.iter().map(|&x| x as f64).collect())
            .collect();
        for max_tokens in [1, 30, 75] {
            let at = format!("{name}, passes of {max_tokens} tokens");
            let mut seen = Vec::new();
            let refs_in_passes = step::reference_stats_in_passes(
                &CpuOps,
                &policy,
                Some(&reference),
                &groups,
                &spec,
                max_tokens,
            )
            .unwrap()
            .unwrap();
            assert_eq!(refs_in_passes.len(), refs.len());
            for (a, b) in refs_in_passes.iter().zip(&refs) {
                assert_eq!(a.tokens, b.tokens, "{at}");
                close(&format!("{at}: reference S"), a.logp_sum, b.logp_sum);
            }
            let eval_in_passes = step::evaluate_in_passes(
                &CpuOps,
                &policy,
                Some(&refs),
                &groups,
                &spec,
                opts.aux_coef,
                max_tokens,
                |done| seen.push(done),
            )
            .unwrap();
            assert_eq!(seen.last(), Some(&groups.len()), "{at}: progress");
            assert_eq!(seen.len(), token_chunks(&groups, max_tokens).len());
            let per_pass = ["loss", "aux_loss"];
            for ((name_a, a), (name_b, b)) in eval_in_passes.metrics.iter().zip(&eval.metrics) {
                assert_eq!(name_a, name_b, "{at}: metric names");
                if !(moe && per_pass.contains(&name_a.as_str())) {
                    close(&format!("{at}: eval {name_a}"), *a, *b);
                }
            }
            assert_eq!(eval_in_passes.metrics.len(), eval.metrics.len());
            if moe {
                continue;
            }
            close(&format!("{at}: eval loss"), eval_in_passes.loss, eval.loss);
            let passes = step::loss_and_grads_in_passes(
                &CpuOps,
                &policy,
                Some(&refs),
                &groups,
                &spec,
                &opts,
                max_tokens,
                |_| {},
            )
            .unwrap();
            close(
                &format!("{at}: step loss"),
                passes.logged.loss,
                whole.logged.loss,
            );
            close(
                &format!("{at}: eval vs step loss"),
                passes.logged.loss,
                eval.loss,
            );
            for ((g, w), (tensor, _)) in passes
                .grads
                .iter()
                .into_iter()
                .zip(&whole_grads)
                .zip(contralign::model::params::param_specs(&policy.cfg))
            {
                let err = rel_err(g, w);
                assert!(err <= 1e-6, "{at}: gradient of {tensor}: {err:.2e}");
            }
        }
    }
}
