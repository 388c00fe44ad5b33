//! AdamW over bf16 stores (cuda/adamw.cu's `adamw_bf16_g*_m*`) against the CPU's
//! bf16-rounding mode (`ops::optimizer::FlatStores`), for every combination of master copy,
//! gradient type and moment type: bit for bit (bound 0), stochastic roundings included. The
//! device updates one flat store in one launch; the CPU updates it in two stretches, the
//! second starting at an odd flat index, so that the rounding's hash of (seed, step, flat
//! index) and each store's field of it are checked to be the device's and not a per-stretch
//! restart.

use super::{compare, magnitudes, random, upload, Row};
use crate::ops::cuda::device::{Device, Float};
use crate::ops::cuda::kernels::{AdamWStep, Kernels};
use crate::ops::optimizer::{AdamWConfig, FlatStep, FlatStores};
use crate::ops::storage::Dtype;
use anyhow::Result;
use half::bf16;
use rand::rngs::StdRng;
use rand::Rng;

/// A random state of `n` elements, each value representable in the type it is stored in.
struct State {
    weights: Vec<f32>,
    master: Option<Vec<f32>>,
    grads: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl State {
    fn random(rng: &mut StdRng, n: usize, master: bool, grads: Dtype, moments: Dtype) -> State {
        let master = master.then(|| random(rng, n, 1.0));
        let mut weights = match &master {
            Some(m) => m.clone(),
            None => random(rng, n, 1.0),
        };
        Dtype::Bf16.round_all(&mut weights);
        let mut g = random(rng, n, 1e-2);
        grads.round_all(&mut g);
        let mut m = random(rng, n, 1e-2);
        let mut v: Vec<f32> = g.iter().map(|g| g * g * rng.gen_range(0.0..4.0)).collect();
        moments.round_all(&mut m);
        moments.round_all(&mut v);
        State {
            weights,
            master,
            grads: g,
            m,
            v,
        }
    }

    /// The CPU's update, in two stretches split at `split`.
    fn cpu(&mut self, step: &FlatStep, coef: f64, moments: Dtype, split: usize) {
        let State {
            weights,
            master,
            grads: g,
            m,
            v,
        } = self;
        let (w0, w1) = weights.split_at_mut(split);
        let (g0, g1) = g.split_at(split);
        let (m0, m1) = m.split_at_mut(split);
        let (v0, v1) = v.split_at_mut(split);
        let (mut ma0, mut ma1) = match master {
            Some(ma) => {
                let (a, b) = ma.split_at_mut(split);
                (Some(a), Some(b))
            }
            None => (None, None),
        };
        for (first, w, ma, g, m, v) in [
            (0, w0, ma0.take(), g0, m0, v0),
            (split as u64, w1, ma1.take(), g1, m1, v1),
        ] {
            FlatStores {
                weights: (w, Dtype::Bf16),
                master: ma,
                grads: g,
                moments: (m, v, moments),
                first,
            }
            .update(step, coef);
        }
    }
}

/// The device's update of `state`: everything after it, in f32.
fn device<G: Float, M: Float>(
    k: &Kernels,
    state: &State,
    clip: &[f32; 2],
    step: &AdamWStep,
) -> Result<Vec<f32>> {
    let dev: &Device = k.device;
    let mut weights = upload::<bf16>(dev, &state.weights)?;
    let master = match &state.master {
        Some(m) => Some(dev.upload(m)?),
        None => None,
    };
    let grads = upload::<G>(dev, &state.grads)?;
    let (mut m, mut v) = (upload::<M>(dev, &state.m)?, upload::<M>(dev, &state.v)?);
    let clip = dev.upload(clip)?;
    k.adamw_bf16(
        &mut weights,
        master.as_ref().map(|b| b.view()),
        &grads,
        &mut m,
        &mut v,
        Some(clip.view()),
        step,
    )?;
    let mut out = super::download(dev, &weights)?;
    if let Some(master) = &master {
        out.extend(dev.download(master)?);
    }
    out.extend(super::download(dev, &m)?);
    out.extend(super::download(dev, &v)?);
    Ok(out)
}

/// One row per (master, gradient type, moment type), on `n` elements.
pub fn rows(k: &Kernels, rng: &mut StdRng, n: usize) -> Result<Vec<Row>> {
    let config = AdamWConfig {
        betas: (0.9, 0.95),
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut rows = Vec::new();
    for master in [false, true] {
        for grads in [Dtype::F32, Dtype::Bf16] {
            for moments in [Dtype::F32, Dtype::Bf16] {
                let mut state = State::random(rng, n, master, grads, moments);
                let (step, lr, seed) = (rng.gen_range(1..20), 1e-3, rng.gen());
                let coef = rng.gen_range(0.25f32..1.0);
                let launch = AdamWStep::new(&config, step, lr, seed);
                let clip = [1.0, coef];
                let got = match (grads, moments) {
                    (Dtype::F32, Dtype::F32) => device::<f32, f32>(k, &state, &clip, &launch)?,
                    (Dtype::F32, Dtype::Bf16) => device::<f32, bf16>(k, &state, &clip, &launch)?,
                    (Dtype::Bf16, Dtype::F32) => device::<bf16, f32>(k, &state, &clip, &launch)?,
                    (Dtype::Bf16, Dtype::Bf16) => device::<bf16, bf16>(k, &state, &clip, &launch)?,
                };
                let split = (n / 3) | 1;
                let cpu_step = FlatStep::new(&config, step, lr, seed);
                state.cpu(&cpu_step, coef as f64, moments, split);
                let mut want = state.weights.clone();
                want.extend(state.master.iter().flatten());
                want.extend(&state.m);
                want.extend(&state.v);
                let op = format!(
                    "adamw bf16 stores {} master, {} grads, {} moments = CPU",
                    if master { "f32" } else { "no" },
                    grads.name(),
                    moments.name()
                );
                rows.push(compare(
                    op,
                    format!("{n}"),
                    &got,
                    &want,
                    &magnitudes(&want),
                    0.0,
                ));
            }
        }
    }
    Ok(rows)
}
