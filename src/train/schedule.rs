//! Learning-rate schedules as transformers' `get_*_schedule_with_warmup` define them: the
//! factor for optimizer step `s` (0-based) — so the first step of a warmup uses lr 0.

use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

impl ScheduleKind {
    pub const NAMES: &'static [&'static str] = &["constant", "linear", "cosine"];

    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "constant" => ScheduleKind::Constant,
            "linear" => ScheduleKind::Linear,
            "cosine" => ScheduleKind::Cosine,
            other => bail!(
                "unknown schedule {other:?}; expected one of {:?}",
                Self::NAMES
            ),
        })
    }
}

#[derive(Clone, Debug)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// `warmup_ratio` becomes `ceil(ratio · total_steps)` warmup steps, as in transformers.
    pub fn with_warmup_ratio(
        kind: ScheduleKind,
        lr: f64,
        ratio: f64,
        total_steps: u64,
    ) -> Result<Self> {
        if !(0.0..=1.0).contains(&ratio) {
            bail!("--warmup-ratio must be in [0, 1], found {ratio}");
        }
        let warmup_steps = (ratio * total_steps as f64).ceil() as u64;
        Ok(Schedule {
            kind,
            lr,
            warmup_steps,
            total_steps,
        })
    }

    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        let (s, w, n) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < self.warmup_steps {
            return self.lr * s / w.max(1.0);
        }
        let progress = (s - w) / (n - w).max(1.0);
        self.lr
            * match self.kind {
                ScheduleKind::Constant => 1.0,
                ScheduleKind::Linear => ((n - s) / (n - w).max(1.0)).max(0.0),
                ScheduleKind::Cosine => {
                    (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
                }
            }
    }
}
