//! Which files of a data set repository hold a split, as `datasets.load_dataset` decides:
//! the card's YAML `configs:` (each with `data_files`, per split or for `train`, and/or a
//! `data_dir` they are found under), else `datasets`' default naming, first that which
//! matches: sharded files `data/{split}-00000-of-00002.parquet` (any split name), a split
//! keyword (`train`, `validation`/`valid`/`dev`/`val`, `test`/`eval`, ...) as a folder
//! (`test/0.jsonl`), a keyword in the file name (`my_train.jsonl`), else every data file as
//! `train`. Like `datasets` it ignores `README.md`, `config.json`, `dataset_info(s).json`
//! and `dataset_dict.json` unless a pattern names them.

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

/// Names `datasets` never reads as data unless a pattern names them
/// (`datasets.data_files.FILES_TO_IGNORE`).
const FILES_TO_IGNORE: [&str; 6] = [
    "README.md",
    "config.json",
    "dataset_info.json",
    "dataset_infos.json",
    "dummy_data.zip",
    "dataset_dict.json",
];

/// A split's file patterns, by split name.
type Splits = Vec<(String, Vec<String>)>;

/// A data set card (`README.md`): where it is, for messages, and its text.
pub struct Card {
    pub path: PathBuf,
    pub text: String,
}

/// One entry of a card's `configs:`, its files read only once it is the one chosen, so that
/// a config this contralign cannot read does not stand in the way of another.
struct CardConfig<'a> {
    index: usize,
    name: String,
    default: bool,
    yaml: &'a Yaml,
}

/// What a chosen config names: the folder its files are under (`""` for the repository's
/// root) and its splits' patterns there, or None for `datasets`' default naming.
struct ConfigFiles {
    data_dir: String,
    splits: Option<Splits>,
}

/// The YAML front matter of a card, if it has one.
fn front_matter(card: &Card) -> Result<Option<Yaml>> {
    let Some(front) = card
        .text
        .strip_prefix("---")
        .and_then(|rest| rest.split_once("\n---").map(|(yaml, _)| yaml))
    else {
        return Ok(None);
    };
    let docs = YamlLoader::load_from_str(front)
        .with_context(|| format!("{}: the YAML header is malformed", card.path.display()))?;
    Ok(docs.into_iter().next())
}

/// The `configs:` of a card's front matter, by name.
fn card_configs(front: &Yaml) -> Vec<CardConfig<'_>> {
    let Some(configs) = front["configs"].as_vec() else {
        return Vec::new();
    };
    configs
        .iter()
        .enumerate()
        .map(|(index, yaml)| CardConfig {
            index,
            name: yaml["config_name"]
                .as_str()
                .unwrap_or("default")
                .to_string(),
            default: yaml["default"].as_bool().unwrap_or(false),
            yaml,
        })
        .collect()
}

