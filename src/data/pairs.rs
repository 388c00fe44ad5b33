//! Turning reward groups with K > 2 into pairs for the pairwise losses, by the strategies
//! the NCA paper compares (docs/losses.md §4). A pair is chosen first, with rewards `(1, 0)`;
//! responses with equal rewards never form a pair.

use super::Group;
use anyhow::{bail, ensure, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairStrategy {
    /// The best response against one random worse one (Zephyr).
    BestVsRandom,
    /// The best response against each worse one (DPO×3 for K = 4).
    BestVsEach,
    /// Every pair with different rewards, the better one chosen (DPO×C(K,2)).
    AllPairs,
}

impl PairStrategy {
    pub const NAMES: &'static [&'static str] = &["best_vs_random", "best_vs_each", "all_pairs"];

    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "best_vs_random" => PairStrategy::BestVsRandom,
            "best_vs_each" => PairStrategy::BestVsEach,
            "all_pairs" => PairStrategy::AllPairs,
            other => bail!(
                "unknown pairs strategy {other:?}; expected one of {:?}",
                Self::NAMES
            ),
        })
    }
}

fn pair(g: &Group, chosen: usize, rejected: usize) -> Group {
    Group {
        prompt: g.prompt.clone(),
        responses: vec![g.responses[chosen].clone(), g.responses[rejected].clone()],
        rewards: vec![1.0, 0.0],
        source: g.source.clone(),
    }
}

/// A group of two as a pairwise loss reads it, the better-rated response first: as it is when
/// it already is, else swapped into a pair (rewards `(1, 0)`). Equal rewards make no pair: an
/// error naming the group's line.
pub fn chosen_first(g: Group, loss: &str) -> Result<Group> {
    let r = &g.rewards;
    ensure!(
        r[0] != r[1],
        "{}: {loss} needs a chosen and a rejected response, but the two rewards are equal \
         ({}); drop the group, or give --pairs to leave out groups without a better response",
        g.source,
        r[0]
    );
    Ok(if r[0] > r[1] { g } else { pair(&g, 1, 0) })
}

/// The pairs of every group, in group order. Groups whose rewards are all equal give none.
pub fn to_pairs(groups: &[Group], strategy: PairStrategy, seed: u64) -> Vec<Group> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for g in groups {
        let r = &g.rewards;
        let best = crate::loss::best(r);
        match strategy {
            PairStrategy::BestVsRandom => {
                let worse: Vec<usize> = (0..r.len()).filter(|&i| r[i] < r[best]).collect();
                if !worse.is_empty() {
                    out.push(pair(g, best, worse[rng.gen_range(0..worse.len())]));
                }
            }
            PairStrategy::BestVsEach => {
                out.extend(
                    (0..r.len())
                        .filter(|&i| r[i] < r[best])
                        .map(|i| pair(g, best, i)),
                );
            }
            PairStrategy::AllPairs => {
                for i in 0..r.len() {
                    for j in i + 1..r.len() {
                        if r[i] > r[j] {
                            out.push(pair(g, i, j));
                        } else if r[j] > r[i] {
                            out.push(pair(g, j, i));
                        }
                    }
                }
            }
        }
    }
    out
}
