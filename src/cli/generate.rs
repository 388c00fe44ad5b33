use crate::cli::data_args::{model_tokenizer, DataArgs};
use crate::cli::stdout;
use anyhow::{Context, Result};
use clap::{ArgGroup, Args};
use contralign::config::ModelConfig;
use contralign::generate::{generate, Sampling};
use contralign::hub::checkpoint_files::how_to_get_tokenizer;
use contralign::model::Model;
use contralign::ops::cpu::CpuOps;
use contralign::tokenizer::{Message, TextTokenizer};
use std::path::{Path, PathBuf};

/// Generate a completion of a prompt, or of every prompt of a data set, on the CPU with a KV
/// cache: greedy by default, or sampled with --temperature and --top-p. Generation stops at an
/// EOS id of the model's config or after --max-new-tokens.
///
/// With --prompt, prints the completion's text (special tokens skipped), or with --json one
/// object {"prompt", "completion", "ids", "stopped_at_eos"} where "prompt" is the text the
/// model saw (the chat template rendered) and "ids" the new tokens, the EOS included.
///
/// With --data, prints one JSON line per group, in file order: {"group", "source", "ids",
/// "completion", "stopped_at_eos"}; "group" counts the groups generated for, "source" names
/// the record (`file:line`, or `file, row N` for Parquet), and "completion" is null when the
/// model directory has no tokenizer (pre-tokenized data). A text prompt is tokenized alone
/// (a conversation through the chat template with its generation prompt, plain text with the
/// tokenizer's special tokens), not split from the responses as training splits it.
#[derive(Args, Debug)]
#[command(
    allow_negative_numbers = true,
    group(ArgGroup::new("input").required(true).args(["prompt", "data"]))
)]
pub struct GenerateArgs {
    /// Hugging Face model directory (config.json + safetensors; tokenizer.json for text), or
    /// a Hub id (org/name[@revision]) from the local Hugging Face cache, downloaded when
    /// missing.
    #[arg(long, value_name = "DIR|ID", value_parser = crate::cli::model_arg::parse)]
    model: PathBuf,
    /// The prompt's text, tokenized with the model directory's tokenizer: a single user
    /// message in the chat template when the tokenizer has one, otherwise the text with the
    /// tokenizer's special tokens (BOS for Mistral).
    #[arg(long, value_name = "TEXT")]
    prompt: Option<String>,
    /// Generate for every group's prompt of a data set (any format `score` reads; text needs
    /// the model directory's tokenizer, pre-tokenized prompts do not).
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
    /// The split of a data set id or folder (`load_dataset`'s split).
    #[arg(
        long,
        value_name = "NAME",
        default_value = "train",
        conflicts_with = "prompt"
    )]
    split: String,
    /// The config (subset) of a data set id or folder, as its card's `configs:` name it.
    /// Default: the card's default config.
    #[arg(long, value_name = "NAME", conflicts_with = "prompt")]
    data_config: Option<String>,
    /// Keep at most the last N tokens of each data set prompt.
    #[arg(long, value_name = "N", conflicts_with = "prompt")]
    max_prompt_len: Option<usize>,
    /// UltraFeedback's score of a data set: a completion's key or dotted path.
    #[arg(
        long,
        value_name = "FIELD",
        default_value = "overall_score",
        conflicts_with = "prompt"
    )]
    score_field: String,
    /// Skip and count malformed data set lines instead of stopping at the first.
    #[arg(long, conflicts_with = "prompt")]
    skip_invalid: bool,
    /// Stop after N new tokens (an EOS stops sooner); 1 to 2^20.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1 << 20))]
    max_new_tokens: usize,
    /// Divide the logits by F before sampling; 0 is greedy (the highest logit, the lowest id
    /// among equal ones).
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    temperature: f64,
    /// Sample from the nucleus: the most probable tokens whose probability reaches F.
    #[arg(long, value_name = "F", default_value_t = 1.0)]
    top_p: f64,
    /// Seed of the sampling; prompt i draws from its own stream, whatever the others.
    #[arg(long, value_name = "N", default_value_t = 0)]
    seed: u64,
    /// Render --prompt with the chat template (an error when the tokenizer has none).
    #[arg(long, conflicts_with_all = ["data", "no_chat"])]
    chat: bool,
    /// Tokenize --prompt as plain text (with the tokenizer's BOS) even when the tokenizer has a chat
    /// template.
    #[arg(long, conflicts_with = "data")]
    no_chat: bool,
    /// Print --prompt's result as a JSON object instead of the completion's text.
    #[arg(long, conflicts_with = "data")]
    json: bool,
}

