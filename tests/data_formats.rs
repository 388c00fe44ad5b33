//! The JSONL data formats through the loader, with the tiny tokenizer (ids computed by hand
//! from tests/fixtures/README.md, Tokenizers): every format in plain and conversational form,
//! detection per line, UltraFeedback scores, truncation, and bad lines named by file:line.

mod common;

use common::{fixture, tokenizer_dir, SYSTEM_IN_LAST_USER_TURN};
use contralign::data::load::{load_groups, DataOptions, DataStats, Dataset};
use contralign::data::Group;
use contralign::tokenizer::TextTokenizer;
use std::path::PathBuf;
use tempfile::TempDir;

/// `Hi` as a plain prompt: BOS, ▁, H, i.
const PLAIN_PROMPT: [u32; 4] = [1, 246, 75, 108];
/// Responses `the`, `he` and `t` after the prompt `Hi` or the template's `[/INST]`, each
/// with EOS: tokenized with what precedes them (TRL's rule), they continue its last word
/// and get no ▁ of their own.
const THE: [u32; 3] = [249, 251, 2];
const HE: [u32; 2] = [251, 2];
const T: [u32; 2] = [249, 2];

/// Each byte of ASCII text as the tiny tokenizer's byte-fallback id.
fn bytes(s: &str) -> Vec<u32> {
    s.bytes().map(|b| u32::from(b) + 3).collect()
}

/// `[{"role": "user", "content": "Hi"}]` through the Mistral template:
/// `<s>[INST] Hi [/INST]`, tokenized as `<s>`, `▁[INST]▁Hi▁[/INST]`.
fn chat_prompt() -> Vec<u32> {
    let mut ids = vec![1, 246];
    ids.extend(bytes("[INST]"));
    ids.extend([246, 75, 108, 246]);
    ids.extend(bytes("[/INST]"));
    ids
}

struct Data {
    _dir: TempDir,
    path: PathBuf,
}

impl Data {
    fn new(lines: &[&str]) -> Self {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("data.jsonl");
        std::fs::write(&path, lines.join("\n")).unwrap();
        Data { _dir: dir, path }
    }

    fn load(&self, opts: &DataOptions) -> anyhow::Result<Dataset> {
        let tok = TextTokenizer::load(&fixture("tiny-tokenizer")).unwrap();
        load_groups(&self.path, Some(&tok), opts)
    }

    /// Loads with the tiny tokenizer.json and this tokenizer_config.json.
    fn load_with_config(&self, config: serde_json::Value) -> anyhow::Result<Dataset> {
        let dir = tokenizer_dir(Some(config));
        let tok = TextTokenizer::load(dir.path()).unwrap();
        load_groups(&self.path, Some(&tok), &DataOptions::default())
    }

    fn group(&self, line: usize, prompt: Vec<u32>, responses: &[&[u32]], rewards: &[f64]) -> Group {
        Group {
            prompt,
            responses: responses.iter().map(|r| r.to_vec()).collect(),
            rewards: rewards.to_vec(),
            source: format!("{}:{line}", self.path.display()),
        }
    }

    fn err(&self, opts: &DataOptions) -> String {
        load_error(self.load(opts))
    }
}

/// The error of a load expected to fail, with its causes.
fn load_error(loaded: anyhow::Result<Dataset>) -> String {
    match loaded {
        Ok(d) => panic!("expected an error, loaded {:?}", d.groups),
        Err(e) => format!("{e:#}"),
    }
}

fn only_group(data: &Data) -> Group {
    let dataset = data.load(&DataOptions::default()).unwrap();
    assert_eq!(dataset.groups.len(), 1);
    dataset.groups.into_iter().next().unwrap()
}

const USER_HI: &str = r#"[{"role": "user", "content": "Hi"}]"#;

