//! Parquet data files (tests/fixtures/parquet, written by pyarrow as `datasets` writes them)
//! give the groups of their JSONL twins token for token, through the Mistral tokenizer and
//! its chat template; folders of shards; and every bad input is an error naming the file,
//! row and column.

mod common;
#[path = "common/parquet_file.rs"]
mod parquet_file;

use common::fixture;
use contralign::data::load::{load_groups, DataOptions, Dataset};
use contralign::data::Group;
use contralign::tokenizer::TextTokenizer;
use parquet::basic::Compression;
use parquet::data_type::ByteArray;
use parquet_file::{Chunk, Column};
use rand::{Rng, SeedableRng};
use std::path::Path;
use tempfile::TempDir;

fn tokenizer() -> TextTokenizer {
    TextTokenizer::load(&fixture("mistral-tokenizer")).unwrap()
}

fn load(path: &Path, opts: &DataOptions) -> anyhow::Result<Dataset> {
    load_groups(path, Some(&tokenizer()), opts)
}

/// Groups without their sources, which name different files.
fn contents(groups: &[Group]) -> Vec<parquet_file::TokenRow> {
    groups
        .iter()
        .map(|g| (g.prompt.clone(), g.responses.clone(), g.rewards.clone()))
        .collect()
}

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.unwrap_err())
}

#[test]
fn every_fixture_equals_its_jsonl_twin() {
    let rows = [
        ("ultrafeedback_binarized", 12),
        ("pairs_plain", 12),
        ("reward_groups", 9),
        ("pretokenized", 7),
    ];
    for (name, n) in rows {
        let dir = fixture("parquet");
        let opts = DataOptions::default();
        let from_parquet = load(&dir.join(format!("{name}.parquet")), &opts).unwrap();
        let from_jsonl = load(&dir.join(format!("{name}.jsonl")), &opts).unwrap();
        assert_eq!(from_parquet.groups.len(), n, "{name}");
        assert_eq!(
            contents(&from_parquet.groups),
            contents(&from_jsonl.groups),
            "{name}"
        );
        assert_eq!(from_parquet.stats, from_jsonl.stats, "{name}");
        assert!(
            from_parquet.groups[n - 1]
                .source
                .ends_with(&format!("{name}.parquet, row {}", n - 1)),
            "{}",
            from_parquet.groups[n - 1].source
        );
        // Truncation applies to Parquet rows as to lines.
        let cut = DataOptions {
            max_prompt_len: Some(3),
            max_len: Some(4),
            ..DataOptions::default()
        };
        let (a, b) = (
            load(&dir.join(format!("{name}.parquet")), &cut).unwrap(),
            load(&dir.join(format!("{name}.jsonl")), &cut).unwrap(),
        );
        assert_eq!(contents(&a.groups), contents(&b.groups), "{name}");
        assert_eq!(a.stats, b.stats, "{name}");
        assert!(a.stats.truncated_responses > 0, "{name}");
    }
}

#[test]
fn a_null_field_names_the_row_and_the_column() {
    let path = fixture("parquet/bad_null_chosen.parquet");
    let text = err_text(load(&path, &DataOptions::default()));
    assert!(
        text.contains("bad_null_chosen.parquet, row 3") && text.contains("field `chosen` is null"),
        "{text}"
    );
    let skip = DataOptions {
        skip_invalid: true,
        ..DataOptions::default()
    };
    let data = load(&path, &skip).unwrap();
    assert_eq!(data.stats.skipped, 1);
    assert_eq!(data.stats.groups + 1, data.stats.lines);
    assert!(data
        .stats
        .first_skipped
        .unwrap()
        .contains("row 3: field `chosen` is null"));
    assert!(data.groups.iter().all(|g| !g.source.ends_with("row 3")));
}

#[test]
fn truncated_and_foreign_files_are_refused() {
    let tmp = TempDir::new().unwrap();
    let bytes = std::fs::read(fixture("parquet/reward_groups.parquet")).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
    for _ in 0..4 {
        let cut = rng.gen_range(1..bytes.len() - 1);
        let path = tmp.path().join("cut.parquet");
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let text = err_text(load(&path, &DataOptions::default()));
        assert!(
            text.contains("cut.parquet: not a readable Parquet file"),
            "cut at {cut}: {text}"
        );
    }
    let path = tmp.path().join("lines.parquet");
    std::fs::copy(fixture("parquet/pairs_plain.jsonl"), &path).unwrap();
    let text = err_text(load(&path, &DataOptions::default()));
    assert!(
        text.contains("lines.parquet: not a readable Parquet file"),
        "{text}"
    );
}

