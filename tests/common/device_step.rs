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
    let want_step =
        step::loss_and_grads(&CpuOps, &cpu, Some(&ref_stats), &groups, &spec, &opts).unwrap();
    let got_step =
        step::loss_and_grads(&ops, &on_device, Some(&ref_stats), &groups, &spec, &opts).unwrap();
    let (got, want) = (&got_step.logged, &want_step.logged);
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
    let (got_grads, want_grads) = (got_step.grads.iter(), want_step.grads.iter());
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

/// Copies queued into a readback carry the values of their point in the device's work, and
/// arrive whole: a buffer overwritten after its copy was queued reads as it was, several
/// copies share one readback, one larger than its first capacity (64 KiB on a GPU) grows it
/// without losing the copies before, and a cleared readback takes new copies.
pub fn check_readback(device: &Device, seed: u64) {
    use contralign::ops::cuda::readback::Readback;
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut random = |n: usize| -> Vec<f64> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
    let (a, b) = (random(13), random(100_003));
    let norm = [1.5f32, f32::NAN];
    let mut readback = Readback::new();
    let mut buffer = device.upload(&a).unwrap();
    let first = device.queue_download(&buffer, &mut readback).unwrap();
    device.copy_to(&mut buffer, &random(13)).unwrap();
    let big = device.upload(&b).unwrap();
    let second = device.queue_download(&big, &mut readback).unwrap();
    let third = device
        .queue_download(&device.upload(&norm).unwrap(), &mut readback)
        .unwrap();
    assert!(readback.read(first).is_err(), "read before the wait");
    device.wait_readback(&mut readback).unwrap();
    assert_eq!(readback.read(first).unwrap(), a, "seed {seed}");
    assert!(readback.read(second).unwrap() == b, "seed {seed}");
    let got = readback.read(third).unwrap();
    assert!(got[0] == 1.5 && got[1].is_nan(), "{got:?}");
    readback.clear().unwrap();
    let again = device.queue_download(&buffer, &mut readback).unwrap();
    device.wait_readback(&mut readback).unwrap();
    assert_eq!(
        readback.read(again).unwrap(),
        device.download(&buffer).unwrap()
    );
}

/// A non-finite loss drops the step on the device: `flag_nonfinite` marks it, the next norm
/// makes its coef NaN (keeping the norm) and resets the mark, and AdamW leaves the weights
/// and moments as they were; finite values mark nothing.
pub fn check_drop(device: &Device, seed: u64) {
    use contralign::ops::cuda::kernels::{AdamWStep, Kernels};
    use contralign::train::optimizer::AdamWConfig;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(seed);
    let k = Kernels::new(device);
    let n = 1037;
    let random =
        |rng: &mut StdRng| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
    let (w0, g, m0) = (random(&mut rng), random(&mut rng), random(&mut rng));
    let v0: Vec<f32> = random(&mut rng).iter().map(|x| x.abs()).collect();
    let (mut w, grad) = (device.upload(&w0).unwrap(), device.upload(&g).unwrap());
    let (mut m, mut v) = (device.upload(&m0).unwrap(), device.upload(&v0).unwrap());
    let ws = k.grad_norm_workspace(&[grad.view()]).unwrap();
    let want_norm = g.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let step = AdamWStep::new(&AdamWConfig::default(), 1, 1e-3, 7);
    for (values, drops) in [
        (vec![0.5, f64::NAN], true),
        (vec![f64::NEG_INFINITY], true),
        (vec![1e300, -3.0, 0.0], false),
    ] {
        // Two micro-batches' losses: one bad value among them drops the step.
        k.flag_nonfinite(&device.upload(&[2.0f64]).unwrap(), &ws)
            .unwrap();
        k.flag_nonfinite(&device.upload(&values).unwrap(), &ws)
            .unwrap();
        let clip = k.grad_norm(&ws, 0.0).unwrap();
        let out = device.download(&clip).unwrap();
        assert!(
            (out[0] as f64 - want_norm).abs() <= 1e-5 * want_norm,
            "seed {seed}, {values:?}: norm {}, want {want_norm}",
            out[0]
        );
        assert_eq!(out[1].is_nan(), drops, "{values:?}: coef {}", out[1]);
        let before = device.download(&w).unwrap();
        k.adamw_f32(&mut w, &grad, &mut m, &mut v, Some(clip), &step)
            .unwrap();
        let after = device.download(&w).unwrap();
        assert_eq!(
            after == before,
            drops,
            "{values:?}: the weights moved: {}",
            !drops
        );
        if drops {
            assert_eq!(device.download(&m).unwrap(), m0);
            assert_eq!(device.download(&v).unwrap(), v0);
        }
    }
    // The mark was reset by the norm that read it.
    let out = device.download(&k.grad_norm(&ws, 0.0).unwrap()).unwrap();
    assert_eq!(out[1], 1.0);
    assert_ne!(device.download(&w).unwrap(), w0);
}
