//! The MoE kernels (cuda/moe.cu through [`MoeKernels`]) against the CPU reference
//! (`ops::moe`, `CpuOps`'s MoE ops), forward and backward.
//!
//! Bounds, with `u = 2^-24` (fp32) and `v = 2^-53` (fp64):
//!
//! - the choices, the per-expert row counts and each slot's row in expert order are integers:
//!   bit for bit (bound 0), ties included (the cases draw logits from a few values).
//! - probabilities: `z − m` rounds once, `exp` errs by an ulp plus `|z − m|` times the
//!   argument's rounding, the sum of `E` positive terms by `E v`, the division once:
//!   `ε_p = (max|z − m| + E + 4) v` relative.
//! - weights: `p / Σ_top p` in f64 (`ε_p` twice and a division), then one rounding to f32,
//!   which a difference that small can move by one f32 ulp: `2u + 3 ε_p`.
//! - the row moves (permute, unpermute, weighted or not) are the CPU's f32 products and sums
//!   in the CPU's order, checked against the CPU's ops on the device's own routing: bound 0.
//! - the router backward: `dL/dweight` is an f64 dot of `d` products (`d v` relative to
//!   `G = Σ|dout||y|`), and the softmax backward's f64 chain adds a few roundings per term
//!   and `ε_p` per probability, all relative to `S_e = p_e (|dp|_e + Σ_e' p_e' |dp|_e')`,
//!   `|dp|` the magnitudes of `dp`'s terms (`G` for `dL/dweight`); then one rounding to f32:
//!   `u + 8 (ε_p + (d + E + k + 8) v)` relative to `S_e`.
//! - the load-balancing loss: sums of `T` positive f64 terms per layer in another order (block
//!   tree), `(T + E) v` each; the loss multiplies two of them and divides by `W²`:
//!   `4 (T + E + ε_p / v + 8) v` relative.

use super::{compare, random, Row, U};
use crate::ops::cpu::{CpuOps, CpuRouting};
use crate::ops::cuda::device::Device;
use crate::ops::cuda::moe::{DeviceRouting, MoeKernels};
use crate::ops::cuda::pool::Pool;
use crate::ops::moe::{LoadBalance, Routing};
use crate::ops::{MoeAux, Ops};
use anyhow::Result;
use half::bf16;
use rand::rngs::StdRng;
use rand::Rng;

/// The unit roundoff of fp64.
const V: f64 = f64::EPSILON / 2.0;

/// One MoE check: `tokens` rows of width `d` routed to the top `k` of `experts`.
#[derive(Clone, Copy, Debug)]
pub struct MoeCase {
    pub tokens: usize,
    pub experts: usize,
    pub k: usize,
    pub d: usize,
    /// Logits from `{-1, 0, 1}`: many exact ties.
    pub ties: bool,
    /// The last expert's logits 40 below the rest: it receives no token.
    pub starved: bool,
}

/// Top-1 to top-4, an expert that receives no token, ties, one slot block and several
/// (256 slots each), widths that are and are not whole 16-byte packs.
pub fn cases() -> Vec<MoeCase> {
    let case = |tokens, experts, k, d, ties, starved| MoeCase {
        tokens,
        experts,
        k,
        d,
        ties,
        starved,
    };
    vec![
        case(37, 8, 2, 67, false, false),
        case(300, 5, 1, 20, false, true),
        case(129, 7, 3, 33, true, false),
        case(61, 6, 4, 64, false, true),
        case(1, 4, 4, 5, true, false),
    ]
}

fn shape(c: &MoeCase) -> String {
    format!(
        "T={} E={} k={} d={}{}{}",
        c.tokens,
        c.experts,
        c.k,
        c.d,
        if c.ties { " ties" } else { "" },
        if c.starved { " starved" } else { "" }
    )
}

fn logits(rng: &mut StdRng, c: &MoeCase) -> Vec<f32> {
    (0..c.tokens * c.experts)
        .map(|i| {
            let z = if c.ties {
                rng.gen_range(-1i32..=1) as f32
            } else {
                rng.gen_range(-3.0..3.0)
            };
            if c.starved && i % c.experts == c.experts - 1 {
                z - 40.0
            } else {
                z
            }
        })
        .collect()
}

fn as_f64<T: Copy + Into<f64>>(x: &[T]) -> Vec<f64> {
    x.iter().map(|&v| v.into()).collect()
}

/// The device's routing on the host, as the CPU's ops take it.
fn downloaded(device: &Device, r: &DeviceRouting) -> Result<CpuRouting> {
    let routing = Routing {
        experts: r.experts,
        k: r.k,
        probs: device.download(&r.probs)?,
        chosen: device
            .download(&r.chosen)?
            .into_iter()
            .map(|e| e as usize)
            .collect(),
        weights: as_f64(&device.download(&r.weights)?),
    };
    let order = routing.expert_order();
    Ok(CpuRouting { routing, order })
}

