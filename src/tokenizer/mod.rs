//! The text side of a Hugging Face model directory: `tokenizer.json` (through the
//! `tokenizers` crate), the special tokens of `tokenizer_config.json` (and of a legacy
//! `special_tokens_map.json`) and its chat template, and the split of a prompt and its
//! responses into token ids as TRL makes it.

pub mod strftime;
mod template;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use template::ChatTemplate;
use tokenizers::Tokenizer;

/// transformers' named special tokens (`SPECIAL_TOKENS_ATTRIBUTES`), which
/// `apply_chat_template` passes to the template where the tokenizer defines them.
const SPECIAL_TOKEN_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// One chat message, as chat templates see it.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A prompt and its responses as token ids, split as TRL splits them
/// ([`split_at_divergence`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Tokenized {
    pub prompt: Vec<u32>,
    pub responses: Vec<Vec<u32>>,
    /// The last tokens of the prompt tokenized alone that the split cut off, because they
    /// merged with the start of a response (empty when none did): `prompt` followed by them
    /// is the prompt alone, which generation continues.
    pub prompt_cut: Vec<u32>,
}

/// The texts a conversation is tokenized from: the prompt rendered with the generation
/// prompt, and what each full rendering adds after it.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatTexts {
    pub prompt: String,
    pub responses: Vec<String>,
}

