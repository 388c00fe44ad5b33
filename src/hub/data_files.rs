//! Which files of a data set repository hold a split, as `datasets.load_dataset` decides:
//! the card's YAML `configs:` (each with `data_files`, per split or for `train`), else
//! `datasets`' default naming — a split keyword (`train`, `validation`/`valid`/`dev`/`val`,
//! `test`/`eval`, ...) as a folder or a delimited part of the file name
//! (`data/train-00000-of-00002.parquet`, `test/0.jsonl`), else every data file as `train`.

use super::cache::{commit_dir, incomplete_snapshot, snapshot_dir};
use super::download::Remote;
use super::env::HubEnv;
use super::repo::RepoId;
use crate::data::records::FileKind;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use yaml_rust2::{Yaml, YamlLoader};

/// `datasets`' split keywords (`datasets.data_files.SPLIT_KEYWORDS`), in its order.
const SPLIT_KEYWORDS: [(&str, &[&str]); 3] = [
    ("train", &["train", "training"]),
    ("validation", &["validation", "valid", "dev", "val"]),
    ("test", &["test", "testing", "eval", "evaluation"]),
];

/// A split's file patterns, by split name.
type Splits = Vec<(String, Vec<String>)>;

/// The `configs:` of a card's YAML front matter: (name, whether default, splits).
fn card_configs(card: &str) -> Result<Vec<(String, bool, Splits)>> {
    let Some(front) = card
        .strip_prefix("---")
        .and_then(|rest| rest.split_once("\n---").map(|(yaml, _)| yaml))
    else {
        return Ok(Vec::new());
    };
    let docs = YamlLoader::load_from_str(front).context("the card's YAML header is malformed")?;
    let Some(configs) = docs.first().and_then(|d| d["configs"].as_vec()) else {
        return Ok(Vec::new());
    };
    configs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let name = c["config_name"].as_str().unwrap_or("default").to_string();
            let default = c["default"].as_bool().unwrap_or(false);
            let splits = config_splits(&c["data_files"])
                .with_context(|| format!("the card's configs[{i}] ({name}): data_files"))?;
            Ok((name, default, splits))
        })
        .collect()
}

fn patterns(value: &Yaml) -> Result<Vec<String>> {
    match value {
        Yaml::String(s) => Ok(vec![s.clone()]),
        Yaml::Array(items) => items
            .iter()
            .map(|p| {
                p.as_str()
                    .map(str::to_string)
                    .context("expected a path pattern")
            })
            .collect(),
        _ => bail!("expected a path pattern or a list of them"),
    }
}

/// `data_files` as `datasets` accepts it: patterns (the `train` split), a list of
/// `{split, path}`, or a mapping from split to patterns.
fn config_splits(data_files: &Yaml) -> Result<Splits> {
    match data_files {
        Yaml::Array(items) if items.iter().all(|i| i.as_hash().is_some()) => items
            .iter()
            .map(|i| {
                let split = i["split"].as_str().unwrap_or("train").to_string();
                Ok((split, patterns(&i["path"]).context("field path")?))
            })
            .collect(),
        Yaml::Hash(map) => map
            .iter()
            .map(|(k, v)| {
                let split = k.as_str().context("expected split names as keys")?;
                Ok((split.to_string(), patterns(v)?))
            })
            .collect(),
        other => Ok(vec![("train".to_string(), patterns(other)?)]),
    }
}

/// fsspec's glob as `datasets` uses it: `*` and `?` within a path part, `**` across parts.
fn glob_match(pattern: &str, path: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match p {
            [] => s.is_empty(),
            [b'*', b'*', rest @ ..] => {
                let rest = rest.strip_prefix(b"/").unwrap_or(rest);
                (0..=s.len()).any(|i| go(rest, &s[i..]))
            }
            [b'*', rest @ ..] => (0..=s.len())
                .take_while(|&i| i == 0 || s[i - 1] != b'/')
                .any(|i| go(rest, &s[i..])),
            [b'?', rest @ ..] => s.first().is_some_and(|&c| c != b'/') && go(rest, &s[1..]),
            [c, rest @ ..] => s.first() == Some(c) && go(rest, &s[1..]),
        }
    }
    go(pattern.as_bytes(), path.as_bytes())
}

/// The split of a file by `datasets`' default naming: a keyword delimited by `-._ `, digits,
/// or `/` anywhere in its path.
fn default_split(path: &str) -> Option<&'static str> {
    let parts: Vec<&str> = path
        .split(|c: char| "-._ /".contains(c) || c.is_ascii_digit())
        .collect();
    SPLIT_KEYWORDS
        .iter()
        .find(|(_, words)| words.iter().any(|w| parts.contains(w)))
        .map(|(split, _)| *split)
}

