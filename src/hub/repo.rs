//! Hub repository ids and their folders in the cache.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    /// The cache folder's prefix and the `hf download --repo-type` value.
    pub fn name(self) -> &'static str {
        match self {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        }
    }

    /// What the kind is called in messages.
    pub fn what(self) -> &'static str {
        match self {
            RepoKind::Model => "model",
            RepoKind::Dataset => "data set",
        }
    }
}

/// `org/name` at a revision (a branch, tag or commit; `main` by default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoId {
    pub kind: RepoKind,
    pub id: String,
    pub revision: String,
}

/// Characters the Hub allows in an owner or a repository name.
fn valid_part(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(['.', '-'])
        && !s.ends_with('.')
        && !s.contains("..")
        && s.len() <= 96
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl RepoId {
    /// `org/name` or `org/name@revision`; None for anything else (a path).
    pub fn parse(text: &str, kind: RepoKind) -> Option<RepoId> {
        let (id, revision) = match text.split_once('@') {
            Some((id, rev)) if !rev.is_empty() => (id, rev),
            Some(_) => return None,
            None => (text, "main"),
        };
        let (org, name) = id.split_once('/')?;
        (valid_part(org) && valid_part(name)).then(|| RepoId {
            kind,
            id: id.to_string(),
            revision: revision.to_string(),
        })
    }

    /// The repository's folder in the cache: `models--org--name`, `datasets--org--name`.
    pub fn folder(&self) -> String {
        format!("{}s--{}", self.kind.name(), self.id.replace('/', "--"))
    }

    /// The `hf` command that fetches the repository (or the given files of it).
    pub fn download_command(&self, files: &[&str]) -> String {
        let mut cmd = format!("hf download {}", self.id);
        for f in files {
            cmd.push(' ');
            cmd.push_str(f);
        }
        if self.kind == RepoKind::Dataset {
            cmd.push_str(" --repo-type dataset");
        }
        if self.revision != "main" {
            cmd.push_str(&format!(" --revision {}", self.revision));
        }
        cmd
    }
}

impl fmt::Display for RepoId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.revision.as_str() {
            "main" => write!(f, "{}", self.id),
            rev => write!(f, "{}@{rev}", self.id),
        }
    }
}
