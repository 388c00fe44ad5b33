//! Loading data files (JSONL, Parquet) into groups of token ids: each record parsed in its
//! own format ([`super::formats`]), tokenized where it is text, and truncated.

use super::formats::{record_of, Sequences};
use super::records::{records, RawRecord};
use super::truncate::truncate;
use super::Group;
use crate::tokenizer::{Message, TextTokenizer, Tokenized};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq)]
pub struct DataOptions {
    /// Keep at most this many prompt tokens, the last ones.
    pub max_prompt_len: Option<usize>,
    /// The most tokens of prompt + response (TRL's `max_length`); longer responses are cut.
    pub max_len: Option<usize>,
    /// UltraFeedback's score: a completion's key or a dotted path into it.
    pub score_field: String,
    /// Skip and count invalid lines instead of failing on the first.
    pub skip_invalid: bool,
    /// A record with a token id at or above this (the model's vocab_size) is invalid, in its
    /// place in the file like a malformed one: an error, or with `skip_invalid` skipped.
    pub vocab: Option<usize>,
    /// Each prompt as tokenized alone (what generation continues) instead of TRL's training
    /// split, which cuts the prompt's last tokens where they merge with a response's.
    pub prompt_alone: bool,
    /// The model directory text records are tokenized with, named (with how to get its
    /// tokenizer.json) when a text record finds no tokenizer.
    pub model_dir: Option<PathBuf>,
}

