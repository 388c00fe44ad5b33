//! The mixture-of-experts layer on the emulated device (cuda/moe.cu through `DeviceOps`)
//! against the CPU reference: the selftest's rows for every MoE kernel under several random
//! seeds, and the whole MoE feed-forward (`model::layer::moe_forward` / `moe_backward`,
//! load-balancing term included) forward and backward on random inputs of awkward sizes.

use contralign::engine::moe_bench::expert_views;
use contralign::model::layer::{moe_backward, moe_forward, MoeShape};
use contralign::model::params::Expert;
use contralign::ops::cpu::CpuOps;
use contralign::ops::cuda::device::{counters, Device};
use contralign::ops::cuda::emu::{self, Probe};
use contralign::ops::cuda::ops::DeviceOps;
use contralign::ops::cuda::pool::Tensor;
use contralign::ops::{MoeAux, Ops};
use contralign::selftest::{self, moe};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[test]
fn every_moe_kernel_matches_the_cpu_reference() {
    for seed in [1, 2, 3] {
        let rng = &mut StdRng::seed_from_u64(seed);
        let rows = moe::rows(&Device::Emu, rng).unwrap();
        assert!(rows.len() >= 5 * moe::cases().len());
        let failed: Vec<_> = rows.iter().filter(|r| !r.pass).cloned().collect();
        assert!(
            failed.is_empty(),
            "seed {seed}:\n{}",
            selftest::table(&failed)
        );
    }
}

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// What one backend gives for the layer: output, input gradient, the router's gradient, each
/// expert's three weight gradients, the load-balancing loss.
struct LayerResult {
    out: Vec<f32>,
    dx: Vec<f32>,
    grads: Vec<Vec<f32>>,
    aux: f64,
}

/// The load-balancing coefficient of these tests.
const AUX_COEF: f64 = 0.05;

/// Row weights where prompt-like rows count three times, as packing weighs a prompt shared
/// by K responses.
fn prompt_weighted_rows(t: usize) -> Vec<f64> {
    (0..t).map(|i| if i < t / 3 { 3.0 } else { 1.0 }).collect()
}

fn run_layer<O: Ops>(
    ops: &O,
    s: MoeShape,
    weights: &[Vec<f32>],
    x: &[f32],
    dy: &[f32],
) -> LayerResult {
    let t = x.len() / s.d;
    let up = |w: &Vec<f32>| ops.upload(w);
    let router = up(&weights[0]);
    let experts: Vec<Expert<O::Buf>> = weights[1..]
        .chunks(3)
        .map(|w| Expert {
            gate: up(&w[0]),
            up: up(&w[1]),
            down: up(&w[2]),
        })
        .collect();
    let zeros = |w: &Vec<f32>| ops.zeros(w.len());
    let mut grouter = zeros(&weights[0]);
    let mut gexperts: Vec<Expert<O::Buf>> = weights[1..]
        .chunks(3)
        .map(|w| Expert {
            gate: zeros(&w[0]),
            up: zeros(&w[1]),
            down: zeros(&w[2]),
        })
        .collect();
    let x_buf = ops.upload(x);
    let (out, acts) = moe_forward(ops, s, &router, &experts, &x_buf, t);
    let row_weights = prompt_weighted_rows(t);
    let mut balance = ops.moe_balance(s.experts);
    ops.moe_balance_add(&mut balance, acts.routing(), &row_weights);
    let aux = ops.moe_balance_loss(&balance);
    let dx = moe_backward(
        ops,
        s,
        (&router, &experts),
        (&mut grouter, &mut gexperts),
        (&x_buf, t),
        &acts,
        &ops.upload(dy),
        Some(MoeAux {
            balance: &balance,
            coef: AUX_COEF,
            row_weights: &row_weights,
        }),
    );
    let mut grads = vec![ops.download(&grouter)];
    for g in &gexperts {
        grads.extend([&g.gate, &g.up, &g.down].map(|b| ops.download(b)));
    }
    let result = LayerResult {
        out: ops.download(&out),
        dx: ops.download(&dx),
        grads,
        aux,
    };
    ops.check().unwrap();
    result
}

