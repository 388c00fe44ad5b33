//! `train`'s configuration files: `--config FILE.toml`, whose keys are the flags' long
//! names, and a run directory's saved `train.toml`, read back by `--resume`. Both become
//! flags placed before the command line's own, and the command line's win (clap's
//! `args_override_self`).

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The arguments of `T` that a file may set (by their long names).
fn file_keys<T: Args>() -> (clap::Command, Vec<clap::Arg>) {
    let command = T::augment_args(clap::Command::new("train"));
    let args = command
        .get_arguments()
        .filter(|a| {
            a.get_long()
                .is_some_and(|long| !["config", "resume", "help", "version"].contains(&long))
        })
        .cloned()
        .collect();
    (command, args)
}

/// `--flag=text` through the command's own parser (with `--resume`, so that nothing else is
/// required), so that a bad value is named with the file and key it came from rather than as
/// a command-line flag.
fn check_value(command: &clap::Command, flag: &str, text: &str) -> Result<(), String> {
    // A model's parser resolves a Hub id (a download when missing): left to the real parse,
    // whose message names the value already.
    if ["model", "ref-model"].contains(&flag) {
        return Ok(());
    }
    let argv = ["train", &format!("--{flag}={text}"), "--resume", "."];
    let command = command.clone().mut_args(|a| a.required(false));
    match command.try_get_matches_from(argv) {
        Ok(_) => Ok(()),
        Err(e) => {
            let message = e.to_string();
            let first = message.lines().next().unwrap_or_default();
            Err(first.trim_start_matches("error: ").to_string())
        }
    }
}

/// The value names of a flag that takes a path or a Hub id (`DIR|ID`), which a file gives as a
/// string: a number or a list there is a slip, not a directory named `5`.
fn path_value(arg: &clap::Arg) -> Option<String> {
    let names: Vec<&str> = arg.get_value_names()?.iter().map(|n| n.as_str()).collect();
    let names = names.join(" ");
    ["FILE", "DIR", "ID"]
        .iter()
        .any(|kind| names.split(['|', '_', ' ']).any(|part| part == *kind))
        .then_some(names)
}

/// The flags a TOML file stands for, in file order.
pub fn toml_to_args<T: Args>(path: &Path) -> Result<Vec<OsString>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: malformed TOML", path.display()))?;
    let (command, keys) = file_keys::<T>();
    let mut args = Vec::new();
    let mut seen: Vec<(String, String)> = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        let Some(arg) = keys.iter().find(|a| a.get_long() == Some(flag.as_str())) else {
            let mut names: Vec<&str> = keys.iter().filter_map(clap::Arg::get_long).collect();
            names.sort();
            bail!(
                "{}: unknown key `{key}`; the keys are the flags' names: {}",
                path.display(),
                names.join(", ")
            );
        };
        if let Some((first, _)) = seen.iter().find(|(_, f)| *f == flag) {
            bail!(
                "{}: keys `{first}` and `{key}` both set --{flag}; keep one",
                path.display()
            );
        }
        seen.push((key.clone(), flag.clone()));
        let takes_value = &arg.get_action().takes_values();
        if let Some(names) = path_value(arg).filter(|_| !value.is_str()) {
            bail!(
                "{}: key `{key}`: expected a string ({names}), found {value}",
                path.display()
            );
        }
        let text = match &value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) if !takes_value => {
                if *b {
                    args.push(OsString::from(format!("--{flag}")));
                }
                continue;
            }
            toml::Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            other => bail!(
                "{}: key `{key}`: expected a {}, found {other}",
                path.display(),
                if *takes_value {
                    "string or number"
                } else {
                    "boolean"
                }
            ),
        };
        if !takes_value {
            bail!(
                "{}: key `{key}` is a switch: write `{key} = true` or leave it out",
                path.display()
            );
        }
        check_value(&command, &flag, &text)
            .map_err(|e| anyhow::anyhow!("{}: key `{key}`: {e}", path.display()))?;
        args.push(OsString::from(format!("--{flag}")));
        args.push(OsString::from(text));
    }
    Ok(args)
}

/// The value of `--name X` or `--name=X` in `args`, removed from them when `remove`.
fn take_flag(args: &mut Vec<OsString>, name: &str, remove: bool) -> Result<Option<PathBuf>> {
    let long = format!("--{name}");
    let prefix = format!("--{name}=");
    let mut found = None;
    let mut i = 0;
    while i < args.len() {
        let a = args[i].to_string_lossy().to_string();
        if a == long {
            let v = args
                .get(i + 1)
                .with_context(|| format!("{long} needs a value"))?
                .clone();
            found = Some(PathBuf::from(v));
            if remove {
                args.drain(i..i + 2);
                continue;
            }
            i += 2;
        } else if let Some(v) = a.strip_prefix(&prefix) {
            found = Some(PathBuf::from(v));
            if remove {
                args.remove(i);
                continue;
            }
            i += 1;
        } else {
            i += 1;
        }
    }
    Ok(found)
}

