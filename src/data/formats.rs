//! The JSONL data formats, detected per line. Text forms, whose prompt `P` and responses `R`
//! are plain strings or conversations (lists of `{"role", "content"}`, as TRL accepts them):
//!
//! - reward groups `{"prompt": P, "responses": [R, ..], "rewards": [r, ..]}`;
//! - TRL preference pairs `{"prompt": P, "chosen": R, "rejected": R}`, the group `K = 2`,
//!   rewards `(1, 0)`, chosen first; without `prompt`, TRL's implicit prompt: the longest
//!   common prefix of `chosen` and `rejected` (see [`split_implicit_prompt`]);
//! - UltraFeedback as published, `{"instruction": P, "completions": [{"response": R,
//!   "overall_score": s, ..}, ..]}`, the score field selectable; plain text there becomes
//!   one user message and assistant messages when the tokenizer has a chat template
//!   ([`Sequences::Instruction`]);
//!
//! and the pre-tokenized forms of [`super::pretokenized`].
//!
//! With a conversational prompt, a response is its assistant message(s); a plain-string
//! response there is one assistant message. An empty response is a response (TRL tokenizes
//! an empty plain-text one as the EOS alone); an empty prompt is an error.

use super::pretokenized;
use crate::tokenizer::Message;
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

/// A prompt and its responses, before tokenization where they are text.
#[derive(Clone, Debug, PartialEq)]
pub enum Sequences {
    Tokens {
        prompt: Vec<u32>,
        responses: Vec<Vec<u32>>,
    },
    Plain {
        prompt: String,
        responses: Vec<String>,
    },
    Chat {
        prompt: Vec<Message>,
        responses: Vec<Vec<Message>>,
    },
    /// UltraFeedback's plain-text instruction and responses: with a chat template, one user
    /// message and one assistant message each (as HuggingFaceH4's binarization makes them);
    /// without one, plain text.
    Instruction {
        prompt: String,
        responses: Vec<String>,
    },
}

/// One line of a data file: a group before tokenization.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub sequences: Sequences,
    pub rewards: Vec<f64>,
}

/// Parses one line, detecting its format; `score_field` is UltraFeedback's score, a key or a
/// dotted path into each completion (`overall_score`, `annotations.helpfulness.Rating`).
pub fn parse_record(line: &str, score_field: &str) -> Result<Record> {
    let value: Value = serde_json::from_str(line).context("malformed JSON")?;
    record_of(&value, score_field)
}

/// The data formats, as [`format_of`] tells them apart by their fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Pretokenized,
    RewardGroup,
    PreferencePair,
    UltraFeedback,
}

/// What the formats expect, for the errors of records (and tables) that fit none.
pub const EXPECTED_FIELDS: &str = "`prompt` with `responses` and `rewards` (reward group), \
     `chosen` and `rejected`, with a `prompt` or not (preference pair; without one, TRL's \
     implicit prompt), `instruction` with `completions` (UltraFeedback), or `prompt_ids` with \
     `response_ids` and `rewards` or with `chosen_ids` and `rejected_ids` (pre-tokenized)";

/// The format of a record with these fields, or none.
pub fn format_of(has: impl Fn(&str) -> bool) -> Option<Format> {
    if pretokenized::PRETOKENIZED_FIELDS.iter().any(|k| has(k)) {
        Some(Format::Pretokenized)
    } else if has("responses") {
        Some(Format::RewardGroup)
    } else if has("chosen") || has("rejected") {
        Some(Format::PreferencePair)
    } else if has("completions") || has("instruction") {
        Some(Format::UltraFeedback)
    } else {
        None
    }
}

/// One record (a JSONL line's or a table row's object), its format detected from its fields.
pub fn record_of(value: &Value, score_field: &str) -> Result<Record> {
    let obj = value.as_object().context("expected a JSON object")?;
    match format_of(|k| obj.contains_key(k)) {
        Some(Format::Pretokenized) => pretokenized::parse(obj),
        Some(Format::RewardGroup) => reward_group(obj),
        Some(Format::PreferencePair) => preference_pair(obj),
        Some(Format::UltraFeedback) => ultrafeedback(obj, score_field),
        None => {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            bail!("unknown record: expected {EXPECTED_FIELDS}; found keys {keys:?}")
        }
    }
}

