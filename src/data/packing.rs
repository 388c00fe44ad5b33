//! Packing groups into one token stream: each group's prompt once, then its K responses,
//! which attend to the prompt and to themselves (docs/architecture.md §7). No padding.

use super::Group;
use crate::ops::AttentionLayout;

/// Where one response's log-probs live among a batch's predictions (the ops trait's type).
pub use crate::ops::ResponseSpan;

#[derive(Clone, Debug)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub layout: AttentionLayout,
    /// How many sequences each row stands for: K for a prompt row, 1 for a response row
    /// (the weights of the load-balancing loss, docs/model.md).
    pub row_weights: Vec<f64>,
    /// The row whose logits predict each target token.
    pub prediction_rows: Vec<u32>,
    pub targets: Vec<u32>,
    pub responses: Vec<ResponseSpan>,
    /// `responses[group_offsets[g]..group_offsets[g + 1]]` belong to group `g`.
    pub group_offsets: Vec<usize>,
}

impl Batch {
    pub fn pack(groups: &[Group], window: Option<usize>, is_eos: impl Fn(u32) -> bool) -> Self {
        let mut b = Batch {
            tokens: Vec::new(),
            layout: AttentionLayout {
                window,
                ..Default::default()
            },
            row_weights: Vec::new(),
            prediction_rows: Vec::new(),
            targets: Vec::new(),
            responses: Vec::new(),
            group_offsets: vec![0],
        };
        for (g, group) in groups.iter().enumerate() {
            b.layout
                .push_group(group.prompt.len(), group.responses.iter().map(Vec::len));
            let k = group.responses.len() as f64;
            b.push_rows(&group.prompt, k);
            let prompt_end = b.tokens.len() as u32;
            for response in &group.responses {
                let start = b.tokens.len() as u32;
                b.push_rows(response, 1.0);
                let first = b.targets.len();
                for (j, &y) in response.iter().enumerate() {
                    let row = if j == 0 {
                        prompt_end - 1
                    } else {
                        start + j as u32 - 1
                    };
                    b.prediction_rows.push(row);
                    b.targets.push(y);
                }
                b.responses.push(ResponseSpan {
                    group: g,
                    first,
                    len: response.len(),
                    ends_with_eos: response.last().is_some_and(|&t| is_eos(t)),
                });
            }
            b.group_offsets.push(b.responses.len());
        }
        b
    }

    /// Token ids whose rows each stand for `weight` sequences.
    fn push_rows(&mut self, ids: &[u32], weight: f64) {
        self.tokens.extend_from_slice(ids);
        self.row_weights
            .extend(std::iter::repeat_n(weight, ids.len()));
    }

    pub fn num_groups(&self) -> usize {
        self.group_offsets.len() - 1
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}
