//! Mixtral routing, the CPU reference: softmax over experts, top-k with renormalized weights,
//! the (token, slot) rows grouped by expert, the backward into the router logits, and the
//! Switch load-balancing loss (docs/model.md §4), in f64. The device backend runs the same
//! arithmetic in its kernels (cuda/moe.cu) and is checked against this.

use anyhow::{ensure, Result};

/// The routing decision of one layer.
#[derive(Clone, Debug)]
pub struct Routing {
    pub experts: usize,
    pub k: usize,
    /// `softmax(z)` per token, `[T, E]`.
    pub probs: Vec<f64>,
    /// The chosen experts per token, `[T, k]`, by decreasing probability (ties: lowest index).
    pub chosen: Vec<usize>,
    /// Their renormalized weights, `[T, k]`.
    pub weights: Vec<f64>,
}

pub fn route(logits: &[f32], experts: usize, k: usize) -> Routing {
    let tokens = logits.len() / experts;
    let mut probs = vec![0f64; tokens * experts];
    let mut chosen = Vec::with_capacity(tokens * k);
    let mut weights = Vec::with_capacity(tokens * k);
    for t in 0..tokens {
        let z = &logits[t * experts..(t + 1) * experts];
        let max = z
            .iter()
            .map(|&x| x as f64)
            .fold(f64::NEG_INFINITY, f64::max);
        let p = &mut probs[t * experts..(t + 1) * experts];
        for (pe, &ze) in p.iter_mut().zip(z) {
            *pe = (ze as f64 - max).exp();
        }
        let sum: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= sum);
        let mut order: Vec<usize> = (0..experts).collect();
        // Stable sort: equal probabilities keep the lower index first.
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        let top = &order[..k];
        let top_sum: f64 = top.iter().map(|&e| p[e]).sum();
        chosen.extend_from_slice(top);
        weights.extend(top.iter().map(|&e| p[e] / top_sum));
    }
    Routing {
        experts,
        k,
        probs,
        chosen,
        weights,
    }
}

impl Routing {
    pub fn tokens(&self) -> usize {
        self.probs.len() / self.experts
    }

    /// The slots (`t * k + j`) grouped by expert, in expert order and, within an expert, in
    /// token order: the order of the rows the experts process.
    pub fn expert_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.chosen.len()).collect();
        // Stable: an expert's slots keep their token order.
        order.sort_by_key(|&slot| self.chosen[slot]);
        order
    }

    /// How many rows each expert receives.
    pub fn expert_rows(&self) -> Vec<usize> {
        let mut rows = vec![0; self.experts];
        for &e in &self.chosen {
            rows[e] += 1;
        }
        rows
    }

    /// `dL/dz [T, E]` from `dL/dweight` per slot (`[T, k]`) plus any direct `dL/dp`
    /// (`[T, E]`, from the load-balancing loss).
    pub fn backward(&self, d_weights: &[f64], d_probs_direct: Option<&[f64]>) -> Vec<f32> {
        let (e_count, k) = (self.experts, self.k);
        let mut dz = vec![0f32; self.probs.len()];
        for t in 0..self.tokens() {
            let p = &self.probs[t * e_count..(t + 1) * e_count];
            let mut dp = match d_probs_direct {
                Some(direct) => direct[t * e_count..(t + 1) * e_count].to_vec(),
                None => vec![0f64; e_count],
            };
            let slots = t * k..(t + 1) * k;
            let top_sum: f64 = self.chosen[slots.clone()].iter().map(|&e| p[e]).sum();
            let mean_grad: f64 = slots.clone().map(|s| d_weights[s] * self.weights[s]).sum();
            for s in slots {
                dp[self.chosen[s]] += (d_weights[s] - mean_grad) / top_sum;
            }
            let centre: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
            for e in 0..e_count {
                dz[t * e_count + e] = (p[e] * (dp[e] - centre)) as f32;
            }
        }
        dz
    }
}

/// The running sums of the load-balancing loss over layers and weighted token rows.
#[derive(Clone, Debug)]
pub struct LoadBalance {
    experts: usize,
    chosen_mass: Vec<f64>,
    prob_mass: Vec<f64>,
    total_weight: f64,
}

impl LoadBalance {
    pub fn new(experts: usize) -> Self {
        LoadBalance::from_sums(vec![0.0; experts], vec![0.0; experts], 0.0)
    }

    /// The sums `Σ w [e chosen]`, `Σ w p_e` per expert and `Σ w`, over layers and rows.
    pub fn from_sums(chosen_mass: Vec<f64>, prob_mass: Vec<f64>, total_weight: f64) -> Self {
        LoadBalance {
            experts: chosen_mass.len(),
            chosen_mass,
            prob_mass,
            total_weight,
        }
    }

    /// From the sums laid out flat as a device keeps them: `Σ w [e chosen]` of each expert,
    /// then `Σ w p_e` of each, then `Σ w`.
    pub fn from_flat_sums(experts: usize, sums: &[f64]) -> Result<Self> {
        ensure!(
            sums.len() == 2 * experts + 1,
            "{} load-balancing sums for {experts} experts, which need {}",
            sums.len(),
            2 * experts + 1
        );
        Ok(LoadBalance::from_sums(
            sums[..experts].to_vec(),
            sums[experts..2 * experts].to_vec(),
            sums[2 * experts],
        ))
    }

    pub fn add_layer(&mut self, routing: &Routing, row_weights: &[f64]) {
        for (t, &w) in row_weights.iter().enumerate() {
            self.total_weight += w;
            for e in 0..self.experts {
                self.prob_mass[e] += w * routing.probs[t * self.experts + e];
            }
            for &e in &routing.chosen[t * routing.k..(t + 1) * routing.k] {
                self.chosen_mass[e] += w;
            }
        }
    }

    /// `aux = E · Σ_e f_e P_e`.
    pub fn loss(&self) -> f64 {
        let w = self.total_weight;
        self.experts as f64
            * (0..self.experts)
                .map(|e| (self.chosen_mass[e] / w) * (self.prob_mass[e] / w))
                .sum::<f64>()
    }

    /// `coef · d aux / d p [T, E]` of one layer; the gradient flows through `P_e` only.
    pub fn prob_grad(&self, coef: f64, row_weights: &[f64]) -> Vec<f64> {
        let w = self.total_weight;
        let scale: Vec<f64> = (0..self.experts)
            .map(|e| coef * self.experts as f64 * (self.chosen_mass[e] / w) / w)
            .collect();
        row_weights
            .iter()
            .flat_map(|&rw| scale.iter().map(move |s| s * rw))
            .collect()
    }
}
