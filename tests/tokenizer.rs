//! The text tokenizer: the real Mistral tokenizer against transformers' chat golden, the tiny
//! test tokenizer against ids computed by hand (tests/fixtures/README.md, Tokenizers), special
//! tokens and chat templates from tokenizer_config.json, and errors naming their file.

mod common;

use common::{fixture, tokenizer_dir, SYSTEM_IN_LAST_USER_TURN};
use contralign::tokenizer::strftime::DateTime;
use contralign::tokenizer::{Message, TextTokenizer, Tokenized};
use serde_json::Value;
use tempfile::TempDir;

fn msg(role: &str, content: &str) -> Message {
    Message {
        role: role.into(),
        content: content.into(),
    }
}

fn err_text<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

fn tiny() -> TextTokenizer {
    TextTokenizer::load(&fixture("tiny-tokenizer")).unwrap()
}

#[test]
fn mistral_chat_golden_token_for_token() {
    let tok = TextTokenizer::load(&fixture("mistral-tokenizer")).unwrap();
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    let text = std::fs::read_to_string(fixture("mistral-tokenizer/chat_golden.jsonl")).unwrap();
    let mut lines = 0;
    for line in text.lines() {
        let case: Value = serde_json::from_str(line).unwrap();
        let prompt: Vec<Message> = case["prompt"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| msg(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let response = case["response"].as_str().unwrap();
        let responses = vec![vec![msg("assistant", response)]];
        let ids = |key: &str| -> Vec<u32> {
            case[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };

        let texts = tok.chat_texts(&prompt, &responses).unwrap();
        assert_eq!(texts.prompt, case["prompt_text"].as_str().unwrap());
        assert_eq!(texts.responses, [case["response_text"].as_str().unwrap()]);
        // Each text on its own: the template and the tokenizer alone, not TRL's split.
        assert_eq!(
            tok.encode(&texts.prompt).unwrap(),
            ids("prompt_ids"),
            "{line}"
        );
        let response_ids = tok.encode(&texts.responses[0]).unwrap();
        assert_eq!(response_ids, ids("response_ids"), "{line}");
        assert_eq!(tok.decode(&response_ids).unwrap(), response);
        lines += 1;
    }
    assert_eq!(lines, 3);
}

#[test]
fn tiny_tokenizer_ids_by_hand() {
    let tok = tiny();
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    // "▁Hi▁the": ▁ 246, H = 0x48 + 3, i = 0x69 + 3, then ▁ t h e merged into ▁the 252.
    assert_eq!(tok.encode("Hi the").unwrap(), [246, 75, 108, 252]);
    // "▁other": h e merges, t stays a piece, o and r are bytes.
    assert_eq!(tok.encode("other").unwrap(), [246, 114, 249, 251, 117]);
    // é = C3 A9: bytes above 0xC1 sit one place lower (0xC0 and 0xC1 are left out).
    assert_eq!(tok.encode("é").unwrap(), [246, 196, 172]);
    assert_eq!(tok.encode("🙂").unwrap(), [246, 241, 162, 156, 133]);
    // Special tokens written in the text are recognized; none are added.
    assert_eq!(tok.encode("<s>the</s>").unwrap(), [1, 252, 2]);
    assert_eq!(
        tok.decode(&[1, 246, 75, 108, 252, 246, 196, 172, 2])
            .unwrap(),
        "Hi the é"
    );
    assert!(tok.chat_template().unwrap().starts_with("{{ bos_token }}"));
}

#[test]
fn plain_text_is_split_where_prompt_and_prompt_plus_response_diverge() {
    let tok = tiny();
    // "Hithe</s>" and "Hihe</s>": the responses continue the prompt's word, so they get no
    // ▁ of their own (`t`, `he`, then EOS), as in TRL.
    let got = tok
        .tokenize_plain("Hi", &["the".into(), "he".into()])
        .unwrap();
    assert_eq!(
        got,
        Tokenized {
            prompt: vec![1, 246, 75, 108],
            responses: vec![vec![249, 251, 2], vec![251, 2]],
            prompt_cut: vec![],
        }
    );
    // "Hi the": ▁the; a response that already ends with the EOS text gets no second one.
    let got = tok
        .tokenize_plain("Hi", &[" the".into(), " t</s>".into()])
        .unwrap();
    assert_eq!(got.responses, [vec![252, 2], vec![250, 2]]);
    assert!(got.prompt_cut.is_empty());
    // "Hi " alone ends in ▁ (246), which "Hi the" merges into ▁the: the prompt is the common
    // prefix, one token shorter.
    let got = tok
        .tokenize_plain("Hi ", &["the".into(), "he".into()])
        .unwrap();
    assert_eq!(
        got,
        Tokenized {
            prompt: vec![1, 246, 75, 108],
            responses: vec![vec![252, 2], vec![246, 251, 2]],
            prompt_cut: vec![246],
        }
    );
    // Without tokenizer_config.json there is no EOS nor chat template; BOS comes from
    // tokenizer.json's post-processor, as `tokenizer(text)` adds it.
    let bare = tokenizer_dir(None);
    let tok = TextTokenizer::load(bare.path()).unwrap();
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.chat_template()),
        (None, None, None)
    );
    assert_eq!(
        tok.encode_with_special_tokens("Hi").unwrap(),
        [1, 246, 75, 108]
    );
    // Plain-text responses end with the EOS, which this tokenizer lacks: refused, naming
    // the directory, rather than trained without it.
    let text = err_text(tok.tokenize_plain("Hi", &[" the".into()]));
    assert!(
        text.contains(&bare.path().display().to_string()) && text.contains("EOS"),
        "{text}"
    );
    let text = err_text(tok.tokenize_chat(&[msg("user", "Hi")], &[vec![msg("assistant", "t")]]));
    assert!(
        text.contains("conversational data needs a chat template"),
        "{text}"
    );
}

#[test]
fn special_tokens_as_added_token_objects() {
    let dir = tokenizer_dir(Some(serde_json::json!({
        "bos_token": {"content": "<s>", "lstrip": false, "special": true},
        "eos_token": {"__type": "AddedToken", "content": "</s>"},
    })));
    let tok = TextTokenizer::load(dir.path()).unwrap();
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));

    let dir = tokenizer_dir(Some(serde_json::json!({"eos_token": "<|im_end|>"})));
    let text = err_text(TextTokenizer::load(dir.path()));
    assert!(
        text.contains("tokenizer_config.json") && text.contains("<|im_end|>"),
        "{text}"
    );
}

