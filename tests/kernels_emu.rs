//! Kernels of cuda/*.cu run in the emulator against the CPU reference (`ops::cpu`), on fresh
//! random inputs of awkward sizes and launch shapes.

use contralign::ops::cpu::CpuOps;
use contralign::ops::cuda::emu::{self, KernelArgs, LaunchConfig};
use contralign::ops::Ops;
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
            let (mut dg, mut du) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            let mut args = KernelArgs::new();
            args.arg(gate.as_ptr()).arg(up.as_ptr()).arg(dy.as_ptr());
            args.arg(dg.as_mut_ptr()).arg(du.as_mut_ptr()).arg(n as i64);
            launch("swiglu_backward_f32", grid, block, &args);
            assert_close("f32 dgate", &dg, &want_dg, &scale_dg, F32_REL, 1e-30);
            assert_close("f32 dup", &du, &want_du, &scale_du, F32_REL, 1e-30);

            let (gate_h, up_h, dy_h) = (to_bf16(&gate), to_bf16(&up), to_bf16(&dy));
            let (gate_r, up_r, dy_r) = (from_bf16(&gate_h), from_bf16(&up_h), from_bf16(&dy_h));
            let (want_dg, want_du) = CpuOps.swiglu_backward(&gate_r, &up_r, &dy_r);
            let (scale_dg, scale_du) = scales(&gate_r, &up_r, &dy_r);
            let (mut dg_h, mut du_h) = (vec![0xffffu16; n], vec![0xffffu16; n]);
            let mut args = KernelArgs::new();
            args.arg(gate_h.as_ptr())
                .arg(up_h.as_ptr())
                .arg(dy_h.as_ptr());
            args.arg(dg_h.as_mut_ptr())
                .arg(du_h.as_mut_ptr())
                .arg(n as i64);
            launch("swiglu_backward_bf16", grid, block, &args);
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