pub struct TextTokenizer {
    tokenizer: Tokenizer,
    /// The model directory it was loaded from, for errors.
    dir: PathBuf,
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
    /// The named special tokens the tokenizer defines (`bos_token`, `unk_token`, ...), as
    /// chat templates see them.
    special_tokens: Vec<(String, String)>,
    template: Option<ChatTemplate>,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Message {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

/// A named special token (`bos_token`, ...) and the file that defines it.
struct SpecialToken {
    key: &'static str,
    content: String,
    file: PathBuf,
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json` and, when present, `dir/tokenizer_config.json` and
    /// `dir/chat_template.jinja` (where recent transformers saves the template; it wins over
    /// tokenizer_config.json's, as in transformers).
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            bail!("{}: {}", path.display(), crate::fsutil::not_a_file(&path));
        }
        let mut tokenizer = Tokenizer::from_file(&path).map_err(|e| {
            anyhow!(
                "{}: not a tokenizer the tokenizers library reads (a Hugging Face \
                     tokenizer.json): {e}",
                path.display()
            )
        })?;
        // Lengths are the data loader's business: a tokenizer.json saved with truncation or
        // padding must not cut or pad what it encodes.
        tokenizer
            .with_truncation(None)
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        tokenizer.with_padding(None);
        let config_path = dir.join("tokenizer_config.json");
        let config = read_config(&config_path)?;
        let special_tokens = special_tokens(dir, &config)?;
        let id_of = |key: &str| -> Result<Option<(String, u32)>> {
            let Some(token) = special_tokens.iter().find(|t| t.key == key) else {
                return Ok(None);
            };
            let id = tokenizer.token_to_id(&token.content).with_context(|| {
                format!(
                    "{}: {key} {:?} is not in the vocabulary of {}",
                    token.file.display(),
                    token.content,
                    path.display()
                )
            })?;
            Ok(Some((token.content.clone(), id)))
        };
        // tokenizer.json's post-processor adds the special tokens: transformers 5 drops
        // add_bos_token and add_eos_token when there is a tokenizer.json.
        let (bos, eos) = (id_of("bos_token")?, id_of("eos_token")?);
        // What `strftime_now` renders until `with_template_date` says otherwise.
        let today = strftime::DateTime::today();
        let jinja_path = dir.join("chat_template.jinja");
        let template = if jinja_path.is_file() {
            let source = std::fs::read_to_string(&jinja_path)
                .with_context(|| format!("cannot read {}", jinja_path.display()))?;
            let origin = jinja_path.display().to_string();
            Some(ChatTemplate::new(&source, &origin, today).with_context(|| origin.clone())?)
        } else {
            config_template(&config)
                .and_then(|source| {
                    let origin = config_path.display().to_string();
                    source
                        .map(|s| ChatTemplate::new(s, &origin, today))
                        .transpose()
                })
                .with_context(|| format!("{}: chat_template", config_path.display()))?
        };
        Ok(TextTokenizer {
            tokenizer,
            dir: dir.to_path_buf(),
            bos,
            eos,
            special_tokens: special_tokens
                .into_iter()
                .map(|t| (t.key.to_string(), t.content))
                .collect(),
            template,
        })
    }

    /// The text's tokens with no special tokens added; special tokens written in the text
    /// (`<s>`, `</s>`) are recognized, as in Hugging Face tokenizers.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.ids(text, false)
    }

    fn ids(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("cannot tokenize {text:?}: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of the ids, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow!("cannot decode {ids:?}: {e}"))
    }

    /// The number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|(_, id)| *id)
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|(_, id)| *id)
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.template.as_ref().map(ChatTemplate::source)
    }

    /// The tokenizer with its chat template's `strftime_now` rendering `date` (transformers
    /// renders the clock's time, which would tokenize a run's data otherwise on another day).
    pub fn with_template_date(mut self, date: strftime::DateTime) -> Result<Self> {
        self.template = self.template.map(|t| t.at(date)).transpose()?;
        Ok(self)
    }

    /// Renders the chat template over `messages`, with the special tokens (`bos_token`,
    /// `eos_token`, `unk_token`, ...), `tools`, `documents` and `add_generation_prompt`
    /// defined as transformers' `apply_chat_template` defines them.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.template.as_ref().context(
            "conversational data needs a chat template, and the tokenizer has none (no \
                 chat_template in tokenizer_config.json, no chat_template.jinja)",
        )?;
        template.render(messages, &self.special_tokens, add_generation_prompt)
    }

    /// The text's tokens with the special tokens of tokenizer.json's post-processor added
    /// (BOS for Mistral), as `tokenizer(text)` gives them in transformers.
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>> {
        self.ids(text, true)
    }

    /// Plain text as TRL's DPOTrainer tokenizes it: the prompt with special tokens added, and
    /// the prompt followed by each response and the EOS token's text (unless the response
    /// already ends with it); see [`split_at_divergence`]. A tokenizer without an EOS token
    /// is an error here: TRL ends every plain-text response with it.
    pub fn tokenize_plain(&self, prompt: &str, responses: &[String]) -> Result<Tokenized> {
        let (eos, _) = self.eos.as_ref().with_context(|| {
            format!(
                "plain-text responses end with the EOS token (as TRL appends it), and the \
                 tokenizer in {} defines none (no eos_token in tokenizer_config.json or \
                 special_tokens_map.json)",
                self.dir.display()
            )
        })?;
        let full = responses
            .iter()
            .map(|r| {
                let eos = if r.ends_with(eos.as_str()) { "" } else { eos };
                self.encode_with_special_tokens(&format!("{prompt}{r}{eos}"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(split_at_divergence(
            self.encode_with_special_tokens(prompt)?,
            full,
        ))
    }

    /// The texts of a conversation: the prompt rendered with the generation prompt, and for
    /// each response (its assistant message or messages) what rendering the prompt and the
    /// response without the generation prompt adds after that prompt text. A check of the
    /// template alone; training splits token ids instead ([`Self::tokenize_chat`]).
    pub fn chat_texts(&self, prompt: &[Message], responses: &[Vec<Message>]) -> Result<ChatTexts> {
        let (prompt_text, full) = self.render_conversations(prompt, responses)?;
        // Each full rendering starts with the prompt's, so the cut is on a char boundary.
        let responses = full
            .into_iter()
            .map(|f| f[prompt_text.len()..].to_string())
            .collect();
        Ok(ChatTexts {
            prompt: prompt_text,
            responses,
        })
    }

    /// A conversation as TRL's DPOTrainer tokenizes it: the template over the prompt with the
    /// generation prompt, and over the prompt and each response, tokenized with no special
    /// tokens added (the template writes them); see [`split_at_divergence`].
    pub fn tokenize_chat(
        &self,
        prompt: &[Message],
        responses: &[Vec<Message>],
    ) -> Result<Tokenized> {
        let (prompt_text, full) = self.render_conversations(prompt, responses)?;
        let full = full
            .iter()
            .map(|f| self.encode(f))
            .collect::<Result<Vec<_>>>()?;
        Ok(split_at_divergence(self.encode(&prompt_text)?, full))
    }

    /// The prompt rendered with the generation prompt, and the prompt and each response
    /// rendered without it, each of which must start with the prompt's rendering: a template
    /// that renders the prompt differently once a response follows (Mistral-7B-Instruct-v0.3's
    /// moves the system message into the last user turn) leaves no place to split them.
    /// TRL only warns there ("Mismatch between tokenized prompt and the start of tokenized
    /// prompt+chosen") and splits at the prompt's length anyway, training on tokens that are
    /// not the response; this is an error instead.
    fn render_conversations(
        &self,
        prompt: &[Message],
        responses: &[Vec<Message>],
    ) -> Result<(String, Vec<String>)> {
        let prompt_text = self.render_chat(prompt, true)?;
        let full = responses
            .iter()
            .enumerate()
            .map(|(i, response)| {
                let full = self.render_chat(&conversation(prompt, response), false)?;
                if !full.starts_with(&prompt_text) {
                    bail!(
                        "response {i}: the chat template renders the prompt differently when a \
                         response follows it, so the conversation does not start with the \
                         prompt and cannot be split into prompt and response; {}",
                        divergence(&prompt_text, &full)
                    );
                }
                Ok(full)
            })
            .collect::<Result<_>>()?;
        Ok((prompt_text, full))
    }
}

/// Where two renderings first differ: the character offset and a few characters of each
/// from there.
fn divergence(prompt: &str, full: &str) -> String {
    const SHOWN: usize = 40;
    let at = prompt
        .char_indices()
        .zip(full.chars())
        .find(|((_, a), b)| a != b)
        .map_or(prompt.len().min(full.len()), |((i, _), _)| i);
    let from = |s: &str| s[at..].chars().take(SHOWN).collect::<String>();
    format!(
        "they diverge at character {}: the prompt alone continues {:?}, the conversation {:?}",
        prompt[..at].chars().count(),
        from(prompt),
        from(full)
    )
}

fn conversation(prompt: &[Message], response: &[Message]) -> Vec<Message> {
    prompt.iter().chain(response).cloned().collect()
}

/// TRL's split of a tokenized prompt and the tokenized prompt + response texts: the prompt
/// is the longest common prefix of the prompt's ids and every full sequence's ids (the
/// minimum over the responses), and each response is the rest of its full sequence. A
/// SentencePiece tokenizer thus gives a response no word-start token of its own where the
/// full text has none; where a token spans the prompt's end, the prompt is shortened.
pub fn split_at_divergence(prompt: Vec<u32>, full: Vec<Vec<u32>>) -> Tokenized {
    let common = full
        .iter()
        .map(|f| prompt.iter().zip(f).take_while(|(a, b)| a == b).count())
        .min()
        .unwrap_or(prompt.len());
    Tokenized {
        prompt_cut: prompt[common..].to_vec(),
        prompt: prompt[..common].to_vec(),
        responses: full.into_iter().map(|f| f[common..].to_vec()).collect(),
    }
}

/// tokenizer_config.json (or special_tokens_map.json) as a JSON object, or `null` when there
/// is none.
fn read_config(path: &Path) -> Result<Value> {
    if !path.is_file() {
        return Ok(Value::Null);
    }
    crate::fsutil::read_json_object(path)
}

/// The named special tokens as transformers 5's `from_pretrained` reads them: those of
/// tokenizer_config.json, and where it has no `added_tokens_decoder` (a folder saved before
/// transformers 4.34), those of special_tokens_map.json over them.
fn special_tokens(dir: &Path, config: &Value) -> Result<Vec<SpecialToken>> {
    let config_path = dir.join("tokenizer_config.json");
    let map_path = dir.join("special_tokens_map.json");
    let map = match config.get("added_tokens_decoder") {
        Some(_) => Value::Null,
        None => read_config(&map_path)?,
    };
    Ok(SPECIAL_TOKEN_KEYS
        .iter()
        .filter_map(|&key| {
            // A key of the map replaces the config's, `null` (no such token) included.
            let (content, file) = match map.get(key) {
                Some(value) => (token_content(value)?, &map_path),
                None => (token_content(&config[key])?, &config_path),
            };
            Some(SpecialToken {
                key,
                content: content.to_string(),
                file: file.clone(),
            })
        })
        .collect())
}

/// tokenizer_config.json's chat template: a string, or in older files a list of named
/// templates of which transformers uses the one named `default`.
fn config_template(config: &Value) -> Result<Option<&str>> {
    match &config["chat_template"] {
        Value::Null => Ok(None),
        Value::String(source) => Ok(Some(source)),
        Value::Array(named) => named
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(Some)
            .context("no template named \"default\" in the list"),
        other => bail!("expected a string or a list of named templates, found {other}"),
    }
}

/// A special token of tokenizer_config.json or special_tokens_map.json: a string, or an
/// AddedToken-style object `{"content": ..}`.
fn token_content(value: &Value) -> Option<&str> {
    match value {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}
