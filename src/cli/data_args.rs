//! The data flags shared by every command that reads a data set.

use anyhow::{bail, Result};
use clap::Args;
use contralign::config::ModelConfig;
use contralign::data::load::{load_files, DataOptions};
use contralign::data::Group;
use contralign::hub::{data_files, is_single_file};
use contralign::tokenizer::strftime::DateTime;
use contralign::tokenizer::TextTokenizer;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Args, Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DataArgs {
    /// The data set: a JSONL file (one group per line), a Parquet file (one per row), a
    /// folder of shards, or a Hugging Face data set id (org/name[@revision]) found in the
    /// local Hugging Face cache (downloaded when missing). Formats, detected per record:
    /// reward groups {"prompt", "responses", "rewards"}, TRL pairs {"prompt", "chosen",
    /// "rejected"} (the prompt optional), UltraFeedback {"instruction", "completions"}, or
    /// their pre-tokenized forms (`prompt_ids`, `response_ids`, `chosen_ids`,
    /// `rejected_ids`). Text is plain or a conversation (a list of {"role", "content"})
    /// rendered with the model's chat template.
    #[arg(long, value_name = "FILE|DIR|ID")]
    pub data: PathBuf,
    /// The split of a data set id or folder (`load_dataset`'s split).
    #[arg(long, value_name = "NAME", default_value = "train")]
    pub split: String,
    /// The config (subset) of a data set id or folder, as its card's `configs:` name it
    /// (`load_dataset`'s name). Default: the card's default config.
    #[arg(long, value_name = "NAME")]
    pub data_config: Option<String>,
    /// Keep at most the last N prompt tokens.
    #[arg(long, value_name = "N", value_parser = crate::cli::passes::saved_count(0))]
    pub max_prompt_len: Option<usize>,
    /// At most N tokens of prompt + response (TRL's max_length); longer responses are cut
    /// and then have no EOS, and groups whose prompt leaves no room for a response are
    /// dropped, as TRL drops them.
    #[arg(long, value_name = "N", value_parser = crate::cli::passes::saved_count(0))]
    pub max_len: Option<usize>,
    /// The date (YYYY-MM-DD, at 00:00 UTC) that a chat template's `strftime_now` renders,
    /// where transformers renders the clock: a run's data then tokenizes the same on any day
    /// (train saves the date it used, so that a resume does; give a reference cache's to
    /// score its data alike). Default: today, UTC.
    #[arg(long, value_name = "YYYY-MM-DD", value_parser = template_date)]
    pub template_date: Option<String>,
    /// UltraFeedback's score: a completion's key or dotted path.
    #[arg(long, value_name = "FIELD", default_value = "overall_score")]
    pub score_field: String,
    /// Skip and count invalid records instead of stopping at the first: malformed lines,
    /// token ids outside the model's vocabulary, and (for a loss) groups of one response.
    #[arg(long)]
    pub skip_invalid: bool,
}

/// The tokenizer of a model directory, `None` when it has no tokenizer.json. A path that is
/// not a directory is an error first, so that it is not blamed on text needing a tokenizer;
/// so is a tokenizer.json that is there but is not a file.
pub fn model_tokenizer(model_dir: &Path) -> Result<Option<TextTokenizer>> {
    if !model_dir.is_dir() {
        let what = if model_dir.exists() {
            "not a directory"
        } else {
            "no such directory"
        };
        bail!("--model {}: {what}", model_dir.display());
    }
    // A dangling link (a Hub cache missing its blob) is there too.
    if model_dir.join("tokenizer.json").symlink_metadata().is_ok() {
        Ok(Some(TextTokenizer::load(model_dir)?))
    } else {
        Ok(None)
    }
}

/// A --template-date: checked as it is parsed, kept as its text (train.toml saves it).
fn template_date(text: &str) -> Result<String> {
    DateTime::parse_date(text)?;
    Ok(text.to_string())
}