#[test]
fn mistral_template_renders_and_raises() {
    let tok = tiny();
    let conversation = [msg("user", "Hi"), msg("assistant", "the"), msg("user", "t")];
    assert_eq!(
        tok.render_chat(&conversation, true).unwrap(),
        "<s>[INST] Hi [/INST]the</s>[INST] t [/INST]"
    );
    let text = err_text(tok.render_chat(&[msg("assistant", "the")], false));
    assert!(
        text.contains("Conversation roles must alternate user/assistant/user/assistant/..."),
        "{text}"
    );
    let text = err_text(tok.render_chat(&[msg("user", "Hi"), msg("system", "be brief")], false));
    assert!(
        text.contains("Only user and assistant roles are supported!"),
        "{text}"
    );
}

#[test]
fn templates_get_transformers_whitespace_and_python_methods() {
    // trim_blocks drops the newline after each block tag; `.strip()` is Python's.
    let template = "{% for m in messages %}\n{{ m.role }}: {{ m.content.strip() }}\n{% endfor %}\n\
                    {% if add_generation_prompt %}assistant:{% endif %}";
    let dir = tokenizer_dir(Some(serde_json::json!({"chat_template": template})));
    let tok = TextTokenizer::load(dir.path()).unwrap();
    assert_eq!(
        tok.render_chat(&[msg("user", "  hi \n")], true).unwrap(),
        "user: hi\nassistant:"
    );
    let texts = tok
        .chat_texts(&[msg("user", "hi")], &[vec![msg("assistant", " ok ")]])
        .unwrap();
    assert_eq!(texts.prompt, "user: hi\nassistant:");
    // The full rendering has no "assistant:" generation prompt but "assistant: ok".
    assert_eq!(texts.responses, [" ok\n"]);
}

