//! `train`'s configuration files: `--config FILE.toml`, whose keys are the flags' long
//! names, and a run directory's saved `train.toml`, read back by `--resume`. Both become
//! flags placed before the command line's own, and the command line's win (clap's
//! `args_override_self`).

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The long flags of `T` that a file may set, with whether each takes a value.
fn file_keys<T: Args>() -> Vec<(String, bool)> {
    T::augment_args(clap::Command::new("train"))
        .get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?;
            let excluded = ["config", "resume", "help", "version"].contains(&long);
            (!excluded).then(|| (long.to_string(), a.get_action().takes_values()))
        })
        .collect()
}

/// The flags a TOML file stands for, in file order.
pub fn toml_to_args<T: Args>(path: &Path) -> Result<Vec<OsString>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: malformed TOML", path.display()))?;
    let keys = file_keys::<T>();
    let mut args = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        let Some((_, takes_value)) = keys.iter().find(|(k, _)| *k == flag) else {
            let mut names: Vec<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
            names.sort();
            bail!(
                "{}: unknown key `{key}`; the keys are the flags' names: {}",
                path.display(),
                names.join(", ")
            );
        };
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
    let mut expanded = Vec::new();
    if let Some(run) = &resume {
        let saved = run.join(saved_config);
        if !saved.is_file() {
            bail!(
                "--resume {}: no {saved_config} there; is it a run directory written by \
                 `contralign train`?",
                run.display()
            );
        }
        expanded.extend(toml_to_args::<T>(&saved)?);
        expanded.push("--out".into());
        expanded.push(run.clone().into_os_string());
    }
    if let Some(file) = &config {
        expanded.extend(toml_to_args::<T>(file).context("--config")?);
    }
    expanded.extend(args);
    Ok(expanded)
}

/// The TOML a run directory saves: every flag that has a value.
pub fn args_to_toml<T: Serialize>(args: &T) -> Result<String> {
    toml::to_string(args).context("serializing the run configuration")
}
