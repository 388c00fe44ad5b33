//! Which groups each optimizer step sees. An epoch is a seeded shuffle of the data set cut
//! into steps by a token or group budget; a step is cut into micro-batches that fit in
//! memory (gradient accumulation). Everything is a pure function of the seed, so a resumed
//! run sees exactly the batches it would have seen.

use anyhow::{anyhow, bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// The most group visits (epochs × groups) whose steps a token budget plans one by one:
/// under a second of shuffling, where more would hang before the first step.
const MAX_PLANNED_VISITS: u64 = 100_000_000;

/// How much data one optimizer step takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepBudget {
    /// Groups are added while their packed tokens stay within this many (at least one group).
    Tokens(usize),
    /// This many groups.
    Groups(usize),
}

impl StepBudget {
    /// The flag that sets it, with its value.
    pub fn flag(&self) -> String {
        match self {
            StepBudget::Tokens(n) => format!("--tokens-per-step {n}"),
            StepBudget::Groups(n) => format!("--groups-per-step {n}"),
        }
    }
}

/// How long training runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Length {
    Steps(u64),
    Epochs(u64),
}

/// Where a run is in its data: the step about to be taken within an epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Position {
    pub epoch: u64,
    pub step_in_epoch: usize,
}

/// The step plan of a data set: packed lengths of its groups, the seed and the budget.
#[derive(Clone, Debug)]
pub struct Planner {
    lengths: Vec<usize>,
    seed: u64,
    budget: StepBudget,
}

impl Planner {
    pub fn new(lengths: Vec<usize>, seed: u64, budget: StepBudget) -> Result<Self> {
        if lengths.is_empty() {
            bail!("the data set has no groups to train on");
        }
        match budget {
            StepBudget::Tokens(0) => bail!("--tokens-per-step must be at least 1"),
            StepBudget::Groups(0) => bail!("--groups-per-step must be at least 1"),
            _ => {}
        }
        Ok(Planner {
            lengths,
            seed,
            budget,
        })
    }

    /// The group order of `epoch`: a shuffle seeded by the run's seed, one stream per epoch.
    fn order(&self, epoch: u64) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(epoch);
        let mut order: Vec<usize> = (0..self.lengths.len()).collect();
        order.shuffle(&mut rng);
        order
    }

    /// The steps of `epoch`, each a list of group indices. The last step may be short.
    pub fn epoch(&self, epoch: u64) -> Vec<Vec<usize>> {
        let order = self.order(epoch);
        match self.budget {
            StepBudget::Groups(n) => order.chunks(n).map(<[usize]>::to_vec).collect(),
            StepBudget::Tokens(budget) => greedy(&order, &self.lengths, budget),
        }
    }

    /// The number of optimizer steps a run of `length` takes.
    /// Under a token budget each epoch's shuffle is cut to count its steps, so the epochs
    /// are bounded (`MAX_PLANNED_VISITS` groups in all); under a group budget every epoch has
    /// the same steps.
    pub fn total_steps(&self, length: Length) -> Result<u64> {
        let epochs = match length {
            Length::Steps(n) => return Ok(n),
            Length::Epochs(e) => e,
        };
        let groups = self.lengths.len() as u64;
        let steps = match self.budget {
            StepBudget::Groups(n) => groups.div_ceil(n as u64).checked_mul(epochs),
            StepBudget::Tokens(_) => epochs
                .checked_mul(groups)
                .filter(|visits| *visits <= MAX_PLANNED_VISITS)
                .map(|_| (0..epochs).map(|e| self.epoch(e).len() as u64).sum()),
        };
        // A step count is saved as a TOML and JSON integer, an i64.
        let steps = steps.filter(|s| i64::try_from(*s).is_ok());
        steps.ok_or_else(|| {
            anyhow!(
                "--epochs {epochs}: {epochs} epochs of {groups} groups are too many steps to \
                 plan; give fewer epochs, or --steps N"
            )
        })
    }

    /// The packed token count of a step.
    pub fn tokens(&self, groups: &[usize]) -> usize {
        groups.iter().map(|&g| self.lengths[g]).sum()
    }

    /// Splits a step into micro-batches of at most `max_tokens` packed tokens each, in order;
    /// a group longer than that is a micro-batch of its own.
    pub fn micro_batches(&self, step: &[usize], max_tokens: usize) -> Vec<Vec<usize>> {
        greedy(step, &self.lengths, max_tokens)
    }
}

/// Cuts `order` into consecutive runs whose lengths sum to at most `budget` (a run always
/// holds at least one element).
fn greedy(order: &[usize], lengths: &[usize], budget: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut current = Vec::new();
    let mut tokens = 0;
    for &g in order {
        if !current.is_empty() && tokens + lengths[g] > budget {
            out.push(std::mem::take(&mut current));
            tokens = 0;
        }
        current.push(g);
        tokens += lengths[g];
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Walks the plan step by step from a position, across epochs.
#[derive(Clone, Debug)]
pub struct Cursor {
    pub position: Position,
    /// The steps of `position.epoch`.
    steps: Vec<Vec<usize>>,
}

impl Cursor {
    pub fn new(planner: &Planner, position: Position) -> Self {
        Cursor {
            position,
            steps: planner.epoch(position.epoch),
        }
    }

    /// The groups of the next step and the epoch progress after it (e.g. 1.25 = a quarter
    /// into the second epoch); moves the position on.
    pub fn next_step(&mut self, planner: &Planner) -> (Vec<usize>, f64) {
        if self.position.step_in_epoch >= self.steps.len() {
            self.position = Position {
                epoch: self.position.epoch + 1,
                step_in_epoch: 0,
            };
            self.steps = planner.epoch(self.position.epoch);
        }
        let groups = self.steps[self.position.step_in_epoch].clone();
        self.position.step_in_epoch += 1;
        let progress = self.position.epoch as f64
            + self.position.step_in_epoch as f64 / self.steps.len() as f64;
        (groups, progress)
    }
}
