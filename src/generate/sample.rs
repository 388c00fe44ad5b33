//! Choosing the next token from logits: greedy, or temperature and nucleus (top-p) sampling.

use rand::Rng;

/// The token of the highest logit, the lowest id among equal ones (as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &z) in logits.iter().enumerate() {
        if z > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// A token drawn from `softmax(logits / temperature)` restricted to its nucleus: the most
/// probable tokens, in decreasing probability (lowest id first among equals), up to and
/// including the first at which their probability reaches `top_p` — what transformers'
/// `TopPLogitsWarper` keeps. `temperature == 0` is greedy ([`argmax`]).
pub fn sample(logits: &[f32], temperature: f64, top_p: f64, rng: &mut impl Rng) -> u32 {
    if temperature == 0.0 {
        return argmax(logits);
    }
    let max = logits[argmax(logits) as usize] as f64;
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &z)| (i as u32, ((z as f64 - max) / temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|&(_, p)| p).sum();
    let mut mass = total;
    if top_p < 1.0 {
        // Stable: equal probabilities keep increasing ids.
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut cumulative = 0.0;
        let mut kept = 0;
        for &(_, p) in &probs {
            cumulative += p;
            kept += 1;
            if cumulative >= top_p * total {
                break;
            }
        }
        probs.truncate(kept);
        mass = cumulative;
    }
    let u = rng.gen::<f64>() * mass;
    let mut cumulative = 0.0;
    for &(id, p) in &probs {
        cumulative += p;
        if u < cumulative {
            return id;
        }
    }
    // Rounding can leave `u` just past the last sum.
    probs.last().expect("logits are not empty").0
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn argmax_breaks_ties_by_the_lowest_id() {
        assert_eq!(argmax(&[0.0, 3.0, -1.0, 3.0]), 1);
        assert_eq!(argmax(&[2.0]), 0);
    }

    #[test]
    fn the_nucleus_is_the_fewest_tokens_reaching_top_p() {
        let logits = [0.1f32.ln(), 0.4f32.ln(), 0.2f32.ln(), 0.3f32.ln()];
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[sample(&logits, 1.0, 0.65, &mut rng) as usize] += 1;
        }
        // 0.4 + 0.3 reaches 0.65: tokens 1 and 3 only, in the ratio 4:3.
        assert_eq!((seen[0], seen[2]), (0, 0), "{seen:?}");
        let share = seen[1] as f64 / 2000.0;
        assert!((share - 4.0 / 7.0).abs() < 0.05, "{seen:?}");
    }
}
