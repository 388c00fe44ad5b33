//! bf16 storage on the emulated device (`DeviceOps` at `Dtype::Bf16`) on both tiny fixtures:
//! score, eval and grads against the transformers float64 goldens within the bounds of
//! docs/numerics.md §6, against the CPU's bf16-rounding mode (`RoundedCpuOps`) within the
//! much tighter like-for-like bounds, and f32 on the emulator against the CPU reference.

mod common;

use common::{fixture, hyperparameters, rel_err, spec_from_json, Golden};
use contralign::data::pretokenized::read_file;
use contralign::data::Group;
use contralign::loss::{LossKind, LossSpec};
use contralign::memory_plan::RecomputePolicy;
use contralign::model::params::param_specs;
use contralign::model::{Model, ResponseStats, StepOptions};
use contralign::ops::cpu::{CpuOps, RoundedCpuOps};
use contralign::ops::cuda::device::Device;
use contralign::ops::cuda::ops::DeviceOps;
use contralign::ops::storage::Dtype;
use contralign::step;
use contralign::step::LossOps;
use std::sync::OnceLock;

const MODELS: [&str; 2] = ["tiny-mistral", "tiny-mixtral"];

/// What one backend computes of a fixture: statistics per data kind and model, and per loss
/// case the eval loss, the step loss and the gradients.
struct Outputs {
    stats: Vec<(String, Vec<ResponseStats>)>,
    cases: Vec<(String, f64, f64, Vec<Vec<f32>>)>,
}

fn data(model: &str, kind: &str) -> Vec<Group> {
    read_file(&fixture(&format!("{model}.{kind}.jsonl"))).unwrap()
}

/// The loss cases checked: one reference-based listwise, one pairwise, one reference-free.
const CASES: [(&str, LossKind, &str); 3] = [
    ("nca", LossKind::Nca, "reward"),
    ("dpo", LossKind::Dpo, "pairs"),
    ("sft", LossKind::Sft, "reward"),
];

fn run<O: LossOps>(ops: &O, name: &str) -> Outputs {
    let policy = Model::load(ops, &fixture(name)).unwrap();
    let reference = Model::load(ops, &fixture(&format!("{name}-ref"))).unwrap();
    let mut stats = Vec::new();
    for kind in ["reward", "pairs"] {
        for (model, which) in [(&policy, "policy"), (&reference, "ref")] {
            let batch = step::pack(model, &data(name, kind)).unwrap();
            stats.push((format!("{kind}.stats.{which}"), model.score(ops, &batch)));
        }
    }
    let mut out = Vec::new();
    for (golden_name, kind, kind_data) in CASES {
        let spec: LossSpec = spec_from_json(kind, &hyperparameters(name, golden_name));
        let groups = data(name, kind_data);
        let ref_stats =
            step::reference_stats(ops, &policy, Some(&reference), &groups, &spec).unwrap();
        let eval = step::evaluate(ops, &policy, ref_stats.as_deref(), &groups, &spec, 0.0).unwrap();
        let opts = StepOptions {
            recompute: RecomputePolicy::Full,
            aux_coef: 0.0,
        };
        let step = step::loss_and_grads(ops, &policy, ref_stats.as_deref(), &groups, &spec, &opts)
            .unwrap();
        let grads = step
            .grads
            .iter()
            .into_iter()
            .map(|g| ops.download(g))
            .collect();
        out.push((golden_name.to_string(), eval.loss, step.logged.loss, grads));
    }
    ops.check().unwrap();
    Outputs { stats, cases: out }
}

fn golden_outputs(name: &str) -> Outputs {
    let golden = Golden::load(&format!("{name}.golden.safetensors"));
    let cfg = contralign::config::ModelConfig::load(&fixture(name)).unwrap();
    let stats = ["reward", "pairs"]
        .iter()
        .flat_map(|kind| ["policy", "ref"].map(|w| format!("{kind}.stats.{w}")))
        .map(|key| {
            let t = golden.get(&key);
            let stats = t
                .chunks(4)
                .map(|r| ResponseStats {
                    logp_sum: r[0],
                    tokens: r[1] as usize,
                    logp_mean: r[2],
                    eos_logp: (!r[3].is_nan()).then_some(r[3]),
                })
                .collect();
            (key, stats)
        })
        .collect();
    let cases = CASES
        .iter()
        .map(|(g, _, _)| {
            let loss = golden.scalar(&format!("loss.{g}"));
            let grads = param_specs(&cfg)
                .iter()
                .map(|(p, _)| {
                    golden
                        .get(&format!("grad.{g}.{p}"))
                        .iter()
                        .map(|&v| v as f32)
                        .collect()
                })
                .collect();
            (g.to_string(), loss, loss, grads)
        })
        .collect();
    Outputs { stats, cases }
}

