//! AdamW as PyTorch defines it (decoupled weight decay, bias correction) and global-norm
//! gradient clipping as `torch.nn.utils.clip_grad_norm_` does it.

use crate::ops::storage::{bf16_stochastic, rounding_bits, Dtype, Store};
use anyhow::{bail, Result};

#[derive(Clone, Debug)]
pub struct AdamWConfig {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults.
    fn default() -> Self {
        AdamWConfig {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    pub fn validate(&self) -> Result<()> {
        let (b1, b2) = self.betas;
        if !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2)) {
            bail!("--betas must both be in [0, 1), found {b1},{b2}");
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            bail!("--eps must be > 0, found {}", self.eps);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("--weight-decay must be >= 0, found {}", self.weight_decay);
        }
        Ok(())
    }
}

/// The factors of one AdamW step that do not depend on the element, shared by the CPU update
/// and the CUDA kernel (`cuda/adamw.cu`) so that both compute them identically.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepConstants {
    /// `lr / (1 − β1ᵗ)`.
    pub step_size: f64,
    /// `√(1 − β2ᵗ)`.
    pub bias2_sqrt: f64,
    /// `1 − lr·wd`.
    pub decay: f64,
}

impl AdamWConfig {
    /// The constants of step `step` (1 for the first update).
    pub fn step_constants(&self, step: u64, lr: f64) -> StepConstants {
        let (b1, b2) = self.betas;
        let t = step as i32;
        StepConstants {
            step_size: lr / (1.0 - b1.powi(t)),
            bias2_sqrt: (1.0 - b2.powi(t)).sqrt(),
            decay: 1.0 - lr * self.weight_decay,
        }
    }
}

/// The factors of one AdamW step as the update multiplies by them: each rounded once to f32
/// from its f64 value, as PyTorch hands its Python-float scalars to fp32 tensor operations.
/// The CPU update ([`FlatStores::update`]) and the CUDA kernels (`cuda/adamw.cu`'s
/// `AdamWStep`, field for field) both take these.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepFactors {
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub eps: f32,
    /// `lr / (1 − β1ᵗ)`.
    pub step_size: f32,
    /// `√(1 − β2ᵗ)`.
    pub bias2_sqrt: f32,
    /// `1 − lr·wd`.
    pub decay: f32,
}

/// AdamW state: f32 first and second moments per parameter tensor, and the step count.
#[derive(Clone, Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub step: u64,
    pub exp_avg: Vec<Vec<f32>>,
    pub exp_avg_sq: Vec<Vec<f32>>,
}

impl AdamW {
    pub fn new(config: AdamWConfig, sizes: &[usize]) -> Self {
        AdamW {
            config,
            step: 0,
            exp_avg: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            exp_avg_sq: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// One update of every tensor with learning rate `lr`:
    /// `p ← p(1 − lr·wd) − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + eps)`.
    pub fn update(&mut self, params: &mut [&mut Vec<f32>], grads: &[&Vec<f32>], lr: f64) {
        self.step += 1;
        let step = FlatStep::new(&self.config, self.step, lr, 0);
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let mut stores = FlatStores {
                weights: (p, Dtype::F32),
                master: None,
                grads: g,
                moments: (&mut self.exp_avg[i], &mut self.exp_avg_sq[i], Dtype::F32),
                first: 0,
            };
            stores.update(&step, 1.0);
        }
    }
}

/// One AdamW step's constants and the stochastic rounding's seed, as the device kernels take
/// them (`cuda/adamw.cu`).
#[derive(Clone, Copy, Debug)]
pub struct FlatStep {
    pub betas: (f64, f64),
    pub eps: f64,
    pub constants: StepConstants,
    pub seed: u64,
    pub step: u64,
}

impl FlatStep {
    pub fn new(config: &AdamWConfig, step: u64, lr: f64, seed: u64) -> Self {
        FlatStep {
            betas: config.betas,
            eps: config.eps,
            constants: config.step_constants(step, lr),
            seed,
            step,
        }
    }

