//! The records of data files before their format is read: JSONL lines, the items of a JSON
//! array and Parquet rows as JSON objects, each with where it came from for error messages.

use super::parquet::ParquetRecords;
use anyhow::{Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// One record: where it is (`file:line`, `file, item N`, `file, row N`) and its object, or
/// why the record is not one (a malformed line, which `--skip-invalid` may skip).
pub struct RawRecord {
    pub source: String,
    pub value: Result<Value>,
}

/// The file kinds a data set is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Parquet,
    Jsonl,
}

/// The UTF-8 byte order mark some editors write first; `datasets` skips it.
const BOM: &[u8] = b"\xef\xbb\xbf";

/// A file's extension, lower case, with a `.gz` taken off first (`train.jsonl.gz` is
/// `jsonl`), and whether it was gzip-compressed.
fn data_extension(path: &Path) -> (Option<String>, bool) {
    let lower = |p: &Path| {
        p.extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
    };
    match lower(path) {
        Some(gz) if gz == "gz" => (path.file_stem().and_then(|s| lower(Path::new(s))), true),
        extension => (extension, false),
    }
}

impl FileKind {
    /// `.parquet` files are Parquet; any other file is read as JSON Lines (or a JSON array).
    pub fn of(path: &Path) -> FileKind {
        match data_extension(path) {
            (Some(e), false) if e == "parquet" => FileKind::Parquet,
            _ => FileKind::Jsonl,
        }
    }

    /// Whether a file of a data set's folder holds data of this kind (`.jsonl`, `.json` as
    /// `datasets` reads them, either gzip-compressed, `.parquet`).
    pub fn holds_data(path: &Path) -> bool {
        match data_extension(path) {
            (Some(e), false) => ["parquet", "jsonl", "json"].contains(&e.as_str()),
            (Some(e), true) => ["jsonl", "json"].contains(&e.as_str()),
            (None, _) => false,
        }
    }
}

/// The records of one file, in order. An unreadable file is an error here or from the
/// iterator (which then ends); a malformed record is a record holding its error.
pub fn records(path: &Path) -> Result<Box<dyn Iterator<Item = Result<RawRecord>>>> {
    match FileKind::of(path) {
        FileKind::Parquet => Ok(Box::new(ParquetRecords::open(path)?)),
        FileKind::Jsonl => json_records(path),
    }
}

/// The text of a JSON file, gunzipped when it is `.gz`, past a leading byte order mark.
fn json_text(path: &Path) -> Result<Box<dyn BufRead>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut text: Box<dyn BufRead> = match data_extension(path) {
        (_, true) => Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(file))),
        (_, false) => Box::new(BufReader::new(file)),
    };
    let starts_with_bom = text
        .fill_buf()
        .with_context(|| format!("cannot read {}", path.display()))?
        .starts_with(BOM);
    if starts_with_bom {
        text.consume(BOM.len());
    }
    Ok(text)
}

/// A JSON file's records: the items of a top-level array in a `.json` file (`datasets`
/// reads a file that starts with `[` so), else its lines.
fn json_records(path: &Path) -> Result<Box<dyn Iterator<Item = Result<RawRecord>>>> {
    let mut text = json_text(path)?;
    let name = path.display().to_string();
    let is_json = data_extension(path).0.as_deref() == Some("json");
    let first = text
        .fill_buf()
        .with_context(|| format!("cannot read {name}"))?
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .copied();
    if is_json && first == Some(b'[') {
        return array_records(text, name);
    }
    Ok(line_records(text, name))
}

/// The items of a file holding one JSON array, each a record named by its index.
fn array_records(
    text: impl Read,
    name: String,
) -> Result<Box<dyn Iterator<Item = Result<RawRecord>>>> {
    let items: Vec<Value> = serde_json::from_reader(text).with_context(|| {
        format!("{name}: malformed JSON (a file that starts with `[` is one array of records)")
    })?;
    Ok(Box::new(items.into_iter().enumerate().map(
        move |(i, value)| {
            Ok(RawRecord {
                source: format!("{name}, item {i}"),
                value: Ok(value),
            })
        },
    )))
}

fn line_records(
    text: impl BufRead + 'static,
    name: String,
) -> Box<dyn Iterator<Item = Result<RawRecord>>> {
    // Lines as bytes: a line that is not UTF-8 is a malformed record of its own (named by its
    // line, skippable), not the end of the file.
    let lines = text.split(b'\n').enumerate();
    Box::new(lines.filter_map(move |(i, line)| {
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                return Some(Err(
                    anyhow::Error::new(e).context(format!("cannot read {name}"))
                ))
            }
        };
        let value = match String::from_utf8(line) {
            Ok(text) if text.trim().is_empty() => return None,
            Ok(text) => serde_json::from_str(&text).context("malformed JSON"),
            Err(e) => Err(anyhow::anyhow!(
                "not UTF-8 text (byte {} of the line)",
                e.utf8_error().valid_up_to()
            )),
        };
        Some(Ok(RawRecord {
            source: format!("{name}:{}", i + 1),
            value,
        }))
    }))
}
