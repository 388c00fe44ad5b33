//! The demo's inputs, made from nothing: the data sets as JSONL text, a word-level tokenizer
//! trained on them with the tokenizers crate, and a tiny Mistral initialized at random.

use super::task::{candidates, judge, prompt_text, random_list};
use crate::config::ModelConfig;
use anyhow::{anyhow, Context, Result};
use rand::Rng;
use serde_json::json;
use std::path::Path;
use tokenizers::models::wordlevel::{WordLevel, WordLevelTrainer};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// The probability of each candidate (best first) as an SFT target: mostly imperfect, so the
/// supervised model starts with room to improve.
const SFT_MIX: [f64; 4] = [0.3, 0.4, 0.3, 0.0];

/// Writes `lines` as JSONL.
fn write_jsonl(path: &Path, lines: &[serde_json::Value]) -> Result<()> {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    crate::fsutil::write_atomically(path, text.as_bytes())
}

/// The graded candidates of a list and the judge's scores of them.
fn judged(digits: &[u8], rng: &mut impl Rng) -> (Vec<String>, Vec<f64>) {
    let answers = candidates(digits, rng);
    let rewards = answers.iter().map(|a| judge(digits, a)).collect();
    (answers, rewards)
}

/// The demo's data sets in `dir`: `sft.jsonl` (one imperfect target per prompt, as a pair
/// whose first response is the target), `train.jsonl` (reward groups of K = 4 judged
/// candidates, like UltraFeedback), `train.binarized.jsonl` (best vs a random worse one, as
/// UltraFeedback-binarized) and `heldout.jsonl` (reward groups of unseen lists). Returns the
/// held-out lists.
pub fn write_data(
    dir: &Path,
    train: usize,
    heldout: usize,
    rng: &mut impl Rng,
) -> Result<Vec<Vec<u8>>> {
    let (mut sft, mut reward, mut binarized) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..train {
        let digits = random_list(rng);
        let prompt = prompt_text(&digits);
        let (answers, rewards) = judged(&digits, rng);
        let mut pick = rng.gen::<f64>();
        let target = SFT_MIX
            .iter()
            .position(|p| {
                pick -= p;
                pick < 0.0
            })
            .unwrap_or(0);
        let other = (target + 1 + rng.gen_range(0..3)) % 4;
        sft.push(json!({"prompt": prompt, "chosen": answers[target], "rejected": answers[other]}));
        let worse = rng.gen_range(1..4);
        binarized.push(json!({"prompt": prompt, "chosen": answers[0], "rejected": answers[worse]}));
        reward.push(json!({"prompt": prompt, "responses": answers, "rewards": rewards}));
    }
    let mut lists = Vec::new();
    let mut held = Vec::new();
    for _ in 0..heldout {
        let digits = random_list(rng);
        let (answers, rewards) = judged(&digits, rng);
        held.push(
            json!({"prompt": prompt_text(&digits), "responses": answers, "rewards": rewards}),
        );
        lists.push(digits);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_jsonl(&dir.join("sft.jsonl"), &sft)?;
    write_jsonl(&dir.join("train.jsonl"), &reward)?;
    write_jsonl(&dir.join("train.binarized.jsonl"), &binarized)?;
    write_jsonl(&dir.join("heldout.jsonl"), &held)?;
    Ok(lists)
}

/// Trains a word-level tokenizer on the task's words and writes `tokenizer.json` and
/// `tokenizer_config.json` into `dir`; `<unk>`, `<s>`, `</s>` are ids 0, 1, 2.
pub fn write_tokenizer(dir: &Path) -> Result<usize> {
    let words: Vec<String> = std::iter::once("sort :".to_string())
        .chain((0..10).map(|d| d.to_string()))
        .collect();
    let mut tokenizer = Tokenizer::new(
        WordLevel::builder()
            .unk_token("<unk>".to_string())
            .build()
            .map_err(|e| anyhow!("building the tokenizer: {e}"))?,
    );
    tokenizer.with_pre_tokenizer(Some(WhitespaceSplit));
    let special = ["<unk>", "<s>", "</s>"].map(|t| AddedToken::from(t, true));
    let mut trainer: TrainerWrapper = WordLevelTrainer::builder()
        .show_progress(false)
        .special_tokens(special.to_vec())
        .build()
        .map_err(|e| anyhow!("building the tokenizer trainer: {e}"))?
        .into();
    tokenizer
        .train(&mut trainer, words.iter())
        .map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    // BOS before every text, as Mistral's tokenizer.json adds it: `tokenizer(text)` in
    // transformers, and TRL's tokenization of plain text, then start with it.
    let bos = TemplateProcessing::builder()
        .try_single("<s> $A")
        .map_err(|e| anyhow!("building the tokenizer's post-processor: {e}"))?
        .special_tokens(vec![("<s>", 1)])
        .build()
        .map_err(|e| anyhow!("building the tokenizer's post-processor: {e}"))?;
    tokenizer.with_post_processor(Some(bos));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("tokenizer.json");
    tokenizer
        .save(&path, false)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let config = json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                        "tokenizer_class": "PreTrainedTokenizerFast"});
    crate::fsutil::write_atomically(
        &dir.join("tokenizer_config.json"),
        config.to_string().as_bytes(),
    )?;
    Ok(tokenizer.get_vocab_size(true))
}

/// A tiny Mistral for a vocabulary of `vocab` tokens, initialized as transformers does
/// (normal weights of std 0.02, unit norms), written into `dir` with the tokenizer files of
/// `tokenizer_dir`.
pub fn write_model(
    dir: &Path,
    tokenizer_dir: &Path,
    vocab: usize,
    rng: &mut impl Rng,
) -> Result<()> {
    let config = json!({
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "sliding_window": null,
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": 0.02,
        "torch_dtype": "float32"
    });
    let cfg = ModelConfig::from_json(config)?;
    crate::model::init::write_random_model(
        dir,
        &cfg,
        safetensors::Dtype::F32,
        usize::MAX,
        Some(tokenizer_dir),
        rng,
    )
}
