//! Kernels of cuda/*.cu run in the emulator against the CPU reference (`ops::cpu`), on fresh
//! random inputs of awkward sizes and launch shapes.

mod common;

use contralign::ops::cpu::CpuOps;
use contralign::ops::cuda::device::Device;
use contralign::ops::cuda::emu::{self, KernelArgs, LaunchConfig};
use contralign::ops::cuda::kernels::{AdamWStep, Kernels};
use contralign::ops::Ops;
use contralign::selftest::{self, Row};
use contralign::train::optimizer::AdamWConfig;
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Element counts that are not multiples of anything, and launch shapes (grid, block) that
/// cover them exactly, partly, or with a grid-stride loop over a small grid.
const SIZES: [usize; 5] = [1, 31, 1000, 4099, 65537];

fn shapes(n: usize) -> [(u32, u32); 3] {
    [
        ((n.div_ceil(96)) as u32, 96),
        (3, 128),
        (n.div_ceil(1024) as u32, 1024),
    ]
}

fn launch(name: &str, grid: u32, block: u32, args: &KernelArgs) {
    // SAFETY: every pointer in `args` is a live buffer of the n elements the kernel touches.
    unsafe { emu::launch(name, LaunchConfig::new(grid, block, 0), args) }
        .unwrap_or_else(|e| panic!("{e:#}"));
}

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

fn to_bf16(x: &[f32]) -> Vec<u16> {
    x.iter().map(|&v| bf16::from_f32(v).to_bits()).collect()
}

fn from_bf16(x: &[u16]) -> Vec<f32> {
    x.iter().map(|&b| bf16::from_bits(b).to_f32()).collect()
}

/// Asserts |got - want| <= rel * scale + abs elementwise, where `scale` is the magnitude the
/// error of that element is relative to.
fn assert_close(what: &str, got: &[f32], want: &[f32], scale: &[f32], rel: f32, abs: f32) {
    assert_eq!(got.len(), want.len());
    for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        let bound = rel * s + abs;
        assert!(
            (g - w).abs() <= bound,
            "{what}[{i}] = {g}, want {w} ± {bound}"
        );
    }
}

/// f32 kernels: a handful of fp32 roundings and one expf (a few ulp) against the CPU's f64.
const F32_REL: f32 = 16.0 * f32::EPSILON;
/// bf16 outputs: one rounding to 8 significant bits (half an ulp, 2^-9 relative) on top of the
/// fp32 computation; twice that for margin.
const BF16_REL: f32 = 1.0 / 256.0;

#[test]
fn swiglu_forward_matches_the_cpu_reference() {
    let mut rng = StdRng::seed_from_u64(11);
    for n in SIZES {
        for (grid, block) in shapes(n) {
            let gate = random(&mut rng, n, 8.0);
            let up = random(&mut rng, n, 3.0);
            let want = CpuOps.swiglu(&gate, &up);
            let scale: Vec<f32> = want.iter().map(|w| w.abs()).collect();

            let mut out = vec![f32::NAN; n];
            let mut args = KernelArgs::new();
            args.arg(gate.as_ptr())
                .arg(up.as_ptr())
                .arg(out.as_mut_ptr())
                .arg(n as i64);
            launch("swiglu_forward_f32", grid, block, &args);
            assert_close("f32 out", &out, &want, &scale, F32_REL, 1e-30);

            // bf16: the reference sees the same bf16-rounded inputs.
            let (gate_h, up_h) = (to_bf16(&gate), to_bf16(&up));
            let want = CpuOps.swiglu(&from_bf16(&gate_h), &from_bf16(&up_h));
            let scale: Vec<f32> = want.iter().map(|w| w.abs()).collect();
            let mut out_h = vec![0xffffu16; n];
            let mut args = KernelArgs::new();
            args.arg(gate_h.as_ptr())
                .arg(up_h.as_ptr())
                .arg(out_h.as_mut_ptr())
                .arg(n as i64);
            launch("swiglu_forward_bf16", grid, block, &args);
            assert_close(
                "bf16 out",
                &from_bf16(&out_h),
                &want,
                &scale,
                BF16_REL,
                1e-30,
            );
        }
    }
}

