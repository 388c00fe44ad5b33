//! A whole training step on a device against the CPU reference (tests/device_ops.rs on the
//! emulator, tests/gpu.rs on a GPU).

use contralign::loss::{LossKind, LossSpec};
use contralign::memory_plan::RecomputePolicy;
use contralign::model::{Model, StepOptions};
use contralign::ops::cpu::CpuOps;
use contralign::ops::cuda::device::Device;
use contralign::ops::cuda::ops::DeviceOps;
use contralign::ops::Ops;
use contralign::step;

/// The bounds the CPU reference itself meets against transformers' float64 goldens
/// (tests/golden_model.rs): the device path runs its kernels in fp32 with fp32 reductions,
/// far inside them (about 1e-6 relative).
pub const STATS_REL: f64 = 1e-5;
pub const GRAD_REL: f64 = 1e-4;

/// A training step (NCA + aux) of fixture `name` on `device` against the CPU reference:
/// loss, statistics and every parameter gradient, on fresh random groups.
pub fn check_step_on_device(device: &Device, name: &str, recompute: RecomputePolicy) {
    let mut rng = crate::common::rng(name);
    let dir = crate::common::fixture(name);
    let reference_dir = crate::common::fixture(&format!("{name}-ref"));
    let cpu = Model::load(&CpuOps, &dir).unwrap();
    let reference = Model::load(&CpuOps, &reference_dir).unwrap();
    let ops = DeviceOps::new(device);
    let on_device = Model::load(&ops, &dir).unwrap();
    ops.check().unwrap();

    let vocab = cpu.cfg.vocab_size as u32;
    let groups = crate::common::random_groups(&mut rng, 3, vocab, 9, 4, 7);
    let spec = LossSpec::new(LossKind::Nca);
    let opts = StepOptions {
        recompute,
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

    let what = format!("{name} recompute={}", recompute.name());
    crate::common::assert_close(&format!("{what} loss"), got.loss, want.loss, STATS_REL);
    if let (Some(g), Some(w)) = (got.aux_loss, want.aux_loss) {
        crate::common::assert_close(&format!("{what} aux"), g, w, STATS_REL);
    }
    assert_eq!(got.aux_loss.is_some(), want.aux_loss.is_some());
    // The metrics come from the loss kernels' summary on the device, from the host's loss
    // library on the CPU.
    crate::common::assert_metrics_close(
        &what,
        &got.metrics.means(),
        &want.metrics.means(),
        STATS_REL,
        spec.beta,
    );
    let batch = step::pack(&cpu, &groups).unwrap();
    let (got_stats, want_stats) = (on_device.score(&ops, &batch), cpu.score(&CpuOps, &batch));
    ops.check().unwrap();
    for (i, (g, w)) in got_stats.iter().zip(&want_stats).enumerate() {
        crate::common::assert_close(&format!("{what} S[{i}]"), g.logp_sum, w.logp_sum, STATS_REL);
        assert_eq!(g.tokens, w.tokens);
    }
    let names = contralign::model::params::param_specs(&cpu.cfg);
    let (got_grads, want_grads) = (got.grads.iter(), want.grads.iter());
    assert_eq!(got_grads.len(), want_grads.len());
    for ((g, w), (tensor, _)) in got_grads.into_iter().zip(want_grads).zip(&names) {
        let want: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        let err = crate::common::rel_err(&ops.download(g), &want);
        assert!(
            err <= GRAD_REL,
            "{what}: gradient of {tensor}: relative error {err:.2e}"
        );
    }
    ops.check().unwrap();
}
