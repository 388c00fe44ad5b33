//! Atomic writes: every output is written to a temporary name beside its destination and
//! renamed into place, so a crash or Ctrl-C never leaves a half-written file or directory.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// A temporary name beside `path`, unique to this process.
pub fn temp_path(path: &Path) -> PathBuf {
    beside(path, "tmp")
}

/// Where `write_dir_atomically` keeps the directory it replaces until the new one is in place.
fn old_path(path: &Path) -> PathBuf {
    beside(path, "old")
}

fn beside(path: &Path, kind: &str) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.{kind}-{}", std::process::id()))
}

/// The name that a file name made by [`temp_path`] or [`old_path`] (by any process) stands
/// for: `.NAME.tmp-PID` or `.NAME.old-PID` gives `NAME`.
pub fn leftover_of(file_name: &str) -> Option<&str> {
    let rest = file_name.strip_prefix('.')?;
    let (name, pid) = rest.rsplit_once('-')?;
    let name = name
        .strip_suffix(".tmp")
        .or_else(|| name.strip_suffix(".old"))?;
    let is_pid = !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
    (is_pid && !name.is_empty()).then_some(name)
}

/// Why `path` cannot be read as a file, for a message: "no such file", "not a file", or a
/// link whose target is missing (a Hub cache without its blob).
pub fn not_a_file(path: &Path) -> String {
    match std::fs::read_link(path) {
        Ok(target) if !path.exists() => {
            format!("a link to {}, which does not exist", target.display())
        }
        _ if path.exists() => "not a file".to_string(),
        _ => "no such file".to_string(),
    }
}

pub fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to)
        .with_context(|| format!("cannot move {} to {}", from.display(), to.display()))
}

/// A JSON file that must hold an object (config.json, tokenizer_config.json).
pub fn read_json_object(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a JSON file (byte {} is not UTF-8 text)",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: malformed JSON", path.display()))?;
    if !value.is_object() {
        bail!("{}: expected a JSON object", path.display());
    }
    Ok(value)
}

/// Hard-links `from` at `to`, or copies it where the filesystem has no hard links (or
/// `to` is on another one).
pub fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to)
        .map(|_| ())
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically_with(path, |tmp| {
        std::fs::write(tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))
    })
}

/// Builds the file `path` atomically: `write` writes a temporary file (removed if it fails),
/// which then replaces `path`.
pub fn write_atomically_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_path(path);
    let flushed = |tmp: &Path| {
        std::fs::File::open(tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot flush {} to the disk", tmp.display()))
    };
    if let Err(e) = write(&tmp)
        .and_then(|()| flushed(&tmp))
        .and_then(|()| rename(&tmp, path))
    {
        std::fs::remove_file(&tmp).ok();
        return Err(e);
    }
    sync_parent(path);
    Ok(())
}

/// Builds the directory `path` atomically: `fill` writes into a fresh temporary directory,
/// which then replaces `path` (an existing `path` is removed only once the new one is
/// complete).
pub fn write_dir_atomically(path: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_path(path);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    if let Err(e) = fill(&tmp).and_then(|()| sync_dir_and_files(&tmp)) {
        std::fs::remove_dir_all(&tmp).ok();
        return Err(e);
    }
    // A move that fails leaves nothing of the new directory, and what was there in place
    // (or, if even that move back fails, says where it is).
    let give_up = |e: anyhow::Error| {
        std::fs::remove_dir_all(&tmp).ok();
        Err(e)
    };
    if path.exists() {
        let old = old_path(path);
        if let Err(e) = rename(path, &old) {
            return give_up(e);
        }
        if let Err(e) = rename(&tmp, path) {
            if let Err(restore) = rename(&old, path) {
                // Nothing is lost, but the previous directory is under another name.
                return give_up(e.context(format!(
                    "and the previous {} could not be put back: it is at {} ({restore:#})",
                    path.display(),
                    old.display()
                )));
            }
            return give_up(e);
        }
        std::fs::remove_dir_all(&old)
            .with_context(|| format!("cannot remove {}", old.display()))?;
    } else if let Err(e) = rename(&tmp, path) {
        return give_up(e);
    }
    sync_parent(path);
    Ok(())
}

/// Flushes the directory that holds `path`: a rename reaches the disk with its parent.
fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent);
    }
}

/// Flushes every file directly in `dir`, and `dir` itself, to the disk: a directory renamed
/// into place after a crash holds what it held before it (the caller may then delete the
/// previous one, as checkpoints do).
fn sync_dir_and_files(dir: &Path) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot read {}", dir.display()))?
            .path();
        if path.is_file() {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("cannot flush {} to the disk", path.display()))?;
        }
    }
    sync_dir(dir);
    Ok(())
}

/// Flushes a directory's entries, where the filesystem allows it (some refuse to sync a
/// directory; the files in it are synced either way).
fn sync_dir(dir: &Path) {
    if let Ok(handle) = std::fs::File::open(dir) {
        handle.sync_all().ok();
    }
}

/// Fails early, before any work, when files cannot be created in directory `dir` (which is
/// created if missing).
pub fn check_writable_dir(dir: &Path, flag: &str) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("{flag} {}: exists and is not a directory", dir.display());
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{flag} {}: cannot create the directory", dir.display()))?;
    let probe = temp_path(&dir.join("write-probe"));
    std::fs::write(&probe, b"")
        .with_context(|| format!("{flag} {}: cannot write there", dir.display()))?;
    std::fs::remove_file(&probe).ok();
    Ok(())
}

/// Fails early, before any work, when the file `path` cannot be written: it must not be a
/// directory, and its directory must exist and take new files.
pub fn check_writable_file(path: &Path, flag: &str) -> Result<()> {
    if path.is_dir() || path.as_os_str().to_string_lossy().ends_with('/') {
        bail!(
            "{flag} {}: is a directory; give a file path",
            path.display()
        );
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if parent.exists() && !parent.is_dir() {
        bail!(
            "{flag} {}: {} is not a directory",
            path.display(),
            parent.display()
        );
    }
    if !parent.is_dir() {
        bail!(
            "{flag} {}: directory {} does not exist",
            path.display(),
            parent.display()
        );
    }
    let probe = temp_path(path);
    std::fs::write(&probe, b"")
        .with_context(|| format!("{flag} {}: cannot write there", path.display()))?;
    std::fs::remove_file(&probe).ok();
    Ok(())
}

/// Fails when writing `out` would replace one of the command's inputs (`(flag, path)`): the
/// input file itself, or a file inside an input directory (a model's weights). An `out` that
/// does not exist yet replaces nothing; an input that is not a path (a Hub id) holds nothing
/// here.
pub fn check_not_an_input(out: &Path, flag: &str, inputs: &[(&str, &Path)]) -> Result<()> {
    let Ok(target) = std::fs::canonicalize(out) else {
        return Ok(());
    };
    for &(input_flag, input) in inputs {
        let Ok(real) = std::fs::canonicalize(input) else {
            continue;
        };
        if target == real {
            bail!(
                "{flag} {} is the {input_flag} input itself; give another path",
                out.display()
            );
        }
        if real.is_dir() && target.starts_with(&real) {
            bail!(
                "{flag} {} would replace a file of {input_flag} {}; give a path outside it",
                out.display(),
                input.display()
            );
        }
    }
    Ok(())
}