fn assistant(content: &str) -> String {
    format!(r#"[{{"role": "assistant", "content": "{content}"}}]"#)
}

#[test]
fn reward_groups_plain_and_conversational() {
    let data = Data::new(&[
        r#"{"prompt": "Hi", "responses": ["the", "he", "t"], "rewards": [1, 0.5, 0]}"#,
    ]);
    assert_eq!(
        only_group(&data),
        data.group(1, PLAIN_PROMPT.to_vec(), &[&THE, &HE, &T], &[1.0, 0.5, 0.0])
    );

    let line = format!(
        r#"{{"prompt": {USER_HI}, "responses": [{}, {}], "rewards": [2, 3]}}"#,
        assistant("the"),
        assistant("he")
    );
    let data = Data::new(&[&line]);
    // An assistant message renders as its content and EOS, right after `[/INST]`.
    assert_eq!(
        only_group(&data),
        data.group(1, chat_prompt(), &[&THE, &HE], &[2.0, 3.0])
    );
}

#[test]
fn preference_pairs_plain_and_conversational() {
    let data = Data::new(&[r#"{"prompt": "Hi", "chosen": "the", "rejected": "t"}"#]);
    assert_eq!(
        only_group(&data),
        data.group(1, PLAIN_PROMPT.to_vec(), &[&THE, &T], &[1.0, 0.0])
    );

    // TRL's conversational form; the rejected side is a two-turn continuation.
    let rejected = r#"[{"role": "assistant", "content": "t"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "e"}]"#;
    let line = format!(
        r#"{{"prompt": {USER_HI}, "chosen": {}, "rejected": {rejected}}}"#,
        assistant("the")
    );
    let data = Data::new(&[&line]);
    // `t</s>[INST] Hi [/INST]e</s>`: t, EOS, then the second turn as in the prompt (the
    // text after a special token starts a word).
    let mut two_turns = vec![249, 2, 246];
    two_turns.extend(bytes("[INST]"));
    two_turns.extend([246, 75, 108, 246]);
    two_turns.extend(bytes("[/INST]"));
    two_turns.extend([247, 2]);
    assert_eq!(
        only_group(&data),
        data.group(1, chat_prompt(), &[&THE, &two_turns], &[1.0, 0.0])
    );

    // With a conversational prompt, a plain response is one assistant message.
    let line = format!(r#"{{"prompt": {USER_HI}, "chosen": "the", "rejected": "t"}}"#);
    let data = Data::new(&[&line]);
    assert_eq!(
        only_group(&data),
        data.group(1, chat_prompt(), &[&THE, &T], &[1.0, 0.0])
    );
}

#[test]
fn preference_pairs_without_a_prompt_split_it_off_as_trl_does() {
    use contralign::data::formats::split_implicit_prompt;
    let chars = |s: &str| s.chars().collect::<Vec<char>>();
    let split = |c: &str, r: &str| split_implicit_prompt(&chars(c), &chars(r), |ch| *ch == ' ');
    // The first difference, less the space before it; a prefix keeps one item for the shorter.
    assert_eq!(split("Hi the", "Hi he"), 2);
    assert_eq!(split("Hi:the", "Hi:he"), 3);
    assert_eq!(split("Hi the", "Hi t"), 3);
    assert_eq!(split("same", "same"), 3);
    assert_eq!(split("x", "y"), 0);

    // Each implicit form loads as the explicit pair TRL's extract_prompt makes of it.
    let chat = |content: &str| {
        format!(
            r#"[{{"role": "user", "content": "Hi"}}, {{"role": "assistant", "content": "{content}"}}]"#
        )
    };
    let cases = [
        (
            r#"{"chosen": "Hi the", "rejected": "Hi he"}"#.to_string(),
            r#"{"prompt": "Hi", "chosen": " the", "rejected": " he"}"#.to_string(),
        ),
        (
            format!(
                r#"{{"chosen": {}, "rejected": {}}}"#,
                chat("the"),
                chat("he")
            ),
            format!(
                r#"{{"prompt": {USER_HI}, "chosen": {}, "rejected": {}}}"#,
                assistant("the"),
                assistant("he")
            ),
        ),
    ];
    for (implicit, explicit) in cases {
        let (implicit, explicit) = (Data::new(&[&implicit]), Data::new(&[&explicit]));
        let (mut got, want) = (only_group(&implicit), only_group(&explicit));
        got.source = want.source.clone();
        assert_eq!(got, want);
    }

    for (line, message) in [
        (
            r#"{"chosen": "the", "rejected": "he"}"#.to_string(),
            "implicit prompt (their common start) is empty",
        ),
        (
            format!(r#"{{"chosen": "Hi the", "rejected": {}}}"#, chat("he")),
            "not both plain text or both conversations",
        ),
    ] {
        let err = Data::new(&[&line]).err(&DataOptions::default());
        assert!(err.contains(message), "{err}");
        assert!(err.contains(":1"), "{err}");
    }
}

const UF_LINE: &str = r#"{"source": "evol_instruct", "instruction": "Hi", "models": ["a", "b"], "completions": [
    {"model": "a", "annotations": {"helpfulness": {"Rating": "2", "Rationale": "meh"}}, "overall_score": 7.5, "response": "the"},
    {"model": "b", "annotations": {"helpfulness": {"Rating": " 4 ", "Rationale": "ok"}}, "overall_score": 3, "response": "he"}]}"#;

#[test]
fn ultrafeedback_with_default_and_custom_score_fields() {
    let line = UF_LINE.replace('\n', "");
    let data = Data::new(&[&line]);
    // With a chat template the instruction is one user message and each response one
    // assistant message, as HuggingFaceH4's binarization makes them.
    assert_eq!(
        only_group(&data),
        data.group(1, chat_prompt(), &[&THE, &HE], &[7.5, 3.0])
    );
    // Without one they are plain text, joined as TRL joins plain text.
    let plain = data
        .load_with_config(serde_json::json!({"bos_token": "<s>", "eos_token": "</s>"}))
        .unwrap();
    assert_eq!(
        plain.groups,
        [data.group(1, PLAIN_PROMPT.to_vec(), &[&THE, &HE], &[7.5, 3.0])]
    );
    let opts = DataOptions {
        score_field: "annotations.helpfulness.Rating".into(),
        ..DataOptions::default()
    };
    assert_eq!(data.load(&opts).unwrap().groups[0].rewards, [2.0, 4.0]);

    let na = line.replace(r#""Rating": " 4 ""#, r#""Rating": "N/A""#);
    let data = Data::new(&[&line, &na]);
    let text = data.err(&opts);
    for part in [
        &format!("{}:2", data.path.display()),
        "completion 1",
        "score field `annotations.helpfulness.Rating`",
        "\"N/A\"",
    ] {
        assert!(text.contains(part), "{text:?} lacks {part:?}");
    }
}

#[test]
fn formats_are_detected_per_line() {
    let chat_pair = format!(
        r#"{{"prompt": {USER_HI}, "chosen": {}, "rejected": {}}}"#,
        assistant("t"),
        assistant("the")
    );
    let uf = UF_LINE.replace('\n', "");
    let data = Data::new(&[
        r#"{"prompt_ids": [1, 5], "response_ids": [[7, 2], [9, 9, 2]], "rewards": [1, 0]}"#,
        r#"{"prompt": "Hi", "responses": ["t"], "rewards": [4]}"#,
        "",
        &chat_pair,
        "   ",
        r#"{"prompt_ids": [1, 6], "chosen_ids": [8], "rejected_ids": [3, 2]}"#,
        &uf,
    ]);
    let dataset = data.load(&DataOptions::default()).unwrap();
    assert_eq!(
        dataset.groups,
        [
            data.group(1, vec![1, 5], &[&[7, 2], &[9, 9, 2]], &[1.0, 0.0]),
            data.group(2, PLAIN_PROMPT.to_vec(), &[&T], &[4.0]),
            data.group(4, chat_prompt(), &[&T, &THE], &[1.0, 0.0]),
            data.group(6, vec![1, 6], &[&[8], &[3, 2]], &[1.0, 0.0]),
            data.group(7, chat_prompt(), &[&THE, &HE], &[7.5, 3.0]),
        ]
    );
    assert_eq!(
        dataset.stats,
        DataStats {
            lines: 5,
            groups: 5,
            ..DataStats::default()
        }
    );
}

#[test]
fn truncation_keeps_the_prompt_end_and_cuts_responses() {
    let data = Data::new(&[
        r#"{"prompt": "Hi", "responses": ["the", "he", "t"], "rewards": [1, 0.5, 0]}"#,
        r#"{"prompt_ids": [1, 5, 6, 7], "response_ids": [[8, 9, 10, 2], [11, 2]], "rewards": [1, 0]}"#,
        r#"{"prompt_ids": [1, 5], "chosen_ids": [8, 9, 2], "rejected_ids": [9, 2]}"#,
    ]);
    let opts = DataOptions {
        max_prompt_len: Some(2),
        max_len: Some(4),
        ..DataOptions::default()
    };
    let dataset = data.load(&opts).unwrap();
    assert_eq!(
        dataset.groups,
        [
            // The prompt keeps `H i`; `t he EOS` is cut to its first two tokens, losing EOS.
            data.group(1, vec![75, 108], &[&[249, 251], &HE, &T], &[1.0, 0.5, 0.0]),
            data.group(2, vec![6, 7], &[&[8, 9], &[11, 2]], &[1.0, 0.0]),
            data.group(3, vec![1, 5], &[&[8, 9], &[9, 2]], &[1.0, 0.0]),
        ]
    );
    assert_eq!(
        dataset.stats,
        DataStats {
            lines: 3,
            groups: 3,
            truncated_prompts: 2,
            truncated_responses: 3,
            ..DataStats::default()
        }
    );

    // A prompt as long as max_len leaves no room for a response: the group is dropped and
    // counted, as TRL's DPOTrainer drops it (`len(prompt_ids) < max_length`), with no cuts.
    let opts = DataOptions {
        max_len: Some(4),
        ..DataOptions::default()
    };
    let dataset = data.load(&opts).unwrap();
    assert_eq!(
        dataset.groups,
        [data.group(3, vec![1, 5], &[&[8, 9], &[9, 2]], &[1.0, 0.0])]
    );
    assert_eq!(
        dataset.stats,
        DataStats {
            lines: 3,
            groups: 1,
            truncated_responses: 1,
            dropped_long_prompts: 2,
            ..DataStats::default()
        }
    );
    // A prompt one token shorter keeps a one-token response.
    let opts = DataOptions {
        max_len: Some(5),
        ..DataOptions::default()
    };
    assert_eq!(data.load(&opts).unwrap().stats.dropped_long_prompts, 0);
    // When every group is dropped, the error says why.
    let long = Data::new(&[r#"{"prompt": "Hi", "responses": ["the"], "rewards": [1]}"#]);
    let text = long.err(&DataOptions {
        max_len: Some(4),
        ..DataOptions::default()
    });
    assert!(
        text.contains("no group left")
            && text.contains("prompts of all 1 records leave no room")
            && text.contains("--max-len 4"),
        "{text}"
    );
    // Skipped invalid lines and dropped groups are counted apart.
    let mixed = Data::new(&[
        r#"{"prompt": "Hi", "responses": ["the"], "rewards": [1]}"#,
        r#"{"prompt": "Hi"}"#,
    ]);
    let text = mixed.err(&DataOptions {
        max_len: Some(4),
        skip_invalid: true,
        ..DataOptions::default()
    });
    assert!(
        text.contains("no group left: 1 records were invalid")
            && text.contains("the prompts of the other 1 leave no room"),
        "{text}"
    );
}

#[test]
fn empty_responses_are_the_eos_alone_as_in_trl() {
    // TRL appends the EOS to an empty plain-text response; an empty assistant message is
    // what the template renders for it.
    let data = Data::new(&[
        r#"{"prompt": "Hi", "chosen": "the", "rejected": ""}"#,
        &format!(
            r#"{{"prompt": {USER_HI}, "chosen": {}, "rejected": {}}}"#,
            assistant("t"),
            assistant("")
        ),
    ]);
    let dataset = data.load(&DataOptions::default()).unwrap();
    assert_eq!(
        dataset.groups,
        [
            data.group(1, PLAIN_PROMPT.to_vec(), &[&THE, &[2]], &[1.0, 0.0]),
            data.group(2, chat_prompt(), &[&T, &[2]], &[1.0, 0.0]),
        ]
    );
}

#[test]
fn a_template_that_moves_the_prompt_names_the_record() {
    // The conversation does not start with the prompt's rendering.
    let prompt = r#"[{"role": "system", "content": "brief"}, {"role": "user", "content": "Hi"}]"#;
    let line = format!(
        r#"{{"prompt": {prompt}, "chosen": {}, "rejected": {}}}"#,
        assistant("t"),
        assistant("the")
    );
    let data = Data::new(&[&line]);
    let config = serde_json::json!({
        "bos_token": "<s>", "eos_token": "</s>", "chat_template": SYSTEM_IN_LAST_USER_TURN,
    });
    let text = load_error(data.load_with_config(config));
    for part in [
        &format!("{}:1: ", data.path.display()),
        "renders the prompt differently",
        "diverge at character 7",
        "\"brief Hi [/INST]\"",
        "\"Hi [/INST]t</s>\"",
    ] {
        assert!(text.contains(part), "{text:?} lacks {part:?}");
    }
    assert!(!text.contains("merges"), "{text}");
}

#[test]
fn malformed_lines_name_file_line_and_problem() {
    let good = r#"{"prompt": "Hi", "chosen": "the", "rejected": "t"}"#;
    let system = r#"[{"role": "user", "content": "Hi"}, {"role": "system", "content": "x"}]"#;
    let cases: Vec<(String, &[&str])> = vec![
        (r#"{"prompt": "Hi", "responses": "#.into(), &["malformed JSON"]),
        ("[1, 2]".into(), &["expected a JSON object"]),
        (r#"{"prompt": "Hi", "chosen": "the"}"#.into(), &["missing field `rejected`"]),
        (
            r#"{"prompt": 5, "chosen": "the", "rejected": "t"}"#.into(),
            &["field `prompt`", "expected a string or a list of messages"],
        ),
        (
            r#"{"prompt": "", "responses": ["the", "t"], "rewards": [1, 0]}"#.into(),
            &["field `prompt` is empty"],
        ),
        (
            r#"{"prompt": "Hi", "responses": ["the", "t"], "rewards": [1]}"#.into(),
            &["2 responses but 1 rewards"],
        ),
        (
            r#"{"prompt": "Hi", "responses": [], "rewards": []}"#.into(),
            &["holds no response"],
        ),
        (
            r#"{"question": "Hi", "answer": "the"}"#.into(),
            &["unknown record", "\"question\"", "\"answer\""],
        ),
        (
            format!(r#"{{"prompt": {system}, "chosen": "the", "rejected": "t"}}"#),
            &[
                "tokenizer_config.json: chat template",
                "Only user and assistant roles are supported!",
            ],
        ),
        (
            format!(r#"{{"prompt": "Hi", "chosen": {}, "rejected": "t"}}"#, assistant("x")),
            &[
                "field `chosen` is a conversation",
                "the prompt is plain text",
                "with a conversational prompt",
            ],
        ),
        (
            format!(
                r#"{{"prompt": "Hi", "responses": ["t", {}], "rewards": [1, 0]}}"#,
                assistant("x")
            ),
            &["field `responses[1]` is a conversation"],
        ),
        (
            r#"{"prompt": [{"content": "Hi"}], "chosen": "the", "rejected": "t"}"#.into(),
            &["field `prompt`, message 0", "missing field `role`"],
        ),
        (
            r#"{"prompt": [], "chosen": "the", "rejected": "t"}"#.into(),
            &["field `prompt` holds no message"],
        ),
        (
            r#"{"instruction": "Hi", "completions": [{"response": "the", "overall_score": 1}, {"response": "t"}]}"#.into(),
            &["completion 1", "missing score field `overall_score`"],
        ),
        (
            r#"{"instruction": "Hi", "completions": []}"#.into(),
            &["holds no completion"],
        ),
        (
            r#"{"prompt_ids": [1], "response_ids": [[3, 2], []], "rewards": [1, 0]}"#.into(),
            &["response 1", "empty"],
        ),
    ];
    for (line, parts) in cases {
        let data = Data::new(&[good, "", &line]);
        let text = data.err(&DataOptions::default());
        assert!(
            text.contains(&format!("{}:3: ", data.path.display())),
            "{text:?} does not name line 3"
        );
        for part in parts {
            assert!(text.contains(part), "{line}: {text:?} lacks {part:?}");
        }
    }
}

#[test]
fn text_needs_a_tokenizer_and_conversations_a_template() {
    let data = Data::new(&[
        r#"{"prompt_ids": [1], "chosen_ids": [3], "rejected_ids": [4]}"#,
        r#"{"prompt": "Hi", "chosen": "the", "rejected": "t"}"#,
    ]);
    let text = format!(
        "{:#}",
        load_groups(&data.path, None, &DataOptions::default()).unwrap_err()
    );
    assert!(
        text.contains(&format!("{}:2", data.path.display()))
            && text.contains("is text")
            && text.contains("no tokenizer.json"),
        "{text}"
    );

    let bare = TempDir::new().unwrap();
    std::fs::copy(
        fixture("tiny-tokenizer/tokenizer.json"),
        bare.path().join("tokenizer.json"),
    )
    .unwrap();
    let tok = TextTokenizer::load(bare.path()).unwrap();
    let line = format!(r#"{{"prompt": {USER_HI}, "chosen": "the", "rejected": "t"}}"#);
    let data = Data::new(&[&line]);
    let text = format!(
        "{:#}",
        load_groups(&data.path, Some(&tok), &DataOptions::default()).unwrap_err()
    );
    assert!(
        text.contains(&format!("{}:1", data.path.display()))
            && text.contains("conversational data needs a chat template"),
        "{text}"
    );
}

#[test]
fn a_response_the_template_drops_is_an_error() {
    let dir = TempDir::new().unwrap();
    std::fs::copy(
        fixture("tiny-tokenizer/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let template = "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}\
                    {% endfor %}";
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::json!({ "chat_template": template }).to_string(),
    )
    .unwrap();
    let tok = TextTokenizer::load(dir.path()).unwrap();
    let line = format!(r#"{{"prompt": {USER_HI}, "chosen": "the", "rejected": "t"}}"#);
    let data = Data::new(&[&line]);
    let text = format!(
        "{:#}",
        load_groups(&data.path, Some(&tok), &DataOptions::default()).unwrap_err()
    );
    assert_eq!(
        text,
        format!("{}:1: response 0 has no tokens", data.path.display())
    );
}

#[test]
fn skip_invalid_counts_and_keeps_the_first_reason() {
    let data = Data::new(&[
        r#"{"prompt": "Hi", "chosen": "the", "rejected": "t"}"#,
        r#"{"prompt": "Hi", "chosen": "the"}"#,
        r#"{"prompt": "Hi", "responses": ["he"], "rewards": [1]}"#,
        "not json",
        r#"{"prompt_ids": [1], "chosen_ids": [3], "rejected_ids": [4]}"#,
    ]);
    let opts = DataOptions {
        skip_invalid: true,
        ..DataOptions::default()
    };
    let dataset = data.load(&opts).unwrap();
    assert_eq!(
        dataset
            .groups
            .iter()
            .map(|g| g.source.clone())
            .collect::<Vec<_>>(),
        [1, 3, 5].map(|l| format!("{}:{l}", data.path.display()))
    );
    assert_eq!(
        dataset.stats,
        DataStats {
            lines: 5,
            groups: 3,
            skipped: 2,
            first_skipped: Some(format!(
                "{}:2: missing field `rejected`",
                data.path.display()
            )),
            ..DataStats::default()
        }
    );

    let data = Data::new(&["not json", "[]"]);
    let text = data.err(&opts);
    assert!(
        text.contains("no valid group") && text.contains("all 2 lines were invalid"),
        "{text}"
    );
    let text = Data::new(&["", "  "]).err(&DataOptions::default());
    assert!(text.contains("no groups in the file"), "{text}");
}

#[test]
fn bad_length_limits_are_refused() {
    let data = Data::new(&[r#"{"prompt_ids": [1], "chosen_ids": [3], "rejected_ids": [4]}"#]);
    for (opts, part) in [
        (
            DataOptions {
                max_prompt_len: Some(0),
                ..DataOptions::default()
            },
            "--max-prompt-len (the maximum prompt length) must be at least 1",
        ),
        (
            DataOptions {
                max_len: Some(1),
                ..DataOptions::default()
            },
            "--max-len (the maximum length) must be at least 2",
        ),
    ] {
        let text = data.err(&opts);
        assert!(text.contains(part), "{text}");
    }
}

/// `tests/fixtures/mistral-tokenizer/trl_golden.jsonl`: each row, as text, loads to the ids
/// TRL's DPOTrainer made of it (plain, conversational, implicit prompt), and to the same
/// groups as the row's pre-tokenized form.
#[test]
fn trl_golden_rows_load_to_trl_token_ids() {
    let tok = TextTokenizer::load(&fixture("mistral-tokenizer")).unwrap();
    let golden = std::fs::read_to_string(fixture("mistral-tokenizer/trl_golden.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = golden
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let text_lines: Vec<String> = rows.iter().map(|r| r["row"].to_string()).collect();
    let id_lines: Vec<String> = rows
        .iter()
        .map(|r| {
            serde_json::json!({"prompt_ids": r["prompt_ids"], "chosen_ids": r["chosen_ids"],
                               "rejected_ids": r["rejected_ids"]})
            .to_string()
        })
        .collect();
    fn lines(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let (text, ids) = (Data::new(&lines(&text_lines)), Data::new(&lines(&id_lines)));
    let opts = DataOptions::default();
    let got = load_groups(&text.path, Some(&tok), &opts).unwrap();
    let want = load_groups(&ids.path, None, &opts).unwrap();
    assert_eq!(got.groups.len(), rows.len());
    let kinds = |pred: &dyn Fn(&serde_json::Value) -> bool| rows.iter().filter(|r| pred(r)).count();
    assert!(kinds(&|r| r["row"]["prompt"].is_string()) >= 2);
    assert!(kinds(&|r| r["row"]["prompt"].is_array()) >= 2);
    assert!(kinds(&|r| r["row"].get("prompt").is_none()) >= 1);
    for (i, (g, w)) in got.groups.iter().zip(&want.groups).enumerate() {
        assert_eq!(g.prompt, w.prompt, "row {i}: prompt_ids");
        assert_eq!(
            g.responses, w.responses,
            "row {i}: chosen_ids, rejected_ids"
        );
        assert_eq!(g.rewards, [1.0, 0.0]);
    }
    // The row whose prompt ends in a space: alone it ends in ▁, which the completion's first
    // word takes; TRL's prompt (the common prefix) is one token shorter. Counted once per row.
    let shortened = rows
        .iter()
        .filter(|r| {
            let prompt = r["row"]["prompt"].as_str();
            prompt.is_some_and(|p| {
                tok.encode_with_special_tokens(p).unwrap().len()
                    > r["prompt_ids"].as_array().unwrap().len()
            })
        })
        .count();
    assert!(shortened >= 1);
    assert_eq!(got.stats.shortened_prompts, shortened);
}

/// Two pre-tokenized reward groups, as JSON objects.
const FIRST: &str =
    r#"{"prompt_ids": [1, 5], "response_ids": [[7, 2], [9, 2]], "rewards": [1, 0]}"#;
const SECOND: &str =
    r#"{"prompt_ids": [1, 6], "response_ids": [[8, 2], [9, 2]], "rewards": [0, 1]}"#;

/// The UTF-8 byte order mark.
const BOM: &str = "\u{feff}";

/// The prompts and sources of a data set's groups.
fn prompts_and_sources(path: &std::path::Path) -> Vec<(Vec<u32>, String)> {
    let data = load_groups(path, None, &DataOptions::default()).unwrap();
    data.groups
        .into_iter()
        .map(|g| (g.prompt, g.source))
        .collect()
}

fn gzip(text: &str) -> Vec<u8> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(text.as_bytes()).unwrap();
    gz.finish().unwrap()
}

#[test]
fn json_arrays_byte_order_marks_and_gzip_read_as_datasets_reads_them() {
    let dir = TempDir::new().unwrap();
    let name = |file: &str| dir.path().join(file).display().to_string();

    // A .json file holding one array (with a BOM, pretty-printed): its items, by index.
    let array = dir.path().join("records.json");
    std::fs::write(&array, format!("{BOM}[\n  {FIRST},\n  {SECOND}\n]\n")).unwrap();
    assert_eq!(
        prompts_and_sources(&array),
        [
            (vec![1, 5], format!("{}, item 0", name("records.json"))),
            (vec![1, 6], format!("{}, item 1", name("records.json"))),
        ]
    );
    // A bad item is named by its index; a bad line of a gzip-compressed file by its line.
    let bad = dir.path().join("bad.jsonl.gz");
    std::fs::write(&array, format!(r#"[{FIRST}, {{"prompt_ids": "x"}}]"#)).unwrap();
    std::fs::write(&bad, gzip(&format!("{FIRST}\n{{\"prompt_ids\": \n"))).unwrap();
    for (path, start) in [
        (&array, format!("{}, item 1: ", name("records.json"))),
        (&bad, format!("{}:2: malformed JSON", name("bad.jsonl.gz"))),
    ] {
        let err = format!(
            "{:#}",
            load_groups(path, None, &DataOptions::default()).unwrap_err()
        );
        assert!(err.starts_with(&start), "{err}");
    }

    // JSON Lines after a BOM (line 1 a record like the others), and gzip-compressed JSON
    // Lines given directly: lines named in the file as they are.
    let lines = format!("{FIRST}\n{SECOND}\n");
    for (file, bytes) in [
        ("bom.jsonl", format!("{BOM}{lines}").into_bytes()),
        ("train.jsonl.gz", gzip(&lines)),
    ] {
        let path = dir.path().join(file);
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(
            prompts_and_sources(&path),
            [
                (vec![1, 5], format!("{}:1", name(file))),
                (vec![1, 6], format!("{}:2", name(file))),
            ]
        );
    }

    // In a folder, a .jsonl.gz is data and datasets' metadata files are not.
    let folder = TempDir::new().unwrap();
    std::fs::write(
        folder.path().join("data.jsonl.gz"),
        gzip(&format!("{FIRST}\n")),
    )
    .unwrap();
    for meta in [
        "dataset_infos.json",
        "dataset_info.json",
        "dataset_dict.json",
        "config.json",
    ] {
        std::fs::write(folder.path().join(meta), r#"{"default": {"splits": {}}}"#).unwrap();
    }
    let got = prompts_and_sources(folder.path());
    assert_eq!(
        got,
        [(
            vec![1, 5],
            format!("{}:1", folder.path().join("data.jsonl.gz").display())
        )]
    );
}
