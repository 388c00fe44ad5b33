//! The experts' grouped GEMMs (cuda/moe_gemm.cu through [`MoeKernels`]) against an f64
//! evaluation of their definition on the device's own routing: each expert's rows times its
//! own weight, forward, input gradient and the weight gradient, accumulated and overwritten
//! (into a gradient of NaNs, which must not be read; an expert without rows gets zeros).
//!
//! Bounds, as for the library GEMMs (`selftest::gemm`): an fp32 accumulation of `K` products
//! errs by `K u` of the sum of their magnitudes (twice that for bf16 inputs, whose products
//! the tensor cores may sum in another order), plus `2 u` for the final roundings; an output
//! stored as bf16 adds its rounding. The weight gradient's magnitude includes the old value
//! it is added to.

use super::{compare, random, rounded, stored, Row, U};
use crate::ops::cuda::device::{Device, Float, View};
use crate::ops::cuda::fresh::GradWrite;
use crate::ops::cuda::moe::{DeviceRouting, ExpertStack, MoeKernels};
use crate::ops::cuda::pool::Pool;
use anyhow::Result;
use half::bf16;
use rand::rngs::StdRng;
use rand::Rng;

/// `tokens` routed to the top `k` of `experts` (the last one starved of rows when `starved`),
/// projected from `k_in` to `n` columns.
#[derive(Clone, Copy, Debug)]
struct Case {
    tokens: usize,
    experts: usize,
    k: usize,
    k_in: usize,
    n: usize,
    starved: bool,
}

/// Expert rows over and under one 64-row tile, an expert without rows, widths that are and
/// are not whole 16-byte packs, K over several 32-wide steps.
fn cases() -> [Case; 3] {
    let case = |tokens, experts, k, k_in, n, starved| Case {
        tokens,
        experts,
        k,
        k_in,
        n,
        starved,
    };
    [
        case(37, 8, 2, 67, 45, false),
        case(130, 5, 2, 96, 80, true),
        case(61, 6, 4, 64, 24, true),
    ]
}

fn shape(c: &Case) -> String {
    format!(
        "T={} E={} k={} {}->{}{}",
        c.tokens,
        c.experts,
        c.k,
        c.k_in,
        c.n,
        if c.starved { " starved" } else { "" }
    )
}

/// The routing of random logits, the last expert's 40 lower when `starved`.
fn routing(moe: &MoeKernels, rng: &mut StdRng, c: &Case) -> Result<DeviceRouting> {
    let logits: Vec<f32> = (0..c.tokens * c.experts)
        .map(|i| {
            let z = rng.gen_range(-3.0..3.0);
            if c.starved && i % c.experts == c.experts - 1 {
                z - 40.0
            } else {
                z
            }
        })
        .collect();
    moe.route(&moe.device.upload(&logits)?, c.experts, c.k)
}

/// `Σ_p a(i, p) b(p, j)` and `Σ_p |a(i, p) b(p, j)|` in f64.
fn dot(terms: impl Iterator<Item = (f32, f32)>) -> (f64, f64) {
    terms.fold((0.0, 0.0), |(sum, magnitude), (a, b)| {
        let product = a as f64 * b as f64;
        (sum + product, magnitude + product.abs())
    })
}

