//! Parquet data files, as Hugging Face `datasets` writes them (pyarrow): each row becomes the
//! JSON object its JSONL twin's line holds, so that one implementation ([`super::formats`])
//! reads every format from both. Rows are decoded one row group at a time, so memory is
//! bounded by the largest row group, not by the file.

use super::formats::{format_of, EXPECTED_FIELDS};
use super::records::RawRecord;
use anyhow::{bail, Context, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::reader::RowIter;
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
            self.rows.push_back(row.with_context(what)?.to_json_value());
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