/// Expands a `train` command line: the saved configuration of `--resume RUN_DIR` first (and
/// `--out RUN_DIR`), then `--config FILE`'s keys, then the flags given.
pub fn expand_train_args<T: Args>(
    mut args: Vec<OsString>,
    saved_config: &str,
) -> Result<Vec<OsString>> {
    let config = take_flag(&mut args, "config", true)?;
    let resume = take_flag(&mut args, "resume", false)?;
    // Each source's flags, the earliest first: what a later one sets wins.
    let mut layers: Vec<(String, Vec<OsString>)> = Vec::new();
    if let Some(run) = &resume {
        let saved = run.join(saved_config);
        if !saved.is_file() {
            bail!(
                "--resume {}: no {saved_config} there; is it a run directory written by \
                 `contralign train`?",
                run.display()
            );
        }
        let mut flags = toml_to_args::<T>(&saved)?;
        flags.push("--out".into());
        flags.push(run.clone().into_os_string());
        layers.push((saved.display().to_string(), flags));
    }
    if let Some(file) = &config {
        let flags = toml_to_args::<T>(file).context("--config")?;
        layers.push((file.display().to_string(), flags));
    }
    let sources: Vec<String> = layers.iter().map(|(source, _)| source.clone()).collect();
    layers.push(("the command line".into(), args));
    let expanded = drop_overridden_exclusives::<T>(layers);
    // `--help` needs nothing else: clap prints it whatever is missing.
    let wants_help = expanded.iter().any(|a| a == "--help" || a == "-h");
    if let Some(flag) =
        missing_required::<T>(&expanded).filter(|_| !sources.is_empty() && !wants_help)
    {
        bail!(
            "--{flag} is required and neither {} nor the command line sets it: add \
             `{flag} = ...` there or give --{flag}",
            sources.join(" nor ")
        );
    }
    Ok(expanded)
}

/// The flags of all `layers` (sources, the earliest first), less those of an earlier source
/// that a later one excludes: a run saved with `--epochs` resumed with `--steps`, or a
/// `--config` with `warmup-steps` given `--warmup-ratio`, takes the later choice, as a flag
/// given again replaces the earlier value (clap would refuse the two together).
fn drop_overridden_exclusives<T: Args>(layers: Vec<(String, Vec<OsString>)>) -> Vec<OsString> {
    let command = T::augment_args(clap::Command::new("train"));
    let exclusive = exclusive_pairs(&command);
    let mut expanded = Vec::new();
    for (i, (source, flags)) in layers.iter().enumerate() {
        let later: Vec<String> = layers[i + 1..]
            .iter()
            .flat_map(|(_, flags)| flag_names(flags))
            .collect();
        for (flag, tokens) in split_flags(&command, flags) {
            let winner = later
                .iter()
                .find(|l| exclusive.contains(&(flag.clone(), l.to_string())));
            match winner {
                Some(winner) => eprintln!("note: --{winner} replaces {flag} of {source}"),
                None => expanded.extend(tokens),
            }
        }
    }
    expanded
}

/// Every ordered pair of long names `(a, b)` that clap refuses together (`conflicts_with`,
/// declared on one side of the pair, holds both ways).
fn exclusive_pairs(command: &clap::Command) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    for arg in command.get_arguments() {
        for other in command.get_arg_conflicts_with(arg) {
            if let (Some(a), Some(b)) = (arg.get_long(), other.get_long()) {
                pairs.push((a.to_string(), b.to_string()));
                pairs.push((b.to_string(), a.to_string()));
            }
        }
    }
    pairs
}

/// The long names of the flags in `args` (`--flag`, `--flag=value`; values are skipped).
fn flag_names(args: &[OsString]) -> Vec<String> {
    args.iter()
        .filter_map(|a| {
            let a = a.to_string_lossy();
            let rest = a.strip_prefix("--")?;
            Some(rest.split('=').next().unwrap_or(rest).to_string())
        })
        .collect()
}

/// `args` cut into flags, each its long name and its tokens (`--flag value`, `--flag=value`
/// or a switch), as `toml_to_args` and a command line write them.
fn split_flags(command: &clap::Command, args: &[OsString]) -> Vec<(String, Vec<OsString>)> {
    let takes_value = |name: &str| {
        command
            .get_arguments()
            .find(|a| a.get_long() == Some(name))
            .is_some_and(|a| a.get_action().takes_values())
    };
    let mut flags = Vec::new();
    let mut tokens = args.iter();
    while let Some(token) = tokens.next() {
        let text = token.to_string_lossy();
        let Some(rest) = text.strip_prefix("--") else {
            flags.push((String::new(), vec![token.clone()]));
            continue;
        };
        let mut taken = vec![token.clone()];
        let name = match rest.split_once('=') {
            Some((name, _)) => name.to_string(),
            None => {
                if takes_value(rest) {
                    taken.extend(tokens.next().cloned());
                }
                rest.to_string()
            }
        };
        flags.push((name, taken));
    }
    flags
}

/// The first flag that `T` requires and `args` does not hold (as `--flag X` or `--flag=X`).
fn missing_required<T: Args>(args: &[OsString]) -> Option<String> {
    let command = T::augment_args(clap::Command::new("train"));
    let given = |long: &str| {
        args.iter().any(|a| {
            let a = a.to_string_lossy();
            a.strip_prefix("--")
                .is_some_and(|rest| rest == long || rest.starts_with(&format!("{long}=")))
        })
    };
    let required: Vec<String> = command
        .get_arguments()
        .filter(|a| a.is_required_set())
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect();
    required.into_iter().find(|long| !given(long))
}

/// The TOML a run directory saves: every flag that has a value.
pub fn args_to_toml<T: Serialize>(args: &T) -> Result<String> {
    toml::to_string(args).context("serializing the run configuration")
}