/// The three kernels of one case with inputs `E` and weight gradients `G`.
fn check<E: Float, G: Float>(device: &Device, rng: &mut StdRng, c: &Case) -> Result<Vec<Row>> {
    let moe = MoeKernels::new(device, Pool::default());
    let r = routing(&moe, rng, c)?;
    let offsets = device.download(&r.expert_offsets)?;
    let (rows, k_in, n, experts) = (r.slots(), c.k_in, c.n, c.experts);
    let x = rounded::<E>(&random(rng, rows * k_in, 2.0));
    let w = rounded::<E>(&random(rng, experts * n * k_in, 1.0));
    let dy = rounded::<E>(&random(rng, rows * n, 2.0));
    let dw = rounded::<G>(&random(rng, experts * n * k_in, 4.0));
    let expert_of = |row: usize| offsets.partition_point(|&o| o as usize <= row) - 1;
    let we = |row: usize| &w[expert_of(row) * n * k_in..][..n * k_in];

    let up = |v: &[f32]| device.upload(&v.iter().map(|&x| E::from_f32(x)).collect::<Vec<E>>());
    let (x_dev, w_dev, dy_dev) = (up(&x)?, up(&w)?, up(&dy)?);
    let dw_dev = device.upload(&dw.iter().map(|&v| G::from_f32(v)).collect::<Vec<G>>())?;
    let stack = |len: usize| -> Result<Vec<_>> {
        (0..experts)
            .map(|e| w_dev.view().slice(e * len, len))
            .collect()
    };
    let w_stack = ExpertStack::new("weights", &stack(n * k_in)?)?;
    let fresh_dev = device.upload(&vec![G::from_f32(f32::NAN); experts * n * k_in])?;
    let grad_stack = |flat: View<G>| -> Result<ExpertStack<G>> {
        let views = (0..experts)
            .map(|e| flat.slice(e * n * k_in, n * k_in))
            .collect::<Result<Vec<_>>>()?;
        ExpertStack::new("weight gradients", &views)
    };
    let y_dev = device.alloc::<E>(rows * n)?;
    let dx_dev = device.alloc::<E>(rows * k_in)?;
    moe.expert_forward(x_dev.view(), w_stack, &r, (k_in, n), y_dev.view())?;
    moe.expert_input_grad(dy_dev.view(), w_stack, &r, (k_in, n), dx_dev.view())?;
    for (dw, write) in [
        (dw_dev.view(), GradWrite::Accumulate),
        (fresh_dev.view(), GradWrite::Overwrite),
    ] {
        let inputs = (dy_dev.view(), x_dev.view());
        moe.expert_weight_grad(inputs, &r, (k_in, n), grad_stack(dw)?, write)?;
    }

    let (mut y, mut y_scale) = (Vec::new(), Vec::new());
    for row in 0..rows {
        for j in 0..n {
            let (s, m) = dot((0..k_in).map(|p| (x[row * k_in + p], we(row)[j * k_in + p])));
            y.push(s as f32);
            y_scale.push(m as f32);
        }
    }
    let (mut dx, mut dx_scale) = (Vec::new(), Vec::new());
    for row in 0..rows {
        for j in 0..k_in {
            let (s, m) = dot((0..n).map(|p| (dy[row * n + p], we(row)[p * k_in + j])));
            dx.push(s as f32);
            dx_scale.push(m as f32);
        }
    }
    let (mut dw_want, mut dw_scale) = (Vec::new(), Vec::new());
    let (mut fresh_want, mut fresh_scale) = (Vec::new(), Vec::new());
    for e in 0..experts {
        let (begin, end) = (offsets[e] as usize, offsets[e + 1] as usize);
        for i in 0..n {
            for j in 0..k_in {
                let prior = dw[(e * n + i) * k_in + j] as f64;
                let (s, m) = dot((begin..end).map(|row| (dy[row * n + i], x[row * k_in + j])));
                dw_want.push((prior + s) as f32);
                dw_scale.push((prior.abs() + m) as f32);
                fresh_want.push(s as f32);
                fresh_scale.push(m as f32);
            }
        }
    }
    let accumulation = if E::DTYPE == "bf16" { 2.0 } else { 1.0 };
    let bound = |terms: usize| (accumulation * terms as f64 + 2.0) * U;
    let rows_of = |what: &str| format!("moe_gemm {what} {}->{}", E::DTYPE, G::DTYPE);
    let got = |v: Vec<E>| v.into_iter().map(E::to_f32).collect::<Vec<f32>>();
    let max_rows = offsets.windows(2).map(|o| o[1] - o[0]).max().unwrap_or(0) as usize;
    let gradients = |flat| -> Result<Vec<f32>> {
        Ok(device.download(flat)?.into_iter().map(G::to_f32).collect())
    };
    let weight_rows = vec![
        compare(
            rows_of("weight grad +="),
            shape(c),
            &gradients(&dw_dev)?,
            &dw_want,
            &dw_scale,
            stored::<G>(bound(max_rows + 1)),
        ),
        compare(
            rows_of("weight grad ="),
            shape(c),
            &gradients(&fresh_dev)?,
            &fresh_want,
            &fresh_scale,
            stored::<G>(bound(max_rows)),
        ),
    ];
    if G::DTYPE != "f32" {
        // The forward and input rows do not depend on the gradients' type: checked once.
        return Ok(weight_rows);
    }
    let mut rows = vec![
        compare(
            format!("moe_gemm forward {}", E::DTYPE),
            shape(c),
            &got(device.download(&y_dev)?),
            &y,
            &y_scale,
            stored::<E>(bound(k_in)),
        ),
        compare(
            format!("moe_gemm input grad {}", E::DTYPE),
            shape(c),
            &got(device.download(&dx_dev)?),
            &dx,
            &dx_scale,
            stored::<E>(bound(n)),
        ),
    ];
    rows.extend(weight_rows);
    Ok(rows)
}

/// Every case at every pair of types the engine runs: f32 throughout, bf16 inputs with f32
/// or bf16 gradients.
pub fn rows(device: &Device, rng: &mut StdRng) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for c in cases() {
        rows.extend(check::<f32, f32>(device, rng, &c)?);
        rows.extend(check::<bf16, f32>(device, rng, &c)?);
        rows.extend(check::<bf16, bf16>(device, rng, &c)?);
    }
    Ok(rows)
}