/// The prompt's text as the model sees it, and its tokens.
fn tokenize_prompt(
    tokenizer: &TextTokenizer,
    text: &str,
    args: &GenerateArgs,
) -> Result<(String, Vec<u32>)> {
    let chat = if args.chat {
        true
    } else {
        !args.no_chat && tokenizer.chat_template().is_some()
    };
    if chat {
        let message = Message {
            role: "user".to_string(),
            content: text.to_string(),
        };
        let rendered = tokenizer.render_chat(&[message], true)?;
        let ids = tokenizer.encode(&rendered)?;
        Ok((rendered, ids))
    } else {
        let ids = tokenizer.encode_with_special_tokens(text)?;
        Ok((text.to_string(), ids))
    }
}

/// A note when a sequence may reach past the positions the model was trained on
/// (config.json's `max_position_embeddings`): generation goes on, as transformers' does.
fn note_position_limit(cfg: &ModelConfig, longest: usize) {
    let limit = cfg.raw["max_position_embeddings"].as_u64();
    if let Some(limit) = limit.filter(|&l| longest as u64 > l) {
        eprintln!(
            "note: sequences of up to {longest} tokens (prompt + --max-new-tokens) pass the \
             model's max_position_embeddings of {limit}"
        );
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let sampling = Sampling {
        temperature: args.temperature,
        top_p: args.top_p,
        max_new_tokens: args.max_new_tokens,
        seed: args.seed,
    };
    sampling.check()?;
    if sampling.temperature == 0.0 && sampling.top_p < 1.0 {
        eprintln!("note: --top-p samples only with --temperature above 0; decoding is greedy");
    }
    match (&args.prompt, &args.data) {
        (Some(text), _) => run_prompt(&args, text, &sampling),
        (None, Some(data)) => run_data(&args, data, &sampling),
        (None, None) => unreachable!("clap requires --prompt or --data"),
    }
}

fn run_prompt(args: &GenerateArgs, text: &str, sampling: &Sampling) -> Result<()> {
    let tokenizer = model_tokenizer(&args.model)?.with_context(|| {
        format!(
            "--prompt needs a tokenizer, and {} has no tokenizer.json (--data takes \
             pre-tokenized prompts); {}",
            args.model.display(),
            how_to_get_tokenizer(&args.model)
        )
    })?;
    let (rendered, ids) = tokenize_prompt(&tokenizer, text, args)?;
    let model = Model::load(&CpuOps, &args.model)?;
    note_position_limit(&model.cfg, ids.len() + sampling.max_new_tokens);
    let g = generate(&model, &[ids], sampling)?.remove(0);
    let completion = tokenizer.decode(&g.ids)?;
    if args.json {
        let line = serde_json::json!({
            "prompt": rendered,
            "completion": completion,
            "ids": g.ids,
            "stopped_at_eos": g.stopped_at_eos,
        });
        stdout::line(line)
    } else {
        stdout::line(completion)
    }
}

fn run_data(args: &GenerateArgs, data: &Path, sampling: &Sampling) -> Result<()> {
    let data_args = DataArgs {
        data: data.to_path_buf(),
        split: args.split.clone(),
        data_config: args.data_config.clone(),
        max_prompt_len: args.max_prompt_len,
        max_len: None,
        score_field: args.score_field.clone(),
        template_date: None,
        skip_invalid: args.skip_invalid,
    };
    data_args.refuse_flags_a_file_ignores()?;
    let (groups, tokenizer) = data_args.load_prompts_alone(&args.model)?;
    let model = Model::load(&CpuOps, &args.model)?;
    let (prompts, sources): (Vec<Vec<u32>>, Vec<String>) =
        groups.into_iter().map(|g| (g.prompt, g.source)).unzip();
    let mut out = stdout::Lines::new();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    note_position_limit(&model.cfg, longest + sampling.max_new_tokens);
    let generated = generate(&model, &prompts, sampling)?;
    for (i, (g, source)) in generated.iter().zip(&sources).enumerate() {
        let completion = tokenizer.as_ref().map(|t| t.decode(&g.ids)).transpose()?;
        let line = serde_json::json!({
            "group": i,
            "source": source,
            "ids": g.ids,
            "completion": completion,
            "stopped_at_eos": g.stopped_at_eos,
        });
        out.line(line)?;
    }
    out.finish()
}
