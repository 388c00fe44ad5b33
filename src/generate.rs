//! Greedy decoding by recomputing the whole sequence for each new token.

use crate::model::Model;
use crate::ops::cpu::CpuOps;
use anyhow::Result;

pub struct Sampling {
    pub temperature: f64,
    pub top_p: f64,
    pub max_new_tokens: usize,
    pub seed: u64,
}

pub struct Generation {
    pub ids: Vec<u32>,
    pub stopped_at_eos: bool,
}

pub fn generate(
    model: &Model<Vec<f32>>,
    prompts: &[Vec<u32>],
    s: &Sampling,
) -> Result<Vec<Generation>> {
    let v = model.cfg.vocab_size;
    Ok(prompts
        .iter()
        .map(|p| {
            let mut ids = p.clone();
            let mut out = Vec::new();
            let mut eos = false;
            for _ in 0..s.max_new_tokens {
                let logits = model.logits(&CpuOps, &ids);
                let last = &logits[(ids.len() - 1) * v..];
                let mut best = 0;
                for (i, &x) in last.iter().enumerate() {
                    if x > last[best] {
                        best = i;
                    }
                }
                let t = best as u32;
                ids.push(t);
                if model.cfg.is_eos(t) {
                    eos = true;
                    break;
                }
                out.push(t);
            }
            Generation {
                ids: out,
                stopped_at_eos: eos,
            }
        })
        .collect())
}