#[test]
fn a_table_of_other_columns_lists_them() {
    let tmp = TempDir::new().unwrap();
    let path = tmp.path().join("qa.parquet");
    let mut question = Column::<ByteArray>::default();
    let mut answer = Column::<ByteArray>::default();
    question.push_scalar("Why?".into());
    answer.push_scalar("Because.".into());
    parquet_file::write(
        &path,
        "message schema { optional binary question (STRING); optional binary answer (STRING); }",
        Compression::UNCOMPRESSED,
        vec![vec![Chunk::Text(question), Chunk::Text(answer)]],
    );
    let text = err_text(load(&path, &DataOptions::default()));
    assert!(
        text.contains(r#"the columns ["question", "answer"] fit no data format"#)
            && text.contains("(reward group)")
            && text.contains("(pre-tokenized)"),
        "{text}"
    );
}

/// One row of one text value per column.
fn text_columns(values: &[&str]) -> Vec<Chunk> {
    values
        .iter()
        .map(|&text| {
            let mut c = Column::<ByteArray>::default();
            c.push_scalar(text.into());
            Chunk::Text(c)
        })
        .collect()
}

/// A text column stored as plain binary (no STRING annotation, as pandas writes at times)
/// reads as its text, not as base64; a column named twice and a NaN are named.
#[test]
fn binary_text_columns_read_as_text_and_odd_tables_are_named() {
    let tmp = TempDir::new().unwrap();
    let pairs = |annotation: &str, name: &str| {
        let path = tmp.path().join(name);
        let columns = text_columns(&["Hi there", "a fine answer", "no"]);
        let schema = format!(
            "message schema {{ optional binary prompt{annotation}; \
             optional binary chosen{annotation}; optional binary rejected{annotation}; }}"
        );
        parquet_file::write(&path, &schema, Compression::UNCOMPRESSED, vec![columns]);
        path
    };
    let text = load(&pairs(" (STRING)", "text.parquet"), &DataOptions::default()).unwrap();
    let binary = load(&pairs("", "binary.parquet"), &DataOptions::default()).unwrap();
    assert_eq!(contents(&binary.groups), contents(&text.groups));

    let twice = tmp.path().join("twice.parquet");
    let columns = text_columns(&["Hi", "yes", "no"]);
    parquet_file::write(
        &twice,
        "message schema { optional binary prompt (STRING); optional binary chosen (STRING); \
         optional binary chosen (STRING); }",
        Compression::UNCOMPRESSED,
        vec![columns],
    );
    let text = err_text(load(&twice, &DataOptions::default()));
    assert!(text.contains("column `chosen` appears twice"), "{text}");

    let nan = tmp.path().join("nan.parquet");
    parquet_file::write_pretokenized(
        &nan,
        &[(vec![1, 5], vec![vec![7], vec![9]], vec![f64::NAN, 0.0])],
        1,
    );
    let text = err_text(load(&nan, &DataOptions::default()));
    assert!(
        text.contains("nan.parquet, row 0") && text.contains("NaN"),
        "{text}"
    );
}

/// Fresh random conversations in UltraFeedback's shape, written with each codec and awkward
/// row-group sizes, equal their JSON Lines twin.
#[test]
fn written_tables_equal_their_twins_under_every_codec() {
    let mut rng = common::rng("written_tables_equal_their_twins_under_every_codec");
    let words = [
        "Paris", "prime", "é", "京都", "the", "answer", "is", "7", "\n", "  ",
    ];
    let sentence = |rng: &mut rand::rngs::StdRng| -> String {
        let n = rng.gen_range(1..9);
        (0..n)
            .map(|_| words[rng.gen_range(0..words.len())])
            .collect::<Vec<_>>()
            .join(" ")
    };
    let message = |content: String, role: &str| (content, role.to_string());
    let rows: Vec<_> = (0..rng.gen_range(20..40))
        .map(|_| {
            let prompt = message(format!("Q: {}", sentence(&mut rng)), "user");
            let chosen = vec![prompt.clone(), message(sentence(&mut rng), "assistant")];
            let rejected = vec![prompt, message(sentence(&mut rng), "assistant")];
            let scores = (rng.gen_range(0.0..10.0), rng.gen_range(0.0..10.0));
            (chosen, rejected, scores.0, scores.1)
        })
        .collect();
    let tmp = TempDir::new().unwrap();
    let jsonl = tmp.path().join("uf.jsonl");
    std::fs::write(&jsonl, parquet_file::ultrafeedback_jsonl(&rows)).unwrap();
    let want = load(&jsonl, &DataOptions::default()).unwrap();
    let codecs = [
        Compression::SNAPPY,
        Compression::GZIP(Default::default()),
        Compression::ZSTD(Default::default()),
        Compression::UNCOMPRESSED,
    ];
    for (i, codec) in codecs.into_iter().enumerate() {
        let path = tmp.path().join(format!("uf{i}.parquet"));
        let per_group = rng.gen_range(1..rows.len());
        parquet_file::write_ultrafeedback(&path, &rows, per_group, codec);
        let got = load(&path, &DataOptions::default()).unwrap();
        assert_eq!(
            contents(&got.groups),
            contents(&want.groups),
            "{codec:?}, {per_group} rows per group"
        );
    }
}

#[test]
fn a_folder_of_shards_is_one_data_set_in_name_order() {
    let groups =
        contralign::data::pretokenized::read_file(&fixture("tiny-mistral.reward.jsonl")).unwrap();
    let rows: Vec<_> = groups
        .iter()
        .map(|g| (g.prompt.clone(), g.responses.clone(), g.rewards.clone()))
        .collect();
    let tmp = TempDir::new().unwrap();
    // Written out of order: the second shard first.
    parquet_file::write_pretokenized(
        &tmp.path().join("train-00001-of-00002.parquet"),
        &rows[2..],
        1,
    );
    parquet_file::write_pretokenized(
        &tmp.path().join("train-00000-of-00002.parquet"),
        &rows[..2],
        1,
    );
    std::fs::write(tmp.path().join("README.md"), "not data").unwrap();
    let data = load_groups(tmp.path(), None, &DataOptions::default()).unwrap();
    assert_eq!(contents(&data.groups), rows);
    assert!(data.groups[2]
        .source
        .ends_with("train-00001-of-00002.parquet, row 0"));
    let empty = TempDir::new().unwrap();
    let text = err_text(load_groups(empty.path(), None, &DataOptions::default()));
    assert!(
        text.contains("no data files (.parquet, .jsonl, .json, .jsonl.gz, .json.gz)"),
        "{text}"
    );
}
