//! The text side of a Hugging Face model directory: `tokenizer.json` (through the
//! `tokenizers` crate), the special tokens and chat template of `tokenizer_config.json`, and
//! the split of a prompt and its responses into token ids as TRL makes it.

mod template;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::Path;
use template::ChatTemplate;
use tokenizers::Tokenizer;

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
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
    template: Option<ChatTemplate>,
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
        let special = |key: &str| -> Result<Option<(String, u32)>> {
            let Some(content) = token_content(&config[key]) else {
                return Ok(None);
            };
            let id = tokenizer.token_to_id(content).with_context(|| {
                format!(
                    "{}: {key} {content:?} is not in the vocabulary of {}",
                    config_path.display(),
                    path.display()
                )
            })?;
            Ok(Some((content.to_string(), id)))
        };
        let (bos, eos) = (special("bos_token")?, special("eos_token")?);
        let jinja_path = dir.join("chat_template.jinja");
        let template = if jinja_path.is_file() {
            let source = std::fs::read_to_string(&jinja_path)
                .with_context(|| format!("cannot read {}", jinja_path.display()))?;
            let origin = jinja_path.display().to_string();
            Some(ChatTemplate::new(&source, &origin).with_context(|| origin.clone())?)
        } else {
            config_template(&config)
                .and_then(|source| {
                    let origin = config_path.display().to_string();
                    source.map(|s| ChatTemplate::new(s, &origin)).transpose()
                })
                .with_context(|| format!("{}: chat_template", config_path.display()))?
        };
        Ok(TextTokenizer {
            tokenizer,
            bos,
            eos,
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

    /// Renders the chat template over `messages`, with `bos_token`, `eos_token` and
    /// `add_generation_prompt` defined as transformers' `apply_chat_template` defines them.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.template.as_ref().context(
            "conversational data needs a chat template, and the tokenizer has none (no \
                 chat_template in tokenizer_config.json, no chat_template.jinja)",
        )?;
        template.render(
            messages,
            self.bos.as_ref().map(|(s, _)| s.as_str()),
            self.eos.as_ref().map(|(s, _)| s.as_str()),
            add_generation_prompt,
        )
    }

    /// The text's tokens with the special tokens of tokenizer.json's post-processor added
    /// (BOS for Mistral), as `tokenizer(text)` gives them in transformers.
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>> {
        self.ids(text, true)
    }

    /// Plain text as TRL's DPOTrainer tokenizes it: the prompt with special tokens added, and
    /// the prompt followed by each response and the EOS token's text (unless the response
    /// already ends with it); see [`split_at_divergence`].
    pub fn tokenize_plain(&self, prompt: &str, responses: &[String]) -> Result<Tokenized> {
        let eos = self.eos.as_ref().map(|(text, _)| text.as_str());
        let full = responses
            .iter()
            .map(|r| {
                let eos = eos.filter(|e| !r.ends_with(e)).unwrap_or("");
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
        let prompt_text = self.render_chat(prompt, true)?;
        let responses = responses
            .iter()
            .enumerate()
            .map(|(i, response)| {
                let full = self.render_chat(&conversation(prompt, response), false)?;
                full.strip_prefix(&prompt_text)
                    .map(str::to_string)
                    .with_context(|| {
                        format!(
                            "response {i}: the chat template's rendering of the conversation \
                             {full:?} does not start with its rendering of the prompt \
                             {prompt_text:?}"
                        )
                    })
            })
            .collect::<Result<_>>()?;
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
        let prompt_ids = self.encode(&self.render_chat(prompt, true)?)?;
        let full = responses
            .iter()
            .map(|r| self.encode(&self.render_chat(&conversation(prompt, r), false)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(split_at_divergence(prompt_ids, full))
    }
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

/// tokenizer_config.json as a JSON object, or `null` when there is none.
fn read_config(path: &Path) -> Result<Value> {
    if !path.is_file() {
        return Ok(Value::Null);
    }
    crate::fsutil::read_json_object(path)
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

/// A special token of tokenizer_config.json: a string, or an AddedToken-style object
/// `{"content": ..}`.
fn token_content(value: &Value) -> Option<&str> {
    match value {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}
