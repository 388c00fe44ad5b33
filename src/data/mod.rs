//! Data sets: groups of one prompt and its rated responses, read from JSONL and Parquet files
//! in the formats of [`formats`], and their packing into batches.

pub mod formats;
pub mod load;
pub mod packing;
pub mod pairs;
pub mod parquet;
pub mod pretokenized;
pub mod records;
pub mod truncate;

/// One prompt with `K` responses and a reward for each (docs/losses.md §1). A pairwise example is
/// the group `K = 2`, rewards `(1, 0)`, chosen first.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub prompt: Vec<u32>,
    pub responses: Vec<Vec<u32>>,
    pub rewards: Vec<f64>,
    /// Where the group came from, `file:line`, for error messages.
    pub source: String,
}

/// `groups` cut into consecutive runs of at most `max_tokens` packed tokens (a larger group
/// alone): the passes of `score`, `eval`, `grads` and `precompute-ref`, so that the memory of
/// one pass is bounded whatever the data set's size.
pub fn token_chunks(groups: &[Group], max_tokens: usize) -> Vec<std::ops::Range<usize>> {
    let mut chunks = Vec::new();
    let (mut start, mut tokens) = (0, 0);
    for (i, g) in groups.iter().enumerate() {
        let len = g.packed_len();
        if i > start && tokens + len > max_tokens {
            chunks.push(start..i);
            (start, tokens) = (i, 0);
        }
        tokens += len;
    }
    if start < groups.len() {
        chunks.push(start..groups.len());
    }
    chunks
}

impl Group {
    /// Tokens the group takes in a packed batch: the prompt once, then every response.
    pub fn packed_len(&self) -> usize {
        self.prompt.len() + self.responses.iter().map(Vec::len).sum::<usize>()
    }

    /// The first token id of the group at or above `vocab`, described (`prompt, token 3: id
    /// 999 is outside the vocabulary (size 256)`), if there is one.
    pub fn out_of_vocab(&self, vocab: usize) -> Option<String> {
        let seqs = std::iter::once(("prompt".to_string(), &self.prompt)).chain(
            self.responses
                .iter()
                .enumerate()
                .map(|(i, r)| (format!("response {i}"), r)),
        );
        for (what, ids) in seqs {
            if let Some((pos, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
                return Some(format!(
                    "{what}, token {pos}: id {id} is outside the vocabulary (size {vocab})"
                ));
            }
        }
        None
    }

    /// Fails, naming the group's source, when a token id is at or above `vocab`.
    pub fn check_vocab(&self, vocab: usize) -> anyhow::Result<()> {
        match self.out_of_vocab(vocab) {
            Some(what) => anyhow::bail!("{}: {what}", self.source),
            None => Ok(()),
        }
    }
}