#[test]
fn response_must_extend_the_prompt_rendering() {
    let template = "{% for m in messages %}{{ m.content }}{% endfor %}\
                    {% if add_generation_prompt %}>>{% endif %}";
    let dir = tokenizer_dir(Some(serde_json::json!({"chat_template": template})));
    let tok = TextTokenizer::load(dir.path()).unwrap();
    let text = err_text(tok.chat_texts(&[msg("user", "hi")], &[vec![msg("assistant", "ok")]]));
    assert!(
        text.contains("response 0")
            && text.contains("renders the prompt differently")
            && text.contains("diverge at character 2")
            && text.contains(r#"the prompt alone continues ">>""#)
            && text.contains(r#"the conversation "ok""#),
        "{text}"
    );
}

#[test]
fn a_template_that_moves_the_prompt_is_refused_where_the_renderings_diverge() {
    let dir = tokenizer_dir(Some(serde_json::json!({
        "bos_token": "<s>", "eos_token": "</s>", "chat_template": SYSTEM_IN_LAST_USER_TURN,
    })));
    let tok = TextTokenizer::load(dir.path()).unwrap();
    let prompt = [msg("system", "brief"), msg("user", "Hi")];
    assert_eq!(
        tok.render_chat(&prompt, true).unwrap(),
        "[INST] brief Hi [/INST]"
    );
    let responses = [vec![msg("assistant", "the")]];
    let text = err_text(tok.tokenize_chat(&prompt, &responses));
    assert!(
        text.contains("response 0")
            && text.contains("renders the prompt differently")
            && text.contains("diverge at character 7")
            && text.contains(r#"the prompt alone continues "brief Hi [/INST]""#)
            && text.contains(r#"the conversation "Hi [/INST]the</s>""#),
        "{text}"
    );
    assert_eq!(err_text(tok.chat_texts(&prompt, &responses)), text);
}

#[test]
fn special_tokens_map_json_defines_them_in_a_legacy_folder() {
    // No added_tokens_decoder in tokenizer_config.json: transformers 5 reads
    // special_tokens_map.json, whose tokens win.
    let dir = tokenizer_dir(Some(serde_json::json!({"bos_token": "<unk>"})));
    let map = serde_json::json!({"bos_token": "<s>", "eos_token": {"content": "</s>"}});
    std::fs::write(dir.path().join("special_tokens_map.json"), map.to_string()).unwrap();
    let tok = TextTokenizer::load(dir.path()).unwrap();
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    let got = tok.tokenize_plain("Hi", &[" the".into()]).unwrap();
    assert_eq!(got.responses, [vec![252, 2]]);

    // With added_tokens_decoder (saved by transformers >= 4.34) the map is not read.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::json!({"bos_token": "<unk>", "added_tokens_decoder": {}}).to_string(),
    )
    .unwrap();
    let tok = TextTokenizer::load(dir.path()).unwrap();
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(0), None));

    // A null in the map unsets the config's token, as transformers copies every map key.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::json!({"bos_token": "<s>", "eos_token": "</s>"}).to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("special_tokens_map.json"),
        serde_json::json!({"eos_token": null}).to_string(),
    )
    .unwrap();
    let tok = TextTokenizer::load(dir.path()).unwrap();
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), None));

    // A token of the map outside the vocabulary names the map.
    std::fs::write(dir.path().join("tokenizer_config.json"), "{}").unwrap();
    std::fs::write(
        dir.path().join("special_tokens_map.json"),
        serde_json::json!({"eos_token": "<|im_end|>"}).to_string(),
    )
    .unwrap();
    let text = err_text(TextTokenizer::load(dir.path()));
    assert!(
        text.contains("special_tokens_map.json") && text.contains("<|im_end|>"),
        "{text}"
    );
}

