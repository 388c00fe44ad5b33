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
use serde_json::ser::Formatter;
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
    /// The template `source` read from `origin`, whose `strftime_now` renders `now`: one
    /// instant for every rendering, so that a prompt and its conversation agree and a run's
    /// data tokenizes the same on any day.
    pub fn new(source: &str, origin: &str, now: DateTime) -> Result<Self> {
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
        // transformers' `datetime.now().strftime(format)`, at the template's fixed instant.
        env.add_function(
            "strftime_now",
            move |format: String| -> Result<String, Error> {
                now.format(&format)
                    .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))
            },
        );
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| anyhow!("cannot parse the template: {e}"))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            origin: origin.to_string(),
        })
    }

    /// The same template with `strftime_now` rendering `now`.
    pub fn at(&self, now: DateTime) -> Result<Self> {
        ChatTemplate::new(&self.source, &self.origin, now)
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

/// transformers' `tojson` filter: `json.dumps(value, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)` with those keyword arguments, keys in their order
/// unless sorted (minijinja's own filter writes compact JSON and escapes HTML characters).
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let invalid = |what: String| Error::new(ErrorKind::InvalidOperation, format!("tojson: {what}"));
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent.filter(|v| !v.is_none()) {
        None => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => " ".repeat(usize::try_from(v.clone()).map_err(|_| {
                invalid(format!(
                    "indent must be a number of spaces or a string, found {v}"
                ))
            })?),
        }),
    };
    // Python's defaults: ", " between items, or "," where an indent ends each line.
    let (item, key) = match separators.filter(|v| !v.is_none()) {
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
        Some(v) => {
            let pair: Vec<String> = v
                .try_iter()
                .map_err(|_| invalid(format!("separators must be two strings, found {v}")))?
                .map(|s| s.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| invalid(format!("separators must be two strings, found {v}")))?;
            match <[String; 2]>::try_from(pair) {
                Ok([item, key]) => (item, key),
                Err(_) => {
                    return Err(invalid(format!(
                        "separators must be two strings, found {v}"
                    )))
                }
            }
        }
    };
    let mut json = serde_json::to_value(&value).map_err(|e| invalid(e.to_string()))?;
    if sort_keys == Some(true) {
        sort_keys_of(&mut json);
    }
    let mut out = Vec::new();
    let formatter = PythonFormatter {
        item: item.into_bytes(),
        key: key.into_bytes(),
        indent: indent.map(String::into_bytes),
        depth: 0,
        has_value: false,
    };
    json.serialize(&mut serde_json::Serializer::with_formatter(
        &mut out, formatter,
    ))
    .map_err(|e| invalid(e.to_string()))?;
    let json = String::from_utf8(out).map_err(|e| invalid(e.to_string()))?;
    let json = if ensure_ascii == Some(true) {
        ascii_escaped(&json)
    } else {
        json
    };
    Ok(Value::from_safe_string(json))
}

/// Every object's keys in sorted order, at every depth (`sort_keys=True`).
fn sort_keys_of(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.sort_keys();
            map.values_mut().for_each(sort_keys_of);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(sort_keys_of),
        _ => {}
    }
}

/// JSON text with every non-ASCII character written `\uXXXX` (a surrogate pair above the
/// Basic Multilingual Plane), as `ensure_ascii=True` writes it: outside strings JSON text is
/// ASCII already.
fn ascii_escaped(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            for unit in c.encode_utf16(&mut [0; 2]) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// Python's `json.dumps` layout: `item` between items, `key` after a key and, with an
/// `indent`, each item on a line of its own indented by its depth (an empty container stays
/// `[]` or `{}`).
struct PythonFormatter {
    item: Vec<u8>,
    key: Vec<u8>,
    indent: Option<Vec<u8>>,
    depth: usize,
    /// Whether the container being written has an item yet.
    has_value: bool,
}

impl PythonFormatter {
    fn new_line<W: ?Sized + std::io::Write>(&self, writer: &mut W) -> std::io::Result<()> {
        if let Some(indent) = &self.indent {
            writer.write_all(b"\n")?;
            for _ in 0..self.depth {
                writer.write_all(indent)?;
            }
        }
        Ok(())
    }

    fn open<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        bracket: &[u8],
    ) -> std::io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        w.write_all(bracket)
    }

    fn close<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        bracket: &[u8],
    ) -> std::io::Result<()> {
        self.depth -= 1;
        if self.has_value {
            self.new_line(w)?;
        }
        w.write_all(bracket)
    }

    fn item<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if !first {
            w.write_all(&self.item)?;
        }
        self.new_line(w)
    }
}

impl Formatter for PythonFormatter {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"[")
    }

    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"]")
    }

    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.item(w, first)
    }

    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"{")
    }

    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"}")
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.item(w, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(&self.key)
    }

    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}
