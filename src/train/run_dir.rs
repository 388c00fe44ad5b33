//! A run directory: `metrics.jsonl`, the run's configuration, checkpoints
//! (`checkpoint-STEP/`: a Hugging Face model directory plus the state a resume needs —
//! `contralign_state.json`, `optimizer.safetensors`, and `master.safetensors`, the f32
//! weights, when the model is saved in a 16-bit dtype — and transformers'
//! `trainer_state.json`), and `final/`, the last checkpoint's model alone (hard links to its
//! files where the filesystem allows). Resumes read checkpoints only, never `final/`.

use super::trainer::{Trainer, TrainerState};
use crate::checkpoint::{named_tensors, write_model_dir, MappedTensors};
use crate::engine::Moment;
use crate::fsutil;
use crate::model::params::param_specs;
use crate::model::Model;
use crate::ops::cpu::CpuOps;
use anyhow::{bail, Context, Result};
use safetensors::tensor::Dtype;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub const METRICS: &str = "metrics.jsonl";
pub const CONFIG: &str = "train.toml";
pub const FINAL: &str = "final";
/// What a resume needs besides weights and moments (not transformers' trainer_state.json).
const STATE: &str = "contralign_state.json";
/// transformers' `TrainerState` layout, for tools that read Hugging Face checkpoints.
const HF_STATE: &str = "trainer_state.json";
const OPTIMIZER: &str = "optimizer.safetensors";
const MASTER: &str = "master.safetensors";
/// The files of a checkpoint that `final/` leaves out: resume state, not model.
const RESUME_FILES: [&str; 4] = [STATE, HF_STATE, OPTIMIZER, MASTER];
const CHECKPOINT_PREFIX: &str = "checkpoint-";
/// Locked (flock) by the process that writes the run; the kernel releases it when that
/// process ends, however it ends.
const LOCK: &str = "train.lock";

/// How checkpoints are written.
#[derive(Clone, Debug)]
pub struct SaveOptions {
    /// `None` keeps the dtype the model was loaded in.
    pub dtype: Option<Dtype>,
    pub max_shard_bytes: usize,
    /// Where the tokenizer and generation files are copied from.
    pub source: PathBuf,
    /// Keep at most this many `checkpoint-*` directories, the newest (Hugging Face's
    /// `save_total_limit`); `None` keeps all.
    pub total_limit: Option<usize>,
    /// A checkpoint never removed by `total_limit`: the one the run resumed from.
    pub keep: Option<PathBuf>,
}

pub struct RunDir {
    pub path: PathBuf,
}

/// The run directory's lock, held until dropped (or the process ends).
pub struct RunLock {
    _file: std::fs::File,
}

/// A checkpoint read back for a resume.
pub struct Restored {
    pub policy: Model<Vec<f32>>,
    pub state: TrainerState,
    pub moments: CheckpointMoments,
}

/// A checkpoint's AdamW moments, checked and read a tensor at a time ([`Trainer::restore`]
/// uploads them so to a device).
pub struct CheckpointMoments {
    file: MappedTensors,
    specs: Vec<(String, Vec<usize>)>,
}

impl CheckpointMoments {
    /// Tensor `index` (in checkpoint order) of one moment, as f32.
    pub fn tensor(&self, which: Moment, index: usize) -> Result<Vec<f32>> {
        let (name, shape) = self
            .specs
            .get(index)
            .with_context(|| format!("a checkpoint's moments have no tensor {index}"))?;
        self.file.get(&moment_name(which, name), shape)
    }
}

/// The name of a moment's tensor in `optimizer.safetensors`.
fn moment_name(which: Moment, param: &str) -> String {
    match which {
        Moment::ExpAvg => format!("exp_avg.{param}"),
        Moment::ExpAvgSq => format!("exp_avg_sq.{param}"),
    }
}

impl RunDir {
    /// Creates the directory if needed and checks that it can be written.
    pub fn create(path: &Path) -> Result<Self> {
        fsutil::check_writable_dir(path, "--out")?;
        Ok(RunDir {
            path: path.to_path_buf(),
        })
    }

    /// The lock file ([`RunDir::lock`]).
    pub fn lock_path(&self) -> PathBuf {
        self.path.join(LOCK)
    }

