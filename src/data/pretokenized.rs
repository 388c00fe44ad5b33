//! The pre-tokenized JSONL formats (fixtures/README.md): reward groups
//! `{"prompt_ids", "response_ids": [[..], ..], "rewards"}` and pairs
//! `{"prompt_ids", "chosen_ids", "rejected_ids"}`.

use super::formats::{rewards, Record, Sequences};
use super::load::{load_groups, DataOptions};
use super::Group;
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

fn ids(obj: &Map<String, Value>, key: &str) -> Result<Vec<u32>> {
    let v = obj
        .get(key)
        .with_context(|| format!("missing field `{key}`"))?;
    let arr = v
        .as_array()
        .with_context(|| format!("field `{key}`: expected a list of token ids"))?;
    ids_of(arr).with_context(|| format!("field `{key}`"))
}

fn ids_of(arr: &[Value]) -> Result<Vec<u32>> {
    arr.iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .with_context(|| format!("element {i}: expected a token id, found {x}"))
        })
        .collect()
}

fn nonempty(ids: Vec<u32>, what: &str) -> Result<Vec<u32>> {
    if ids.is_empty() {
        bail!("{what} is empty");
    }
    Ok(ids)
}

/// The fields of which any one makes a record pre-tokenized.
pub const PRETOKENIZED_FIELDS: [&str; 3] = ["response_ids", "chosen_ids", "rejected_ids"];

/// Parses a pre-tokenized line's object.
pub fn parse(obj: &Map<String, Value>) -> Result<Record> {
    let prompt = nonempty(ids(obj, "prompt_ids")?, "field `prompt_ids`")?;
    let (responses, rewards) = if obj.contains_key("response_ids") {
        let arr = obj["response_ids"]
            .as_array()
            .context("field `response_ids`: expected a list of lists of token ids")?;
        let responses = arr
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let r = r.as_array().with_context(|| {
                    format!("field `response_ids`, response {i}: expected a list of token ids")
                })?;
                let r = ids_of(r).with_context(|| format!("field `response_ids`, response {i}"))?;
                nonempty(r, &format!("field `response_ids`, response {i}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let rewards = rewards(obj, responses.len())?;
        if responses.is_empty() {
            bail!("field `response_ids` holds no response");
        }
        (responses, rewards)
    } else {
        let chosen = nonempty(ids(obj, "chosen_ids")?, "field `chosen_ids`")?;
        let rejected = nonempty(ids(obj, "rejected_ids")?, "field `rejected_ids`")?;
        (vec![chosen, rejected], vec![1.0, 0.0])
    };
    Ok(Record {
        sequences: Sequences::Tokens { prompt, responses },
        rewards,
    })
}

/// Reads every group of a JSONL file that needs no tokenizer, untruncated: the loader of
/// [`super::load`] with no tokenizer and default options (text lines are an error).
pub fn read_file(path: &Path) -> Result<Vec<Group>> {
    Ok(load_groups(path, None, &DataOptions::default())?.groups)
}
