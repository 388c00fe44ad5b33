//! Subcommands of the `contralign` binary.

mod eval;
mod grads;
mod loss_args;
mod plot;
mod score;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "contralign",
    version,
    about = "Contrastive alignment (NCA, InfoNCA, DPO, SimPO, REFA) of Mistral and Mixtral \
             models",
    long_about = "Contrastive alignment of Mistral and Mixtral models.\n\nModels are Hugging \
                  Face checkpoint directories (config.json plus model.safetensors or a sharded \
                  model.safetensors.index.json, float32/bfloat16/float16). Data sets are JSONL, \
                  one group (a prompt with its rated responses) per line."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Score(score::ScoreArgs),
    Eval(Box<eval::EvalArgs>),
    Grads(Box<grads::GradsArgs>),
    Plot(plot::PlotArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Score(args) => score::run(args),
        Command::Eval(args) => eval::run(*args),
        Command::Grads(args) => grads::run(*args),
        Command::Plot(args) => plot::run(args),
    }
}
