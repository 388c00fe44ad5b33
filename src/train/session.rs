//! A training run from its current step to the end: every step logged to metrics.jsonl,
//! checkpoints every `save_every` steps and at the end (with `final/`, the model alone), a
//! checkpoint and a stop on an interrupt or on too many non-finite steps in a row.

use super::run_dir::{RunDir, SaveOptions};
use super::trainer::{StepRecord, Trainer};
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

/// How a run ended.
pub enum Outcome {
    /// The last step's checkpoint and `final/` were written; the path is `final/`.
    Finished(PathBuf),
    /// Interrupted: this checkpoint was written.
    Interrupted(PathBuf),
}

/// Runs `trainer` to its last step. `on_step` sees every step once it is logged and before
/// its checkpoint (progress display, held-out evaluation); `interrupted` is polled after
/// each step.
pub fn run(
    trainer: &mut Trainer,
    run: &RunDir,
    save: &SaveOptions,
    save_every: u64,
    interrupted: &AtomicBool,
    mut on_step: impl FnMut(&StepRecord, &Trainer) -> Result<()>,
) -> Result<Outcome> {
    while !trainer.done() {
        let record = trainer.train_step()?;
        run.append_metrics(&record.to_json())?;
        on_step(&record, trainer)?;
        if trainer.too_many_bad_steps() {
            let path = run.save_checkpoint(trainer, save)?;
            bail!(
                "{} steps in a row had a non-finite loss or gradient; stopped at step {} and \
                 saved {}",
                trainer.bad_steps_in_a_row,
                trainer.step,
                path.display()
            );
        }
        if interrupted.load(Ordering::SeqCst) {
            return Ok(Outcome::Interrupted(run.save_checkpoint(trainer, save)?));
        }
        if save_every > 0 && trainer.step.is_multiple_of(save_every) && !trainer.done() {
            run.save_checkpoint(trainer, save)?;
        }
    }
    let last = run.save_checkpoint(trainer, save)?;
    Ok(Outcome::Finished(run.save_final(&last)?))
}
