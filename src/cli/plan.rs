use crate::cli::precision_args::PrecisionArgs;
use crate::cli::size_arg::parse_size_in;
use crate::cli::stdout;
use anyhow::Result;
use clap::Args;
use contralign::config::ModelConfig;
use contralign::memory_plan::{
    human_bytes, MemoryPlan, PlanOptions, RecomputePolicy, ReferenceSource, StorageDtype,
};
use serde_json::json;
use std::path::PathBuf;

/// Print the memory plan of a training step on one device, and whether it fits.
///
/// A table of the bytes of weights, master weights, gradients, moments, reference weights,
/// kept activations, recompute workspace, logits chunk, cuBLAS workspace and batch data,
/// their total and whether it fits in --memory. The exit status is 1 when it does not, with
/// the flags that would make it fit. The device engine allocates exactly this plan, as one
/// arena of 256-byte aligned regions. No weights are read.
#[derive(Args, Debug)]
pub struct PlanArgs {
    /// A model directory or a config.json file.
    #[arg(long, value_name = "DIR|CONFIG.json")]
    model: PathBuf,
    /// Most packed tokens in one forward/backward (train's --micro-tokens).
    #[arg(long, value_name = "N", default_value_t = 8192, value_parser = crate::cli::passes::at_least_one())]
    micro_tokens: usize,
    #[command(flatten)]
    precision: PrecisionArgs,
    /// What the backward recomputes of each layer. Default: selective where it fits in
    /// memory (about 6N FLOPs per token), else full (8N).
    #[arg(
        long,
        value_enum,
        value_name = "POLICY",
        help_heading = "Precision and memory"
    )]
    recompute: Option<RecomputePolicy>,
    /// Where the reference statistics come from: cached (train --ref-logps), resident
    /// (train --ref-model: its weights on the device) or none (reference-free losses).
    #[arg(long, value_enum, default_value = "cached")]
    reference: ReferenceSource,
    /// Rows of one logits chunk (at most --micro-tokens: a larger value is cut to it).
    /// Default: the most (a multiple of 128, at most --micro-tokens) whose fp32 logits fit
    /// in 1 GiB.
    #[arg(long, value_name = "N")]
    logits_chunk_rows: Option<usize>,
    /// The device's memory: 80GB, 80 (GB), 79.5GiB, 85899345920B. Decimal GB, as
    /// transformers writes sizes; an "80 GB" H100 has 81559 MiB (85.5e9 bytes).
    #[arg(long, value_name = "SIZE", default_value = "80GB")]
    memory: String,
    /// One JSON object (every region with its offset) instead of the table.
    #[arg(long)]
    json: bool,
}

/// `--memory`: a bare number is in GB.
pub fn parse_memory(text: &str) -> Result<u64> {
    parse_size_in("--memory", text, 1e9)
}

/// `7,241,732,096`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn model_line(cfg: &ModelConfig) -> String {
    let family = match &cfg.moe {
        None => "Mistral".to_string(),
        Some(m) => format!(
            "Mixtral ({} experts, top-{})",
            m.num_experts, m.experts_per_token
        ),
    };
    format!(
        "{family}, {} layers, d {}, vocab {}",
        cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    )
}

fn table(args: &PlanArgs, plan: &MemoryPlan, memory: u64) -> Result<String> {
    let o = &plan.options;
    let total = plan.total();
    let recompute = match (args.recompute, o.recompute) {
        (Some(_), _) => String::new(),
        (None, RecomputePolicy::Selective) => " (the default where it fits)".into(),
        (None, _) => {
            let hint = plan.selective_hint(memory)?;
            let hint = hint.map(|h| format!("; {h}")).unwrap_or_default();
            format!(" (the default: selective does not fit{hint})")
        }
    };
    let mut out = format!(
        "model        {}: {}\nparameters   {}\nmicro-batch  {} tokens, logits chunk {} rows\n\
         precision    {}\nrecompute    {}{recompute}\nreference    {}\n\n",
        args.model.display(),
        model_line(&plan.cfg),
        grouped(plan.parameters() as u64),
        o.micro_tokens,
        plan.logits_chunk_rows,
        o.precision.describe(),
        o.recompute.name(),
        o.reference.name(),
    );
    let row = |label: &str, bytes: u64| {
        format!(
            "{label:<21} {:>10} {:>18} {:>6.1}%\n",
            human_bytes(bytes),
            grouped(bytes),
            100.0 * bytes as f64 / total as f64
        )
    };
    out += &format!(
        "{:<21} {:>10} {:>18} {:>7}\n",
        "category", "size", "bytes", "share"
    );
    for (category, bytes) in plan.categories() {
        out += &row(category.label(), bytes);
    }
    out += &row("total", total);
    let verdict = if total <= memory {
        format!("yes (free {})", human_bytes(memory - total))
    } else {
        format!("no ({} short)", human_bytes(total - memory))
    };
    out += &format!("\nfits in {}: {verdict}\n", human_bytes(memory));
    Ok(out)
}

fn json(args: &PlanArgs, plan: &MemoryPlan, memory: u64) -> serde_json::Value {
    let total = plan.total();
    json!({
        "model": args.model,
        "parameters": plan.parameters(),
        "options": plan.options,
        "recompute_default": args.recompute.is_none(),
        "logits_chunk_rows": plan.logits_chunk_rows,
        "categories": plan
            .categories()
            .iter()
            .map(|&(c, bytes)| (c.key().to_string(), json!(bytes)))
            .collect::<serde_json::Map<_, _>>(),
        "total": total,
        "memory": memory,
        "fits": total <= memory,
        "free": memory as i64 - total as i64,
        "regions": plan.regions,
    })
}

pub fn run(args: PlanArgs) -> Result<()> {
    let memory = parse_memory(&args.memory)?;
    let cfg = crate::cli::model_arg::local_config("--model", &args.model)?;
    let options = PlanOptions {
        micro_tokens: args.micro_tokens,
        precision: args.precision.options(StorageDtype::Bf16)?,
        recompute: args.recompute.unwrap_or(RecomputePolicy::Selective),
        reference: args.reference,
        logits_chunk_rows: args.logits_chunk_rows,
    };
    let plan = match args.recompute {
        Some(_) => MemoryPlan::new(&cfg, &options)?,
        None => MemoryPlan::with_default_recompute(&cfg, &options, memory)?,
    };
    if args.json {
        stdout::unless_unread(stdout::line(json(&args, &plan, memory)))?;
    } else {
        stdout::unless_unread(stdout::text(table(&args, &plan, memory)?))?;
    }
    // The exit status says whether it fits, whether or not anyone reads the table.
    plan.fits(memory)
}