/// transformers 5 drops `add_bos_token`/`add_eos_token` when a tokenizer.json is there
/// (`_from_pretrained`), so its post-processor decides: the flags change nothing.
#[test]
fn add_bos_and_add_eos_token_leave_tokenizer_json_in_charge() {
    for flags in [
        serde_json::json!({}),
        serde_json::json!({"add_bos_token": true, "add_eos_token": true}),
        serde_json::json!({"add_bos_token": false}),
        serde_json::json!({"add_eos_token": true}),
    ] {
        let mut config = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>"});
        config
            .as_object_mut()
            .unwrap()
            .extend(flags.as_object().unwrap().clone());
        let dir = tokenizer_dir(Some(config));
        let tok = TextTokenizer::load(dir.path()).unwrap();
        assert_eq!(
            tok.encode_with_special_tokens("Hi").unwrap(),
            [1, 246, 75, 108],
            "{flags}"
        );
    }
}

#[test]
fn templates_get_transformers_globals_and_filters() {
    let template = "{{ unk_token }}|{{ pad_token is defined }}|{{ sep_token is defined }}|\
        {% if tools is none and documents is none %}none{% endif %}|\
        {{ messages[0] | tojson }}|{{ {'b': 'é', 'a': [1, 2.5, none, true]} | tojson }}|\
        {{ {'a': {'x': []}} | tojson(indent=2) }}|{{ '<&>' | tojson }}|{{ strftime_now('%Y') }}|\
        {{ {'b': 'é', 'a': 1, 'c': '😀'} | tojson(ensure_ascii=True, sort_keys=True) }}|\
        {{ [1, {'x': 2}] | tojson(separators=[',', ':']) }}|\
        {{ {'a': [1, {}]} | tojson(indent=1, separators=[';', '=']) }}";
    let dir = tokenizer_dir(Some(serde_json::json!({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": {"content": "<unk>"},
        "pad_token": "</s>", "sep_token": null, "chat_template": template,
    })));
    let tok = TextTokenizer::load(dir.path()).unwrap();
    let year = DateTime::today().year;
    assert_eq!(
        tok.render_chat(&[msg("user", "Hi")], false).unwrap(),
        format!(
            "<unk>|True|False|none|{{\"role\": \"user\", \"content\": \"Hi\"}}|\
             {{\"b\": \"é\", \"a\": [1, 2.5, null, true]}}|{{\n  \"a\": {{\n    \"x\": []\n  }}\n}}|\
             \"<&>\"|{year}|\
             {{\"a\": 1, \"b\": \"\\u00e9\", \"c\": \"\\ud83d\\ude00\"}}|\
             [1,{{\"x\":2}}]|\
             {{\n \"a\"=[\n  1;\n  {{}}\n ]\n}}"
        )
    );
    // Python's json.dumps(..., ensure_ascii=True, sort_keys=True), separators=(",", ":"),
    // indent=1 with separators=(";", "="), as written above.
    let dated = tok
        .with_template_date(DateTime::parse_date("2024-02-29").unwrap())
        .unwrap();
    let rendered = dated.render_chat(&[msg("user", "Hi")], false).unwrap();
    assert!(rendered.contains("\"<&>\"|2024|"), "{rendered}");
}

/// strftime_now renders the tokenizer's template date, one instant for every rendering.
#[test]
fn strftime_now_renders_the_template_date() {
    let template = "{{ strftime_now('%d %b %Y %H:%M') }}|{{ messages[0].content }}";
    let dir = tokenizer_dir(Some(serde_json::json!({
        "bos_token": "<s>", "eos_token": "</s>", "chat_template": template,
    })));
    let tok = TextTokenizer::load(dir.path()).unwrap();
    let today = DateTime::today();
    assert_eq!(
        tok.render_chat(&[msg("user", "Hi")], false).unwrap(),
        format!("{}|Hi", today.format("%d %b %Y 00:00").unwrap())
    );
    let tok = tok
        .with_template_date(DateTime::parse_date("2023-12-31").unwrap())
        .unwrap();
    assert_eq!(
        tok.render_chat(&[msg("user", "Hi")], false).unwrap(),
        "31 Dec 2023 00:00|Hi"
    );
}