/// How far the device's layer may be from the CPU's, relative to each tensor's magnitude.
/// The MoE kernels are the CPU's f32 arithmetic (bit for bit, selftest) and the routing's f64
/// arithmetic (to a few ulps of f64); the router's GEMM accumulates in f64 as the CPU's does,
/// and the grouped expert GEMMs in f32, which over K ≤ 80 terms of mixed signs errs by a few
/// u (u = 2^-24) of the terms' magnitude. A gradient passes through at most 8 roundings of
/// that kind (router, 3 GEMMs, SwiGLU, the weighted moves, dz), each amplified by less than
/// 16 at these magnitudes: 8 · 16 u = 2^-17 of the tensor's magnitude.
const BOUND: f64 = 1.0 / 131072.0;

/// `max |got - want| / max |want|` (the error relative to the tensor's magnitude).
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
    let err = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()));
    if err == 0.0 {
        0.0
    } else {
        err / scale
    }
}

#[test]
fn the_moe_layer_on_the_device_matches_the_cpu_forward_and_backward() {
    // (tokens, d, ffn, experts, k): top-1 to top-4, widths that are and are not whole
    // 16-byte packs, more slots than one block of the counting sort (256).
    let shapes = [
        (45, 36, 20, 5, 2),
        (19, 17, 11, 4, 1),
        (131, 24, 9, 8, 3),
        (23, 13, 7, 6, 4),
        (97, 72, 66, 3, 2),
    ];
    let device = Device::Emu;
    for (i, &(t, d, ffn, experts, k)) in shapes.iter().enumerate() {
        let rng = &mut StdRng::seed_from_u64(40 + i as u64);
        let s = MoeShape { d, ffn, experts, k };
        let mut weights = vec![random(rng, experts * d, 0.5)];
        for _ in 0..experts {
            weights.push(random(rng, ffn * d, 0.4));
            weights.push(random(rng, ffn * d, 0.4));
            weights.push(random(rng, d * ffn, 0.4));
        }
        let x = random(rng, t * d, 1.5);
        let dy = random(rng, t * d, 1.0);
        let want = run_layer(&CpuOps, s, &weights, &x, &dy);
        let got = run_layer(&DeviceOps::new(&device), s, &weights, &x, &dy);
        let what = format!("T={t} d={d} ffn={ffn} E={experts} k={k}");
        assert!(rel_err(&got.out, &want.out) <= BOUND, "{what}: output");
        assert!(rel_err(&got.dx, &want.dx) <= BOUND, "{what}: dx");
        for (j, (g, w)) in got.grads.iter().zip(&want.grads).enumerate() {
            let err = rel_err(g, w);
            assert!(err <= BOUND, "{what}: gradient {j} off by {err:e}");
        }
        // Sums of positive f64 terms in another order: a few ulps of f64.
        let aux_err = (got.aux - want.aux).abs() / want.aux;
        assert!(
            aux_err <= 1e-13,
            "{what}: aux loss {} vs {}",
            got.aux,
            want.aux
        );
        assert!(want.aux > 0.0);
    }
}

/// Each expert's gate, up and down gradients, in that order.
fn expert_grads(ops: &DeviceOps, grads: &[Expert<Tensor>]) -> Vec<Vec<f32>> {
    grads
        .iter()
        .flat_map(|g| [&g.gate, &g.up, &g.down].map(|b| ops.download(b)))
        .collect()
}

