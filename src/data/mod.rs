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

impl Group {
    /// Tokens the group takes in a packed batch: the prompt once, then every response.
    pub fn packed_len(&self) -> usize {
        self.prompt.len() + self.responses.iter().map(Vec::len).sum::<usize>()
    }

    /// Checks every token id against the vocabulary of the model that will read it.
    pub fn check_vocab(&self, vocab: usize) -> anyhow::Result<()> {
        let seqs = std::iter::once(("prompt".to_string(), &self.prompt)).chain(
            self.responses
                .iter()
                .enumerate()
                .map(|(i, r)| (format!("response {i}"), r)),
        );
        for (what, ids) in seqs {
            if let Some((pos, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
                anyhow::bail!(
                    "{}: {what}, token {pos}: id {id} is outside the vocabulary (size {vocab})",
                    self.source
                );
            }
        }
        Ok(())
    }
}
