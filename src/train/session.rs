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
/// its checkpoint (progress display, held-out evaluation); `wants_weights(step)` says whether
/// it needs the weights that step left (a held-out evaluation), which on a device means
/// reading the step's scalars before the next step is queued, as a checkpoint, the last
/// step, an interrupt and a run of non-finite steps near its limit do; `interrupted` is
/// polled after each step. Otherwise a step on a device is logged while the next one runs.
pub fn run(
    trainer: &mut Trainer,
    run: &RunDir,
    save: &SaveOptions,
    save_every: u64,
    interrupted: &AtomicBool,
    wants_weights: impl Fn(u64) -> bool,
    mut on_step: impl FnMut(&StepRecord, &Trainer) -> Result<()>,
) -> Result<Outcome> {
    let mut log = |record: StepRecord, trainer: &mut Trainer| -> Result<()> {
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
        Ok(())
    };
    while !trainer.done() {
        let record = match trainer.train_step() {
            Ok(record) => record,
            Err(err) => return Err(log_before_failing(trainer, run, err)),
        };
        if let Some(record) = record {
            // Logging a step (or what `on_step` does with it) can fail with the next step
            // queued: that one is logged before the error too.
            if let Err(err) = log(record, trainer) {
                return Err(log_before_failing(trainer, run, err));
            }
        }
        let step = trainer.step;
        let checkpoint = save_every > 0 && step.is_multiple_of(save_every) && !trainer.done();
        let stopping = interrupted.load(Ordering::SeqCst);
        // One more non-finite step would stop the run: it stops at that step, not after.
        let near_limit = trainer.bad_steps_in_a_row.saturating_add(1) >= trainer.opts.max_bad_steps;
        if trainer.done() || checkpoint || stopping || near_limit || wants_weights(step) {
            if let Some(record) = trainer.flush()? {
                log(record, trainer)?;
            }
        }
        // Interrupted at the last step, the run ends as a finished one would.
        if stopping && !trainer.done() {
            return Ok(Outcome::Interrupted(run.save_checkpoint(trainer, save)?));
        }
        if checkpoint {
            run.save_checkpoint(trainer, save)?;
        }
    }
    let last = run.save_checkpoint(trainer, save)?;
    Ok(Outcome::Finished(run.save_final(&last)?))
}

/// A step that fails on a device may follow one whose scalars were not read yet (or were
/// read but not logged), and logging a step may fail with the next one queued: that step's
/// record goes to metrics.jsonl before `err` is returned, so that a failure loses no step
/// that ran, and the error says so. It is only logged: `on_step` (the progress display, a
/// held-out evaluation) does not see it.
fn log_before_failing(trainer: &mut Trainer, run: &RunDir, err: anyhow::Error) -> anyhow::Error {
    let record = match trainer.flush() {
        Ok(Some(record)) => record,
        Ok(None) => return err,
        Err(read) => {
            return err.context(format!(
                "a step failed, and the step before it could not be read either ({read:#})"
            ))
        }
    };
    let metrics = run.metrics_path();
    match run.append_metrics(&record.to_json()) {
        Ok(()) => err.context(format!(
            "step {}, which ran before this failure, is logged in {}",
            record.step,
            metrics.display()
        )),
        Err(write) => err.context(format!(
            "step {} ran before this failure but could not be logged in {} ({write:#})",
            record.step,
            metrics.display()
        )),
    }
}
