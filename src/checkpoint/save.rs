//! Writing safetensors: single tensor files, and Hugging Face model directories that
//! transformers' `from_pretrained` loads (config.json, one file or shards with an index,
//! the tokenizer files).

use crate::fsutil;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::Dtype;
use serde_json::{json, Value};
use std::borrow::Cow;
use std::io::Write;
use std::path::Path;

/// One named tensor of f32 values with its shape.
pub struct Tensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: &'a [f32],
}

/// One tensor per `(name, shape)` of `specs` (the parameters as `param_specs` lists them),
/// named `prefix` + name, holding the matching item of `data`.
pub fn named_tensors<'a, D: AsRef<[f32]> + 'a>(
    specs: &[(String, Vec<usize>)],
    prefix: &str,
    data: impl IntoIterator<Item = &'a D>,
) -> Vec<Tensor<'a>> {
    specs
        .iter()
        .zip(data)
        .map(|((name, shape), data)| Tensor {
            name: format!("{prefix}{name}"),
            shape: shape.clone(),
            data: data.as_ref(),
        })
        .collect()
}

/// The dtype named as transformers names it (`float32`, `bfloat16`, `float16`), or short.
pub fn parse_dtype(name: &str) -> Result<Dtype> {
    Ok(match name {
        "float32" | "f32" | "fp32" => Dtype::F32,
        "bfloat16" | "bf16" => Dtype::BF16,
        "float16" | "f16" | "fp16" => Dtype::F16,
        other => bail!("unknown dtype {other:?}; expected float32, bfloat16 or float16"),
    })
}

/// transformers' name of a dtype, as config.json writes it.
pub fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        _ => "float32",
    }
}

/// Appends the little-endian bytes of `data` in `dtype` to `out` (round to nearest even for
/// 16-bit types). Returns the first value that is finite but rounds to infinity in `dtype`
/// (its index and value): such a file would not load back.
fn encode(data: &[f32], dtype: Dtype, out: &mut Vec<u8>) -> Option<(usize, f32)> {
    let mut overflow = None;
    let mut push = |i: usize, x: f32, finite: bool, bytes: [u8; 2]| {
        if x.is_finite() && !finite && overflow.is_none() {
            overflow = Some((i, x));
        }
        out.extend(bytes);
    };
    match dtype {
        Dtype::BF16 => data.iter().enumerate().for_each(|(i, &x)| {
            let y = half::bf16::from_f32(x);
            push(i, x, y.is_finite(), y.to_le_bytes())
        }),
        Dtype::F16 => data.iter().enumerate().for_each(|(i, &x)| {
            let y = half::f16::from_f32(x);
            push(i, x, y.is_finite(), y.to_le_bytes())
        }),
        _ => out.extend_from_slice(bytemuck::cast_slice(data)),
    }
    overflow
}

/// Elements encoded at a time while writing: the file is streamed, so that writing a
/// checkpoint holds no second copy of it (an optimizer state of 7B is 58 GB).
const ENCODE_CHUNK: usize = 1 << 20;

/// The safetensors header of tensors `(name, shape)` stored as `dtype`, laid out one after
/// the other in their order, with the `format: pt` metadata that transformers checks for;
/// padded with spaces to a multiple of 8 bytes, as the safetensors crate writes it.
fn header(entries: &[(&str, &[usize])], dtype: Dtype) -> Result<Vec<u8>> {
    let width = dtype.size();
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0;
    for &(name, shape) in entries {
        let end = offset + shape.iter().product::<usize>() * width;
        let entry = json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, end]});
        if map.insert(name.to_string(), entry).is_some() {
            bail!("two tensors named {name}");
        }
        offset = end;
    }
    let mut text = serde_json::to_vec(&Value::Object(map)).context("serializing a header")?;
    text.resize(text.len().next_multiple_of(8), b' ');
    Ok(text)
}

/// Writes tensors `(name, shape)` to one safetensors file at `path` (not atomically; callers
/// write into a temporary place), streaming: `fetch(i)` gives tensor i's values when its turn
/// comes, and a chunk of them is encoded at a time.
fn write_entries<'a>(
    path: &Path,
    entries: &[(&str, &[usize])],
    dtype: Dtype,
    mut fetch: impl FnMut(usize) -> Result<Cow<'a, [f32]>>,
) -> Result<()> {
    let header = header(entries, dtype)?;
    let fail = |e: std::io::Error| anyhow!("cannot write {}: {e}", path.display());
    let file = std::fs::File::create(path).map_err(fail)?;
    let mut out = std::io::BufWriter::with_capacity(8 << 20, file);
    out.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(fail)?;
    out.write_all(&header).map_err(fail)?;
    let mut bytes = Vec::with_capacity(ENCODE_CHUNK * dtype.size());
    for (i, &(name, shape)) in entries.iter().enumerate() {
        let data = fetch(i)?;
        let want: usize = shape.iter().product();
        if data.len() != want {
            bail!(
                "{}: tensor {name} of shape {shape:?} has {} values, not {want}",
                path.display(),
                data.len()
            );
        }
        for (c, chunk) in data.chunks(ENCODE_CHUNK).enumerate() {
            bytes.clear();
            if let Some((i, x)) = encode(chunk, dtype, &mut bytes) {
                bail!(
                    "{}: tensor {name} holds {x} at element {}, beyond the range of {}; save \
                     in a wider dtype (--save-dtype float32, or bfloat16 for float16)",
                    path.display(),
                    c * ENCODE_CHUNK + i,
                    dtype_name(dtype)
                );
            }
            out.write_all(&bytes).map_err(fail)?;
        }
    }
    out.into_inner()
        .map_err(|e| fail(e.into_error()))?
        .sync_all()
        .map_err(fail)
}

