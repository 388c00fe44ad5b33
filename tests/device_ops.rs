//! The model on the device layer (`--device emu`; `ops::cuda::ops::DeviceOps`) against the CPU
//! reference: statistics, losses and every parameter gradient of a training step, on fresh
//! random groups of awkward sizes, for the dense and the mixture-of-experts fixture.

mod common;

use common::device_step::check_step_on_device;
use common::rng;
use contralign::memory_plan::RecomputePolicy;
use contralign::ops::cpu::CpuOps;
use contralign::ops::cuda::device::{counters, Arena, AsView, Device, ALIGNMENT};
use contralign::ops::cuda::lists::{KeptLists, StagedLists};
use contralign::ops::cuda::ops::DeviceOps;
use contralign::ops::cuda::pool::{Leased, Pool};
use contralign::ops::Ops;
use rand::Rng;

fn download<T: bytemuck::Pod>(list: &Leased<T>) -> Vec<T> {
    Device::Emu.download(&list.view()).unwrap()
}

/// A small lease that outlives the large one leased before it (a loss's summary beside the
/// activations) does not split the workspace: it sits at the top, so that a later lease of
/// nearly the whole region still fits, and neither overwrites the other.
#[test]
fn a_small_lease_left_behind_does_not_split_the_pool() {
    let device = Device::Emu;
    let mut arena = Arena::new(&device, 1 << 20).unwrap();
    let pool = Pool::in_region(arena.carve::<u8>("workspace", 1 << 20).unwrap()).unwrap();
    let large = pool.lease::<f32>(&device, 150_001).unwrap();
    let summary: Vec<f64> = (0..13).map(|i| i as f64 * 0.25 - 1.0).collect();
    let small = pool.upload(&device, &summary).unwrap();
    drop(large);
    let mut nearly_all = pool.lease::<u8>(&device, (1 << 20) - 4096).unwrap();
    assert_eq!(
        pool.allocated(),
        0,
        "the pool grew: the small lease split it"
    );
    device
        .copy_to(&mut nearly_all, &vec![0xa5; (1 << 20) - 4096])
        .unwrap();
    assert_eq!(download(&small), summary);
    assert!(download(&nearly_all).iter().all(|&b| b == 0xa5));
}

/// A lease beyond a plan's region adds a segment of its own size, not twice the region's
/// (a GPU whose memory the arena holds has no room for that); the pool's own segments then
/// double, so that a growing need makes few of them.
#[test]
fn a_pool_grows_by_what_it_lacks_not_by_its_carved_region() {
    let device = Device::Emu;
    let mut arena = Arena::new(&device, 1 << 20).unwrap();
    let pool = Pool::in_region(arena.carve::<u8>("workspace", 1 << 20).unwrap()).unwrap();
    let _region = pool.lease::<u8>(&device, 1 << 20).unwrap();
    let _first = pool.lease::<u8>(&device, 3000).unwrap();
    assert_eq!(
        pool.allocated(),
        3072,
        "the first segment holds the lease alone"
    );
    let _second = pool.lease::<u8>(&device, 3000).unwrap();
    assert_eq!(
        pool.allocated(),
        3072 + 6144,
        "the next one doubles the pool's own"
    );
}

/// A device-to-device copy is a memcpy on a GPU (cuMemcpyDtoDAsync): overlapping ranges are
/// refused on every device, the emulator's too; adjacent ones copy.
#[test]
fn a_device_copy_refuses_overlapping_ranges() {
    let device = Device::Emu;
    let data: Vec<f32> = (0..37).map(|i| i as f32 * 0.5).collect();
    let buffer = device.upload(&data).unwrap();
    let src = buffer.view().slice(0, 20).unwrap();
    let err = device
        .copy_buffer(&src, &mut buffer.view().slice(5, 20).unwrap())
        .unwrap_err();
    assert!(format!("{err:#}").contains("overlapping"), "{err:#}");
    device
        .copy_buffer(
            &buffer.view().slice(0, 17).unwrap(),
            &mut buffer.view().slice(17, 17).unwrap(),
        )
        .unwrap();
    let copied = device.download(&buffer.view()).unwrap();
    assert_eq!(copied[17..34], data[..17]);
    assert_eq!(copied[..17], data[..17]);
}