/// bf16's unit roundoff: 8 significant bits, round to nearest (docs/numerics.md §3).
const U_BF16: f64 = 1.0 / 256.0;
/// fp32's unit roundoff.
const U_F32: f64 = 1.0 / 16_777_216.0;
/// The confidence factor of the probabilistic bound (docs/numerics.md §6).
const LAMBDA: f64 = 6.0;
/// The largest error of a device kernel against the CPU before it stores, in units of
/// `U_F32` (the SwiGLU bound of docs/numerics.md §3, the largest of the table).
const KERNEL_ULPS: f64 = 32.0;

/// bf16 roundings on the longest chain from the weights to the log-probs
/// (docs/numerics.md §6): the embedding, the final norm, the LM head and its logits chunk,
/// and per layer 16.
fn forward_roundings(layers: usize) -> f64 {
    (4 + 16 * layers) as f64
}

/// What one rounding contributes in the like-for-like comparison: the elements whose fp32
/// and f64 values straddle a rounding boundary flip by one bf16 step.
fn like_for_like_unit() -> f64 {
    (2.0 * KERNEL_ULPS * U_F32 * U_BF16).sqrt() + KERNEL_ULPS * U_F32
}

/// The relative bounds `(statistics and losses, gradients)` for `unit` per rounding.
fn relative_bounds(name: &str, unit: f64) -> (f64, f64) {
    let cfg = contralign::config::ModelConfig::load(&fixture(name)).unwrap();
    let r = forward_roundings(cfg.num_layers);
    (LAMBDA * r.sqrt() * unit, LAMBDA * (2.0 * r).sqrt() * unit)
}

/// The bounds of a bf16 computation against the exact values (the goldens).
fn bf16_bounds(name: &str) -> Bounds {
    let (stats, grads) = relative_bounds(name, U_BF16);
    Bounds {
        stats,
        grads,
        element: grads,
    }
}

/// The bounds of two bf16 computations that round at the same places: in norm the
/// like-for-like unit; element by element, where a store flipped by a bf16 step moves an
/// element by that much, what each side's bound against the exact values gives their
/// difference: twice the bf16 bound.
fn like_for_like_bounds(name: &str) -> Bounds {
    let (stats, grads) = relative_bounds(name, like_for_like_unit());
    Bounds {
        stats,
        grads,
        element: 2.0 * bf16_bounds(name).element,
    }
}

fn relative(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs().max(f64::MIN_POSITIVE)
}

/// Bounds of one comparison (docs/numerics.md §6): `stats` relative for every statistic and
/// loss; `grads` relative in norm for every gradient tensor; and element by element, each
/// gradient `|got − want| ≤ element · (|want| + rms(want))`: a relative part, and an absolute
/// part that is the same bound on the tensor's own scale, for elements whose terms cancel
/// (`element` already holds the confidence factor λ).
#[derive(Clone, Copy)]
struct Bounds {
    stats: f64,
    grads: f64,
    element: f64,
}

impl Bounds {
    /// `(absolute, relative)` of the element-wise check of a gradient tensor.
    fn element_bounds(&self, want: &[f64]) -> (f64, f64) {
        let rms = (want.iter().map(|w| w * w).sum::<f64>() / want.len().max(1) as f64).sqrt();
        (self.element * rms, self.element)
    }
}

/// Every element of `got` within `absolute + relative · |want|` of `want`.
fn assert_elements(at: &str, got: &[f32], want: &[f64], (absolute, relative): (f64, f64)) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        let bound = absolute + relative * w.abs();
        assert!(
            err <= bound,
            "{at}, element {i}: {g} vs {w}, |difference| {err:.2e} > {absolute:.2e} + \
             {relative:.2e} · |want| = {bound:.2e}"
        );
    }
}

