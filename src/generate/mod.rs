//! Generation on the CPU backend with a KV cache: each prompt is prefilled in one forward,
//! then tokens are chosen one at a time (greedy, or sampled with temperature and top-p) until
//! an EOS id of the config or the token budget. Prompts are decoded together in batches.

mod decoder;
mod sample;

pub use decoder::Decoder;
pub use sample::{argmax, sample};

use crate::model::Model;
use anyhow::{bail, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// How tokens are chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// Divides the logits before the softmax; 0 is greedy.
    pub temperature: f64,
    /// The nucleus: the most probable tokens whose probability reaches it (1 keeps all).
    pub top_p: f64,
    pub max_new_tokens: usize,
    /// Prompt `i` draws from stream `i` of a ChaCha8 generator seeded with it, so that its
    /// tokens do not depend on the other prompts of the call.
    pub seed: u64,
}

impl Sampling {
    pub fn greedy(max_new_tokens: usize) -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            max_new_tokens,
            seed: 0,
        }
    }

    pub fn check(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!(
                "--temperature must be a finite number >= 0 (0 is greedy), not {}",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], not {}", self.top_p);
        }
        Ok(())
    }
}

/// What was generated after one prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    /// The new tokens, the EOS included when one was produced.
    pub ids: Vec<u32>,
    pub stopped_at_eos: bool,
}

/// Prompts decoded together: bounds the caches and the prefill's activations held at once.
const PROMPTS_PER_BATCH: usize = 64;

/// Generates after every prompt (token ids, BOS or chat template already applied).
pub fn generate(
    model: &Model<Vec<f32>>,
    prompts: &[Vec<u32>],
    sampling: &Sampling,
) -> Result<Vec<Generation>> {
    sampling.check()?;
    let vocab = model.cfg.vocab_size;
    for (i, prompt) in prompts.iter().enumerate() {
        if prompt.is_empty() {
            bail!("prompt {i} has no tokens");
        }
        if let Some(&id) = prompt.iter().find(|&&id| id as usize >= vocab) {
            bail!("prompt {i}: token id {id} is outside the model's vocabulary of {vocab}");
        }
    }
    let mut out = Vec::with_capacity(prompts.len());
    for (b, batch) in prompts.chunks(PROMPTS_PER_BATCH).enumerate() {
        let mut decoder = Decoder::new(model, batch.len());
        out.extend(decode(
            batch,
            sampling,
            (b * PROMPTS_PER_BATCH) as u64,
            |id| model.cfg.is_eos(id),
            |feeds| decoder.feed(feeds),
        ));
    }
    Ok(out)
}

/// The generation loop over `prompts` (sequence `i` draws from stream `first_stream + i`):
/// `feed` appends tokens to sequences and returns the logits after each feed's last token,
/// as [`Decoder::feed`] does.
fn decode(
    prompts: &[Vec<u32>],
    sampling: &Sampling,
    first_stream: u64,
    is_eos: impl Fn(u32) -> bool,
    mut feed: impl FnMut(&[(usize, &[u32])]) -> Vec<f32>,
) -> Vec<Generation> {
    let mut out = vec![
        Generation {
            ids: Vec::new(),
            stopped_at_eos: false,
        };
        prompts.len()
    ];
    if sampling.max_new_tokens == 0 || prompts.is_empty() {
        return out;
    }
    let mut rngs: Vec<ChaCha8Rng> = (0..prompts.len())
        .map(|i| {
            let mut rng = ChaCha8Rng::seed_from_u64(sampling.seed);
            rng.set_stream(first_stream + i as u64);
            rng
        })
        .collect();
    let prefill: Vec<(usize, &[u32])> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| (i, p.as_slice()))
        .collect();
    let mut logits = feed(&prefill);
    let mut active: Vec<usize> = (0..prompts.len()).collect();
    loop {
        let vocab = logits.len() / active.len();
        let mut next = Vec::with_capacity(active.len());
        for (row, &seq) in active.iter().enumerate() {
            let id = sample(
                &logits[row * vocab..(row + 1) * vocab],
                sampling.temperature,
                sampling.top_p,
                &mut rngs[seq],
            );
            let g = &mut out[seq];
            g.ids.push(id);
            if is_eos(id) {
                g.stopped_at_eos = true;
            } else if g.ids.len() < sampling.max_new_tokens {
                next.push((seq, [id]));
            }
        }
        if next.is_empty() {
            return out;
        }
        let feeds: Vec<(usize, &[u32])> = next.iter().map(|(s, id)| (*s, &id[..])).collect();
        logits = feed(&feeds);
        active = next.iter().map(|&(s, _)| s).collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake model over a vocabulary of 4 whose next token is scripted per sequence.
    fn scripted(scripts: &[Vec<u32>], sampling: &Sampling) -> Vec<Generation> {
        let prompts = vec![vec![0u32]; scripts.len()];
        let mut fed = vec![0usize; scripts.len()];
        decode(
            &prompts,
            sampling,
            0,
            |id| id == 2 || id == 3,
            |feeds| {
                feeds
                    .iter()
                    .flat_map(|&(seq, ids)| {
                        fed[seq] += ids.len();
                        let next = scripts[seq][fed[seq] - 1];
                        (0..4).map(move |v| if v == next { 1.0 } else { 0.0 })
                    })
                    .collect()
            },
        )
    }

    #[test]
    fn generation_stops_at_any_eos_or_the_budget() {
        let scripts = vec![vec![1, 1, 2, 1, 1], vec![3, 1, 1, 1, 1], vec![1; 5]];
        let got = scripted(&scripts, &Sampling::greedy(4));
        let want = [(vec![1, 1, 2], true), (vec![3], true), (vec![1; 4], false)];
        for (g, (ids, eos)) in got.iter().zip(want) {
            assert_eq!((&g.ids, g.stopped_at_eos), (&ids, eos));
        }
        assert!(scripted(&scripts, &Sampling::greedy(0))
            .iter()
            .all(|g| g.ids.is_empty() && !g.stopped_at_eos));
    }

    #[test]
    fn bad_sampling_parameters_are_refused() {
        let bad = |temperature, top_p| {
            Sampling {
                temperature,
                top_p,
                ..Sampling::greedy(1)
            }
            .check()
            .unwrap_err()
            .to_string()
        };
        assert!(bad(-0.5, 1.0).contains("temperature"));
        assert!(bad(f64::NAN, 1.0).contains("temperature"));
        assert!(bad(1.0, 0.0).contains("--top-p"));
        assert!(bad(1.0, 1.5).contains("--top-p"));
    }
}
