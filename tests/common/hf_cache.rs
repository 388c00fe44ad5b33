//! Hugging Face caches built in a temporary folder in `huggingface_hub`'s layout:
//! `REPO/blobs/HASH` with the contents, `REPO/snapshots/COMMIT/PATH` relative symlinks to
//! them, `REPO/refs/main` the commit.

#![allow(dead_code)]
use std::path::{Path, PathBuf};

/// Adds a repository (`models--org--name` or `datasets--org--name`) at `commit` with `files`
/// (path in the repository, contents); `refs/main` points at the commit. Returns the
/// snapshot folder.
pub fn add_repo(cache: &Path, folder: &str, commit: &str, files: &[(String, Vec<u8>)]) -> PathBuf {
    let repo = cache.join(folder);
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    for (path, bytes) in files {
        let hash = blake3::hash(bytes).to_hex().to_string();
        std::fs::write(repo.join("blobs").join(&hash), bytes).unwrap();
        let link = snapshot.join(path);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let depth = path.matches('/').count() + 2;
        let target = "../".repeat(depth) + "blobs/" + &hash;
        std::os::unix::fs::symlink(target, &link).unwrap();
        assert!(link.is_file(), "{}", link.display());
    }
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    snapshot
}

/// Every file of a model directory, for [`add_repo`].
pub fn dir_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    files.sort();
    files
}
