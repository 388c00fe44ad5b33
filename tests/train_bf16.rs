//! Training with bf16 stores (docs/numerics.md §7) on the emulated device engine against the
//! CPU trainer in its bf16-rounding mode, for every precision option: the two round the same
//! values at the same places and draw the same stochastic roundings, so they differ only
//! where an fp32 accumulation order (the device's kernels; the CPU sums in f64) moves a value
//! across a bf16 rounding boundary.
//!
//! Bounds, per quantity, for `S` steps of learning rate at most `lr`:
//!
//! - loss and gradient norm per step: relative `8·2⁻⁸`. A boundary crossing changes one
//!   stored value by one bf16 ulp (`2⁻⁸` relative at most, half an ulp each way from the exact
//!   value); the loss and the norm are means over many such values, of which a few in 10⁴
//!   cross, so the mean moves by far less than one ulp; 8 ulps leaves room for the weights'
//!   differences of earlier steps.
//! - each weight: `|w_emu − w_cpu| ≤ S·(2κ·lr + ulp(w))`, `κ = (1 − β1)/√(1 − β2)` bounding
//!   Adam's `|m̂/(√v̂ + ε)|` (Kingma & Ba, §2.1): per step, the two updates differ by at most
//!   both their sizes, and each rounding to bf16 (to nearest, or to a neighbour when
//!   stochastic) adds at most one ulp.
//! - that the stochastic roundings are the device's: after the first step, from the same
//!   weights, at least 99% of each bf16 store (the weights without a master copy, bf16
//!   moments) is bit-identical, and each f32 store is within `10⁻⁴` of the CPU's in norm. A
//!   different hash would round about half of them the other way. Later steps are not
//!   compared bit for bit: once one weight crosses a boundary, the activations of the next
//!   forward move by about `10⁻³`, and a stochastic rounding then flips with probability
//!   about that times 2⁸, so identity decays step by step although both engines are right.

mod common;

use common::{fixture, random_groups, rng};
use contralign::loss::{LossKind, LossSpec};
use contralign::memory_plan::{MasterWeights, PrecisionOptions, RecomputePolicy, StorageDtype};
use contralign::model::Model;
use contralign::ops::cpu::CpuOps;
use contralign::ops::cuda::device::Device;
use contralign::train::optimizer::AdamWConfig;
use contralign::train::plan::{Length, StepBudget};
use contralign::train::schedule::ScheduleKind;
use contralign::train::trainer::{Reference, StepRecord, TrainOptions, Trainer, Warmup};

const STEPS: u64 = 3;
const LR: f64 = 2e-3;
const BF16_ULP: f64 = 1.0 / 256.0;

fn options(precision: PrecisionOptions) -> TrainOptions {
    TrainOptions {
        spec: LossSpec::new(LossKind::Nca),
        aux_coef: 0.02,
        recompute: RecomputePolicy::Selective,
        precision,
        budget: StepBudget::Groups(3),
        micro_tokens: 40,
        seed: 17,
        length: Length::Steps(STEPS),
        adamw: AdamWConfig {
            weight_decay: 0.05,
            ..AdamWConfig::default()
        },
        schedule: ScheduleKind::Constant,
        lr: LR,
        warmup: Warmup::Steps(0),
        max_grad_norm: 0.05,
        max_bad_steps: 3,
    }
}

fn trainer(model: &str, groups: &[contralign::data::Group], opts: TrainOptions) -> Trainer {
    let load = |name: &str| Model::load(&CpuOps, &fixture(name)).unwrap();
    let reference = Reference::Model(Box::new(load(&format!("{model}-ref"))));
    Trainer::new(opts, load(model), reference, groups.to_vec()).unwrap()
}

/// The steps after the first.
fn run(trainer: &mut Trainer) -> Vec<StepRecord> {
    (1..STEPS).map(|_| trainer.train_step().unwrap()).collect()
}

/// The bf16 ulp of `x` (its spacing at `|x|`).
fn ulp(x: f32) -> f64 {
    let bits = x.abs().to_bits() & 0xffff_0000;
    (f32::from_bits(bits + 0x1_0000) - f32::from_bits(bits)) as f64
}

/// Every bf16 combination of master copy, gradient and moment types.
fn bf16_options() -> Vec<PrecisionOptions> {
    let mut out = Vec::new();
    for master in [MasterWeights::None, MasterWeights::F32] {
        for grads in [StorageDtype::Bf16, StorageDtype::F32] {
            for moments in [StorageDtype::Bf16, StorageDtype::F32] {
                out.push(PrecisionOptions {
                    precision: StorageDtype::Bf16,
                    master,
                    moments,
                    grads,
                });
            }
        }
    }
    out
}