/// The `rewards` list of a reward group, checked against its number of responses.
pub(super) fn rewards(obj: &Map<String, Value>, responses: usize) -> Result<Vec<f64>> {
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
    if rewards.len() != responses {
        bail!("{responses} responses but {} rewards", rewards.len());
    }
    Ok(rewards)
}

fn reward_group(obj: &Map<String, Value>) -> Result<Record> {
    let prompt = prompt_text(field(obj, "prompt")?, "field `prompt`")?;
    let responses = field(obj, "responses")?
        .as_array()
        .context("field `responses`: expected a list of responses")?
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let name = format!("`responses[{i}]`");
            text(r, &format!("field `responses`, response {i}")).map(|t| (name, t))
        })
        .collect::<Result<Vec<_>>>()?;
    let rewards = rewards(obj, responses.len())?;
    if responses.is_empty() {
        bail!("field `responses` holds no response");
    }
    Ok(Record {
        sequences: sequences(prompt, responses)?,
        rewards,
    })
}

fn preference_pair(obj: &Map<String, Value>) -> Result<Record> {
    let chosen = text(field(obj, "chosen")?, "field `chosen`")?;
    let rejected = text(field(obj, "rejected")?, "field `rejected`")?;
    let (prompt, chosen, rejected) = match obj.get("prompt") {
        Some(prompt) => (prompt_text(prompt, "field `prompt`")?, chosen, rejected),
        None => implicit_prompt(chosen, rejected)?,
    };
    let responses = vec![
        ("`chosen`".to_string(), chosen),
        ("`rejected`".to_string(), rejected),
    ];
    Ok(Record {
        sequences: sequences(prompt, responses)?,
        rewards: vec![1.0, 0.0],
    })
}

/// Where TRL's `extract_prompt` ends the prompt shared by `chosen` and `rejected`: at their
/// first difference, less a space just before it (which goes with the responses); where one
/// is a prefix of the other, one item before the shorter one's end, so that no response is
/// empty.
pub fn split_implicit_prompt<T: PartialEq>(
    chosen: &[T],
    rejected: &[T],
    is_space: impl Fn(&T) -> bool,
) -> usize {
    let shorter = chosen.len().min(rejected.len());
    match (0..shorter).find(|&i| chosen[i] != rejected[i]) {
        Some(i) if i > 0 && is_space(&chosen[i - 1]) => i - 1,
        Some(i) => i,
        None => shorter.saturating_sub(1),
    }
}

/// A preference pair without a `prompt` field: the prompt is the common start of both
/// responses (characters of plain text, messages of conversations).
fn implicit_prompt(chosen: Text, rejected: Text) -> Result<(Text, Text, Text)> {
    let (prompt, chosen, rejected) = match (chosen, rejected) {
        (Text::Plain(c), Text::Plain(r)) => {
            let (cc, rc): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
            let at = split_implicit_prompt(&cc, &rc, |ch| *ch == ' ');
            let (c_at, r_at) = (byte_offset(&c, at), byte_offset(&r, at));
            (
                Text::Plain(c[..c_at].to_string()),
                Text::Plain(c[c_at..].to_string()),
                Text::Plain(r[r_at..].to_string()),
            )
        }
        (Text::Chat(c), Text::Chat(r)) => {
            let at = split_implicit_prompt(&c, &r, |_| false);
            (
                Text::Chat(c[..at].to_vec()),
                Text::Chat(c[at..].to_vec()),
                Text::Chat(r[at..].to_vec()),
            )
        }
        _ => bail!(
            "no field `prompt`, and `chosen` and `rejected` are not both plain text or both \
             conversations, so no prompt can be taken from their common start"
        ),
    };
    let empty = match &prompt {
        Text::Plain(p) => p.is_empty(),
        Text::Chat(p) => p.is_empty(),
    };
    if empty {
        bail!(
            "no field `prompt`, and `chosen` and `rejected` differ from their start: TRL's \
             implicit prompt (their common start) is empty"
        );
    }
    Ok((prompt, chosen, rejected))
}

/// The byte offset of character `chars` of `s`.
fn byte_offset(s: &str, chars: usize) -> usize {
    s.char_indices().nth(chars).map_or(s.len(), |(i, _)| i)
}

