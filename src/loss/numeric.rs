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

/// `log Σ exp(x_i)` with the maximum subtracted; `-inf` for an empty slice.
pub fn log_sum_exp(x: &[f64]) -> f64 {
    let max = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + x.iter().map(|&v| (v - max).exp()).sum::<f64>().ln()
}
