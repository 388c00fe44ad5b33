//! AdamW as PyTorch defines it (decoupled weight decay, bias correction) and global-norm
//! gradient clipping as `torch.nn.utils.clip_grad_norm_` does it.

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
        let (b1, b2) = self.config.betas;
        let StepConstants {
            step_size,
            bias2_sqrt,
            decay,
        } = self.config.step_constants(self.step, lr);
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let (m, v) = (&mut self.exp_avg[i], &mut self.exp_avg_sq[i]);
            for j in 0..p.len() {
                let gj = g[j] as f64;
                let mj = b1 * m[j] as f64 + (1.0 - b1) * gj;
                let vj = b2 * v[j] as f64 + (1.0 - b2) * gj * gj;
                m[j] = mj as f32;
                v[j] = vj as f32;
                let denom = (v[j] as f64).sqrt() / bias2_sqrt + self.config.eps;
                p[j] = (p[j] as f64 * decay - step_size * m[j] as f64 / denom) as f32;
            }
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