#[test]
fn a_mistral_step_on_the_emulated_device_matches_the_cpu() {
    check_step_on_device(&Device::Emu, "tiny-mistral", RecomputePolicy::None);
    check_step_on_device(&Device::Emu, "tiny-mistral", RecomputePolicy::Full);
    check_step_on_device(&Device::Emu, "tiny-mistral", RecomputePolicy::Selective);
}

#[test]
fn a_mixtral_step_on_the_emulated_device_matches_the_cpu() {
    check_step_on_device(&Device::Emu, "tiny-mixtral", RecomputePolicy::Full);
    check_step_on_device(&Device::Emu, "tiny-mixtral", RecomputePolicy::Selective);
}

/// On the device, selective recompute makes the SwiGLU's output again inside its backward
/// (`Ops::swiglu_down_backward`) and RMSNorm's 1/rms inside its backward, where `none` keeps
/// both: the same arithmetic, so every gradient is the same bits, f32 and bf16, dense and
/// mixture of experts.
#[test]
fn recompute_policies_give_the_same_gradient_bits_on_the_device() {
    use contralign::loss::{LossKind, LossSpec};
    use contralign::model::{Model, StepOptions};
    use contralign::ops::storage::Dtype;
    use contralign::step;
    let device = Device::Emu;
    for name in ["tiny-mistral", "tiny-mixtral"] {
        let mut rng = rng(name);
        let groups = common::random_groups(&mut rng, 3, 256, 9, 4, 7);
        let spec = LossSpec::new(LossKind::Sft);
        for storage in [Dtype::F32, Dtype::Bf16] {
            let ops = DeviceOps::with_storage(&device, storage);
            let model = Model::load(&ops, &common::fixture(name)).unwrap();
            let grads = |recompute| {
                let opts = StepOptions {
                    recompute,
                    aux_coef: 0.02,
                };
                let out = step::loss_and_grads(&ops, &model, None, &groups, &spec, &opts).unwrap();
                ops.check().unwrap();
                let grads: Vec<Vec<f32>> = out
                    .grads
                    .iter()
                    .into_iter()
                    .map(|g| ops.download(g))
                    .collect();
                (out.logged.loss, grads)
            };
            let kept = grads(RecomputePolicy::None);
            let selective = grads(RecomputePolicy::Selective);
            assert_eq!(kept.0, selective.0, "{name} {storage:?}: loss");
            for (i, (a, b)) in kept.1.iter().zip(&selective.1).enumerate() {
                assert!(
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{name} {storage:?}: gradient {i} differs between none and selective"
                );
            }
            assert!(kept.1.iter().any(|g| g.iter().any(|&v| v != 0.0)));
        }
    }
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

/// Lists of awkward lengths and three types go up in one copy, each aligned, and come
/// back as they were; staging them again, or asking for one of them, moves nothing; a
/// batch with a new list uploads only that one and forgets the lists it does not name.
#[test]
fn staged_lists_go_up_once_and_are_found_by_their_contents() {
    let mut rng = rng("staged_lists_go_up_once_and_are_found_by_their_contents");
    let (device, pool, kept) = (Device::Emu, Pool::default(), KeptLists::default());
    let ids: Vec<u32> = (0..rng.gen_range(1..300)).map(|_| rng.gen()).collect();
    let offsets: Vec<i32> = (0..rng.gen_range(2..40)).map(|_| rng.gen()).collect();
    let weights: Vec<f64> = (0..rng.gen_range(1..77)).map(|_| rng.gen()).collect();
    let stage = |lists: [&dyn Fn(&mut StagedLists); 3]| {
        let mut staged = StagedLists::default();
        for push in lists {
            push(&mut staged);
        }
        kept.stage(&device, &pool, staged).unwrap();
    };
    let before = counters();
    stage([&|s| s.push(&ids), &|s| s.push(&offsets), &|s| {
        s.push(&weights)
    }]);
    assert_eq!(counters().uploads - before.uploads, 1);
    let got_ids = kept.get(&device, &pool, &ids).unwrap();
    let got_offsets = kept.get(&device, &pool, &offsets).unwrap();
    let got_weights = kept.get(&device, &pool, &weights).unwrap();
    assert_eq!(counters().uploads - before.uploads, 1);
    assert_eq!(download(&got_ids), ids);
    assert_eq!(download(&got_offsets), offsets);
    assert_eq!(download(&got_weights), weights);
    for ptr in [
        got_ids.device_ptr(),
        got_offsets.device_ptr(),
        got_weights.device_ptr(),
    ] {
        assert_eq!(ptr % ALIGNMENT as u64, 0);
    }
    // The same bytes as another type are another list.
    let as_f32: Vec<f32> = bytemuck::cast_slice(&ids).to_vec();
    kept.get(&device, &pool, &as_f32).unwrap();
    assert_eq!(counters().uploads - before.uploads, 2);
    stage([&|s| s.push(&ids), &|s| s.push(&offsets), &|s| {
        s.push(&weights)
    }]);
    assert_eq!(counters().uploads - before.uploads, 2);
    let mut other = offsets.clone();
    other[0] = other[0].wrapping_add(1);
    stage([&|s| s.push(&ids), &|s| s.push(&other), &|s| s.push(&ids)]);
    assert_eq!(counters().uploads - before.uploads, 3);
    assert_eq!(download(&kept.get(&device, &pool, &other).unwrap()), other);
    assert_eq!(download(&kept.get(&device, &pool, &ids).unwrap()), ids);
    assert_eq!(counters().uploads - before.uploads, 3);
    kept.get(&device, &pool, &weights).unwrap();
    assert_eq!(
        counters().uploads - before.uploads,
        4,
        "forgotten with its batch"
    );
    // The first batch's copies live as long as someone holds them.
    assert_eq!(download(&got_weights), weights);
}

/// `matmul_backward_into` sums `dy · w` into an accumulator in the GEMM (`beta = 1`), one
/// rounding of each sum: the CPU's bf16-rounding mode gives exactly the inputs as stored,
/// their products summed in f64 onto the prior value, rounded to f32 and then to the
/// accumulator's type (worked out here loop by loop); the emulated device, in each storage
/// type and into an accumulator of either type, gives that within one ulp of the result (its
/// f64 sums run in another order, which can move the f32 rounding across a boundary), and
/// accumulates the weight gradient alike.
#[test]
fn a_projection_backward_sums_its_input_gradient_into_the_accumulator() {
    use contralign::ops::cpu::RoundedCpuOps;
    use contralign::ops::storage::Dtype;
    let mut rng = rng("a_projection_backward_sums_its_input_gradient_into_the_accumulator");
    let device = Device::Emu;
    let mut random =
        |len: usize| -> Vec<f32> { (0..len).map(|_| rng.gen_range(-1.5..1.5)).collect() };
    for storage in [Dtype::F32, Dtype::Bf16] {
        let (dev, cpu) = (
            DeviceOps::with_storage(&device, storage),
            RoundedCpuOps::new(storage),
        );
        let stored = |v: &[f32]| v.iter().map(|&x| storage.round(x)).collect::<Vec<f32>>();
        for (m, k, n) in [(37, 129, 67), (5, 1, 300), (1, 3, 1), (64, 40, 9)] {
            let (x, w, dy) = (random(m * k), random(n * k), random(m * n));
            let (acc0, dw0) = (random(m * k), random(n * k));
            for f32_accumulators in [false, true] {
                let what =
                    format!("{storage:?} m={m} k={k} n={n} f32 accumulators {f32_accumulators}");
                let inputs = [&x, &w, &dy, &acc0, &dw0];
                let (dev_acc, dev_dw) = sum_into(&dev, inputs, (m, k, n), f32_accumulators);
                dev.check().unwrap();
                let (cpu_acc, cpu_dw) = sum_into(&cpu, inputs, (m, k, n), f32_accumulators);
                let acc_type = if f32_accumulators {
                    Dtype::F32
                } else {
                    storage
                };
                let (sw, sdy, sacc0) = (stored(&w), stored(&dy), stored(&acc0));
                for (i, &got) in cpu_acc.iter().enumerate() {
                    let (row, col) = (i / k, i % k);
                    let sum: f64 = (0..n)
                        .map(|p| sdy[row * n + p] as f64 * sw[p * k + col] as f64)
                        .sum();
                    let want = acc_type.round((sacc0[i] as f64 + sum) as f32);
                    assert_eq!(got, want, "{what}: CPU acc[{i}]");
                }
                let ulp = match acc_type {
                    Dtype::F32 => f32::EPSILON as f64,
                    Dtype::Bf16 => 2f64.powi(-7),
                };
                // The magnitude of each element's terms: its prior value and |dy|·|w| (|dy|ᵀ·|x|).
                let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<f32>>();
                let (mut acc_scale, mut dw_scale) = (abs(&acc0), abs(&dw0));
                CpuOps.matmul_backward_into(
                    &abs(&x),
                    &abs(&w),
                    &abs(&dy),
                    (m, k, n),
                    &mut dw_scale,
                    &mut acc_scale,
                );
                for (name, got, want, scale) in [
                    ("acc", dev_acc, cpu_acc, acc_scale),
                    ("dw", dev_dw, cpu_dw, dw_scale),
                ] {
                    for (i, ((g, w), s)) in got.iter().zip(&want).zip(&scale).enumerate() {
                        let bound = ulp * w.abs() as f64 + 2f64.powi(-50) * *s as f64;
                        assert!(
                            (*g as f64 - *w as f64).abs() <= bound,
                            "{what}: {name}[{i}] = {g}, want {w} (bound {bound:.3e})"
                        );
                    }
                }
            }
        }
    }
}

/// `matmul_backward_into` on `ops`: the accumulator and the weight gradient after it, each
/// starting as the values given, stored in the ops' storage type or (`f32_accumulators`) in
/// an f32 tensor holding the same values.
fn sum_into<O: Ops>(
    ops: &O,
    [x, w, dy, acc0, dw0]: [&Vec<f32>; 5],
    (m, k, n): (usize, usize, usize),
    f32_accumulators: bool,
) -> (Vec<f32>, Vec<f32>) {
    let tensor = |values: &[f32]| {
        let stored = ops.upload(values);
        if !f32_accumulators {
            return stored;
        }
        let mut sum = ops.zeros(values.len());
        ops.add_assign(&mut sum, &stored);
        sum
    };
    let (mut acc, mut dw) = (tensor(acc0), tensor(dw0));
    ops.matmul_backward_into(
        &ops.upload(x),
        &ops.upload(w),
        &ops.upload(dy),
        (m, k, n),
        &mut dw,
        &mut acc,
    );
    (ops.download(&acc), ops.download(&dw))
}

/// Fresh gradients (`ops::cuda::fresh`): the one op that covers a fresh gradient exactly may
/// overwrite it; an op that adds into it, or covers it only in part, finds it zeroed first;
/// what is left fresh is zeroed by `settle_all`; a gradient written once is fresh no more.
#[test]
fn fresh_gradients_are_overwritten_whole_or_zeroed_before_anything_adds_into_them() {
    use contralign::ops::cuda::fresh::FreshGrads;
    use contralign::ops::cuda::pool::TensorView;
    let device = Device::Emu;
    // Four gradients of awkward lengths in one buffer, holding a previous step's values.
    let lens = [13usize, 1, 40, 7];
    let total: usize = lens.iter().sum();
    let store = device.upload(&vec![3.5f32; total]).unwrap();
    let whole = store.view();
    let mut spans = Vec::new();
    let mut at = 0;
    for len in lens {
        spans.push(TensorView::F32(whole.slice(at, len).unwrap()));
        at += len;
    }
    let read = || device.download(&whole).unwrap();
    let fresh = FreshGrads::default();
    fresh.mark(spans.iter().copied());
    assert!(fresh.overwrites(&device, &spans[..1]).unwrap());
    assert!(
        !fresh.overwrites(&device, &spans[..1]).unwrap(),
        "written once already"
    );
    // Nothing was zeroed: the op that overwrites writes it.
    assert!(read().iter().all(|&v| v == 3.5));
    // A view over the end of the second gradient and the start of the third zeroes both.
    let straddle = TensorView::F32(whole.slice(13, 5).unwrap());
    assert!(!fresh.overwrites(&device, &[straddle]).unwrap());
    let after = read();
    assert!(after[..13].iter().all(|&v| v == 3.5));
    assert!(after[13..54].iter().all(|&v| v == 0.0));
    assert!(after[54..].iter().all(|&v| v == 3.5));
    // Adding into the third again finds it written (zeroed): nothing changes.
    device
        .copy_to(&mut whole.slice(14, 40).unwrap(), &[1.25; 40])
        .unwrap();
    fresh.settle(&device, &spans[2]).unwrap();
    assert!(read()[14..54].iter().all(|&v| v == 1.25));
    // The last is left fresh until the micro-batch ends.
    fresh.settle_all(&device).unwrap();
    let end = read();
    assert!(end[54..].iter().all(|&v| v == 0.0));
    assert!(end[14..54].iter().all(|&v| v == 1.25));
    // A new step marks them all again.
    fresh.mark(spans.iter().copied());
    fresh.settle(&device, &spans[0]).unwrap();
    assert!(read()[..13].iter().all(|&v| v == 0.0));
    fresh.clear();
    fresh.settle_all(&device).unwrap();
    assert!(
        read()[14..54].iter().all(|&v| v == 1.25),
        "cleared: nothing fresh"
    );
    // Several gradients at once (the experts' grouped GEMM): overwritten only when every one
    // is fresh; otherwise the fresh ones among them are zeroed and the op adds.
    device
        .copy_to(&mut whole.slice(0, total).unwrap(), &vec![3.5; total])
        .unwrap();
    fresh.mark(spans.iter().copied());
    assert!(fresh.overwrites(&device, &[spans[1], spans[3]]).unwrap());
    assert!(!fresh.overwrites(&device, &[spans[0], spans[1]]).unwrap());
    let mixed = read();
    assert!(
        mixed[..13].iter().all(|&v| v == 0.0),
        "the fresh one zeroed"
    );
    assert!(mixed[13..].iter().all(|&v| v == 3.5));
    assert!(
        !fresh.overwrites(&device, &[]).unwrap(),
        "nothing to overwrite"
    );
}

/// A fresh gradient that an op overwrites gets zeros where the op has no rows to sum: the
/// RMSNorm `dw`, the LM head's gradient and the experts' weight gradients, with no token.
#[test]
fn overwriting_a_fresh_gradient_with_no_rows_writes_zeros() {
    use contralign::ops::cuda::fresh::GradWrite;
    use contralign::ops::cuda::kernels::Kernels;
    use contralign::ops::cuda::moe::{ExpertStack, MoeKernels};
    use contralign::ops::cuda::scoring::FusedScoring;
    let device = Device::Emu;
    let k = Kernels::new(&device);
    let (d, vocab, experts) = (24, 37, 3);
    let nans = |len: usize| device.upload(&vec![f32::NAN; len]).unwrap();
    let none_f32 = device.upload::<f32>(&[]).unwrap();
    let none_u32 = device.upload::<u32>(&[]).unwrap();
    let zeros = |buffer| -> bool { device.download(buffer).unwrap().iter().all(|&v| v == 0.0) };

    let (w, mut dw) = (device.upload(&vec![1.0f32; d]).unwrap(), nans(d));
    let mut dh = device.upload::<f32>(&[]).unwrap();
    let dw_write = (&mut dw, GradWrite::Overwrite);
    k.rmsnorm_backward(&none_f32, &w, &none_f32, None, &mut dh, dw_write, 1e-5)
        .unwrap();
    assert!(zeros(&dw), "rmsnorm dw");

    let (head, mut dhead) = (
        device.upload(&vec![0.5f32; vocab * d]).unwrap(),
        nans(vocab * d),
    );
    let scoring = FusedScoring {
        kernels: &k,
        chunk_rows: 8,
    };
    let (lse, coef) = (
        device.upload::<f32>(&[]).unwrap(),
        device.upload::<f32>(&[]).unwrap(),
    );
    let dhead_write = (&mut dhead, GradWrite::Overwrite);
    scoring
        .backward(
            &none_f32,
            &head,
            &none_u32,
            &lse,
            &coef,
            d,
            &mut dh,
            dhead_write,
        )
        .unwrap();
    assert!(zeros(&dhead), "LM head gradient");

    let moe = MoeKernels::new(&device, Pool::default());
    let routing = moe.route(&none_f32, experts, 2).unwrap();
    let grads = nans(experts * d * 5);
    let views: Vec<_> = (0..experts)
        .map(|e| grads.view().slice(e * d * 5, d * 5).unwrap())
        .collect();
    let stack = ExpertStack::new("expert gradients", &views).unwrap();
    let inputs = (none_f32.view(), none_f32.view());
    moe.expert_weight_grad(inputs, &routing, (d, 5), stack, GradWrite::Overwrite)
        .unwrap();
    assert!(zeros(&grads), "experts' gradients");
}

/// RMSNorm's `dw` into a bf16 gradient is summed in fp32 and rounded once, in the reduction
/// itself: the bits of an fp32 copy of the gradient accumulated and rounded back (the path
/// before the bf16 reduction existed, and what the CPU's bf16-rounding mode does).
#[test]
fn rmsnorm_dw_into_bf16_has_the_bits_of_an_f32_copy_rounded_once() {
    use contralign::ops::cuda::fresh::GradWrite;
    use contralign::ops::cuda::kernels::Kernels;
    use half::bf16;
    let device = Device::Emu;
    let k = Kernels::new(&device);
    let mut rng = rng("rmsnorm dw bf16");
    for (rows, d) in [(53, 77), (9, 96), (1, 5)] {
        let mut random = |n: usize, scale: f32| -> Vec<bf16> {
            (0..n)
                .map(|_| bf16::from_f32(rng.gen_range(-scale..scale)))
                .collect()
        };
        let (h, w, dy) = (random(rows * d, 2.0), random(d, 1.5), random(rows * d, 1.0));
        let old = random(d, 0.3);
        let (h, w, dy) = (
            device.upload(&h).unwrap(),
            device.upload(&w).unwrap(),
            device.upload(&dy).unwrap(),
        );
        for write in [GradWrite::Accumulate, GradWrite::Overwrite] {
            let mut dh = device.alloc::<bf16>(rows * d).unwrap();
            let mut dw_bf16 = device.upload(&old).unwrap();
            k.rmsnorm_backward(&h, &w, &dy, None, &mut dh, (&mut dw_bf16, write), 1e-5)
                .unwrap();
            let old_f32: Vec<f32> = old.iter().map(|v| v.to_f32()).collect();
            let mut dw_f32 = device.upload(&old_f32).unwrap();
            k.rmsnorm_backward(&h, &w, &dy, None, &mut dh, (&mut dw_f32, write), 1e-5)
                .unwrap();
            let want: Vec<u16> = device
                .download(&dw_f32)
                .unwrap()
                .iter()
                .map(|&v| bf16::from_f32(v).to_bits())
                .collect();
            let got: Vec<u16> = device
                .download(&dw_bf16)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            assert_eq!(got, want, "rows {rows} d {d} {write:?}");
            if write == GradWrite::Accumulate {
                assert_ne!(got, old.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            }
        }
    }
}
