//! Chat templates (Jinja) rendered with minijinja in the environment transformers'
//! `apply_chat_template` gives them: blocks trimmed and left-stripped, loop controls,
//! Python string methods (`.strip()`, `.startswith()`, ...), `raise_exception`,
//! `strftime_now` and transformers' `tojson`.

use super::strftime::DateTime;
use super::Message;
use anyhow::{anyhow, Result};
use minijinja::value::Kwargs;
use minijinja::{context, Environment, Error, ErrorKind, Value};
use serde::Serialize;
use serde_json::ser::{Formatter, PrettyFormatter};
use std::collections::BTreeMap;

const NAME: &str = "chat_template";

pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// Where it was read (`dir/tokenizer_config.json`, `dir/chat_template.jinja`), for
    /// messages.
    origin: String,
}

impl ChatTemplate {
    pub fn new(source: &str, origin: &str) -> Result<Self> {
        if source.trim().is_empty() {
            return Err(anyhow!("the chat template is empty"));
        }
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| anyhow!("{e}"))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        // transformers' `datetime.now().strftime(format)`, on the UTC clock.
        env.add_function("strftime_now", |format: String| -> Result<String, Error> {
            DateTime::now()
                .format(&format)
                .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| anyhow!("cannot parse the template: {e}"))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            origin: origin.to_string(),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` with `special_tokens` (`("bos_token", "<s>")`, ...; a token the
    /// tokenizer does not define is undefined, as for transformers) and with `tools` and
    /// `documents` none, as transformers passes them when none are given.
    pub fn render(
        &self,
        messages: &[Message],
        special_tokens: &[(String, String)],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| context! { role => m.role.as_str(), content => m.content.as_str() })
            .collect();
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| anyhow!("{}: chat template: {e}", self.origin))?;
        let tokens: BTreeMap<String, String> = special_tokens.iter().cloned().collect();
        let tokens = Value::from(tokens);
        template
            .render(context! {
                messages,
                tools => Value::from(()),
                documents => Value::from(()),
                add_generation_prompt,
                ..tokens
            })
            .map_err(|e| anyhow!("{}: chat template: {e}", self.origin))
    }
}

/// transformers' `tojson` filter: `json.dumps(value, ensure_ascii=False, indent=indent)`,
/// keys in their order, `", "` and `": "` between items without an indent (minijinja's own
/// filter writes compact JSON and escapes HTML characters).
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => " ".repeat(usize::try_from(v.clone()).map_err(|_| {
                Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: indent must be a number of spaces or a string, found {v}"),
                )
            })?),
        }),
    };
    let mut out = Vec::new();
    let written = match &indent {
        Some(indent) => write_json(
            &value,
            &mut out,
            PrettyFormatter::with_indent(indent.as_bytes()),
        ),
        None => write_json(&value, &mut out, PythonSeparators),
    };
    written.map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let json = String::from_utf8(out)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(Value::from_safe_string(json))
}

fn write_json(
    value: &Value,
    out: &mut Vec<u8>,
    formatter: impl Formatter,
) -> serde_json::Result<()> {
    value.serialize(&mut serde_json::Serializer::with_formatter(out, formatter))
}

/// Python's `json.dumps` separators without an indent: `", "` between items, `": "` after
/// keys.
struct PythonSeparators;

impl Formatter for PythonSeparators {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.begin_array_value(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}
