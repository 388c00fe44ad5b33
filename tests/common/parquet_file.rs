//! Parquet files written the way pyarrow (and so `datasets`) lays them out, for tests and
//! benches that need tables the fixtures do not hold: optional columns, three-level LIST
//! groups, `rows_per_group` rows per row group.
#![allow(dead_code)]

use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int32Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use std::path::Path;
use std::sync::Arc;

/// One column chunk's values with their definition and repetition levels.
#[derive(Default)]
pub struct Column<T> {
    pub values: Vec<T>,
    pub def: Vec<i16>,
    pub rep: Vec<i16>,
}

impl<T: Clone> Column<T> {
    /// A present optional scalar.
    pub fn push_scalar(&mut self, v: T) {
        self.values.push(v);
        self.def.push(1);
        self.rep.push(0);
    }

    /// An optional list of optional items (max def 3, max rep 1).
    pub fn push_list(&mut self, items: &[T]) {
        if items.is_empty() {
            self.def.push(1);
            self.rep.push(0);
        }
        for (i, v) in items.iter().enumerate() {
            self.values.push(v.clone());
            self.def.push(3);
            self.rep.push(i16::from(i > 0));
        }
    }

    /// A field of structs in an optional list of optional structs of optional fields
    /// (max def 4, max rep 1): `items` holds the field of each struct.
    pub fn push_struct_field(&mut self, items: &[T]) {
        for (i, v) in items.iter().enumerate() {
            self.values.push(v.clone());
            self.def.push(4);
            self.rep.push(i16::from(i > 0));
        }
    }

    /// An optional list of optional lists of optional items (max def 5, max rep 2); every
    /// inner list is non-empty.
    pub fn push_list_of_lists(&mut self, lists: &[Vec<T>]) {
        for (i, list) in lists.iter().enumerate() {
            for (j, v) in list.iter().enumerate() {
                self.values.push(v.clone());
                self.def.push(5);
                self.rep.push(if j > 0 { 2 } else { i16::from(i > 0) });
            }
        }
    }
}

/// A column chunk of any of the physical types these tables use.
pub enum Chunk {
    Int32(Column<i32>),
    Double(Column<f64>),
    Text(Column<ByteArray>),
}

/// Writes a table: `schema` in Parquet's message syntax, and for each row group its column
/// chunks in schema order (leaf columns).
pub fn write(path: &Path, schema: &str, compression: Compression, row_groups: Vec<Vec<Chunk>>) {
    let schema = Arc::new(parse_message_type(schema).expect("a valid schema"));
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(compression)
            .build(),
    );
    let file = std::fs::File::create(path).expect("a writable file");
    let mut writer = SerializedFileWriter::new(file, schema, props).expect("a writer");
    for chunks in row_groups {
        let mut group = writer.next_row_group().expect("a row group");
        for chunk in chunks {
            let mut col = group
                .next_column()
                .expect("a column")
                .expect("as many columns");
            match chunk {
                Chunk::Int32(c) => {
                    col.typed::<Int32Type>()
                        .write_batch(&c.values, Some(&c.def), Some(&c.rep))
                }
                Chunk::Double(c) => {
                    col.typed::<DoubleType>()
                        .write_batch(&c.values, Some(&c.def), Some(&c.rep))
                }
                Chunk::Text(c) => {
                    col.typed::<ByteArrayType>()
                        .write_batch(&c.values, Some(&c.def), Some(&c.rep))
                }
            }
            .expect("a column chunk");
            col.close().expect("a closed column");
        }
        group.close().expect("a closed row group");
    }
    writer.close().expect("a closed file");
}

/// A pre-tokenized reward group: prompt ids, each response's ids, rewards.
pub type TokenRow = (Vec<u32>, Vec<Vec<u32>>, Vec<f64>);

/// Pre-tokenized reward groups `prompt_ids`, `response_ids`, `rewards`, as pyarrow writes
/// lists of int32 and doubles.
pub fn write_pretokenized(path: &Path, rows: &[TokenRow], rows_per_group: usize) {
    let schema = "message schema {
        optional group prompt_ids (LIST) { repeated group list { optional int32 element; } }
        optional group response_ids (LIST) { repeated group list {
            optional group element (LIST) { repeated group list { optional int32 element; } } } }
        optional group rewards (LIST) { repeated group list { optional double element; } }
    }";
    let ids = |v: &[u32]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
    let groups = rows
        .chunks(rows_per_group)
        .map(|rows| {
            let (mut prompt, mut responses, mut rewards) =
                (Column::default(), Column::default(), Column::default());
            for (p, r, w) in rows {
                prompt.push_list(&ids(p));
                responses.push_list_of_lists(&r.iter().map(|r| ids(r)).collect::<Vec<_>>());
                rewards.push_list(w);
            }
            vec![
                Chunk::Int32(prompt),
                Chunk::Int32(responses),
                Chunk::Double(rewards),
            ]
        })
        .collect();
    write(path, schema, Compression::SNAPPY, groups);
}

/// A conversation message of [`write_ultrafeedback`]: content, role.
pub type Message = (String, String);

/// A row of `ultrafeedback_binarized`: chosen, rejected, score_chosen, score_rejected.
pub type PairRow = (Vec<Message>, Vec<Message>, f64, f64);

/// Rows of `trl-lib/ultrafeedback_binarized`'s shape: `chosen` and `rejected` lists of
/// `{content, role}` structs, `score_chosen` and `score_rejected` doubles.
pub fn write_ultrafeedback(
    path: &Path,
    rows: &[PairRow],
    rows_per_group: usize,
    compression: Compression,
) {
    let messages = |name: &str| {
        format!(
            "optional group {name} (LIST) {{ repeated group list {{ optional group element {{
                optional binary content (STRING); optional binary role (STRING); }} }} }}"
        )
    };
    let schema = format!(
        "message schema {{ {} {} optional double score_chosen; optional double score_rejected; }}",
        messages("chosen"),
        messages("rejected")
    );
    let text = |s: &String| ByteArray::from(s.as_str());
    let groups = rows
        .chunks(rows_per_group)
        .map(|rows| {
            let mut cols: [Column<ByteArray>; 4] = Default::default();
            let (mut sc, mut sr) = (Column::default(), Column::default());
            for (chosen, rejected, score_chosen, score_rejected) in rows {
                for (i, conv) in [chosen, rejected].into_iter().enumerate() {
                    let contents: Vec<_> = conv.iter().map(|(c, _)| text(c)).collect();
                    let roles: Vec<_> = conv.iter().map(|(_, r)| text(r)).collect();
                    cols[2 * i].push_struct_field(&contents);
                    cols[2 * i + 1].push_struct_field(&roles);
                }
                sc.push_scalar(*score_chosen);
                sr.push_scalar(*score_rejected);
            }
            let mut chunks: Vec<Chunk> = cols.into_iter().map(Chunk::Text).collect();
            chunks.extend([Chunk::Double(sc), Chunk::Double(sr)]);
            chunks
        })
        .collect();
    write(path, &schema, compression, groups);
}

/// The JSON Lines twin of [`write_ultrafeedback`]'s rows.
pub fn ultrafeedback_jsonl(rows: &[PairRow]) -> String {
    let conv = |m: &[Message]| -> serde_json::Value {
        m.iter()
            .map(|(content, role)| serde_json::json!({"content": content, "role": role}))
            .collect()
    };
    rows.iter()
        .map(|(c, r, sc, sr)| {
            serde_json::json!({"chosen": conv(c), "rejected": conv(r),
                "score_chosen": sc, "score_rejected": sr})
            .to_string()
                + "\n"
        })
        .collect()
}
