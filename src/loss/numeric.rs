//! Numerically stable scalar functions shared by the losses.

/// `log σ(x) = -softplus(-x)`, exact for margins of hundreds.
pub fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `softmax(r / alpha)`; for `alpha = 0`, uniform over the responses sharing the maximum.
pub fn soft_labels(rewards: &[f64], alpha: f64) -> Vec<f64> {
    let max = rewards.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = if alpha == 0.0 {
        rewards
            .iter()
            .map(|&r| if r == max { 1.0 } else { 0.0 })
            .collect()
    } else {
        rewards.iter().map(|&r| ((r - max) / alpha).exp()).collect()
    };
    let sum: f64 = weights.iter().sum();
    weights.into_iter().map(|w| w / sum).collect()
}

/// `(max(x), log Σ exp(x_i - max))`, the latter as `ln_1p(Σ_{i ≠ argmax} exp(x_i - max))` so
/// that it keeps its tiny values when one term dominates.
pub fn max_and_log_sum_exp(x: &[f64]) -> (f64, f64) {
    let Some((arg, &max)) = x.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)) else {
        return (f64::NEG_INFINITY, 0.0);
    };
    if max == f64::NEG_INFINITY {
        return (max, 0.0);
    }
    let rest: f64 = x
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != arg)
        .map(|(_, &v)| (v - max).exp())
        .sum();
    (max, rest.ln_1p())
}

/// `log Σ exp(x_i)`; `-inf` for an empty slice.
pub fn log_sum_exp(x: &[f64]) -> f64 {
    let (max, shifted) = max_and_log_sum_exp(x);
    max + shifted
}