fn exact(op: &str, c: &MoeCase, got: &[f64], want: &[f64]) -> Row {
    let zeros = vec![0.0; want.len()];
    compare(op.into(), shape(c), got, want, &zeros, 0.0)
}

pub fn moe(device: &Device, rng: &mut StdRng, c: &MoeCase) -> Result<Vec<Row>> {
    let moe = MoeKernels::new(device, Pool::default());
    let (t, e, k, d) = (c.tokens, c.experts, c.k, c.d);
    let z = logits(rng, c);
    let x = random(rng, t * d, 2.0);
    let dy = random(rng, t * d, 1.0);
    let row_weights: Vec<f64> = (0..t).map(|i| [1.0, 4.0, 1.0][i % 3]).collect();
    let coef = 0.3;

    let r = moe.route(&device.upload(&z)?, e, k)?;
    let want = CpuOps.moe_route(&z, e, k);
    let got = downloaded(device, &r)?;
    let max_gap = z
        .chunks(e)
        .flat_map(|row| {
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            row.iter().map(move |&v| (m - v) as f64)
        })
        .fold(0.0, f64::max);
    let eps_p = (max_gap + e as f64 + 4.0) * V;
    let mut rows = vec![
        compare(
            "moe_route probs".into(),
            shape(c),
            &got.routing.probs,
            &want.routing.probs,
            &want.routing.probs,
            eps_p,
        ),
        exact(
            "moe_route chosen",
            c,
            &as_f64(
                &got.routing
                    .chosen
                    .iter()
                    .map(|&v| v as u32)
                    .collect::<Vec<_>>(),
            ),
            &as_f64(
                &want
                    .routing
                    .chosen
                    .iter()
                    .map(|&v| v as u32)
                    .collect::<Vec<_>>(),
            ),
        ),
        compare(
            "moe_route weights".into(),
            shape(c),
            &got.routing.weights,
            &want.routing.weights,
            &want.routing.weights,
            2.0 * U + 3.0 * eps_p,
        ),
    ];
    let counts = moe.expert_rows(&r)?;
    rows.push(exact(
        "moe_count rows per expert",
        c,
        &as_f64(&counts.iter().map(|&n| n as u32).collect::<Vec<_>>()),
        &as_f64(
            &want
                .routing
                .expert_rows()
                .iter()
                .map(|&n| n as u32)
                .collect::<Vec<_>>(),
        ),
    ));
    let mut want_slot_row = vec![0u32; t * k];
    for (row, &slot) in want.order.iter().enumerate() {
        want_slot_row[slot] = row as u32;
    }
    rows.push(exact(
        "moe_permute_index slot rows",
        c,
        &as_f64(&device.download(&r.slot_row)?),
        &as_f64(&want_slot_row),
    ));

    let x_dev = device.upload(&x)?;
    let dy_dev = device.upload(&dy)?;
    for weighted in [false, true] {
        let mut out = device.alloc::<f32>(t * k * d)?;
        moe.permute(&x_dev, &r, weighted, &mut out, d)?;
        let want_out = CpuOps.moe_permute(&x, &got, weighted, d);
        rows.push(exact(
            &format!("moe_gather{}", if weighted { " weighted" } else { "" }),
            c,
            &as_f64(&device.download(&out)?),
            &as_f64(&want_out),
        ));
        let y = random(rng, t * k * d, 2.0);
        let mut back = device.alloc::<f32>(t * d)?;
        moe.unpermute(&device.upload(&y)?, &r, weighted, &mut back, d)?;
        let want_back = CpuOps.moe_unpermute(&y, &got, weighted, d);
        rows.push(exact(
            &format!("moe_unpermute{}", if weighted { " weighted" } else { "" }),
            c,
            &as_f64(&device.download(&back)?),
            &as_f64(&want_back),
        ));
        rows.extend(bf16_moves(&moe, &r, &got, weighted, (&x, &y), (c, d))?);
    }

    // The load-balancing sums over two layers (the second routes the same logits).
    let mut balance = moe.balance(e)?;
    let w_dev = moe.pool.upload(device, &row_weights)?;
    let mut want_balance = LoadBalance::new(e);
    for _ in 0..2 {
        moe.balance_add(&mut balance, &r, &w_dev)?;
        want_balance.add_layer(&want.routing, &row_weights);
    }
    let (got_loss, want_loss) = (moe.balance_sums(&balance)?.loss(), want_balance.loss());
    rows.push(compare(
        "moe_balance loss".into(),
        shape(c),
        &[got_loss],
        &[want_loss],
        &[want_loss],
        4.0 * ((2 * t + e) as f64 + eps_p / V + 8.0) * V,
    ));

    let y = random(rng, t * k * d, 2.0);
    let y_dev = device.upload(&y)?;
    for with_aux in [false, true] {
        let d_weights = moe.slot_dots(&dy_dev, &y_dev, &r, d)?;
        let mut dz = device.alloc::<f32>(t * e)?;
        let aux = with_aux.then_some((&balance, coef, &w_dev));
        moe.route_backward(&r, &d_weights, aux, &mut dz)?;
        let want_aux = with_aux.then_some(MoeAux {
            balance: &want_balance,
            coef,
            row_weights: &row_weights,
        });
        let want_dz = CpuOps.moe_route_backward(&want, &y, &dy, d, want_aux);
        let direct = with_aux.then(|| want_balance.prob_grad(coef, &row_weights));
        let scale = backward_scale(&want, &y, &dy, d, direct.as_deref());
        let bound = U + 8.0 * (eps_p + (d + e + k + 8) as f64 * V);
        rows.push(compare(
            format!("moe_route_backward{}", if with_aux { " +aux" } else { "" }),
            shape(c),
            &device.download(&dz)?,
            &want_dz,
            &scale,
            bound,
        ));
    }
    Ok(rows)
}