#[test]
fn the_moe_layer_downloads_nothing_and_runs_in_place_on_stacked_experts() {
    // Two row tiles per expert, two column tiles and three K steps of the grouped GEMMs.
    let (t, d, ffn, experts, k) = (150, 80, 70, 3, 2);
    let s = MoeShape { d, ffn, experts, k };
    let device = Device::Emu;
    let ops = DeviceOps::new(&device);
    let rng = &mut StdRng::seed_from_u64(9);
    let up = |n: usize, rng: &mut StdRng| ops.upload(&random(rng, n, 0.5));
    let router = up(experts * d, rng);
    // The flat stores are allocated before the step: views of tensors that outlive it.
    let (weights_flat, grads_flat) = (
        up(experts * 3 * ffn * d, rng),
        up(experts * 3 * ffn * d, rng),
    );
    let weights = expert_views(&weights_flat, experts, ffn * d).unwrap();
    let mut grads = expert_views(&grads_flat, experts, ffn * d).unwrap();
    let mut grouter = ops.zeros(experts * d);
    let (x, dy) = (up(t * d, rng), up(t * d, rng));
    let row_weights = prompt_weighted_rows(t);
    let mut host_weights = vec![ops.download(&router)];
    for w in &weights {
        host_weights.extend([&w.gate, &w.up, &w.down].map(|b| ops.download(b)));
    }
    let host_grads = expert_grads(&ops, &grads);

    let before = counters();
    // Counted (which records the library GEMMs too) and race-checked.
    let probe = Probe {
        count: true,
        racecheck: true,
    };
    let ((out, dx), records) = emu::probed(probe, || {
        let (out, acts) = moe_forward(&ops, s, &router, &weights, &x, t);
        let mut balance = ops.moe_balance(experts);
        ops.moe_balance_add(&mut balance, acts.routing(), &row_weights);
        let aux = MoeAux {
            balance: &balance,
            coef: AUX_COEF,
            row_weights: &row_weights,
        };
        let dx = moe_backward(
            &ops,
            s,
            (&router, &weights),
            (&mut grouter, &mut grads),
            (&x, t),
            &acts,
            &dy,
            Some(aux),
        );
        (out, dx)
    });
    let after = counters();
    ops.check().unwrap();
    // The per-expert row counts stay on the device: the grouped GEMMs read them there.
    assert_eq!(after.downloads - before.downloads, 0);
    assert_eq!(
        ops.expert_copies(),
        0,
        "stacked experts are used where they lie"
    );
    let launches = |prefix: &str| {
        records
            .iter()
            .filter(|r| r.kernel.starts_with(prefix))
            .count()
    };
    // Three projections forward; each one's input and weight gradients backward.
    assert_eq!(launches("moe_gemm_forward"), 3);
    assert_eq!(launches("moe_gemm_input"), 3);
    assert_eq!(launches("moe_gemm_weight"), 3);
    // The router's projection, forward and backward, is the only library GEMM.
    assert_eq!(launches("gemm"), 3);

    // The same numbers as the CPU, gradients accumulated onto the stores' earlier values.
    let want = run_layer(
        &CpuOps,
        s,
        &host_weights,
        &ops.download(&x),
        &ops.download(&dy),
    );
    assert!(rel_err(&ops.download(&out), &want.out) <= BOUND, "output");
    assert!(rel_err(&ops.download(&dx), &want.dx) <= BOUND, "dx");
    assert!(
        rel_err(&ops.download(&grouter), &want.grads[0]) <= BOUND,
        "router gradient"
    );
    let got = expert_grads(&ops, &grads);
    for (j, ((g, before), w)) in got
        .iter()
        .zip(&host_grads)
        .zip(&want.grads[1..])
        .enumerate()
    {
        let added: Vec<f32> = g.iter().zip(before).map(|(g, b)| g - b).collect();
        let err = rel_err(&added, w);
        assert!(err <= BOUND, "expert gradient {j} off by {err:e}");
    }
}