    /// Takes the run's lock: one process at a time writes a run. Refused, naming the
    /// process, while another holds it; a lock left by a process that died is free.
    pub fn lock(&self) -> Result<RunLock> {
        let path = self.lock_path();
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                file.read_to_string(&mut holder).ok();
                let holder = holder.trim();
                let holder = if holder.is_empty() {
                    "another process"
                } else {
                    holder
                };
                bail!(
                    "{} is being written by {holder} (it holds {}): a run has one writer at a \
                     time; wait for that process to end or stop it",
                    self.path.display(),
                    path.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
        file.set_len(0)
            .and_then(|()| write!(file, "process {}", std::process::id()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        self.remove_leftovers()?;
        Ok(RunLock { _file: file })
    }

    /// Removes what a killed writer left of its atomic writes: the temporary copies of a
    /// checkpoint, `final/`, metrics.jsonl or train.toml it was writing, and a `final/` it was
    /// replacing (a run that reached its end makes `final/` again on resume). They are its
    /// own names only, and with the lock held no other process is writing them.
    fn remove_leftovers(&self) -> Result<()> {
        let entries = std::fs::read_dir(&self.path)
            .with_context(|| format!("cannot read run directory {}", self.path.display()))?;
        for entry in entries.filter_map(|e| e.ok()) {
            let file_name = entry.file_name().to_string_lossy().to_string();
            if !fsutil::leftover_of(&file_name).is_some_and(is_run_entry) {
                continue;
            }
            let path = entry.path();
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.with_context(|| {
                format!(
                    "cannot remove {}, left by an interrupted write",
                    path.display()
                )
            })?;
        }
        Ok(())
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.path.join(METRICS)
    }

    /// Appends one line to metrics.jsonl.
    pub fn append_metrics(&self, record: &serde_json::Value) -> Result<()> {
        let path = self.metrics_path();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        writeln!(f, "{record}").with_context(|| format!("cannot write {}", path.display()))
    }

    fn flush_metrics(&self) -> Result<()> {
        let path = self.metrics_path();
        match std::fs::File::open(&path) {
            Ok(file) => file
                .sync_all()
                .with_context(|| format!("cannot flush {} to the disk", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot open {}", path.display())),
        }
    }

    /// Keeps only the metrics of steps up to `step` (a resume redoes the later ones).
    pub fn truncate_metrics(&self, step: u64) -> Result<()> {
        let path = self.metrics_path();
        if !path.exists() {
            return Ok(());
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let kept: String = text
            .lines()
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s <= step)
            })
            .map(|line| format!("{line}\n"))
            .collect();
        fsutil::write_atomically(&path, kept.as_bytes())
    }

    /// The complete checkpoints (`checkpoint-*` with a resume state), oldest first by their
    /// saved step.
    fn checkpoints(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut found = Vec::new();
        let entries = std::fs::read_dir(&self.path)
            .with_context(|| format!("cannot read run directory {}", self.path.display()))?;
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().to_string();
            let state = entry.path().join(STATE);
            if name.starts_with(CHECKPOINT_PREFIX) && state.is_file() {
                found.push((read_state(&state)?.step, entry.path()));
            }
        }
        found.sort();
        Ok(found)
    }

    /// The newest checkpoint (by its saved step); `final/` is never one.
    pub fn latest_checkpoint(&self) -> Result<Option<PathBuf>> {
        Ok(self.checkpoints()?.pop().map(|(_, p)| p))
    }

    /// Whether the directory holds anything of a run: metrics or a checkpoint.
    pub fn holds_a_run(&self) -> Result<bool> {
        Ok(self.metrics_path().exists() || !self.checkpoints()?.is_empty())
    }

    /// The entries of the directory that a new run would replace or remove (its
    /// configuration, `final/`, `checkpoint-*`, the plots), sorted: a directory that holds
    /// files of its own under those names (another trainer's output, say) is not a new run's.
    /// The lock is not among them: a new run takes it before it looks.
    pub fn replaceable_entries(&self) -> Result<Vec<String>> {
        let entries = std::fs::read_dir(&self.path)
            .with_context(|| format!("cannot read run directory {}", self.path.display()))?;
        let mut found: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|name| is_run_entry(name))
            .collect();
        found.sort();
        Ok(found)
    }

    /// Removes the oldest checkpoints beyond `opts.total_limit`, never the newest one nor
    /// `opts.keep`.
    fn prune_checkpoints(&self, opts: &SaveOptions) -> Result<()> {
        let Some(limit) = opts.total_limit else {
            return Ok(());
        };
        let mut all = self.checkpoints()?;
        all.pop();
        let keep = limit.saturating_sub(1);
        let excess = all.len().saturating_sub(keep);
        for (_, dir) in all.into_iter().take(excess) {
            if opts.keep.as_ref() == Some(&dir) {
                continue;
            }
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot remove old checkpoint {}", dir.display()))?;
        }
        Ok(())
    }

    /// Writes `final/` from the checkpoint `from`: its model files only (weights, config,
    /// tokenizer and generation files), hard-linked where the filesystem allows, else copied.
    pub fn save_final(&self, from: &Path) -> Result<PathBuf> {
        let path = self.path.join(FINAL);
        fsutil::write_dir_atomically(&path, |dir| {
            let entries = std::fs::read_dir(from)
                .with_context(|| format!("cannot read {}", from.display()))?;
            for entry in entries {
                let entry = entry.with_context(|| format!("cannot read {}", from.display()))?;
                let name = entry.file_name();
                if RESUME_FILES.iter().any(|f| name == *f) {
                    continue;
                }
                fsutil::link_or_copy(&entry.path(), &dir.join(&name))?;
            }
            Ok(())
        })?;
        Ok(path)
    }

    /// Writes `checkpoint-STEP/` atomically, with the trainer's state brought back from its
    /// device first, then removes the checkpoints beyond `opts.total_limit`.
    pub fn save_checkpoint(&self, trainer: &mut Trainer, opts: &SaveOptions) -> Result<PathBuf> {
        trainer.sync_weights_to_host()?;
        // The checkpoint's steps are in metrics.jsonl on the disk before it is: a resume
        // keeps the lines up to its step and redoes none of them.
        self.flush_metrics()?;
        let path = self
            .path
            .join(format!("{CHECKPOINT_PREFIX}{}", trainer.step));
        let hf_state = self.hf_trainer_state(trainer)?;
        let policy = &trainer.policy;
        let specs = param_specs(&policy.cfg);
        let params = policy.params.iter();
        let weights = named_tensors(&specs, "", params);
        let dtype = opts.dtype.unwrap_or(policy.dtype);
        fsutil::write_dir_atomically(&path, |dir| {
            write_model_dir(
                dir,
                &policy.cfg.raw,
                &weights,
                dtype,
                opts.max_shard_bytes,
                Some(&opts.source),
            )?;
            if dtype != Dtype::F32 {
                crate::checkpoint::save_f32(&dir.join(MASTER), &weights)?;
            }
            // The moments are fetched a tensor at a time (from the device, where they live
            // during a device run): 58 GB in f32 for a 7B, never all on the host.
            let n = specs.len();
            let entries: Vec<(String, Vec<usize>)> = [Moment::ExpAvg, Moment::ExpAvgSq]
                .into_iter()
                .flat_map(|which| {
                    specs
                        .iter()
                        .map(move |(name, shape)| (moment_name(which, name), shape.clone()))
                })
                .collect();
            crate::checkpoint::save_f32_fetched(&dir.join(OPTIMIZER), &entries, |k| {
                let which = if k < n {
                    Moment::ExpAvg
                } else {
                    Moment::ExpAvgSq
                };
                trainer.moment(which, k % n)
            })?;
            for (file, value) in [
                (STATE, serde_json::to_value(trainer.state())?),
                (HF_STATE, hf_state),
            ] {
                let path = dir.join(file);
                std::fs::write(&path, serde_json::to_string_pretty(&value)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            Ok(())
        })?;
        self.prune_checkpoints(opts)?;
        Ok(path)
    }

    /// transformers' `TrainerState` of the run at its current step (only fields that
    /// `TrainerState.load_from_json` accepts): the step, epoch, steps in all, and the
    /// metrics of every step so far as `log_history`.
    fn hf_trainer_state(&self, trainer: &Trainer) -> Result<serde_json::Value> {
        let path = self.metrics_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let history: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["step"].as_u64().is_some_and(|s| s <= trainer.step))
            .collect();
        let epoch = history.last().map_or(0.0.into(), |h| h["epoch"].clone());
        Ok(serde_json::json!({
            "global_step": trainer.step,
            "max_steps": trainer.total_steps(),
            "epoch": epoch,
            "logging_steps": 1,
            "log_history": history,
            "is_local_process_zero": true,
            "is_world_process_zero": true,
        }))
    }
}

/// Whether `name` is one a run writes in its directory (its configuration, metrics,
/// `final/`, `checkpoint-*`, the plots).
fn is_run_entry(name: &str) -> bool {
    [METRICS, CONFIG, FINAL].contains(&name)
        || crate::plot::FIGURES.contains(&name)
        || name.starts_with(CHECKPOINT_PREFIX)
}

fn read_state(path: &Path) -> Result<TrainerState> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: malformed trainer state", path.display()))
}

/// Reads a checkpoint back: weights (the f32 master copy when there is one), trainer state
/// and optimizer moments (checked now, read when restored).
pub fn load_checkpoint(dir: &Path) -> Result<Restored> {
    let mut policy = Model::load(&CpuOps, dir)?;
    let specs = param_specs(&policy.cfg);
    let master = dir.join(MASTER);
    if master.is_file() {
        let file = MappedTensors::open(&master)?;
        for ((name, shape), p) in specs.iter().zip(policy.params.iter_mut()) {
            *p = file.get(name, shape)?;
        }
    }
    let state = read_state(&dir.join(STATE))?;
    let file = MappedTensors::open(&dir.join(OPTIMIZER))?;
    for (name, shape) in &specs {
        for which in [Moment::ExpAvg, Moment::ExpAvgSq] {
            file.check(&moment_name(which, name), shape)?;
        }
    }
    let moments = CheckpointMoments { file, specs };
    Ok(Restored {
        policy,
        state,
        moments,
    })
}