#[test]
fn swiglu_backward_matches_the_cpu_reference() {
    let mut rng = StdRng::seed_from_u64(12);
    for n in SIZES {
        for (grid, block) in shapes(n) {
            let gate = random(&mut rng, n, 8.0);
            let up = random(&mut rng, n, 3.0);
            let dy = random(&mut rng, n, 2.0);
            // dgate = dy u s (1 + g (1 - s)) may cancel inside the parentheses: its error is
            // relative to the terms' size, |dy u s| (1 + |g| (1 - s)).
            let scales = |gate: &[f32], up: &[f32], dy: &[f32]| -> (Vec<f32>, Vec<f32>) {
                (0..gate.len())
                    .map(|i| {
                        let (g, u, d) = (gate[i] as f64, up[i] as f64, dy[i] as f64);
                        let s = 1.0 / (1.0 + (-g).exp());
                        let dgate = (d * u * s).abs() * (1.0 + g.abs() * (1.0 - s));
                        (dgate as f32, (d * g * s).abs() as f32)
                    })
                    .unzip()
            };

            let (want_dg, want_du) = CpuOps.swiglu_backward(&gate, &up, &dy);
            let (scale_dg, scale_du) = scales(&gate, &up, &dy);
            // Without the forward's output (kept), then writing it again.
            let want_out = CpuOps.swiglu(&gate, &up);
            let mut out = vec![f32::NAN; n];
            for out_ptr in [std::ptr::null_mut(), out.as_mut_ptr()] {
                let (mut dg, mut du) = (vec![f32::NAN; n], vec![f32::NAN; n]);
                let mut args = KernelArgs::new();
                args.arg(gate.as_ptr()).arg(up.as_ptr()).arg(dy.as_ptr());
                args.arg(dg.as_mut_ptr()).arg(du.as_mut_ptr()).arg(out_ptr);
                args.arg(n as i64);
                launch("swiglu_backward_f32", grid, block, &args);
                assert_close("f32 dgate", &dg, &want_dg, &scale_dg, F32_REL, 1e-30);
                assert_close("f32 dup", &du, &want_du, &scale_du, F32_REL, 1e-30);
            }
            let scale_out: Vec<f32> = want_out.iter().map(|v| v.abs()).collect();
            assert_close("f32 out", &out, &want_out, &scale_out, F32_REL, 1e-30);

            let (gate_h, up_h, dy_h) = (to_bf16(&gate), to_bf16(&up), to_bf16(&dy));
            let (gate_r, up_r, dy_r) = (from_bf16(&gate_h), from_bf16(&up_h), from_bf16(&dy_h));
            let (want_dg, want_du) = CpuOps.swiglu_backward(&gate_r, &up_r, &dy_r);
            let (scale_dg, scale_du) = scales(&gate_r, &up_r, &dy_r);
            let (mut dg_h, mut du_h) = (vec![0xffffu16; n], vec![0xffffu16; n]);
            let mut out_h = vec![0xffffu16; n];
            let mut args = KernelArgs::new();
            args.arg(gate_h.as_ptr())
                .arg(up_h.as_ptr())
                .arg(dy_h.as_ptr());
            args.arg(dg_h.as_mut_ptr())
                .arg(du_h.as_mut_ptr())
                .arg(out_h.as_mut_ptr())
                .arg(n as i64);
            launch("swiglu_backward_bf16", grid, block, &args);
            let want_out = CpuOps.swiglu(&gate_r, &up_r);
            let scale_out: Vec<f32> = want_out.iter().map(|v| v.abs()).collect();
            let out_r = from_bf16(&out_h);
            assert_close("bf16 out", &out_r, &want_out, &scale_out, BF16_REL, 1e-30);
            assert_close(
                "bf16 dgate",
                &from_bf16(&dg_h),
                &want_dg,
                &scale_dg,
                BF16_REL,
                1e-30,
            );
            assert_close(
                "bf16 dup",
                &from_bf16(&du_h),
                &want_du,
                &scale_du,
                BF16_REL,
                1e-30,
            );
        }
    }
}