/// The files a chosen config names: `data_files` under `data_dir`, either of them optional.
fn config_files(card: &Card, config: &CardConfig) -> Result<ConfigFiles> {
    let what = || {
        format!(
            "{}: configs[{}] ({})",
            card.path.display(),
            config.index,
            config.name
        )
    };
    let data_dir = match &config.yaml["data_dir"] {
        Yaml::BadValue => String::new(),
        Yaml::String(dir) => dir.trim_matches('/').to_string(),
        _ => bail!("{}: data_dir: expected a folder of the repository", what()),
    };
    let splits = match &config.yaml["data_files"] {
        Yaml::BadValue => None,
        data_files => {
            Some(config_splits(data_files).with_context(|| format!("{}: data_files", what()))?)
        }
    };
    Ok(ConfigFiles { data_dir, splits })
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

/// The digits-and-`of` of a shard's name: `-00000-of-00002`.
fn is_shard_number(s: &[u8]) -> bool {
    s.len() == 15
        && s[0] == b'-'
        && s[1..6].iter().all(u8::is_ascii_digit)
        && &s[6..10] == b"-of-"
        && s[10..].iter().all(u8::is_ascii_digit)
}

/// The split of a file by `datasets`' `SPLIT_PATTERN_SHARDED`,
/// `data/{split}-[0-9]{5}-of-[0-9]{5}*.*`: the longest name before a shard number.
fn sharded_split(path: &str) -> Option<&str> {
    let name = path.strip_prefix("data/").filter(|n| !n.contains('/'))?;
    let bytes = name.as_bytes();
    (1..bytes.len().saturating_sub(15))
        .rev()
        .find(|&i| is_shard_number(&bytes[i..i + 15]) && name[i + 15..].contains('.'))
        .map(|i| &name[..i])
}

/// `datasets`' rule for a split name (`naming._split_re`, `^\w+(\.\w+)*$`).
fn valid_split_name(name: &str) -> bool {
    name.split('.')
        .all(|w| !w.is_empty() && w.chars().all(|c| c.is_alphanumeric() || c == '_'))
}

/// The splits of sharded files, `datasets`' first rule: `train`, `validation`, `test`
/// first, then the others in name order; None when no file is named so.
fn sharded_splits(files: &[&str]) -> Result<Option<Splits>> {
    let mut names: Vec<&str> = Vec::new();
    for file in files {
        let Some(name) = sharded_split(file) else {
            continue;
        };
        if !valid_split_name(name) {
            bail!("{file}: the split name `{name}` is not one `datasets` accepts (letters, digits and `_`, parts joined by `.`)");
        }
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let rank = |n: &str| SPLIT_KEYWORDS.iter().position(|(s, _)| *s == n);
    names.sort_by_key(|n| (rank(n).unwrap_or(SPLIT_KEYWORDS.len()), *n));
    Ok((!names.is_empty()).then(|| {
        names
            .iter()
            .map(|name| {
                let shards = files.iter().filter(|f| sharded_split(f) == Some(name));
                (name.to_string(), shards.map(|f| f.to_string()).collect())
            })
            .collect()
    }))
}

/// The words of a file or folder name between `datasets`' separators (`-._ ` and digits).
fn words(name: &str) -> impl Iterator<Item = &str> {
    name.split(|c: char| "-._ ".contains(c) || c.is_ascii_digit())
}

/// Whether a folder of the path is named by `keyword` (`test/`, `eval_set/`):
/// `datasets`' `KEYWORDS_IN_DIR_NAME_BASE_PATTERNS`.
fn keyword_in_dir_name(path: &str, keyword: &str) -> bool {
    let dirs = path.rsplit_once('/').map_or("", |(dirs, _)| dirs);
    dirs.split('/').any(|dir| words(dir).any(|w| w == keyword))
}

/// Whether the file's name holds `keyword` followed by a separator (`train.jsonl`,
/// `my-test-0.json`): `datasets`' `KEYWORDS_IN_FILENAME_BASE_PATTERNS`.
fn keyword_in_file_name(path: &str, keyword: &str) -> bool {
    let words: Vec<&str> = words(file_name(path)).collect();
    // The last word has no separator after it.
    words
        .split_last()
        .is_some_and(|(_, followed)| followed.contains(&keyword))
}

/// The default splits by one naming rule: each split's files that `names` matches.
fn keyword_splits(files: &[&str], names: fn(&str, &str) -> bool) -> Splits {
    SPLIT_KEYWORDS
        .iter()
        .map(|(split, keywords)| {
            let matching = files
                .iter()
                .filter(|f| keywords.iter().any(|k| names(f, k)))
                .map(|f| f.to_string());
            (split.to_string(), matching.collect::<Vec<_>>())
        })
        .filter(|(_, files)| !files.is_empty())
        .collect()
}

/// `datasets`' default splits of `files` (`get_data_patterns`): the first rule that names
/// a split wins: sharded names, then keywords in folder names, then in file names, else
/// every file is `train`.
fn default_splits(files: &[&str]) -> Result<Splits> {
    if let Some(splits) = sharded_splits(files)? {
        return Ok(splits);
    }
    for rule in [keyword_in_dir_name, keyword_in_file_name] {
        let splits = keyword_splits(files, rule);
        if !splits.is_empty() {
            return Ok(splits);
        }
    }
    let all: Vec<String> = files.iter().map(|f| f.to_string()).collect();
    Ok(if all.is_empty() {
        Vec::new()
    } else {
        vec![("train".to_string(), all)]
    })
}

/// ` under FOLDER/` for a config's `data_dir`, nothing for the repository's root.
fn under(base: &str) -> String {
    if base.is_empty() {
        String::new()
    } else {
        format!(" under {base}")
    }
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Whether `pattern` picks `file`: the same path or a glob of it; a name `datasets` ignores
/// only where the pattern names it.
fn picks(pattern: &str, file: &str) -> bool {
    let ignored =
        FILES_TO_IGNORE.contains(&file_name(file)) && file_name(pattern) != file_name(file);
    !ignored && (pattern == file || glob_match(pattern, file))
}

/// The config of `--data-config`, else the default one: marked `default: true`, else named
/// `default`, else the only one.
fn chosen_config<'a>(
    what: &str,
    configs: &'a [CardConfig<'a>],
    config: Option<&str>,
) -> Result<&'a CardConfig<'a>> {
    let names = || {
        configs
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match config {
        Some(c) => configs
            .iter()
            .find(|cfg| cfg.name == c)
            .with_context(|| format!("{what}: no config `{c}`; its configs: {}", names())),
        None => configs
            .iter()
            .find(|c| c.default)
            .or_else(|| configs.iter().find(|c| c.name == "default"))
            .or(if configs.len() == 1 {
                configs.first()
            } else {
                None
            })
            .with_context(|| {
                format!(
                    "{what} has several configs and none is the default; choose one with \
                     --data-config: {}",
                    names()
                )
            }),
    }
}

/// The files a config reads, as the folder they are under and its splits' patterns there:
/// the card's chosen config, or without configs the repository's default naming.
fn config_choice(card: Option<&Card>, config: Option<&str>, what: &str) -> Result<ConfigFiles> {
    let front = card.map(front_matter).transpose()?.flatten();
    let configs = front.as_ref().map(card_configs).unwrap_or_default();
    match card.filter(|_| !configs.is_empty()) {
        Some(card) => config_files(card, chosen_config(what, &configs, config)?),
        None => match config {
            Some(config) => bail!("{what}: no config `{config}`; its card names no configs"),
            None => Ok(ConfigFiles {
                data_dir: String::new(),
                splits: None,
            }),
        },
    }
}

/// The files of `split` among `files` (paths relative to the repository, `/`-separated), by
/// the card's configs or else the default naming; an unknown split or config is an error
/// listing those there are.
pub fn split_files(
    what: &str,
    card: Option<&Card>,
    files: &[String],
    config: Option<&str>,
    split: &str,
) -> Result<Vec<String>> {
    let ConfigFiles { data_dir, splits } = config_choice(card, config, what)?;
    let base = if data_dir.is_empty() {
        String::new()
    } else {
        format!("{data_dir}/")
    };
    // Paths below the config's folder, as its patterns name them.
    let data: Vec<&str> = files
        .iter()
        .filter_map(|f| f.strip_prefix(base.as_str()))
        .filter(|f| FileKind::holds_data(Path::new(f)))
        .collect();
    let splits = match splits {
        Some(splits) => splits,
        None => {
            let named: Vec<&str> = data
                .iter()
                .copied()
                .filter(|f| !FILES_TO_IGNORE.contains(&file_name(f)))
                .collect();
            default_splits(&named).with_context(|| what.to_string())?
        }
    };
    let Some((_, patterns)) = splits.iter().find(|(s, _)| s == split) else {
        let names: Vec<&str> = splits.iter().map(|(s, _)| s.as_str()).collect();
        if names.is_empty() {
            bail!(
                "{what}: no data files (.parquet, .jsonl, .json, .jsonl.gz, .json.gz){}",
                under(&base)
            );
        }
        bail!(
            "{what}: no split `{split}`; its splits: {}",
            names.join(", ")
        );
    };
    let mut chosen: Vec<String> = data
        .iter()
        .filter(|f| patterns.iter().any(|p| picks(p, f)))
        .map(|f| format!("{base}{f}"))
        .collect();
    chosen.sort();
    if chosen.is_empty() {
        bail!(
            "{what}: split `{split}` names {} but no data file{} matches",
            patterns.join(", "),
            under(&base)
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
    let card_path = dir.join("README.md");
    let card = std::fs::read_to_string(&card_path).ok().map(|text| Card {
        path: card_path,
        text,
    });
    let files = list_folder(dir)?;
    Ok(split_files(what, card.as_ref(), &files, config, split)?
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
        let path = dir.join("README.md");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the card {}", path.display()))?;
        Some(Card { path, text })
    } else {
        None
    };
    let files = split_files(&what, card.as_ref(), &listing.files, config, split)?;
    for f in &files {
        if !dir.join(f).is_file() {
            remote.fetch(f)?;
        }
    }
    Ok(files.iter().map(|f| dir.join(f)).collect())
}
