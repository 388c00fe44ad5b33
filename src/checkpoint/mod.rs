//! Safetensors checkpoints: loading single-file or sharded weights in f32/bf16/f16 into f32,
//! validated against the names and shapes `config.json` implies; writing them (`save`).

mod describe;
mod save;

pub use save::{
    dtype_name, named_tensors, parse_dtype, save_f32, save_f32_fetched, write_model_dir, Tensor,
    COMPANION_FILES,
};

use crate::config::ModelConfig;
use crate::model::params::param_specs;
use crate::ops::storage::Dtype as StorageDtype;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// The safetensors files of a model directory: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: malformed JSON", index.display()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: no `weight_map` object", index.display()))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for (name, file) in map {
            let file = file.as_str().with_context(|| {
                format!(
                    "{}: weight_map[{name:?}] is not a file name",
                    index.display()
                )
            })?;
            let path = dir.join(file);
            if !files.contains(&path) {
                files.push(path);
            }
        }
        files.sort();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_dir() {
        bail!(
            "{}: is a directory, not a safetensors file",
            single.display()
        );
    }
    if single.exists() {
        return Ok(vec![single]);
    }
    bail!(
        "{}: no model.safetensors or model.safetensors.index.json",
        dir.display()
    )
}

/// The tensors of a safetensors file's bytes; what is wrong with a bad file, in words.
fn deserialize<'a>(bytes: &'a [u8], file: &Path) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| {
        anyhow!(
            "{}: not a valid safetensors file: {}",
            file.display(),
            describe::describe(&e, bytes)
        )
    })
}

/// Converts one stored tensor to f32.
fn to_f32(view: &TensorView<'_>, name: &str, file: &Path) -> Result<Vec<f32>> {
    let bytes = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => bail!(
            "{}: tensor {name} has dtype {other:?}; expected F32, BF16 or F16",
            file.display()
        ),
    })
}

/// The weights of a checkpoint as f32, by name, checked against `cfg`: every expected tensor
/// present with its expected shape, nothing else, every value finite and one that `storage`
/// (what the run will hold them in) can hold. Also returns the stored dtype.
pub fn load_weights(
    dir: &Path,
    cfg: &ModelConfig,
    storage: StorageDtype,
) -> Result<(HashMap<String, Vec<f32>>, Dtype)> {
    let expected: BTreeMap<String, Vec<usize>> = param_specs(cfg).into_iter().collect();
    let mut out = HashMap::new();
    let mut dtype = None;
    for file in weight_files(dir)? {
        let handle =
            File::open(&file).with_context(|| format!("cannot open {}", file.display()))?;
        // SAFETY: the file is only read; a concurrent writer is outside what we can guard.
        let mmap = unsafe { memmap2::Mmap::map(&handle) }
            .with_context(|| format!("cannot map {}", file.display()))?;
        let st = deserialize(&mmap, &file)?;
        let mut views = st.tensors();
        // Sorted, so that the first problem reported does not depend on hash order.
        views.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, view) in views {
            let Some(shape) = expected.get(&name) else {
                bail!(
                    "{}: unexpected tensor {name} (shape {:?}) that a {} checkpoint of this \
                     config does not have",
                    file.display(),
                    view.shape(),
                    if cfg.moe.is_some() {
                        "Mixtral"
                    } else {
                        "Mistral"
                    }
                );
            };
            if view.shape() != shape.as_slice() {
                bail!(
                    "{}: tensor {name} has shape {:?}; config.json implies {:?}",
                    file.display(),
                    view.shape(),
                    shape
                );
            }
            dtype.get_or_insert(view.dtype());
            let values = to_f32(&view, &name, &file)?;
            if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                bail!(
                    "{}: tensor {name} holds {v} at element {i}; a model's weights are finite",
                    file.display()
                );
            }
            if let Some((i, v)) = storage.first_overflow(&values) {
                bail!(
                    "{}: tensor {name} holds {v:e} at element {i}, beyond bf16's largest value \
                     ({:e}): --precision bf16 would store it as infinity; use --precision f32",
                    file.display(),
                    half::bf16::MAX.to_f32()
                );
            }
            out.insert(name.clone(), values);
        }
    }
    if let Some(missing) = expected.keys().find(|n| !out.contains_key(*n)) {
        bail!(
            "{}: tensor {missing} (shape {:?}) is missing from the checkpoint",
            dir.display(),
            expected[missing]
        );
    }
    Ok((out, dtype.unwrap_or(Dtype::F32)))
}

/// One safetensors file, mapped and checked once, whose tensors are read one at a time as f32:
/// a resume of a 7B brings back 29 GB of master weights and 58 GB of moments without holding
/// a file's worth of them at once.
pub struct MappedTensors {
    path: PathBuf,
    bytes: memmap2::Mmap,
}

impl MappedTensors {
    pub fn open(path: &Path) -> Result<Self> {
        let handle = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the file is only read; a concurrent writer is outside what we can guard.
        let bytes = unsafe { memmap2::Mmap::map(&handle) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        deserialize(&bytes, path)?;
        Ok(MappedTensors {
            path: path.to_path_buf(),
            bytes,
        })
    }

    /// Tensor `name` as f32, which must have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let st = deserialize(&self.bytes, &self.path)?;
        to_f32(&self.view(&st, name, shape)?, name, &self.path)
    }

    /// That tensor `name` is there with `shape`, read nothing.
    pub fn check(&self, name: &str, shape: &[usize]) -> Result<()> {
        let st = deserialize(&self.bytes, &self.path)?;
        self.view(&st, name, shape).map(drop)
    }

    /// Tensor `name` of `st` (this file), which must have `shape`.
    fn view<'a>(
        &self,
        st: &SafeTensors<'a>,
        name: &str,
        shape: &[usize],
    ) -> Result<TensorView<'a>> {
        let view = st
            .tensor(name)
            .map_err(|_| anyhow!("{}: tensor {name} is missing", self.path.display()))?;
        if view.shape() != shape {
            bail!(
                "{}: tensor {name} has shape {:?}; expected {shape:?}",
                self.path.display(),
                view.shape()
            );
        }
        Ok(view)
    }
}

/// Tensors by name: shape and f32 values.
pub type TensorMap = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Every tensor of one safetensors file as f32, with its shape, by name. The file is mapped,
/// not read: an optimizer state of 7B is 58 GB, which would otherwise be held twice.
pub fn read_tensors(path: &Path) -> Result<TensorMap> {
    let handle = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: the file is only read; a concurrent writer is outside what we can guard.
    let bytes = unsafe { memmap2::Mmap::map(&handle) }
        .with_context(|| format!("cannot map {}", path.display()))?;
    let st = deserialize(&bytes, path)?;
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = to_f32(&view, &name, path)?;
            Ok((name, (view.shape().to_vec(), data)))
        })
        .collect()
}
