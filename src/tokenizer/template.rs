//! Chat templates (Jinja) rendered with minijinja in the environment transformers'
//! `apply_chat_template` gives them: blocks trimmed and left-stripped, loop controls,
//! Python string methods (`.strip()`, `.startswith()`, ...) and `raise_exception`.

use super::Message;
use anyhow::{anyhow, Result};
use minijinja::{context, Environment, Error, ErrorKind, Value};

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

    pub fn render(
        &self,
        messages: &[Message],
        bos_token: Option<&str>,
        eos_token: Option<&str>,
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
        // A missing token is undefined (renders as nothing), as it is for transformers.
        let token = |t: Option<&str>| t.map_or(Value::UNDEFINED, Value::from);
        template
            .render(context! {
                messages,
                bos_token => token(bos_token),
                eos_token => token(eos_token),
                add_generation_prompt,
            })
            .map_err(|e| anyhow!("{}: chat template: {e}", self.origin))
    }
}
