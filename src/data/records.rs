//! The records of data files before their format is read: JSONL lines and Parquet rows as
//! JSON objects, each with where it came from for error messages.

use super::parquet::ParquetRecords;
use anyhow::{Context, Result};
use serde_json::Value;
use std::io::BufRead;
use std::path::Path;

/// One record: where it is (`file:line`, `file, row N`) and its object, or why the record
/// is not one (a malformed line, which `--skip-invalid` may skip).
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

impl FileKind {
    /// `.parquet` files are Parquet; any other file is read as JSON Lines.
    pub fn of(path: &Path) -> FileKind {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("parquet") => FileKind::Parquet,
            _ => FileKind::Jsonl,
        }
    }

    /// Whether a file of a data set's folder holds data of this kind (`.jsonl`, `.json`
    /// lines as `datasets` reads them, `.parquet`).
    pub fn holds_data(path: &Path) -> bool {
        path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
            ["parquet", "jsonl", "json"].contains(&e.to_ascii_lowercase().as_str())
        })
    }
}

/// The records of one file, in order. An unreadable file is an error here or from the
/// iterator (which then ends); a malformed record is a record holding its error.
pub fn records(path: &Path) -> Result<Box<dyn Iterator<Item = Result<RawRecord>>>> {
    match FileKind::of(path) {
        FileKind::Parquet => Ok(Box::new(ParquetRecords::open(path)?)),
        FileKind::Jsonl => jsonl_records(path),
    }
}

fn jsonl_records(path: &Path) -> Result<Box<dyn Iterator<Item = Result<RawRecord>>>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let name = path.display().to_string();
    // Lines as bytes: a line that is not UTF-8 is a malformed record of its own (named by its
    // line, skippable), not the end of the file.
    let lines = std::io::BufReader::new(file).split(b'\n').enumerate();
    Ok(Box::new(lines.filter_map(move |(i, line)| {
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
    })))
}
