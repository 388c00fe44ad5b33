//! The demo's task: sort a short list of digits. Verifiable, so a programmatic judge scores
//! any answer (the fraction of positions right), and graded wrong answers are easy to make —
//! the stand-in for UltraFeedback's rated completions.

use rand::seq::SliceRandom;
use rand::Rng;

/// The prompt text of a list: `sort 3 1 4 1 : `.
pub fn prompt_text(digits: &[u8]) -> String {
    // The trailing space separates the answer's first word when TRL's rule tokenizes the
    // prompt and prompt + answer as one text.
    format!("sort {} : ", join(digits))
}

fn join(digits: &[u8]) -> String {
    digits
        .iter()
        .map(u8::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

fn sorted(digits: &[u8]) -> Vec<u8> {
    let mut s = digits.to_vec();
    s.sort_unstable();
    s
}

/// The judge: the fraction of positions where `answer` (whitespace-separated tokens) holds
/// the sorted list's digit, over the longer of the two lengths — so missing, extra and
/// malformed tokens all cost.
pub fn judge(digits: &[u8], answer: &str) -> f64 {
    let want = sorted(digits);
    let got: Vec<&str> = answer.split_whitespace().collect();
    let right = want
        .iter()
        .zip(&got)
        .filter(|(w, g)| w.to_string() == **g)
        .count();
    right as f64 / want.len().max(got.len()).max(1) as f64
}

/// A random list of 4 to 6 digits.
pub fn random_list(rng: &mut impl Rng) -> Vec<u8> {
    let n = rng.gen_range(4..=6);
    (0..n).map(|_| rng.gen_range(0..10)).collect()
}

/// Answers of graded quality, best first: the sorted list, the sorted list with two
/// neighbours swapped, the list copied unsorted, and random digits of the same length.
pub fn candidates(digits: &[u8], rng: &mut impl Rng) -> Vec<String> {
    let right = sorted(digits);
    let mut swapped = right.clone();
    let i = rng.gen_range(0..swapped.len() - 1);
    swapped.swap(i, i + 1);
    let mut noise: Vec<u8> = (0..digits.len()).map(|_| rng.gen_range(0..10)).collect();
    noise.shuffle(rng);
    vec![join(&right), join(&swapped), join(digits), join(&noise)]
}