fn ultrafeedback(obj: &Map<String, Value>, score_field: &str) -> Result<Record> {
    let prompt = prompt_text(field(obj, "instruction")?, "field `instruction`")?;
    let completions = field(obj, "completions")?
        .as_array()
        .context("field `completions`: expected a list of completions")?;
    if completions.is_empty() {
        bail!("field `completions` holds no completion");
    }
    let mut responses = Vec::with_capacity(completions.len());
    let mut rewards = Vec::with_capacity(completions.len());
    for (i, c) in completions.iter().enumerate() {
        let c = c
            .as_object()
            .with_context(|| format!("completion {i}: expected a JSON object"))?;
        let what = format!("completion {i}");
        let response = text(
            field(c, "response").with_context(|| what.clone())?,
            &format!("{what}, field `response`"),
        )?;
        responses.push((format!("`completions[{i}].response`"), response));
        rewards.push(score(c, score_field).with_context(|| what)?);
    }
    let sequences = match sequences(prompt, responses)? {
        Sequences::Plain { prompt, responses } => Sequences::Instruction { prompt, responses },
        other => other,
    };
    Ok(Record { sequences, rewards })
}

/// A completion's score: a number or a numeric string (UltraFeedback stores its ratings as
/// strings), found by key or by dotted path.
fn score(completion: &Map<String, Value>, path: &str) -> Result<f64> {
    let value =
        lookup(completion, path).with_context(|| format!("missing score field `{path}`"))?;
    let number = match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    number
        .filter(|x| x.is_finite())
        .with_context(|| format!("score field `{path}`: expected a finite number, found {value}"))
}

/// The value at a key, or else at a dotted path of keys.
fn lookup<'a>(obj: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(v) = obj.get(path) {
        return Some(v);
    }
    let mut keys = path.split('.');
    let mut at = obj.get(keys.next()?)?;
    for key in keys {
        at = at.as_object()?.get(key)?;
    }
    Some(at)
}

fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a Value> {
    obj.get(key)
        .with_context(|| format!("missing field `{key}`"))
}

/// A prompt or response as written: plain text or a conversation.
enum Text {
    Plain(String),
    Chat(Vec<Message>),
}

/// A prompt: text that is not empty.
fn prompt_text(value: &Value, what: &str) -> Result<Text> {
    match text(value, what)? {
        Text::Plain(s) if s.is_empty() => bail!("{what} is empty"),
        prompt => Ok(prompt),
    }
}

/// A prompt or response. An empty string is a response, as in TRL, which tokenizes an empty
/// plain-text response as the EOS token alone (and an empty assistant message as the
/// template renders it).
fn text(value: &Value, what: &str) -> Result<Text> {
    match value {
        Value::Null => bail!("{what} is null"),
        Value::String(s) => Ok(Text::Plain(s.clone())),
        Value::Array(a) if a.is_empty() => bail!("{what} holds no message"),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, m)| message(m).with_context(|| format!("{what}, message {i}")))
            .collect::<Result<_>>()
            .map(Text::Chat),
        _ => bail!("{what}: expected a string or a list of messages, found {value}"),
    }
}

fn message(value: &Value) -> Result<Message> {
    let obj = value
        .as_object()
        .context("expected an object with `role` and `content`")?;
    let string = |key: &str| -> Result<String> {
        field(obj, key)?
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("field `{key}`: expected a string"))
    };
    Ok(Message {
        role: string("role")?,
        content: string("content")?,
    })
}

/// The prompt and its responses, each response named by its field (`` `chosen` ``,
/// `` `responses[1]` ``) for errors.
fn sequences(prompt: Text, responses: Vec<(String, Text)>) -> Result<Sequences> {
    match prompt {
        Text::Plain(prompt) => {
            let responses = responses
                .into_iter()
                .map(|(name, r)| match r {
                    Text::Plain(r) => Ok(r),
                    Text::Chat(_) => bail!(
                        "field {name} is a conversation (a list of messages) but the prompt is \
                         plain text: with a plain-text prompt every response must be plain \
                         text; with a conversational prompt (a list of {{\"role\", \"content\"}} \
                         messages) a response may be its assistant message(s) or a string"
                    ),
                })
                .collect::<Result<_>>()?;
            Ok(Sequences::Plain { prompt, responses })
        }
        Text::Chat(prompt) => {
            let responses = responses
                .into_iter()
                .map(|(_, r)| match r {
                    Text::Chat(messages) => messages,
                    Text::Plain(content) => vec![Message::new("assistant", content)],
                })
                .collect();
            Ok(Sequences::Chat { prompt, responses })
        }
    }
}