    /// The step's factors in f32.
    pub fn factors(&self) -> StepFactors {
        let (b1, b2) = self.betas;
        let c = self.constants;
        StepFactors {
            beta1: b1 as f32,
            one_minus_beta1: (1.0 - b1) as f32,
            beta2: b2 as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            eps: self.eps as f32,
            step_size: c.step_size as f32,
            bias2_sqrt: c.bias2_sqrt as f32,
            decay: c.decay as f32,
        }
    }
}

/// One stretch of a flat parameter store on the host, each part with the type it stands for
/// (its values are representable in it): what the device's AdamW kernels update, element for
/// element, in the CPU's bf16-rounding mode (docs/numerics.md §7).
pub struct FlatStores<'a> {
    pub weights: (&'a mut [f32], Dtype),
    /// The fp32 master copy of bf16 weights.
    pub master: Option<&'a mut [f32]>,
    /// Values of the gradient store's type, widened exactly.
    pub grads: &'a [f32],
    /// `m`, `v` and their type.
    pub moments: (&'a mut [f32], &'a mut [f32], Dtype),
    /// The flat index of the stretch's first element (the stochastic rounding hashes it).
    pub first: u64,
}

impl FlatStores<'_> {
    /// The kernel's update, operation for operation in f32, PyTorch's AdamW formula for f32
    /// tensors (each operation rounded once; PyTorch's `lerp_` and `addcdiv_` group some terms
    /// otherwise): each gradient times `coef` (clipping, rounded to
    /// f32 first), the moments (bf16 moments stored stochastically rounded, the unrounded ones
    /// used), and the weight through the master copy (rounded to nearest) or rounded
    /// stochastically when bf16 has none.
    pub fn update(&mut self, step: &FlatStep, coef: f64) {
        let f = step.factors();
        let coef = coef as f32;
        let grads = self.grads;
        let (weights, weight_type) = (&mut *self.weights.0, self.weights.1);
        let (m, v, moment_type) = (&mut *self.moments.0, &mut *self.moments.1, self.moments.2);
        let draws =
            moment_type == Dtype::Bf16 || (self.master.is_none() && weight_type == Dtype::Bf16);
        for j in 0..weights.len() {
            let bits = if draws {
                rounding_bits(step.seed, step.step, self.first + j as u64)
            } else {
                0
            };
            let g = if coef == 1.0 {
                grads[j]
            } else {
                grads[j] * coef
            };
            let mj = f.beta1 * m[j] + f.one_minus_beta1 * g;
            let vj = f.beta2 * v[j] + f.one_minus_beta2 * g * g;
            let denom = vj.sqrt() / f.bias2_sqrt + f.eps;
            let old = match &self.master {
                Some(master) => master[j],
                None => weights[j],
            };
            let p = old * f.decay - f.step_size * mj / denom;
            (m[j], v[j]) = match moment_type {
                Dtype::F32 => (mj, vj),
                Dtype::Bf16 => (
                    bf16_stochastic(mj, Store::ExpAvg.draw(bits)),
                    bf16_stochastic(vj, Store::ExpAvgSq.draw(bits)),
                ),
            };
            weights[j] = match (&mut self.master, weight_type) {
                (Some(master), _) => {
                    master[j] = p;
                    weight_type.round(p)
                }
                (None, Dtype::F32) => p,
                (None, Dtype::Bf16) => bf16_stochastic(p, Store::Weights.draw(bits)),
            };
        }
    }
}

/// The global L2 norm of all gradients, in f64.
pub fn global_norm(grads: &[&Vec<f32>]) -> f64 {
    grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&x| x as f64 * x as f64)
        .sum::<f64>()
        .sqrt()
}

/// Scales the gradients so that their global norm is at most `max_norm` (0 disables it), as
/// `clip_grad_norm_` does (`max_norm / (norm + 1e-6)`, capped at 1). Returns the norm before
/// clipping.
pub fn clip_global_norm(grads: &mut [&mut Vec<f32>], max_norm: f64) -> f64 {
    let norm = global_norm(&grads.iter().map(|g| &**g).collect::<Vec<_>>());
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                g.iter_mut().for_each(|x| *x = (*x as f64 * coef) as f32);
            }
        }
    }
    norm
}
