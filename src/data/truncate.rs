//! Length limits on a tokenized group, as TRL applies them: the prompt keeps its end (left
//! truncation) and prompt + response is at most `max_len`, the response cut at its end.

/// How many sequences of one group were cut.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cuts {
    pub prompt: bool,
    pub responses: usize,
}

/// Applies `max_prompt_len` to the prompt, then `max_len` to prompt + each response. A
/// response cut here loses its EOS, and the loss treats it as truncated. `None` when the
/// prompt leaves no room for a response: TRL's DPOTrainer (`_prepare_dataset`, since v1.9)
/// drops such rows (`len(prompt_ids) < max_length` under `keep_start`), so the group is
/// dropped, not an error.
pub fn truncate(
    prompt: &mut Vec<u32>,
    responses: &mut [Vec<u32>],
    max_prompt_len: Option<usize>,
    max_len: Option<usize>,
) -> Option<Cuts> {
    let mut cuts = Cuts::default();
    if let Some(max) = max_prompt_len {
        if prompt.len() > max {
            prompt.drain(..prompt.len() - max);
            cuts.prompt = true;
        }
    }
    if let Some(max) = max_len {
        let room = max.checked_sub(prompt.len()).filter(|&room| room > 0)?;
        for r in responses.iter_mut().filter(|r| r.len() > room) {
            r.truncate(room);
            cuts.responses += 1;
        }
    }
    Some(cuts)
}