impl Default for DataOptions {
    fn default() -> Self {
        DataOptions {
            max_prompt_len: None,
            max_len: None,
            score_field: "overall_score".to_string(),
            skip_invalid: false,
            vocab: None,
            prompt_alone: false,
            model_dir: None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct DataStats {
    /// Records read (non-blank lines, rows).
    pub lines: usize,
    pub groups: usize,
    /// Invalid lines skipped (with `skip_invalid`).
    pub skipped: usize,
    /// The first skipped line's error, `file:line: problem`.
    pub first_skipped: Option<String>,
    pub truncated_prompts: usize,
    pub truncated_responses: usize,
    /// Prompts shorter than their own tokenization, because their last tokens merged with
    /// the start of the responses (TRL warns of the mismatch).
    pub shortened_prompts: usize,
    /// Groups dropped because their prompt leaves no room for a response within `max_len`,
    /// as TRL's DPOTrainer drops them.
    pub dropped_long_prompts: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub groups: Vec<Group>,
    pub stats: DataStats,
}

/// Reads every group of a data file (JSONL, one record per non-blank line, or Parquet, one
/// per row), of a folder of such shards (its `train` split, as [`crate::hub::data_files`]
/// reads a folder), or of a data set id; the format is detected per record. Text records
/// need `tokenizer`. A bad record is an error naming `file:line` (`file, row N`), or with
/// `skip_invalid` is skipped and counted.
pub fn load_groups(
    path: &Path,
    tokenizer: Option<&TextTokenizer>,
    opts: &DataOptions,
) -> Result<Dataset> {
    let files = crate::hub::data_files(path, None, "train")?;
    load_files(&path.display().to_string(), &files, tokenizer, opts)
}

/// Reads every group of `files` in order as one data set, `name` in its messages. Nothing
/// is returned unless every file is readable.
pub fn load_files(
    name: &str,
    files: &[PathBuf],
    tokenizer: Option<&TextTokenizer>,
    opts: &DataOptions,
) -> Result<Dataset> {
    if opts.max_prompt_len == Some(0) {
        bail!("--max-prompt-len (the maximum prompt length) must be at least 1 token");
    }
    if opts.max_len.is_some_and(|m| m < 2) {
        bail!(
            "--max-len (the maximum length) must be at least 2 tokens (a prompt and a response \
             token)"
        );
    }
    let mut groups = Vec::new();
    let mut stats = DataStats::default();
    for file in files {
        for record in records(file)? {
            let RawRecord { source, value } = record?;
            stats.lines += 1;
            match value.and_then(|v| group(&v, &source, tokenizer, opts, &mut stats)) {
                Ok(Some(group)) => groups.push(group),
                Ok(None) => stats.dropped_long_prompts += 1,
                Err(e) if opts.skip_invalid => {
                    stats.skipped += 1;
                    stats
                        .first_skipped
                        .get_or_insert_with(|| format!("{source}: {e:#}"));
                }
                Err(e) => return Err(e.context(source)),
            }
        }
    }
    if groups.is_empty() {
        match &stats.first_skipped {
            Some(first) if stats.dropped_long_prompts == 0 => bail!(
                "{name}: no valid group; all {} lines were invalid, the first: {first}",
                stats.skipped
            ),
            Some(first) => bail!(
                "{name}: no group left: {} records were invalid (the first: {first}) and the \
                 prompts of the other {} leave no room for a response within --max-len {} \
                 tokens",
                stats.skipped,
                stats.dropped_long_prompts,
                opts.max_len.unwrap_or_default()
            ),
            None if stats.dropped_long_prompts > 0 => bail!(
                "{name}: no group left: the prompts of all {} records leave no room for a \
                 response within --max-len {} tokens",
                stats.dropped_long_prompts,
                opts.max_len.unwrap_or_default()
            ),
            None if files.len() == 1 => bail!("{name}: no groups in the file"),
            None => bail!("{name}: no groups in the files"),
        }
    }
    stats.groups = groups.len();
    Ok(Dataset { groups, stats })
}

/// The error of a text record without a tokenizer: the model directory that has none and
/// how to get one.
fn no_tokenizer(model_dir: Option<&Path>) -> String {
    match model_dir {
        Some(dir) => format!(
            "the record is text, but the model directory {} has no tokenizer.json; {}",
            dir.display(),
            crate::hub::checkpoint_files::how_to_get_tokenizer(dir)
        ),
        None => "the record is text, but no tokenizer was given (the model directory has no \
                 tokenizer.json)"
            .to_string(),
    }
}

/// One record's group, `None` when `max_len` leaves its responses no room; counts its
/// truncations into `stats` once it is known to be valid.
fn group(
    value: &Value,
    source: &str,
    tokenizer: Option<&TextTokenizer>,
    opts: &DataOptions,
    stats: &mut DataStats,
) -> Result<Option<Group>> {
    let record = record_of(value, &opts.score_field)?;
    let Tokenized {
        mut prompt,
        mut responses,
        prompt_cut,
    } = token_ids(record.sequences, tokenizer, opts.model_dir.as_deref())?;
    let prompt_shortened = !prompt_cut.is_empty() && !opts.prompt_alone;
    if opts.prompt_alone {
        prompt.extend(prompt_cut);
    }
    if prompt.is_empty() {
        bail!("the prompt has no tokens");
    }
    if let Some(i) = responses.iter().position(Vec::is_empty) {
        bail!("response {i} has no tokens");
    }
    let Some(cuts) = truncate(
        &mut prompt,
        &mut responses,
        opts.max_prompt_len,
        opts.max_len,
    ) else {
        return Ok(None);
    };
    let group = Group {
        prompt,
        responses,
        rewards: record.rewards,
        source: source.to_string(),
    };
    if let Some(what) = opts.vocab.and_then(|v| group.out_of_vocab(v)) {
        bail!("{what}");
    }
    stats.truncated_prompts += usize::from(cuts.prompt);
    stats.truncated_responses += cuts.responses;
    stats.shortened_prompts += usize::from(prompt_shortened);
    Ok(Some(group))
}

fn token_ids(
    sequences: Sequences,
    tokenizer: Option<&TextTokenizer>,
    model_dir: Option<&Path>,
) -> Result<Tokenized> {
    let need = || tokenizer.with_context(|| no_tokenizer(model_dir));
    match sequences {
        Sequences::Tokens { prompt, responses } => Ok(Tokenized {
            prompt,
            responses,
            prompt_cut: Vec::new(),
        }),
        Sequences::Plain { prompt, responses } => need()?.tokenize_plain(&prompt, &responses),
        Sequences::Chat { prompt, responses } => need()?.tokenize_chat(&prompt, &responses),
        Sequences::Instruction { prompt, responses } => {
            let tokenizer = need()?;
            if tokenizer.chat_template().is_some() {
                let prompt = [Message::new("user", prompt)];
                let responses: Vec<Vec<Message>> = responses
                    .into_iter()
                    .map(|r| vec![Message::new("assistant", r)])
                    .collect();
                tokenizer.tokenize_chat(&prompt, &responses)
            } else {
                tokenizer.tokenize_plain(&prompt, &responses)
            }
        }
    }
}