/// The files of `split` among `files` (paths relative to the repository, `/`-separated), by
/// the card's configs or else the default naming; an unknown split or config is an error
/// listing those there are.
pub fn split_files(
    what: &str,
    card: Option<&str>,
    files: &[String],
    config: Option<&str>,
    split: &str,
) -> Result<Vec<String>> {
    let data: Vec<&String> = files
        .iter()
        .filter(|f| FileKind::holds_data(Path::new(f.as_str())))
        .collect();
    let configs = card.map(card_configs).transpose()?.unwrap_or_default();
    let splits: Splits = if configs.is_empty() {
        if let Some(config) = config {
            bail!("{what}: no config `{config}`; its card names no configs");
        }
        let mut splits: Splits = Vec::new();
        let any_named = data.iter().any(|f| default_split(f).is_some());
        for f in &data {
            let name = if any_named {
                default_split(f)
            } else {
                Some("train")
            };
            if let Some(name) = name {
                match splits.iter_mut().find(|(s, _)| s == name) {
                    Some((_, fs)) => fs.push(f.to_string()),
                    None => splits.push((name.to_string(), vec![f.to_string()])),
                }
            }
        }
        splits
    } else {
        let names: Vec<&str> = configs.iter().map(|(n, _, _)| n.as_str()).collect();
        let chosen = match config {
            Some(c) => configs.iter().find(|(n, _, _)| n == c).with_context(|| {
                format!("{what}: no config `{c}`; its configs: {}", names.join(", "))
            })?,
            None => configs
                .iter()
                .find(|(_, default, _)| *default)
                .or_else(|| configs.iter().find(|(n, _, _)| n == "default"))
                .or(if configs.len() == 1 {
                    configs.first()
                } else {
                    None
                })
                .with_context(|| {
                    format!(
                        "{what} has several configs and none is the default; choose one with \
                         --data-config: {}",
                        names.join(", ")
                    )
                })?,
        };
        chosen.2.clone()
    };
    let Some((_, patterns)) = splits.iter().find(|(s, _)| s == split) else {
        let names: Vec<&str> = splits.iter().map(|(s, _)| s.as_str()).collect();
        if names.is_empty() {
            bail!("{what}: no data files (.parquet, .jsonl, .json)");
        }
        bail!(
            "{what}: no split `{split}`; its splits: {}",
            names.join(", ")
        );
    };
    let mut chosen: Vec<String> = data
        .iter()
        .filter(|f| patterns.iter().any(|p| *p == ***f || glob_match(p, f)))
        .map(|f| f.to_string())
        .collect();
    chosen.sort();
    if chosen.is_empty() {
        bail!(
            "{what}: split `{split}` names {} but no data file matches",
            patterns.join(", ")
        );
    }
    Ok(chosen)
}

/// Every file below `dir`, relative and `/`-separated (symlinks followed, as a snapshot's
/// files are symlinks into its blobs; a dangling one is listed, to be found missing).
pub fn list_folder(dir: &Path) -> Result<Vec<String>> {
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<()> {
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let rel = format!("{prefix}{name}");
            if entry.path().is_dir() {
                walk(&entry.path(), &format!("{rel}/"), out)?;
            } else {
                out.push(rel);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out)?;
    out.sort();
    Ok(out)
}

/// The files of a split in a local folder laid out as a data set repository (a snapshot,
/// or `hf download --local-dir`): its card `README.md` if any, then the naming rules.
pub fn folder_split(
    what: &str,
    dir: &Path,
    config: Option<&str>,
    split: &str,
) -> Result<Vec<PathBuf>> {
    let card = std::fs::read_to_string(dir.join("README.md")).ok();
    let files = list_folder(dir)?;
    Ok(split_files(what, card.as_deref(), &files, config, split)?
        .into_iter()
        .map(|f| dir.join(f))
        .collect())
}

/// The files of a data set id's split: from its cached snapshot, else downloaded (the card
/// first, then the split's files).
pub fn dataset_files(
    id: &RepoId,
    env: &HubEnv,
    config: Option<&str>,
    split: &str,
) -> Result<Vec<PathBuf>> {
    let what = format!("data set {id}");
    if let Some(dir) = snapshot_dir(env, id) {
        match folder_split(&what, &dir, config, split) {
            Ok(files) => {
                let missing: Vec<String> = files
                    .iter()
                    .filter(|f| !f.is_file())
                    .filter_map(|f| Some(f.strip_prefix(&dir).ok()?.display().to_string()))
                    .collect();
                if missing.is_empty() {
                    return Ok(files);
                }
                if env.offline {
                    return Err(incomplete_snapshot(id, &dir, &missing));
                }
            }
            Err(e) if env.offline => return Err(e),
            Err(_) => {}
        }
    }
    let remote = Remote::connect(env, id)?;
    let listing = remote.list()?;
    let dir = commit_dir(env, id, &listing.commit);
    let card = if listing.files.iter().any(|f| f == "README.md") {
        if !dir.join("README.md").is_file() {
            remote.fetch("README.md")?;
        }
        Some(std::fs::read_to_string(dir.join("README.md")).context("cannot read the card")?)
    } else {
        None
    };
    let files = split_files(&what, card.as_deref(), &listing.files, config, split)?;
    for f in &files {
        if !dir.join(f).is_file() {
            remote.fetch(f)?;
        }
    }
    Ok(files.iter().map(|f| dir.join(f)).collect())
}
