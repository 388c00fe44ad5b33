//! Subcommands of the `contralign` binary.

mod bench;
mod config_file;
mod data_args;
mod demo;
mod device_args;
mod eval;
mod generate;
mod grads;
mod init;
mod loss_args;
mod model_arg;
mod passes;
mod plan;
mod plot;
mod precision_args;
mod precompute;
mod roofline_args;
mod score;
mod selftest;
mod size_arg;
mod stdout;
mod train;

/// The largest count or seed a run's flags take: `train.toml` saves integers as TOML's i64.
pub(crate) const SAVED_INT_MAX: u64 = i64::MAX as u64;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::ffi::OsString;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "contralign",
    version,
    about = "Contrastive alignment (NCA, InfoNCA, DPO, SimPO, REFA) of Mistral and Mixtral \
             models",
    long_about = "Contrastive alignment of Mistral and Mixtral models.\n\nModels are Hugging \
                  Face checkpoint directories (config.json plus model.safetensors or a sharded \
                  model.safetensors.index.json, float32/bfloat16/float16) or Hub ids found in \
                  the local Hugging Face cache. Data sets are JSONL (one group, a prompt with \
                  its rated responses, per line), Parquet (one per row), folders of shards or \
                  Hub data set ids."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Demo(demo::DemoArgs),
    Train(Box<train::TrainArgs>),
    Score(score::ScoreArgs),
    Eval(Box<eval::EvalArgs>),
    Grads(Box<grads::GradsArgs>),
    PrecomputeRef(precompute::PrecomputeArgs),
    Plan(Box<plan::PlanArgs>),
    Plot(plot::PlotArgs),
    Generate(Box<generate::GenerateArgs>),
    Init(Box<init::InitArgs>),
    Selftest(selftest::SelftestArgs),
    Bench(bench::BenchArgs),
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Train(args) => return train::run(*args),
        Command::Score(args) => score::run(args),
        Command::Eval(args) => eval::run(*args),
        Command::Grads(args) => grads::run(*args),
        Command::PrecomputeRef(args) => precompute::run(args),
        Command::Plan(args) => plan::run(*args),
        Command::Plot(args) => plot::run(args),
        Command::Generate(args) => generate::run(*args),
        Command::Init(args) => init::run(*args),
        Command::Selftest(args) => return selftest::run(args),
        Command::Bench(args) => bench::run(args),
    }?;
    Ok(ExitCode::SUCCESS)
}

/// `train`'s command line with its configuration files expanded into flags.
fn expand(mut argv: Vec<OsString>) -> Result<Vec<OsString>> {
    if argv.get(1).is_some_and(|a| a == "train") {
        let rest = argv.split_off(2);
        argv.extend(config_file::expand_train_args::<train::TrainArgs>(
            rest,
            contralign::train::run_dir::CONFIG,
        )?);
    }
    Ok(argv)
}

pub fn main() -> ExitCode {
    let result = expand(std::env::args_os().collect()).and_then(|argv| run(Cli::parse_from(argv)));
    match result {
        Ok(code) => code,
        // The reader of stdout went away (`| head`): what it wanted it has.
        Err(err) if stdout::is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
