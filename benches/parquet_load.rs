//! Loading and tokenizing a Parquet file of `trl-lib/ultrafeedback_binarized`'s shape (50,000
//! rows by default, `CONTRALIGN_BENCH_ROWS` to change; row groups of 1,000 rows, snappy, as
//! `datasets` writes them) against its JSON Lines twin, through the Mistral tokenizer and
//! chat template: the time of each and their ratio; and the peak memory growth of streaming
//! the Parquet rows, bounded by a row group, against keeping every row.

#[path = "../tests/common/parquet_file.rs"]
mod parquet_file;

use contralign::data::load::{load_groups, DataOptions};
use contralign::data::parquet::ParquetRecords;
use contralign::tokenizer::TextTokenizer;
use parquet::basic::Compression;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::time::Instant;

/// A field of /proc/self/status in bytes: `VmRSS` (resident now), `VmHWM` (its peak).
fn memory(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// How much the resident memory peaks above its current level while `f` runs (Linux: the
/// peak is reset first through /proc/self/clear_refs).
fn peak_growth<T>(f: impl FnOnce() -> T) -> (T, u64) {
    std::fs::write("/proc/self/clear_refs", "5").expect("a Linux /proc to reset the peak");
    let before = memory("VmRSS");
    let out = f();
    (out, memory("VmHWM").saturating_sub(before))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() {
    let rows: usize = std::env::var("CONTRALIGN_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let words = [
        "the", "answer", "is", "a", "prime", "number", "between", "Paris", "capital", "of",
        "France", "because", "we", "can", "show", "that", "it", "holds", "for", "every",
    ];
    let mut sentence = |n: usize| -> String {
        (0..n)
            .map(|_| words[rng.gen_range(0..words.len())])
            .collect::<Vec<_>>()
            .join(" ")
    };
    let table: Vec<_> = (0..rows)
        .map(|_| {
            let prompt = (sentence(24), "user".to_string());
            let chosen = vec![prompt.clone(), (sentence(60), "assistant".to_string())];
            let rejected = vec![prompt, (sentence(60), "assistant".to_string())];
            (chosen, rejected, 8.0, 3.0)
        })
        .collect();
    let tmp = tempfile::TempDir::new().unwrap();
    let parquet = tmp.path().join("uf.parquet");
    let jsonl = tmp.path().join("uf.jsonl");
    parquet_file::write_ultrafeedback(&parquet, &table, 1000, Compression::SNAPPY);
    std::fs::write(&jsonl, parquet_file::ultrafeedback_jsonl(&table)).unwrap();
    drop(table);
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();

    let (streamed, growth) = peak_growth(|| ParquetRecords::open(&parquet).unwrap().count());
    assert_eq!(streamed, rows);
    let (kept, kept_growth) = peak_growth(|| {
        ParquetRecords::open(&parquet)
            .unwrap()
            .map(|r| r.unwrap().value.unwrap())
            .collect::<Vec<_>>()
    });
    assert_eq!(kept.len(), rows);
    drop(kept);

    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mistral-tokenizer");
    let tokenizer = TextTokenizer::load(&fixtures).unwrap();
    let time = |path: &Path| {
        let start = Instant::now();
        let data = load_groups(path, Some(&tokenizer), &DataOptions::default()).unwrap();
        (start.elapsed().as_secs_f64(), data.groups)
    };
    let (t_jsonl, from_jsonl) = time(&jsonl);
    let (t_parquet, from_parquet) = time(&parquet);
    assert_eq!(from_jsonl.len(), rows);
    assert!(from_jsonl
        .iter()
        .zip(&from_parquet)
        .all(|(a, b)| a.prompt == b.prompt && a.responses == b.responses));
    println!("{rows} rows of ultrafeedback_binarized's shape, loaded and tokenized (Mistral chat template):");
    println!("  JSONL    {:7.1} MiB  {t_jsonl:7.2} s", mib(size(&jsonl)));
    println!(
        "  Parquet  {:7.1} MiB  {t_parquet:7.2} s",
        mib(size(&parquet))
    );
    println!("  Parquet / JSONL time: {:.3}", t_parquet / t_jsonl);
    println!(
        "  peak memory growth reading every Parquet row: {:.1} MiB streamed (1,000-row groups), \
         {:.1} MiB keeping all rows",
        mib(growth),
        mib(kept_growth)
    );
}