/// The share of `a` and `b` that is bit-identical.
fn identical(a: &[f32], b: &[f32]) -> f64 {
    let same = a
        .iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() == y.to_bits())
        .count();
    same as f64 / a.len().max(1) as f64
}

/// The relative difference of `a` from `b` in norm.
fn norm_difference(a: &[f32], b: &[f32]) -> f64 {
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

/// Every store after one step: bf16 ones bit for bit, f32 ones in norm.
fn check_stores(what: &str, precision: PrecisionOptions, cpu: &Trainer, emu: &Trainer) {
    let flat =
        |stores: Vec<&Vec<f32>>| -> Vec<f32> { stores.into_iter().flatten().copied().collect() };
    let weights = match precision.master {
        MasterWeights::None => precision.precision,
        MasterWeights::F32 => StorageDtype::F32,
    };
    let stores = [
        (
            "weights",
            weights,
            flat(emu.policy.params.iter()),
            flat(cpu.policy.params.iter()),
        ),
        (
            "m",
            precision.moments,
            flat(emu.optimizer.exp_avg.iter().collect()),
            flat(cpu.optimizer.exp_avg.iter().collect()),
        ),
        (
            "v",
            precision.moments,
            flat(emu.optimizer.exp_avg_sq.iter().collect()),
            flat(cpu.optimizer.exp_avg_sq.iter().collect()),
        ),
    ];
    for (name, dtype, got, want) in stores {
        match dtype {
            StorageDtype::Bf16 => {
                let share = identical(&got, &want);
                assert!(
                    share >= 0.99,
                    "{what}: {:.1}% of the {name} are identical after one step",
                    100.0 * share
                );
            }
            StorageDtype::F32 => {
                let diff = norm_difference(&got, &want);
                assert!(
                    diff <= 1e-4,
                    "{what}: the {name} differ by {diff:.1e} in norm after one step"
                );
            }
        }
    }
}

fn check(model: &str, precision: PrecisionOptions, groups: &[contralign::data::Group]) {
    let what = format!("{model} {}", precision.describe());
    let mut cpu = trainer(model, groups, options(precision));
    let mut emu = trainer(model, groups, options(precision));
    emu.use_device(Device::Emu).unwrap();
    let (mut want, mut got) = (
        vec![cpu.train_step().unwrap()],
        vec![emu.train_step().unwrap()],
    );
    emu.sync_to_host().unwrap();
    check_stores(&what, precision, &cpu, &emu);
    want.extend(run(&mut cpu));
    got.extend(run(&mut emu));
    assert!(
        want.iter().any(|r| r.grad_norm > 0.05),
        "{what}: no step was clipped"
    );
    for (g, w) in got.iter().zip(&want) {
        assert!(
            g.skipped.is_none() && w.skipped.is_none(),
            "{what}: a step was skipped"
        );
        common::assert_close(&format!("{what} loss"), g.loss, w.loss, 8.0 * BF16_ULP);
        common::assert_close(
            &format!("{what} grad_norm"),
            g.grad_norm,
            w.grad_norm,
            8.0 * BF16_ULP,
        );
    }
    emu.sync_to_host().unwrap();
    let (b1, b2) = AdamWConfig::default().betas;
    let kappa = (1.0 - b1) / (1.0 - b2).sqrt();
    let names = contralign::model::params::param_specs(&cpu.policy.cfg);
    for ((g, w), (name, _)) in emu
        .policy
        .params
        .iter()
        .iter()
        .zip(cpu.policy.params.iter())
        .zip(&names)
    {
        for (&a, &b) in g.iter().zip(w.iter()) {
            let bound = STEPS as f64 * (2.0 * kappa * LR + ulp(b));
            let diff = (a as f64 - b as f64).abs();
            assert!(
                diff <= bound,
                "{what}: {name}: {a} vs {b}, bound {bound:.2e}"
            );
        }
    }
}

#[test]
fn bf16_training_on_the_emulated_device_equals_the_cpu_rounding_mode() {
    let mut rng = rng("bf16_training_on_the_emulated_device_equals_the_cpu_rounding_mode");
    let groups = random_groups(&mut rng, 7, 256, 9, 4, 10);
    for precision in bf16_options() {
        check("tiny-mistral", precision, &groups);
    }
    check("tiny-mixtral", PrecisionOptions::default(), &groups);
}