/// Launch shapes for the kernels through the device layer: (threads per block, most blocks).
/// Partial warps (33, 96 = 3 warps), one warp, the largest block, and grids small enough that
/// the kernels' grid-stride loops go round several times.
const LAYER_SHAPES: [(u32, u32); 5] = [(256, 4096), (33, 3), (96, 7), (32, 1), (1024, 2)];

fn kernels(device: &Device, (block, max_grid): (u32, u32)) -> Kernels<'_> {
    Kernels {
        block,
        max_grid,
        ..Kernels::new(device)
    }
}

fn assert_pass(rows: Vec<Row>, launch: (u32, u32)) {
    let failed: Vec<&Row> = rows.iter().filter(|r| !r.pass).collect();
    assert!(
        failed.is_empty(),
        "launch shape {launch:?}:\n{}",
        selftest::table(&rows)
    );
}

#[test]
fn embedding_matches_the_cpu_bit_for_bit_with_repeated_ids() {
    let device = Device::Emu;
    let mut rng = common::rng("embedding");
    // (tokens, vocab, d): one token, one column, more tokens than rows (ids repeat), widths
    // that are no multiple of a warp, and widths of whole 16-byte chunks (the vector path).
    for (tokens, vocab, d) in [
        (1, 1, 1),
        (1, 5, 7),
        (40, 3, 33),
        (300, 17, 129),
        (9, 1000, 4099),
        (70, 11, 96),
        (5, 300, 2056),
    ] {
        for launch in LAYER_SHAPES {
            let k = kernels(&device, launch);
            assert_pass(
                selftest::embedding::<f32>(&k, &mut rng, tokens, vocab, d).unwrap(),
                launch,
            );
            assert_pass(
                selftest::embedding::<half::bf16>(&k, &mut rng, tokens, vocab, d).unwrap(),
                launch,
            );
        }
    }
}

#[test]
fn embedding_rejects_an_id_past_the_table() {
    let device = Device::Emu;
    let k = Kernels::new(&device);
    let table = device.upload(&[0f32; 12]).unwrap();
    let ids = device.upload(&[0u32, 3]).unwrap();
    let mut out = device.alloc::<f32>(8).unwrap();
    let err = k.embedding_forward(&table, &ids, &mut out, 4).unwrap_err();
    assert!(format!("{err:#}").contains("trap"), "{err:#}");
}

#[test]
fn rmsnorm_with_residual_matches_the_cpu_reference() {
    let device = Device::Emu;
    let mut rng = common::rng("rmsnorm");
    for (rows, d) in [(1, 1), (1, 4099), (7, 33), (130, 96), (3, 1000), (65, 31)] {
        for launch in LAYER_SHAPES {
            let k = kernels(&device, launch);
            assert_pass(
                selftest::rmsnorm::<f32>(&k, &mut rng, rows, d).unwrap(),
                launch,
            );
            assert_pass(
                selftest::rmsnorm::<half::bf16>(&k, &mut rng, rows, d).unwrap(),
                launch,
            );
        }
    }
}