/// The bf16 row moves on bf16 copies of `x` and `y`: the f32 kernels' arithmetic rounded once
/// to bf16, so the CPU's f32 result rounded to bf16, bit for bit.
fn bf16_moves(
    moe: &MoeKernels,
    r: &DeviceRouting,
    routing: &CpuRouting,
    weighted: bool,
    (x, y): (&[f32], &[f32]),
    (c, d): (&MoeCase, usize),
) -> Result<Vec<Row>> {
    let device = moe.device;
    let to_bf16 = |v: &[f32]| v.iter().map(|&a| bf16::from_f32(a)).collect::<Vec<_>>();
    let widen = |v: Vec<bf16>| v.into_iter().map(|a| a.to_f64()).collect::<Vec<f64>>();
    let rounded = |v: Vec<f32>| v.into_iter().map(|a| bf16::from_f32(a).to_f64()).collect();
    let (xb, yb) = (to_bf16(x), to_bf16(y));
    let widened = |v: &[bf16]| v.iter().map(|a| a.to_f32()).collect::<Vec<f32>>();
    let mut out = device.alloc::<bf16>(r.slots() * d)?;
    moe.permute(&device.upload(&xb)?, r, weighted, &mut out, d)?;
    let want_out: Vec<f64> = rounded(CpuOps.moe_permute(&widened(&xb), routing, weighted, d));
    let mut back = device.alloc::<bf16>(r.tokens * d)?;
    moe.unpermute(&device.upload(&yb)?, r, weighted, &mut back, d)?;
    let want_back: Vec<f64> = rounded(CpuOps.moe_unpermute(&widened(&yb), routing, weighted, d));
    let tag = if weighted { " weighted" } else { "" };
    Ok(vec![
        exact(
            &format!("moe_gather{tag} bf16"),
            c,
            &widen(device.download(&out)?),
            &want_out,
        ),
        exact(
            &format!("moe_unpermute{tag} bf16"),
            c,
            &widen(device.download(&back)?),
            &want_back,
        ),
    ])
}

/// `S_te = p_e (|dp|_e + Σ_e' p_e' |dp|_e')` of the module header, per logit.
fn backward_scale(
    r: &CpuRouting,
    y: &[f32],
    dout: &[f32],
    d: usize,
    direct: Option<&[f64]>,
) -> Vec<f32> {
    let (e_count, k) = (r.routing.experts, r.routing.k);
    let mut magnitude = vec![0f64; r.order.len()];
    for (row, &slot) in r.order.iter().enumerate() {
        let t = slot / k;
        magnitude[slot] = (0..d)
            .map(|c| (dout[t * d + c] as f64 * y[row * d + c] as f64).abs())
            .sum();
    }
    let mut out = vec![0f32; r.routing.probs.len()];
    for t in 0..r.routing.tokens() {
        let p = &r.routing.probs[t * e_count..(t + 1) * e_count];
        let slots = t * k..(t + 1) * k;
        let top_sum: f64 = r.routing.chosen[slots.clone()].iter().map(|&e| p[e]).sum();
        let mean: f64 = slots
            .clone()
            .map(|s| magnitude[s] * r.routing.weights[s])
            .sum();
        let mut dp: Vec<f64> = (0..e_count)
            .map(|e| direct.map_or(0.0, |g| g[t * e_count + e].abs()))
            .collect();
        for s in slots {
            dp[r.routing.chosen[s]] += (magnitude[s] + mean) / top_sum;
        }
        let centre: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
        for e in 0..e_count {
            out[t * e_count + e] = (p[e] * (dp[e] + centre)) as f32;
        }
    }
    out
}

/// Every case.
pub fn rows(device: &Device, rng: &mut StdRng) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for case in cases() {
        rows.extend(moe(device, rng, &case)?);
    }
    Ok(rows)
}
