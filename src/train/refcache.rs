//! The reference log-prob cache: the frozen reference model's statistics of every response
//! of a data set, computed once (`contralign precompute-ref`) and keyed by the contents of
//! the data (its token ids) and of the model (config and weight files), so that a cache made
//! for other data or another model is refused instead of silently used.

use crate::data::Group;
use crate::model::{Model, ResponseStats};
use crate::ops::Ops;
use crate::step::score_groups;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;

const FORMAT: &str = "contralign-ref-logps-v1";

/// The content hash of a data set's token ids (prompts and responses, in order). Rewards do
/// not enter: the reference statistics do not depend on them.
pub fn data_hash(groups: &[Group]) -> String {
    groups_hash(groups, false)
}

/// The content hash of a data set's token ids and rewards, in order: what training learns
/// from, which a resume must find unchanged.
pub fn training_data_hash(groups: &[Group]) -> String {
    groups_hash(groups, true)
}

fn groups_hash(groups: &[Group], with_rewards: bool) -> String {
    let mut h = blake3::Hasher::new();
    for g in groups {
        hash_ids(&mut h, &g.prompt);
        h.update(&(g.responses.len() as u64).to_le_bytes());
        for r in &g.responses {
            hash_ids(&mut h, r);
        }
        if with_rewards {
            for reward in &g.rewards {
                h.update(&reward.to_bits().to_le_bytes());
            }
        }
    }
    h.finalize().to_hex().to_string()
}

fn hash_ids(h: &mut blake3::Hasher, ids: &[u32]) {
    h.update(&(ids.len() as u64).to_le_bytes());
    h.update(bytemuck::cast_slice(ids));
}

/// The content hash of a model directory: config.json and every safetensors file, by name.
pub fn model_hash(dir: &Path) -> Result<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read model directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().is_some_and(|n| n == "config.json")
                || p.extension().is_some_and(|e| e == "safetensors")
        })
        .collect();
    files.sort();
    let mut h = blake3::Hasher::new();
    for f in &files {
        let name = f.file_name().unwrap_or_default().to_string_lossy();
        h.update(name.as_bytes());
        h.update(&[0]);
        h.update_mmap_rayon(f)
            .with_context(|| format!("cannot read {}", f.display()))?;
    }
    Ok(h.finalize().to_hex().to_string())
}

/// The first 12 hex digits of a hash, for messages (all of a shorter, edited one).
fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// One response's cached statistics: `[logp_sum, tokens, eos_logp or null]`.
type Entry = (f64, usize, Option<f64>);

#[derive(Serialize)]
pub struct RefCache {
    pub format: String,
    /// The model directory it was computed from (for messages) and its content hash.
    pub model_dir: String,
    pub model_hash: String,
    /// The data file (for messages) and the hash of its token ids.
    pub data_file: String,
    pub data_hash: String,
    /// Per group, per response.
    groups: Vec<Vec<Entry>>,
}

