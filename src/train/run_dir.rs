//! A run directory: `metrics.jsonl`, the run's configuration, and checkpoints
//! (`checkpoint-STEP/`, `final/`), each a Hugging Face model directory plus the state a
//! resume needs (`trainer_state.json`, `optimizer.safetensors`, and `master.safetensors`
//! — the f32 weights — when the model is saved in a 16-bit dtype).

use super::trainer::{Trainer, TrainerState};
use crate::checkpoint::{named_tensors, read_tensors, write_model_dir, TensorMap};
use crate::fsutil;
use crate::model::params::param_specs;
use crate::model::Model;
use crate::ops::cpu::CpuOps;
use anyhow::{bail, Context, Result};
use safetensors::tensor::Dtype;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const METRICS: &str = "metrics.jsonl";
pub const CONFIG: &str = "train.toml";
const STATE: &str = "trainer_state.json";
const OPTIMIZER: &str = "optimizer.safetensors";
const MASTER: &str = "master.safetensors";

/// How checkpoints are written.
#[derive(Clone, Debug)]
pub struct SaveOptions {
    /// `None` keeps the dtype the model was loaded in.
    pub dtype: Option<Dtype>,
    pub max_shard_bytes: usize,
    /// Where the tokenizer and generation files are copied from.
    pub source: PathBuf,
}

pub struct RunDir {
    pub path: PathBuf,
}

/// A checkpoint read back for a resume.
pub struct Restored {
    pub policy: Model<Vec<f32>>,
    pub state: TrainerState,
    pub moments: (Vec<Vec<f32>>, Vec<Vec<f32>>),
}

impl RunDir {
    /// Creates the directory if needed and checks that it can be written.
    pub fn create(path: &Path) -> Result<Self> {
        fsutil::check_writable_dir(path, "--out")?;
        Ok(RunDir {
            path: path.to_path_buf(),
        })
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

    /// The newest checkpoint (by its saved step) among `checkpoint-*` and `final`.
    pub fn latest_checkpoint(&self) -> Result<Option<PathBuf>> {
        let mut best: Option<(u64, PathBuf)> = None;
        let entries = std::fs::read_dir(&self.path)
            .with_context(|| format!("cannot read run directory {}", self.path.display()))?;
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().to_string();
            if !(name.starts_with("checkpoint-") || name == "final") {
                continue;
            }
            let state = entry.path().join(STATE);
            if !state.is_file() {
                continue;
            }
            let step = read_state(&state)?.step;
            if best.as_ref().is_none_or(|(s, _)| step > *s) {
                best = Some((step, entry.path()));
            }
        }
        Ok(best.map(|(_, p)| p))
    }

    /// Writes `name` (e.g. `checkpoint-40`, `final`) atomically, with the trainer's state
    /// brought back from its device first.
    pub fn save_checkpoint(
        &self,
        name: &str,
        trainer: &mut Trainer,
        opts: &SaveOptions,
    ) -> Result<PathBuf> {
        trainer.sync_to_host()?;
        let path = self.path.join(name);
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
                &opts.source,
            )?;
            if dtype != Dtype::F32 {
                crate::checkpoint::save_f32(&dir.join(MASTER), &weights)?;
            }
            let mut moments = named_tensors(&specs, "exp_avg.", &trainer.optimizer.exp_avg);
            moments.extend(named_tensors(
                &specs,
                "exp_avg_sq.",
                &trainer.optimizer.exp_avg_sq,
            ));
            crate::checkpoint::save_f32(&dir.join(OPTIMIZER), &moments)?;
            let state = serde_json::to_string_pretty(&trainer.state())?;
            std::fs::write(dir.join(STATE), state)
                .with_context(|| format!("cannot write {}", dir.join(STATE).display()))
        })?;
        Ok(path)
    }
}

fn read_state(path: &Path) -> Result<TrainerState> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: malformed trainer state", path.display()))
}

/// Takes the tensor `name` out of `tensors`, checking its shape.
fn take(tensors: &mut TensorMap, name: &str, shape: &[usize], file: &Path) -> Result<Vec<f32>> {
    let (found, data) = tensors
        .remove(name)
        .with_context(|| format!("{}: tensor {name} is missing", file.display()))?;
    if found != shape {
        bail!(
            "{}: tensor {name} has shape {found:?}; expected {shape:?}",
            file.display()
        );
    }
    Ok(data)
}

/// Reads a checkpoint back: weights (the f32 master copy when there is one), trainer state
/// and optimizer moments.
pub fn load_checkpoint(dir: &Path) -> Result<Restored> {
    let mut policy = Model::load(&CpuOps, dir)?;
    let specs = param_specs(&policy.cfg);
    let master = dir.join(MASTER);
    if master.is_file() {
        let mut tensors = read_tensors(&master)?;
        for ((name, shape), p) in specs.iter().zip(policy.params.iter_mut()) {
            *p = take(&mut tensors, name, shape, &master)?;
        }
    }
    let state = read_state(&dir.join(STATE))?;
    let file = dir.join(OPTIMIZER);
    let mut tensors = read_tensors(&file)?;
    let (mut m, mut v) = (Vec::new(), Vec::new());
    for (name, shape) in &specs {
        m.push(take(
            &mut tensors,
            &format!("exp_avg.{name}"),
            shape,
            &file,
        )?);
        v.push(take(
            &mut tensors,
            &format!("exp_avg_sq.{name}"),
            shape,
            &file,
        )?);
    }
    Ok(Restored {
        policy,
        state,
        moments: (m, v),
    })
}
