//! The model on the device layer (`--device emu`; `ops::cuda::ops::DeviceOps`) against the CPU
//! reference: statistics, losses and every parameter gradient of a training step, on fresh
//! random groups of awkward sizes, for the dense and the mixture-of-experts fixture.

mod common;

use contralign::loss::{LossKind, LossSpec};
use contralign::model::{Model, StepOptions};
use contralign::ops::cpu::CpuOps;
use contralign::ops::cuda::device::Device;
use contralign::ops::cuda::ops::DeviceOps;
use contralign::ops::Ops;
use contralign::step;

/// The bounds the CPU reference itself meets against transformers' float64 goldens
/// (tests/golden_model.rs): the device path runs its kernels in fp32 with fp32 reductions,
/// far inside them (about 1e-6 relative).
const STATS_REL: f64 = 1e-5;
const GRAD_REL: f64 = 1e-4;

fn rel_norm_err(got: &[f32], want: &[f32]) -> f64 {
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum();
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

fn check_model(name: &str, checkpointing: bool) {
    let mut rng = common::rng(name);
    let dir = common::fixture(name);
    let reference_dir = common::fixture(&format!("{name}-ref"));
    let cpu = Model::load(&CpuOps, &dir).unwrap();
    let reference = Model::load(&CpuOps, &reference_dir).unwrap();
    let device = Device::open(contralign::ops::cuda::device::DeviceKind::Emu).unwrap();
    let ops = DeviceOps::new(&device);
    let on_device = Model::load(&ops, &dir).unwrap();
    ops.check().unwrap();

    let vocab = cpu.cfg.vocab_size as u32;
    let groups = common::random_groups(&mut rng, 3, vocab, 9, 4, 7);
    let spec = LossSpec::new(LossKind::Nca);
    let opts = StepOptions {
        checkpointing,
        aux_coef: 0.02,
    };
    let ref_stats = step::reference_stats(&CpuOps, &cpu, Some(&reference), &groups, &spec)
        .unwrap()
        .unwrap();
    let want =
        step::loss_and_grads(&CpuOps, &cpu, Some(&ref_stats), &groups, &spec, &opts).unwrap();
    let got =
        step::loss_and_grads(&ops, &on_device, Some(&ref_stats), &groups, &spec, &opts).unwrap();
    ops.check().unwrap();

    let what = format!("{name} checkpointing={checkpointing}");
    common::assert_close(&format!("{what} loss"), got.loss, want.loss, STATS_REL);
    if let (Some(g), Some(w)) = (got.aux_loss, want.aux_loss) {
        common::assert_close(&format!("{what} aux"), g, w, STATS_REL);
    }
    assert_eq!(got.aux_loss.is_some(), want.aux_loss.is_some());
    for (i, (g, w)) in got.stats.iter().zip(&want.stats).enumerate() {
        common::assert_close(&format!("{what} S[{i}]"), g.logp_sum, w.logp_sum, STATS_REL);
        assert_eq!(g.tokens, w.tokens);
    }
    let names = contralign::model::params::param_specs(&cpu.cfg);
    let (got_grads, want_grads) = (got.grads.iter(), want.grads.iter());
    assert_eq!(got_grads.len(), want_grads.len());
    for ((g, w), (tensor, _)) in got_grads.into_iter().zip(want_grads).zip(&names) {
        let err = rel_norm_err(&ops.download(g), w);
        assert!(
            err <= GRAD_REL,
            "{what}: gradient of {tensor}: relative error {err:.2e}"
        );
    }
    ops.check().unwrap();
}

#[test]
fn a_mistral_step_on_the_emulated_device_matches_the_cpu() {
    check_model("tiny-mistral", false);
    check_model("tiny-mistral", true);
}

#[test]
fn a_mixtral_step_on_the_emulated_device_matches_the_cpu() {
    check_model("tiny-mixtral", true);
}

#[test]
fn a_failing_device_op_is_reported_once_and_stops_the_work_after_it() {
    let device = Device::Emu;
    let ops = DeviceOps::new(&device);
    let table = ops.upload(&[1.0; 12]);
    // An id past a 4-row table: the kernel traps.
    let rows = ops.embedding(&table, &[1, 7], 3);
    let err = ops.check().unwrap_err();
    assert!(format!("{err:#}").contains("embedding"), "{err:#}");
    assert_eq!(ops.download(&rows), vec![0.0; 6]);
    ops.check().unwrap();
    let rows = ops.embedding(&table, &[1, 3], 3);
    assert_eq!(ops.download(&rows), vec![1.0; 6]);
    ops.check().unwrap();
}