/// The key of one (prompt, response) pair, so that lookups survive reordering and pairing.
fn pair_key(prompt: &[u32], response: &[u32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    hash_ids(&mut h, prompt);
    hash_ids(&mut h, response);
    *h.finalize().as_bytes()
}

impl RefCache {
    /// Scores every response of `groups` under `model`, `max_tokens` packed tokens at a
    /// time, calling `progress(groups done)` after each chunk.
    #[allow(clippy::too_many_arguments)]
    pub fn compute<O: Ops>(
        ops: &O,
        model: &Model<O::Buf>,
        model_dir: &Path,
        groups: &[Group],
        data_file: &Path,
        max_tokens: usize,
        progress: impl FnMut(usize),
    ) -> Result<Self> {
        let stats = score_groups(ops, model, groups, max_tokens, progress)?;
        let mut it = stats.into_iter();
        let out = groups
            .iter()
            .map(|g| {
                it.by_ref()
                    .take(g.responses.len())
                    .map(|s| (s.logp_sum, s.tokens, s.eos_logp))
                    .collect()
            })
            .collect();
        Ok(RefCache {
            format: FORMAT.to_string(),
            model_dir: model_dir.display().to_string(),
            model_hash: model_hash(model_dir)?,
            data_file: data_file.display().to_string(),
            data_hash: data_hash(groups),
            groups: out,
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string(self).context("serializing the reference cache")?;
        crate::fsutil::write_atomically(path, text.as_bytes())
    }

    /// Reads a cache, naming the field or entry (`groups[3][1]`) that is not what
    /// `precompute-ref` writes.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read reference cache {}", path.display()))?;
        let not_a_cache = || {
            format!(
                "{}: not a reference log-prob cache (make one with `contralign precompute-ref`)",
                path.display()
            )
        };
        let value: serde_json::Value = serde_json::from_str(&text).with_context(not_a_cache)?;
        let Some(fields) = value.as_object() else {
            bail!("{}: expected a JSON object", not_a_cache());
        };
        let text_field = |key: &str| -> Result<String> {
            match fields.get(key) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(other) => bail!(
                    "{}: field `{key}`: expected a string, found {other}",
                    not_a_cache()
                ),
                None => bail!("{}: field `{key}` is missing", not_a_cache()),
            }
        };
        let format = text_field("format")?;
        if format != FORMAT {
            bail!(
                "{}: cache format {format:?}; this version reads {FORMAT:?}",
                path.display()
            );
        }
        const KEYS: [&str; 6] = [
            "format",
            "model_dir",
            "model_hash",
            "data_file",
            "data_hash",
            "groups",
        ];
        // After the format: another version's fields are its format's business.
        if let Some(key) = fields.keys().find(|k| !KEYS.contains(&k.as_str())) {
            bail!("{}: unknown field `{key}`", not_a_cache());
        }
        let Some(groups) = fields.get("groups").and_then(|g| g.as_array()) else {
            bail!(
                "{}: field `groups`: expected a list of groups",
                not_a_cache()
            );
        };
        let groups = groups
            .iter()
            .enumerate()
            .map(|(g, group)| {
                let entries = group.as_array().with_context(|| {
                    format!(
                        "{}: groups[{g}]: expected a list of responses, found {group}",
                        path.display()
                    )
                })?;
                entries
                    .iter()
                    .enumerate()
                    .map(|(r, entry)| {
                        serde_json::from_value::<Entry>(entry.clone()).map_err(|_| {
                            anyhow::anyhow!(
                                "{}: groups[{g}][{r}]: expected [logp_sum, tokens, eos_logp or \
                                 null], found {entry}",
                                path.display()
                            )
                        })
                    })
                    .collect::<Result<Vec<Entry>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(RefCache {
            format,
            model_dir: text_field("model_dir")?,
            model_hash: text_field("model_hash")?,
            data_file: text_field("data_file")?,
            data_hash: text_field("data_hash")?,
            groups,
        })
    }

    /// Refuses a cache made for other data or another model, saying which and why;
    /// `reference_given`: whether `model_dir` is `--ref-model` (else the policy, its default).
    pub fn check(
        &self,
        path: &Path,
        data: &Path,
        groups: &[Group],
        model_dir: &Path,
        reference_given: bool,
    ) -> Result<()> {
        let hash = data_hash(groups);
        if hash != self.data_hash {
            bail!(
                "{}: the cache was made for other data: {} (token hash {}…), but {} with these \
                 truncation settings hashes to {}…; run `contralign precompute-ref` again",
                path.display(),
                self.data_file,
                short(&self.data_hash),
                data.display(),
                short(&hash)
            );
        }
        let hash = model_hash(model_dir)?;
        if hash != self.model_hash {
            let (reference, fix) = if reference_given {
                (format!("--ref-model {}", model_dir.display()), "")
            } else {
                (
                    format!(
                        "the reference, which without --ref-model is the policy {},",
                        model_dir.display()
                    ),
                    " or give --ref-model with the model the cache was made with",
                )
            };
            bail!(
                "{}: the cache was made with another model: {} (content hash {}…), but \
                 {reference} hashes to {}…; run `contralign precompute-ref` again{fix}",
                path.display(),
                self.model_dir,
                short(&self.model_hash),
                short(&hash)
            );
        }
        if self.groups.len() != groups.len() {
            bail!(
                "{}: {} groups cached for {} in the data",
                path.display(),
                self.groups.len(),
                groups.len()
            );
        }
        // The hashes vouch for the token ids, not for the numbers beside them.
        for (i, (g, entries)) in groups.iter().zip(&self.groups).enumerate() {
            if entries.len() != g.responses.len() {
                bail!(
                    "{}: group {i} ({}): {} responses cached for {} in the data",
                    path.display(),
                    g.source,
                    entries.len(),
                    g.responses.len()
                );
            }
            for (j, (r, &(logp_sum, tokens, eos_logp))) in
                g.responses.iter().zip(entries).enumerate()
            {
                let what = format!("{}: group {i} ({}), response {j}", path.display(), g.source);
                if tokens != r.len() {
                    bail!("{what}: {tokens} tokens cached for {} in the data", r.len());
                }
                let log_prob = |v: f64| v.is_finite() && v <= 0.0;
                if !log_prob(logp_sum) || eos_logp.is_some_and(|e| !log_prob(e)) {
                    bail!(
                        "{what}: logp_sum {logp_sum} and eos_logp {eos_logp:?} must be finite \
                         log-probabilities (<= 0)"
                    );
                }
            }
        }
        Ok(())
    }

    /// A lookup by content, for the groups the loss sees (which may be pairs cut from the
    /// cached groups). `groups` are the data set's groups the cache was made from.
    pub fn lookup(&self, groups: &[Group]) -> RefLookup {
        let mut map = HashMap::new();
        for (g, entries) in groups.iter().zip(&self.groups) {
            for (r, &(logp_sum, tokens, eos_logp)) in g.responses.iter().zip(entries) {
                let stats = ResponseStats {
                    logp_sum,
                    tokens,
                    logp_mean: logp_sum / tokens.max(1) as f64,
                    eos_logp,
                };
                map.insert(pair_key(&g.prompt, r), stats);
            }
        }
        RefLookup(map)
    }
}

/// Cached reference statistics by (prompt, response) content.
pub struct RefLookup(HashMap<[u8; 32], ResponseStats>);

impl RefLookup {
    /// A lookup of given statistics, one per response of `groups` in order (benchmarks that
    /// make their reference up).
    pub fn from_stats(groups: &[Group], stats: &[ResponseStats]) -> RefLookup {
        let keys = groups
            .iter()
            .flat_map(|g| g.responses.iter().map(|r| pair_key(&g.prompt, r)));
        RefLookup(keys.zip(stats.iter().copied()).collect())
    }

    /// The statistics of every response of `groups`, in order.
    pub fn stats(&self, groups: &[Group]) -> Result<Vec<ResponseStats>> {
        let mut out = Vec::new();
        for g in groups {
            for (i, r) in g.responses.iter().enumerate() {
                let s = self.0.get(&pair_key(&g.prompt, r)).with_context(|| {
                    format!("{}: response {i} is not in the reference cache", g.source)
                })?;
                out.push(*s);
            }
        }
        Ok(out)
    }
}