/// Fresh gradients (docs/cuda.md "Fresh gradients"): the experts' grouped GEMMs overwrite
/// them without a memset and without reading their old bytes (NaNs here), an expert that
/// receives no row gets zeros, and the router's GEMM overwrites its own.
#[test]
fn fresh_expert_gradients_are_overwritten_without_zeroing_or_reading_them() {
    use contralign::ops::cuda::emu::MEMSET;
    use contralign::ops::cuda::fresh::FreshGrads;
    use std::rc::Rc;
    let (t, d, ffn, experts, k) = (70, 24, 40, 4, 2);
    let s = MoeShape { d, ffn, experts, k };
    // The experts' gradients at one stride (the engine's flat store: in place), and apart
    // (through f32 space that the GEMM overwrites, then copied into them).
    for stacked in [true, false] {
        let device = Device::Emu;
        let fresh = Rc::new(FreshGrads::default());
        let ops = DeviceOps::new(&device).with_fresh_grads(fresh.clone());
        let rng = &mut StdRng::seed_from_u64(17);
        // Every token's first feature is 1 and the last expert's router weight on it -60: that
        // expert is never among the top k.
        let mut router = random(rng, experts * d, 0.5);
        router[(experts - 1) * d] = -60.0;
        let mut x = random(rng, t * d, 1.0);
        x.iter_mut().step_by(d).for_each(|v| *v = 1.0);
        let dy = random(rng, t * d, 1.0);
        let mut host_weights = vec![router.clone()];
        for _ in 0..experts {
            host_weights.extend((0..3).map(|_| random(rng, ffn * d, 0.4)));
        }
        let flat = |w: &[Vec<f32>]| ops.upload(&w.concat());
        let weights_flat = flat(&host_weights[1..]);
        let weights = expert_views(&weights_flat, experts, ffn * d).unwrap();
        let nans = |len: usize| ops.upload(&vec![f32::NAN; len]);
        let grads_flat = nans(experts * 3 * ffn * d);
        let mut grads = if stacked {
            expert_views(&grads_flat, experts, ffn * d).unwrap()
        } else {
            (0..experts)
                .map(|_| Expert {
                    gate: nans(ffn * d),
                    up: nans(ffn * d),
                    down: nans(d * ffn),
                })
                .collect()
        };
        let mut grouter = nans(experts * d);
        let router_dev = ops.upload(&router);
        fresh.mark(
            grads
                .iter()
                .flat_map(|g| [&g.gate, &g.up, &g.down].map(|b| b.storage()))
                .chain([grouter.storage()]),
        );
        let x_dev = ops.upload(&x);
        let row_weights = prompt_weighted_rows(t);
        let probe = Probe {
            count: true,
            racecheck: false,
        };
        // The load-balancing sums are zeroed once a step, for every layer to add into.
        let mut balance = ops.moe_balance(experts);
        let (_, records) = emu::probed(probe, || {
            let (_, acts) = moe_forward(&ops, s, &router_dev, &weights, &x_dev, t);
            ops.moe_balance_add(&mut balance, acts.routing(), &row_weights);
            let aux = MoeAux {
                balance: &balance,
                coef: AUX_COEF,
                row_weights: &row_weights,
            };
            moe_backward(
                &ops,
                s,
                (&router_dev, &weights),
                (&mut grouter, &mut grads),
                (&x_dev, t),
                &acts,
                &ops.upload(&dy),
                Some(aux),
            )
        });
        ops.check().unwrap();
        let memsets: Vec<_> = records.iter().filter(|r| r.kernel == MEMSET).collect();
        assert!(memsets.is_empty(), "stacked {stacked}: zeroed {memsets:?}");
        let weight_grads = records
            .iter()
            .filter(|r| r.kernel.starts_with("moe_gemm_weight"))
            .count();
        assert_eq!(weight_grads, 3);

        let want = run_layer(&CpuOps, s, &host_weights, &x, &dy);
        assert!(
            rel_err(&ops.download(&grouter), &want.grads[0]) <= BOUND,
            "router gradient"
        );
        let got = expert_grads(&ops, &grads);
        for (j, (g, w)) in got.iter().zip(&want.grads[1..]).enumerate() {
            let err = rel_err(g, w);
            assert!(
                err <= BOUND,
                "stacked {stacked}: expert gradient {j} off by {err:e}"
            );
        }
        let starved = &got[3 * (experts - 1)..];
        assert!(
            starved.iter().flatten().all(|&v| v == 0.0),
            "the expert without rows gets zeros"
        );
        assert!(want.grads[1..3 * (experts - 1) + 1]
            .iter()
            .all(|g| g.iter().any(|&v| v != 0.0)));
        // Everything was written: nothing is left for the end of the micro-batch to zero.
        let (_, records) = emu::probed(probe, || fresh.settle_all(&device).unwrap());
        assert!(records.is_empty());
    }
}
