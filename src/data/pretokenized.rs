//! The pre-tokenized JSONL formats (fixtures/README.md), detected per line:
//! reward groups `{"prompt_ids", "response_ids": [[..], ..], "rewards"}` and pairs
//! `{"prompt_ids", "chosen_ids", "rejected_ids"}`.

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

/// Parses one line into a group.
pub fn parse_line(line: &str, source: String) -> Result<Group> {
    let value: Value = serde_json::from_str(line).context("malformed JSON")?;
    let obj = value.as_object().context("expected a JSON object")?;
    let is_reward = obj.contains_key("response_ids");
    let is_pair = obj.contains_key("chosen_ids") || obj.contains_key("rejected_ids");
    if !is_reward && !is_pair {
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        bail!(
            "unknown record: expected `prompt_ids` with `response_ids` and `rewards`, or with \
             `chosen_ids` and `rejected_ids`; found keys {keys:?}"
        );
    }
    let prompt = nonempty(ids(obj, "prompt_ids")?, "field `prompt_ids`")?;
    let (responses, rewards) = if is_reward {
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
        let rewards = obj
            .get("rewards")
            .context("missing field `rewards`")?
            .as_array()
            .context("field `rewards`: expected a list of numbers")?
            .iter()
            .enumerate()
            .map(|(i, r)| {
                r.as_f64().filter(|x| x.is_finite()).with_context(|| {
                    format!("field `rewards`, element {i}: expected a finite number, found {r}")
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if rewards.len() != responses.len() {
            bail!(
                "{} responses but {} rewards",
                responses.len(),
                rewards.len()
            );
        }
        if responses.is_empty() {
            bail!("field `response_ids` holds no response");
        }
        (responses, rewards)
    } else {
        let chosen = nonempty(ids(obj, "chosen_ids")?, "field `chosen_ids`")?;
        let rejected = nonempty(ids(obj, "rejected_ids")?, "field `rejected_ids`")?;
        (vec![chosen, rejected], vec![1.0, 0.0])
    };
    Ok(Group {
        prompt,
        responses,
        rewards,
        source,
    })
}

/// Reads every group of a pre-tokenized JSONL file; blank lines are skipped.
pub fn read_file(path: &Path) -> Result<Vec<Group>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut groups = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let source = format!("{}:{}", path.display(), i + 1);
        groups.push(parse_line(line, source.clone()).with_context(|| source)?);
    }
    if groups.is_empty() {
        bail!("{}: no groups in the file", path.display());
    }
    Ok(groups)
}