/// Writes `tensors` to one safetensors file at `path`, as [`write_entries`].
fn write_file(path: &Path, tensors: &[&Tensor], dtype: Dtype) -> Result<()> {
    let entries: Vec<(&str, &[usize])> = tensors
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .collect();
    write_entries(path, &entries, dtype, |i| {
        Ok(Cow::Borrowed(tensors[i].data))
    })
}

/// Writes `tensors` (f32) to one safetensors file, atomically.
pub fn save_f32(path: &Path, tensors: &[Tensor]) -> Result<()> {
    let refs: Vec<&Tensor> = tensors.iter().collect();
    fsutil::write_atomically_with(path, |tmp| write_file(tmp, &refs, Dtype::F32))
}

/// Writes tensors `(name, shape)` as f32 to one safetensors file, atomically, `fetch(i)`
/// giving tensor i's values when it is written: one tensor at a time on the host (a
/// checkpoint's moments, downloaded from a device one by one).
pub fn save_f32_fetched<'a>(
    path: &Path,
    entries: &[(String, Vec<usize>)],
    fetch: impl FnMut(usize) -> Result<Cow<'a, [f32]>>,
) -> Result<()> {
    let entries: Vec<(&str, &[usize])> = entries
        .iter()
        .map(|(name, shape)| (name.as_str(), shape.as_slice()))
        .collect();
    fsutil::write_atomically_with(path, |tmp| write_entries(tmp, &entries, Dtype::F32, fetch))
}

/// Files of a Hugging Face model directory that travel with the weights.
pub const COMPANION_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// Fills the (new, empty) directory `dir` with a Hugging Face model: `config` with its dtype
/// set to `dtype`, the weights in `dtype` — one `model.safetensors`, or shards of at most
/// `max_shard_bytes` named `model-0000i-of-0000n.safetensors` with
/// `model.safetensors.index.json` — and the tokenizer and generation files of `source`
/// (none without one); `generation_config.json` from the config's token ids where `source`
/// has none.
pub fn write_model_dir(
    dir: &Path,
    config: &Value,
    tensors: &[Tensor],
    dtype: Dtype,
    max_shard_bytes: usize,
    source: Option<&Path>,
) -> Result<()> {
    let mut config = config.clone();
    if let Some(obj) = config.as_object_mut() {
        // transformers 4 writes `torch_dtype`, 5 writes `dtype`; keep whichever is there.
        let key = if obj.contains_key("dtype") {
            "dtype"
        } else {
            "torch_dtype"
        };
        obj.insert(key.to_string(), json!(dtype_name(dtype)));
    }
    let text = serde_json::to_string_pretty(&config).context("serializing config.json")?;
    std::fs::write(dir.join("config.json"), text)
        .with_context(|| format!("cannot write {}", dir.join("config.json").display()))?;

    let width = match dtype {
        Dtype::F32 => 4,
        _ => 2,
    };
    let mut shards: Vec<Vec<&Tensor>> = vec![Vec::new()];
    let mut shard_bytes = 0;
    for t in tensors {
        let bytes = t.data.len() * width;
        if shard_bytes > 0 && shard_bytes + bytes > max_shard_bytes {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shards.last_mut().expect("at least one shard").push(t);
        shard_bytes += bytes;
    }
    if shards.len() == 1 {
        write_file(&dir.join("model.safetensors"), &shards[0], dtype)?;
    } else {
        let n = shards.len();
        let mut weight_map = serde_json::Map::new();
        for (i, shard) in shards.iter().enumerate() {
            let name = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            write_file(&dir.join(&name), shard, dtype)?;
            for t in shard {
                weight_map.insert(t.name.clone(), json!(name));
            }
        }
        let total: usize = tensors.iter().map(|t| t.data.len() * width).sum();
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join("model.safetensors.index.json");
        std::fs::write(&path, serde_json::to_string_pretty(&index)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    for from in source
        .iter()
        .flat_map(|s| COMPANION_FILES.iter().map(|name| s.join(name)))
    {
        if from.is_file() {
            let to = dir.join(from.file_name().expect("a file name"));
            std::fs::copy(&from, to).with_context(|| format!("cannot copy {}", from.display()))?;
        }
    }
    let generation = dir.join("generation_config.json");
    if !generation.exists() {
        // What `save_pretrained` writes for a model without one: its special token ids.
        let mut g = serde_json::Map::from_iter([("_from_model_config".to_string(), json!(true))]);
        for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
            if let Some(v) = config.get(key).filter(|v| !v.is_null()) {
                g.insert(key.to_string(), v.clone());
            }
        }
        std::fs::write(
            &generation,
            serde_json::to_string_pretty(&Value::Object(g))?,
        )
        .with_context(|| format!("cannot write {}", generation.display()))?;
    }
    Ok(())
}
