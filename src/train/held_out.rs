//! Evaluation while training, as TRL's `eval_dataset` and `eval_steps` give it: held-out
//! groups scored under the current policy (no gradient, the packing `eval` uses, in passes of
//! the run's micro-batch tokens) every N steps and at the end, logged to metrics.jsonl with
//! `eval`'s metrics under TRL's `eval_` names (`eval_loss`, `eval_rewards/accuracies`, ...).

use super::trainer::{StepRecord, Trainer};
use crate::data::Group;
use crate::model::ResponseStats;
use anyhow::Result;
use serde_json::{Map, Value};

/// The prefix TRL gives evaluation metrics.
pub const EVAL_PREFIX: &str = "eval_";

pub struct HeldOut {
    groups: Vec<Group>,
    /// The frozen reference's statistics of every held-out response, when the loss needs them.
    ref_stats: Option<Vec<ResponseStats>>,
    /// Evaluate every this many steps (0: only at the end).
    every: u64,
}

impl HeldOut {
    pub fn new(groups: Vec<Group>, ref_stats: Option<Vec<ResponseStats>>, every: u64) -> Self {
        HeldOut {
            groups,
            ref_stats,
            every,
        }
    }

    /// Whether `step` of a run of `total_steps` is evaluated: every `every` steps and the
    /// last one.
    pub fn due(&self, step: u64, total_steps: u64) -> bool {
        step >= total_steps || (self.every > 0 && step.is_multiple_of(self.every))
    }

    /// The metrics.jsonl row of the held-out evaluation after `record`'s step, under the
    /// weights that step left (on the device, where the run trains there).
    pub fn row(&self, trainer: &Trainer, record: &StepRecord) -> Result<Value> {
        let eval = trainer.evaluate(&self.groups, self.ref_stats.as_deref())?;
        let num = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
        let mut row = Map::new();
        row.insert("step".into(), record.step.into());
        row.insert("epoch".into(), num(record.epoch));
        for (name, value) in eval.metrics {
            row.insert(format!("{EVAL_PREFIX}{name}"), num(value));
        }
        Ok(Value::Object(row))
    }
}
