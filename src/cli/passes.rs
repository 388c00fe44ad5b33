//! How `score`, `eval`, `grads` and `precompute-ref` bound their memory: the data set in
//! passes of at most `--micro-tokens` packed tokens, with a progress bar on stderr.

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

#[derive(Args, Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PassArgs {
    /// Most packed tokens in one pass (a group longer than that runs alone): the memory of a
    /// pass's activations is bounded by it, whatever the data set's size. Statistics do not
    /// depend on it; losses and metrics combine over passes as a training step's
    /// micro-batches do (per group, and the Mixtral aux loss per pass).
    #[arg(long, value_name = "N", default_value_t = 8192, value_parser = at_least_one())]
    pub micro_tokens: usize,
}

/// The parser of a count that must be at least 1 (`--micro-tokens` of every command, the
/// bench shapes).
pub fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

/// The parser of a count of at least `min` that a run's train.toml saves (a TOML integer,
/// an i64).
pub fn saved_count(min: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(min..=crate::cli::SAVED_INT_MAX)
}

/// The parser of a count of timed repetitions (a bench's `--reps`, `--steps`): at least 1, at
/// most a million, which no timing needs and whose list of times still fits in memory.
pub fn repetitions() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000)
}

/// A bar over `groups` groups, drawn on stderr (hidden when it is not a terminal).
pub fn groups_bar(groups: usize) -> ProgressBar {
    let bar = ProgressBar::new(groups as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "groups {pos}/{len} [{bar:30}] {elapsed_precise} ETA {eta_precise}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar
}