#[test]
fn rmsnorm_without_residual_is_plain_rmsnorm() {
    let device = Device::Emu;
    let mut rng = common::rng("rmsnorm_plain");
    let k = kernels(&device, (96, 5));
    let (rows, d) = (11, 517);
    let x: Vec<f32> = (0..rows * d).map(|_| rng.gen_range(-3.0..3.0)).collect();
    let w: Vec<f32> = (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let (mut y, mut rstd) = (
        device.alloc::<f32>(rows * d).unwrap(),
        device.alloc(rows).unwrap(),
    );
    k.rmsnorm_forward(
        &device.upload(&x).unwrap(),
        None,
        &device.upload(&w).unwrap(),
        None,
        &mut y,
        &mut rstd,
        1e-6,
    )
    .unwrap();
    let want = CpuOps.rmsnorm(&x, &w, d, 1e-6);
    // As in selftest::rmsnorm: a thread's terms and a 7-level tree, (k/2 + 8) u.
    let terms = selftest::rmsnorm_thread_terms::<f32>(d, 96) as f32;
    let bound = ((terms + 7.0) / 2.0 + 8.0) * f32::EPSILON / 2.0;
    let scale: Vec<f32> = want.iter().map(|v| v.abs()).collect();
    assert_close(
        "y",
        &device.download(&y).unwrap(),
        &want,
        &scale,
        bound,
        0.0,
    );
}

#[test]
fn rope_matches_the_cpu_reference_and_its_inverse() {
    let device = Device::Emu;
    let mut rng = common::rng("rope");
    // (tokens, heads, head_dim): odd head widths leave the last element alone.
    for (tokens, heads, hd) in [(1, 1, 2), (1, 3, 5), (17, 4, 64), (40, 8, 128), (3, 2, 33)] {
        for launch in LAYER_SHAPES {
            let k = kernels(&device, launch);
            assert_pass(
                selftest::rope::<f32>(&k, &mut rng, tokens, heads, hd).unwrap(),
                launch,
            );
            assert_pass(
                selftest::rope::<half::bf16>(&k, &mut rng, tokens, heads, hd).unwrap(),
                launch,
            );
        }
    }
}

#[test]
fn casts_round_to_nearest_even_and_back_exactly() {
    let device = Device::Emu;
    let mut rng = common::rng("casts");
    for n in [1, 31, 70001] {
        for launch in [(256, 4096), (33, 3)] {
            assert_pass(
                selftest::casts(&kernels(&device, launch), &mut rng, n).unwrap(),
                launch,
            );
        }
    }
}

#[test]
fn grad_norm_and_clipping_match_the_cpu_reference() {
    let device = Device::Emu;
    let mut rng = common::rng("grad_norm");
    let cases: [&[usize]; 4] = [&[1], &[0, 31, 1], &[4099, 65537, 7], &[1000; 9]];
    for lens in cases {
        for launch in LAYER_SHAPES {
            let k = kernels(&device, launch);
            assert_pass(
                selftest::grad_norm::<f32>(&k, &mut rng, lens).unwrap(),
                launch,
            );
            assert_pass(
                selftest::grad_norm::<bf16>(&k, &mut rng, lens).unwrap(),
                launch,
            );
        }
    }
}

#[test]
fn grad_norm_is_deterministic_and_leaves_small_gradients_alone() {
    let device = Device::Emu;
    let mut rng = common::rng("grad_norm_determinism");
    let k = kernels(&device, (96, 7));
    let grads: Vec<Vec<f32>> = [5003, 17]
        .iter()
        .map(|&n| (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect())
        .collect();
    let bufs: Vec<_> = grads.iter().map(|g| device.upload(g).unwrap()).collect();
    let ws = k
        .grad_norm_workspace(&bufs.iter().map(|b| b.view()).collect::<Vec<_>>())
        .unwrap();
    // One launch: whichever block finishes last adds up the partials, in block order. Other
    // scheduling seeds make other blocks last. Each launch asks for another clipping factor,
    // so a launch that found the count of blocks done not reset (and so wrote nothing) would
    // show the previous launch's factor.
    let want = grads
        .iter()
        .flatten()
        .map(|&g| g as f64 * g as f64)
        .sum::<f64>()
        .sqrt();
    let seeds = [None, Some(1), Some(0x5eed), Some(u64::MAX), None];
    let mut norms = Vec::new();
    for (i, seed) in seeds.into_iter().enumerate() {
        let k = Kernels {
            emu_seed: seed,
            ..kernels(&device, (96, 7))
        };
        let shrink = (i + 2) as f64;
        let out = device
            .download(&k.grad_norm(&ws, (want / shrink) as f32).unwrap())
            .unwrap();
        assert!(
            (out[1] as f64 * shrink - 1.0).abs() <= 1e-5,
            "launch {i}: {out:?}, norm {want}"
        );
        norms.push(out[0]);
    }
    assert!(norms.windows(2).all(|w| w[0] == w[1]), "{norms:?}");
    assert!(
        (norms[0] as f64 - want).abs() <= 1e-5 * want,
        "{norms:?} vs {want}"
    );
    let out = device.download(&k.grad_norm(&ws, 0.0).unwrap()).unwrap();
    assert_eq!(out, [norms[0], 1.0], "max_norm 0 disables clipping");
    // max_norm above the norm: coef 1, gradients untouched (bit for bit).
    let out = k.grad_norm(&ws, norms[0] * 2.0).unwrap();
    assert_eq!(device.download(&out).unwrap()[1], 1.0);
    k.clip(&ws).unwrap();
    for (b, g) in bufs.iter().zip(&grads) {
        assert_eq!(&device.download(b).unwrap(), g);
    }
}

#[test]
fn queued_downloads_carry_the_values_of_their_point_in_the_work() {
    common::device_step::check_readback(&Device::Emu, 0x2eadbac);
}

/// A non-finite loss drops the step on the device (`device_step::check_drop`).
#[test]
fn a_flagged_non_finite_loss_drops_the_step_on_the_device() {
    common::device_step::check_drop(&Device::Emu, 0xf1a6);
}

#[test]
fn adamw_matches_the_cpu_optimizer_bit_for_bit() {
    let device = Device::Emu;
    let mut rng = common::rng("adamw");
    for n in [1, 33, 4099] {
        for launch in LAYER_SHAPES {
            assert_pass(
                selftest::adamw_exact(&kernels(&device, launch), &mut rng, n).unwrap(),
                launch,
            );
        }
    }
}

#[test]
fn adamw_stochastic_rounding_is_unbiased_and_picks_a_neighbour() {
    let device = Device::Emu;
    let mut rng = common::rng("adamw_stochastic");
    for launch in [(256, 4096), (96, 7)] {
        let k = kernels(&device, launch);
        assert_pass(
            selftest::adamw_stochastic(&k, &mut rng, 16, 4099).unwrap(),
            launch,
        );
    }
}

#[test]
fn adamw_stochastic_rounding_is_deterministic_per_seed() {
    let device = Device::Emu;
    let mut rng = common::rng("adamw_seed");
    let k = Kernels::new(&device);
    let n = 4099;
    // Updates of about a quarter of a bf16 ulp, so that each element's rounding is a coin toss.
    let param: Vec<half::bf16> = (0..n)
        .map(|_| half::bf16::from_f32(rng.gen_range(0.5..1.0)))
        .collect();
    let grad: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let run = |seed: u64| {
        let mut p = device.upload(&param).unwrap();
        let (mut m, mut v) = (
            device.alloc::<f32>(n).unwrap(),
            device.alloc::<f32>(n).unwrap(),
        );
        let step = AdamWStep::new(&AdamWConfig::default(), 1, 1e-3, seed);
        k.adamw_bf16(
            &mut p,
            None,
            &device.upload(&grad).unwrap(),
            &mut m,
            &mut v,
            None,
            &step,
        )
        .unwrap();
        device.download(&p).unwrap()
    };
    let seed = rng.gen();
    assert_eq!(run(seed), run(seed));
    assert_ne!(run(seed), run(seed ^ 1));
}

#[test]
fn gemm_computes_the_cpu_references_projection_and_its_gradients() {
    use contralign::ops::cuda::gemm::Gemm;
    let device = Device::Emu;
    let ops = CpuOps;
    let mut rng = common::rng("gemm");
    for (m, k, n) in [(1, 1, 1), (37, 129, 67), (5, 1, 300), (64, 33, 2)] {
        let x = random(&mut rng, m * k, 1.5);
        let w = random(&mut rng, n * k, 1.5);
        let dy = random(&mut rng, m * n, 1.5);
        let dw0 = random(&mut rng, n * k, 1.5);
        let (xb, wb, dyb) = (
            device.upload(&x).unwrap(),
            device.upload(&w).unwrap(),
            device.upload(&dy).unwrap(),
        );

        let mut y = device.alloc::<f32>(m * n).unwrap();
        device
            .gemm(&Gemm::projection(m, k, n), &xb, &wb, &mut y)
            .unwrap();
        let want_y = ops.download(&ops.matmul(&x, &w, m, k, n));

        let mut dx = device.alloc::<f32>(m * k).unwrap();
        device
            .gemm(&Gemm::projection_input_grad(m, k, n), &dyb, &wb, &mut dx)
            .unwrap();
        let mut want_dw = dw0.clone();
        let want_dx = ops.matmul_backward(&x, &w, &dy, m, k, n, &mut want_dw);

        let mut dw = device.upload(&dw0).unwrap();
        device
            .gemm(&Gemm::projection_weight_grad(m, k, n), &dyb, &xb, &mut dw)
            .unwrap();

        // Both sides accumulate in f64 (in different orders) and round once to f32: one ulp
        // apart at most, and a hair of absolute error where a sum cancels to about zero.
        let shape = format!("m={m} k={k} n={n}");
        for (what, got, want) in [
            ("y", device.download(&y).unwrap(), want_y),
            ("dx", device.download(&dx).unwrap(), want_dx),
            ("dw", device.download(&dw).unwrap(), want_dw),
        ] {
            let scale: Vec<f32> = want.iter().map(|v| v.abs()).collect();
            assert_close(
                &format!("{what} {shape}"),
                &got,
                &want,
                &scale,
                f32::EPSILON,
                1e-9,
            );
        }
    }
    let mut wrong = device.alloc::<f32>(3).unwrap();
    let x = device.upload(&[1f32; 4]).unwrap();
    let err = device
        .gemm(&Gemm::projection(2, 2, 2), &x, &x, &mut wrong)
        .unwrap_err();
    assert!(
        format!("{err}").contains("operand c has 3 elements, needs 4"),
        "{err}"
    );
    let mut bf16_out = device.alloc::<bf16>(4).unwrap();
    let err = device
        .gemm(&Gemm::projection(2, 2, 2), &x, &x, &mut bf16_out)
        .unwrap_err();
    assert!(format!("{err}").contains("no cuBLAS combination"), "{err}");
}

#[test]
fn gemm_over_an_empty_sum_zeroes_c_with_beta_zero_and_keeps_it_with_beta_one() {
    use contralign::ops::cuda::gemm::Gemm;
    let device = Device::Emu;
    let empty = device.upload::<f32>(&[]).unwrap();
    let (m, n) = (7, 5);
    let weight_grad = |beta| Gemm {
        beta,
        ..Gemm::projection_weight_grad(0, n, m)
    };
    // NaN where c was: beta = 0 ignores c, as BLAS does.
    let mut c = device.upload(&vec![f32::NAN; m * n]).unwrap();
    device
        .gemm(&weight_grad(0.0), &empty, &empty, &mut c)
        .unwrap();
    assert_eq!(device.download(&c).unwrap(), vec![0f32; m * n]);

    let prior: Vec<f32> = (0..m * n).map(|i| i as f32 - 3.5).collect();
    let mut c = device.upload(&prior).unwrap();
    device
        .gemm(&weight_grad(1.0), &empty, &empty, &mut c)
        .unwrap();
    assert_eq!(device.download(&c).unwrap(), prior);

    let err = device
        .gemm(&weight_grad(0.5), &empty, &empty, &mut c)
        .unwrap_err();
    assert!(format!("{err}").contains("with beta 0.5"), "{err}");
}