/// Every statistic, loss and gradient of `got` within `bounds` of `want`.
fn assert_within(what: &str, name: &str, got: &Outputs, want: &Outputs, bounds: Bounds) {
    let Bounds { stats, grads, .. } = bounds;
    let cfg = contralign::config::ModelConfig::load(&fixture(name)).unwrap();
    let names = param_specs(&cfg);
    assert_eq!(got.stats.len(), want.stats.len());
    for ((key, g), (_, w)) in got.stats.iter().zip(&want.stats) {
        assert_eq!(g.len(), w.len(), "{what} {name} {key}: responses");
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            let at = format!("{what} {name} {key} response {i}");
            assert_eq!(a.tokens, b.tokens, "{at}: tokens");
            for (field, x, y) in [
                ("S", a.logp_sum, b.logp_sum),
                ("A", a.logp_mean, b.logp_mean),
            ] {
                let err = relative(x, y);
                assert!(
                    err <= stats,
                    "{at} {field}: {x} vs {y}, relative {err:.2e} > {stats:.2e}"
                );
            }
            match (a.eos_logp, b.eos_logp) {
                (Some(x), Some(y)) => {
                    let err = relative(x, y);
                    assert!(
                        err <= stats,
                        "{at} E: {x} vs {y}, relative {err:.2e} > {stats:.2e}"
                    );
                }
                (x, y) => assert_eq!(x.is_some(), y.is_some(), "{at}: E present"),
            }
        }
    }
    assert_eq!(got.cases.len(), want.cases.len());
    for ((case, g_eval, g_loss, g_grads), (_, w_eval, w_loss, w_grads)) in
        got.cases.iter().zip(&want.cases)
    {
        for (field, x, y) in [("eval loss", g_eval, w_eval), ("step loss", g_loss, w_loss)] {
            let err = relative(*x, *y);
            assert!(
                err <= stats,
                "{what} {name} {case} {field}: {x} vs {y}, relative {err:.2e} > {stats:.2e}"
            );
        }
        assert_eq!(g_grads.len(), names.len());
        for ((g, w), (tensor, _)) in g_grads.iter().zip(w_grads).zip(&names) {
            let w: Vec<f64> = w.iter().map(|&v| v as f64).collect();
            let at = format!("{what} {name} {case}: gradient of {tensor}");
            let err = rel_err(g, &w);
            assert!(err <= grads, "{at}: relative error {err:.2e} > {grads:.2e}");
            assert_elements(&at, g, &w, bounds.element_bounds(&w));
        }
    }
}

/// The emulator's bf16 outputs of each fixture, computed once for the tests below.
fn emu_bf16(name: &str) -> &'static Outputs {
    static OUTPUTS: OnceLock<Vec<Outputs>> = OnceLock::new();
    let all = OUTPUTS.get_or_init(|| {
        MODELS
            .iter()
            .map(|m| run(&DeviceOps::with_storage(&Device::Emu, Dtype::Bf16), m))
            .collect()
    });
    &all[MODELS.iter().position(|m| *m == name).unwrap()]
}

#[test]
fn bf16_on_the_emulator_is_within_the_bf16_bounds_of_the_goldens() {
    for name in MODELS {
        assert_within(
            "emu bf16 vs golden",
            name,
            emu_bf16(name),
            &golden_outputs(name),
            bf16_bounds(name),
        );
    }
}

#[test]
fn bf16_on_the_emulator_matches_the_cpu_bf16_rounding_mode_like_for_like() {
    for name in MODELS {
        let cpu = run(&RoundedCpuOps::new(Dtype::Bf16), name);
        // The CPU mode itself is a bf16 computation: within the golden bounds too.
        assert_within(
            "cpu bf16 vs golden",
            name,
            &cpu,
            &golden_outputs(name),
            bf16_bounds(name),
        );
        let bounds = like_for_like_bounds(name);
        assert_within("emu bf16 vs cpu bf16", name, emu_bf16(name), &cpu, bounds);
    }
}

#[test]
fn f32_on_the_emulator_matches_the_cpu_reference() {
    for name in MODELS {
        let device = run(&DeviceOps::new(&Device::Emu), name);
        let cpu = run(&CpuOps, name);
        let bounds = Bounds {
            stats: 1e-5,
            grads: 1e-5,
            element: 1e-5,
        };
        assert_within("emu f32 vs cpu", name, &device, &cpu, bounds);
    }
}