impl DataArgs {
    /// Refuses `--split` (other than its default, `train`) and `--data-config` for a single
    /// file, which is read whole as the split `train` of no config: either flag would be
    /// ignored, as `datasets` refuses an unknown split of a file.
    pub fn refuse_flags_a_file_ignores(&self) -> Result<()> {
        if !is_single_file(&self.data) {
            return Ok(());
        }
        let data = self.data.display();
        if let Some(config) = &self.data_config {
            bail!(
                "--data-config {config}: --data {data} is a single file, which has no configs; \
                 --data-config picks a subset of a data set id or folder"
            );
        }
        if self.split != "train" {
            bail!(
                "--split {}: --data {data} is a single file, read whole as the split `train`; \
                 --split picks a split of a data set id or folder",
                self.split
            );
        }
        Ok(())
    }

    /// The groups of the data set, text tokenized with the tokenizer of `model_dir` (when it
    /// has one); what was skipped or truncated is reported on stderr.
    pub fn load(&self, model_dir: &Path) -> Result<Vec<Group>> {
        let tokenizer = self.tokenizer(model_dir)?;
        self.load_with(model_dir, tokenizer.as_ref(), false)
    }

    /// The groups of the data set with each prompt as tokenized alone, what generation
    /// continues (not TRL's training split of prompt and responses), and the tokenizer that
    /// tokenized them, which decodes what is generated.
    pub fn load_prompts_alone(
        &self,
        model_dir: &Path,
    ) -> Result<(Vec<Group>, Option<TextTokenizer>)> {
        let tokenizer = self.tokenizer(model_dir)?;
        let groups = self.load_with(model_dir, tokenizer.as_ref(), true)?;
        Ok((groups, tokenizer))
    }

    /// The tokenizer of `model_dir` (if it has one), its template dated by --template-date.
    fn tokenizer(&self, model_dir: &Path) -> Result<Option<TextTokenizer>> {
        let tokenizer = model_tokenizer(model_dir)?;
        match (&self.template_date, tokenizer) {
            (Some(date), Some(t)) => Ok(Some(t.with_template_date(DateTime::parse_date(date)?)?)),
            (_, tokenizer) => Ok(tokenizer),
        }
    }

    fn load_with(
        &self,
        model_dir: &Path,
        tokenizer: Option<&TextTokenizer>,
        prompt_alone: bool,
    ) -> Result<Vec<Group>> {
        let opts = DataOptions {
            max_prompt_len: self.max_prompt_len,
            max_len: self.max_len,
            score_field: self.score_field.clone(),
            skip_invalid: self.skip_invalid,
            // Ids the model cannot read make a record as invalid as a malformed line: an
            // error, or skipped, in its place in the file.
            vocab: Some(ModelConfig::load(model_dir)?.vocab_size),
            prompt_alone,
            model_dir: Some(model_dir.to_path_buf()),
        };
        let files = data_files(&self.data, self.data_config.as_deref(), &self.split)?;
        let data = load_files(&self.data.display().to_string(), &files, tokenizer, &opts)?;
        let s = &data.stats;
        if s.skipped > 0 {
            eprintln!(
                "{}: skipped {} invalid of {} records (the first: {})",
                self.data.display(),
                s.skipped,
                s.lines,
                s.first_skipped.as_deref().unwrap_or("?")
            );
        }
        if s.truncated_prompts + s.truncated_responses > 0 {
            eprintln!(
                "{}: truncated {} prompts (--max-prompt-len) and {} responses (--max-len)",
                self.data.display(),
                s.truncated_prompts,
                s.truncated_responses
            );
        }
        if s.dropped_long_prompts > 0 {
            eprintln!(
                "{}: dropped {} groups whose prompt leaves no room for a response within \
                 --max-len (as TRL's DPOTrainer drops them)",
                self.data.display(),
                s.dropped_long_prompts
            );
        }
        if s.shortened_prompts > 0 {
            eprintln!(
                "{}: {} prompts end in a token that merges with the start of their responses \
                 when tokenized together; as TRL does, their prompt is the common prefix of \
                 the tokenized prompt and prompt + response, shorter than the prompt alone",
                self.data.display(),
                s.shortened_prompts
            );
        }
        Ok(data.groups)
    }
}
