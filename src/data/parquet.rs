//! Parquet data files, as Hugging Face `datasets` writes them (pyarrow): each row becomes the
//! JSON object its JSONL twin's line holds, so that one implementation ([`super::formats`])
//! reads every format from both. Rows are decoded one row group at a time, so memory is
//! bounded by the largest row group, not by the file.

use super::formats::{format_of, EXPECTED_FIELDS};
use super::records::RawRecord;
use anyhow::{bail, Context, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::reader::RowIter;
use parquet::record::{Field, Row};
use serde_json::Value;
use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};

/// The rows of one Parquet file, in order, each a record named `file, row N` (N counted from
/// 0 across row groups, as `datasets` indexes them).
pub struct ParquetRecords {
    path: PathBuf,
    reader: SerializedFileReader<File>,
    next_group: usize,
    next_row: usize,
    rows: VecDeque<Value>,
}

impl ParquetRecords {
    /// Opens the file and checks that its columns fit a data format: a truncated or
    /// non-Parquet file, or a table of other columns, fails here, before any row is read.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let reader = SerializedFileReader::new(file).with_context(|| {
            format!(
                "{}: not a readable Parquet file (truncated, or another format)",
                path.display()
            )
        })?;
        let columns: Vec<String> = reader
            .metadata()
            .file_metadata()
            .schema()
            .get_fields()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        if let Some(twice) = columns
            .iter()
            .enumerate()
            .find(|(i, c)| columns[..*i].contains(c))
        {
            bail!(
                "{}: column `{}` appears twice; a row's fields must have one value each",
                path.display(),
                twice.1
            );
        }
        if format_of(|k| columns.iter().any(|c| c == k)).is_none() {
            bail!(
                "{}: the columns {columns:?} fit no data format; expected {EXPECTED_FIELDS}",
                path.display()
            );
        }
        Ok(ParquetRecords {
            path: path.to_path_buf(),
            reader,
            next_group: 0,
            next_row: 0,
            rows: VecDeque::new(),
        })
    }

    /// Decodes the next row group into `rows`; false at the end of the file.
    fn read_row_group(&mut self) -> Result<bool> {
        if self.next_group >= self.reader.num_row_groups() {
            return Ok(false);
        }
        let what = || {
            format!(
                "{}: row group {} is unreadable",
                self.path.display(),
                self.next_group
            )
        };
        let group = self
            .reader
            .get_row_group(self.next_group)
            .with_context(what)?;
        for row in RowIter::from_row_group(None, group.as_ref()).with_context(what)? {
            self.rows.push_back(row_json(&row.with_context(what)?));
        }
        self.next_group += 1;
        Ok(true)
    }
}

impl Iterator for ParquetRecords {
    type Item = Result<RawRecord>;

    fn next(&mut self) -> Option<Result<RawRecord>> {
        while self.rows.is_empty() {
            match self.read_row_group() {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => return Some(Err(e)),
            }
        }
        let value = self.rows.pop_front()?;
        let source = format!("{}, row {}", self.path.display(), self.next_row);
        self.next_row += 1;
        Some(Ok(RawRecord {
            source,
            value: Ok(value),
        }))
    }
}

/// A row as JSON, as its JSONL twin's line holds it ([`field_json`]).
fn row_json(row: &Row) -> Value {
    Value::Object(
        row.get_column_iter()
            .map(|(name, field)| (name.clone(), field_json(field)))
            .collect(),
    )
}

/// A field as JSON, where the parquet crate's own conversion would mislead the formats'
/// checks: binary values holding UTF-8 text (pandas writes strings so at times) as strings,
/// other binary as null (the crate writes base64, which would read as text); decimals as
/// numbers (the crate writes strings); non-finite floats as their names ("NaN", "inf"; the
/// crate writes null), so that a message shows them.
fn field_json(field: &Field) -> Value {
    match field {
        Field::Bytes(b) => std::str::from_utf8(b.data())
            .map_or(Value::Null, |text| Value::String(text.to_string())),
        Field::Float(x) if !x.is_finite() => Value::String(x.to_string()),
        Field::Double(x) if !x.is_finite() => Value::String(x.to_string()),
        Field::Decimal(_) => {
            let text = field.to_json_value();
            let number = text.as_str().and_then(|t| t.parse::<f64>().ok());
            number
                .and_then(serde_json::Number::from_f64)
                .map_or(text, Value::Number)
        }
        Field::Group(row) => row_json(row),
        Field::ListInternal(list) => Value::Array(list.elements().iter().map(field_json).collect()),
        Field::MapInternal(map) => Value::Object(
            map.entries()
                .iter()
                .map(|(key, value)| {
                    let key = field_json(key);
                    let name = key.as_str().map_or_else(|| key.to_string(), str::to_string);
                    (name, field_json(value))
                })
                .collect(),
        ),
        other => other.to_json_value(),
    }
}