#[test]
fn strftime_writes_the_utc_date_as_python_does() {
    // 2024-02-29 13:05:09 UTC, a Thursday.
    let t = DateTime::from_unix(1_709_211_909);
    assert_eq!(
        t.format("%d %b %Y|%B %m %y|%H:%M:%S|%a %A|100%%").unwrap(),
        "29 Feb 2024|February 02 24|13:05:09|Thu Thursday|100%"
    );
    assert_eq!(
        DateTime::from_unix(-1)
            .format("%Y-%m-%d %H:%M:%S %A")
            .unwrap(),
        "1969-12-31 23:59:59 Wednesday"
    );
    let text = err_text(t.format("%Q"));
    assert!(text.contains("%Q is not supported"), "{text}");

    // Dates as --template-date takes them, round trip and refusals.
    for date in ["2024-02-29", "1969-12-31", "2000-03-01", "2100-02-28"] {
        assert_eq!(DateTime::parse_date(date).unwrap().ymd(), date);
    }
    assert_eq!(
        DateTime::parse_date("2024-02-29").unwrap(),
        DateTime::from_unix(1_709_164_800)
    );
    for bad in [
        "2023-02-29",
        "2100-02-29",
        "2024-13-01",
        "2024-1-01",
        "24-01-01",
        "today",
    ] {
        assert!(DateTime::parse_date(bad).is_err(), "{bad}");
    }
}

#[test]
fn load_errors_name_the_file() {
    let empty = TempDir::new().unwrap();
    let text = err_text(TextTokenizer::load(empty.path()));
    assert!(
        text.contains("tokenizer.json") && text.contains("no such file"),
        "{text}"
    );

    let bad = TempDir::new().unwrap();
    std::fs::write(bad.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let text = err_text(TextTokenizer::load(bad.path()));
    assert!(
        text.contains(&format!("{}", bad.path().join("tokenizer.json").display())),
        "{text}"
    );

    let dir = tokenizer_dir(None);
    std::fs::write(dir.path().join("tokenizer_config.json"), "{\"bos_token\": ").unwrap();
    let text = err_text(TextTokenizer::load(dir.path()));
    assert!(
        text.contains("tokenizer_config.json") && text.contains("malformed JSON"),
        "{text}"
    );

    let dir = tokenizer_dir(Some(serde_json::json!({"chat_template": "{% for %}"})));
    let text = err_text(TextTokenizer::load(dir.path()));
    assert!(
        text.contains("tokenizer_config.json") && text.contains("chat_template"),
        "{text}"
    );

    let dir = tokenizer_dir(Some(serde_json::json!({"chat_template": " "})));
    let text = err_text(TextTokenizer::load(dir.path()));
    assert!(
        text.contains("tokenizer_config.json: chat_template")
            && text.contains("the chat template is empty"),
        "{text}"
    );
}

#[test]
fn template_sources_and_saved_lengths() {
    // Older configs list named templates; transformers uses "default".
    let dir = tokenizer_dir(Some(serde_json::json!({"chat_template": [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "{% for m in messages %}[{{ m.content }}]{% endfor %}"},
    ]})));
    let tok = TextTokenizer::load(dir.path()).unwrap();
    assert_eq!(tok.render_chat(&[msg("user", "a")], false).unwrap(), "[a]");
    // chat_template.jinja wins over tokenizer_config.json's template.
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{{ bos_token }}{{ messages | length }}",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::json!({"bos_token": "<s>", "chat_template": "x"}).to_string(),
    )
    .unwrap();
    let tok = TextTokenizer::load(dir.path()).unwrap();
    assert_eq!(tok.render_chat(&[msg("user", "a")], false).unwrap(), "<s>1");

    // Truncation and padding saved in tokenizer.json do not apply to encode.
    let mut json: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-tokenizer/tokenizer.json")).unwrap(),
    )
    .unwrap();
    json["truncation"] = serde_json::json!(
        {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0}
    );
    json["padding"] = serde_json::json!({"strategy": {"Fixed": 9}, "direction": "Right",
        "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "<unk>"});
    std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
    let tok = TextTokenizer::load(dir.path()).unwrap();
    assert_eq!(tok.encode("Hi the").unwrap(), [246, 75, 108, 252]);
}
