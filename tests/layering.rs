//! The layering of docs/architecture.md §1, read off the sources: `ops` is a leaf (it uses
//! nothing of the model, the data, the losses, the step, training or the engine), and `data`
//! knows no backend (it may use the ops trait's plain types, never `ops::cpu` or `ops::cuda`).

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// Every line of the files under `src/{module}` that names one of `forbidden` as a path
/// (comments aside).
fn offending_lines(module: &str, forbidden: &[&str]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src")
        .join(module);
    let mut found = Vec::new();
    for file in rust_files(&root) {
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if forbidden.iter().any(|f| code.contains(f)) {
                found.push(format!("{}:{}: {}", file.display(), i + 1, line.trim()));
            }
        }
    }
    found
}

#[test]
fn ops_is_a_leaf() {
    let upward = [
        "crate::model",
        "crate::data",
        "crate::loss",
        "crate::step",
        "crate::train",
        "crate::engine",
        "crate::selftest",
        "crate::memory_plan",
    ];
    let found = offending_lines("ops", &upward);
    assert!(
        found.is_empty(),
        "ops uses modules above it:\n{}",
        found.join("\n")
    );
}

#[test]
fn data_knows_no_backend() {
    let found = offending_lines("data", &["ops::cpu", "ops::cuda"]);
    assert!(
        found.is_empty(),
        "data uses a backend:\n{}",
        found.join("\n")
    );
}
