//! Generation with the KV cache: its logits and greedy tokens against full-sequence forwards
//! without a cache, batching, EOS, sampling, and the `generate` command.

mod common;

use common::{contralign, contralign_ok, fixture, fx, rel_err, rng};
use contralign::generate::{argmax, generate, Decoder, Generation, Sampling};
use contralign::model::Model;
use contralign::ops::cpu::CpuOps;
use contralign::tokenizer::TextTokenizer;
use rand::Rng;
use tempfile::TempDir;

/// Every fixture model: Mistral with a sliding window of 6, Mixtral without one, Mixtral top-1
/// with a window of 4, tied bf16 Mistral with a window of 3 (MHA), f16 Mistral with MQA and
/// two EOS ids.
const MODELS: [&str; 5] = [
    "tiny-mistral",
    "tiny-mixtral",
    "configs/mixtral-top1-window",
    "configs/mistral-tied-bf16",
    "configs/mistral-mqa-f16",
];

fn load(name: &str) -> Model<Vec<f32>> {
    Model::load(&CpuOps, &fixture(name)).unwrap()
}

/// Prompts of awkward lengths (1, a prime, one past a window, random), BOS first.
fn random_prompts(rng: &mut impl Rng, model: &Model<Vec<f32>>, count: usize) -> Vec<Vec<u32>> {
    let vocab = model.cfg.vocab_size as u32;
    (0..count)
        .map(|i| {
            let len = match i {
                0 => 1,
                1 => 7,
                2 => model.cfg.sliding_window.map_or(5, |w| w + 1),
                _ => rng.gen_range(1..=13),
            };
            let mut p: Vec<u32> = (0..len).map(|_| rng.gen_range(3..vocab)).collect();
            p[0] = 1;
            p
        })
        .collect()
}

/// Greedy decoding without a cache: the argmax of the last row of `Model::logits` over the
/// whole sequence, again and again.
fn greedy_without_cache(model: &Model<Vec<f32>>, prompt: &[u32], max_new: usize) -> Generation {
    let vocab = model.cfg.vocab_size;
    let mut seq = prompt.to_vec();
    let mut ids = Vec::new();
    while ids.len() < max_new {
        let logits = model.logits(&CpuOps, &seq);
        let id = argmax(&logits[logits.len() - vocab..]);
        ids.push(id);
        seq.push(id);
        if model.cfg.is_eos(id) {
            return Generation {
                ids,
                stopped_at_eos: true,
            };
        }
    }
    Generation {
        ids,
        stopped_at_eos: false,
    }
}

#[test]
fn greedy_with_the_cache_equals_argmax_of_full_sequence_logits() {
    let mut rng = rng("greedy_with_the_cache_equals_argmax_of_full_sequence_logits");
    for name in MODELS {
        let mut model = load(name);
        // No EOS: every prompt runs its 24 tokens, far past every sliding window.
        model.cfg.eos_token_ids.clear();
        let prompts = random_prompts(&mut rng, &model, 4);
        let got = generate(&model, &prompts, &Sampling::greedy(24)).unwrap();
        for (prompt, g) in prompts.iter().zip(&got) {
            assert_eq!(g.ids.len(), 24, "{name}");
            assert_eq!(
                g,
                &greedy_without_cache(&model, prompt, 24),
                "{name}, prompt {prompt:?}"
            );
        }
    }
}

/// `logits` against the last row of `Model::logits` over `seq`.
fn assert_last_row(model: &Model<Vec<f32>>, seq: &[u32], logits: &[f32], what: &str) {
    let vocab = model.cfg.vocab_size;
    let full = model.logits(&CpuOps, seq);
    let want: Vec<f64> = full[full.len() - vocab..]
        .iter()
        .map(|&x| x as f64)
        .collect();
    let err = rel_err(logits, &want);
    assert!(err < 1e-5, "{what} at {} tokens: {err:.2e}", seq.len());
}

#[test]
fn cached_logits_equal_full_sequence_logits_at_every_step() {
    let mut rng = rng("cached_logits_equal_full_sequence_logits_at_every_step");
    for name in MODELS {
        let model = load(name);
        let vocab = model.cfg.vocab_size;
        let mut seqs = random_prompts(&mut rng, &model, 3);
        let mut decoder = Decoder::new(&model, seqs.len());
        let feeds: Vec<(usize, &[u32])> =
            seqs.iter().enumerate().map(|(i, p)| (i, &p[..])).collect();
        let logits = decoder.feed(&feeds);
        for (i, seq) in seqs.iter().enumerate() {
            let row = &logits[i * vocab..(i + 1) * vocab];
            assert_last_row(&model, seq, row, &format!("{name} prefill {i}"));
        }
        // Each sequence continues with random tokens fed one, two or three at a time, some
        // sequences together, some left out of a step.
        for step in 0..12 {
            let chosen: Vec<usize> = (0..seqs.len())
                .filter(|&s| s == step % seqs.len() || rng.gen_bool(0.6))
                .collect();
            let new: Vec<Vec<u32>> = chosen
                .iter()
                .map(|_| {
                    let n = rng.gen_range(1..=3);
                    (0..n).map(|_| rng.gen_range(0..vocab as u32)).collect()
                })
                .collect();
            let feeds: Vec<(usize, &[u32])> =
                chosen.iter().zip(&new).map(|(&s, t)| (s, &t[..])).collect();
            let logits = decoder.feed(&feeds);
            for (row, (&seq, tokens)) in chosen.iter().zip(&new).enumerate() {
                seqs[seq].extend_from_slice(tokens);
                assert_eq!(decoder.len(seq), seqs[seq].len());
                let what = format!("{name} step {step}, sequence {seq}");
                assert_last_row(
                    &model,
                    &seqs[seq],
                    &logits[row * vocab..(row + 1) * vocab],
                    &what,
                );
            }
        }
    }
}

#[test]
fn batched_generation_equals_one_prompt_at_a_time() {
    let mut rng = rng("batched_generation_equals_one_prompt_at_a_time");
    for name in ["tiny-mistral", "tiny-mixtral"] {
        let model = load(name);
        // More prompts than one batch holds.
        let prompts = random_prompts(&mut rng, &model, 70);
        let sampling = Sampling::greedy(rng.gen_range(5..=12));
        let batched = generate(&model, &prompts, &sampling).unwrap();
        for (prompt, g) in prompts.iter().zip(&batched) {
            let alone = generate(&model, std::slice::from_ref(prompt), &sampling).unwrap();
            assert_eq!(&alone[0], g, "{name}, prompt {prompt:?}");
        }
    }
}

#[test]
fn generation_stops_at_the_first_eos_id() {
    let mut rng = rng("generation_stops_at_the_first_eos_id");
    for name in MODELS {
        let mut model = load(name);
        model.cfg.eos_token_ids.clear();
        let prompts = random_prompts(&mut rng, &model, 3);
        let free = generate(&model, &prompts, &Sampling::greedy(20)).unwrap();
        // Make two tokens each continuation produces EOS ids: each stops at the first of them.
        let eos: Vec<u32> = free[..2]
            .iter()
            .map(|g| g.ids[rng.gen_range(0..20)])
            .collect();
        model.cfg.eos_token_ids = eos.clone();
        let stopped = generate(&model, &prompts, &Sampling::greedy(20)).unwrap();
        for (f, s) in free.iter().zip(&stopped) {
            let end = f.ids.iter().position(|id| eos.contains(id));
            match end {
                Some(end) => {
                    assert_eq!(s.ids, f.ids[..=end], "{name}");
                    assert!(s.stopped_at_eos, "{name}");
                }
                None => assert_eq!(s, f, "{name}"),
            }
        }
        assert!(
            stopped[0].stopped_at_eos && stopped[1].stopped_at_eos,
            "{name}"
        );
    }
}

fn sampled(temperature: f64, top_p: f64, max_new_tokens: usize, seed: u64) -> Sampling {
    Sampling {
        temperature,
        top_p,
        max_new_tokens,
        seed,
    }
}

#[test]
fn sampling_is_seeded_and_its_limits_are_greedy() {
    let mut rng = rng("sampling_is_seeded_and_its_limits_are_greedy");
    for name in ["tiny-mistral", "configs/mixtral-top1-window"] {
        let mut model = load(name);
        model.cfg.eos_token_ids.clear();
        let prompts = random_prompts(&mut rng, &model, 5);
        let seed = rng.gen();
        let run = |s: &Sampling| generate(&model, &prompts, s).unwrap();
        let greedy = run(&Sampling::greedy(20));
        let a = run(&sampled(1.0, 0.9, 20, seed));
        assert_eq!(a, run(&sampled(1.0, 0.9, 20, seed)), "{name}: same seed");
        assert_ne!(
            a,
            run(&sampled(1.0, 0.9, 20, seed ^ 1)),
            "{name}: another seed"
        );
        assert_ne!(a, greedy, "{name}: sampling at temperature 1");
        assert_eq!(
            run(&sampled(1e-7, 1.0, 20, seed)),
            greedy,
            "{name}: temperature → 0"
        );
        assert_eq!(
            run(&sampled(1.0, 1e-9, 20, seed)),
            greedy,
            "{name}: top_p → 0"
        );
        assert_eq!(
            run(&sampled(3.0, 1e-9, 20, seed)),
            greedy,
            "{name}: top_p → 0 at T=3"
        );
    }
}

/// Pearson's statistic of `counts` against probabilities `probs` over `n` draws, with cells
/// expected fewer than 5 times pooled; returns it with its degrees of freedom.
fn chi_square(counts: &[usize], probs: &[f64], n: usize) -> (f64, usize) {
    let (mut stat, mut cells) = (0.0, 0);
    let (mut pooled_count, mut pooled_expected) = (0.0, 0.0);
    for (&c, &p) in counts.iter().zip(probs) {
        let expected = p * n as f64;
        if expected < 5.0 {
            pooled_count += c as f64;
            pooled_expected += expected;
        } else {
            stat += (c as f64 - expected).powi(2) / expected;
            cells += 1;
        }
    }
    if pooled_expected > 0.0 {
        stat += (pooled_count - pooled_expected).powi(2) / pooled_expected;
        cells += 1;
    }
    (stat, cells - 1)
}

#[test]
fn sampled_first_tokens_follow_the_nucleus_of_the_softmax() {
    let mut rng = rng("sampled_first_tokens_follow_the_nucleus_of_the_softmax");
    let model = load("tiny-mistral");
    let vocab = model.cfg.vocab_size;
    let mut prompt: Vec<u32> = (0..3).map(|_| rng.gen_range(3..vocab as u32)).collect();
    prompt[0] = 1;
    let logits = model.logits(&CpuOps, &prompt);
    let last: Vec<f64> = logits[logits.len() - vocab..]
        .iter()
        .map(|&x| x as f64)
        .collect();
    let draws = 8_000;
    let prompts = vec![prompt.clone(); draws];
    for (temperature, top_p) in [(1.0, 1.0), (0.7, 1.0), (1.0, 0.6)] {
        let max = last.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let mut probs: Vec<f64> = last
            .iter()
            .map(|z| ((z - max) / temperature).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        // The nucleus: the most probable tokens until their mass reaches top_p.
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        let mut mass = 0.0;
        let mut nucleus = vec![false; vocab];
        for &id in &order {
            nucleus[id] = true;
            mass += probs[id];
            if mass >= top_p {
                break;
            }
        }
        for (p, &inside) in probs.iter_mut().zip(&nucleus) {
            *p = if inside { *p / mass } else { 0.0 };
        }
        let sampling = sampled(temperature, top_p, 1, rng.gen());
        let mut counts = vec![0usize; vocab];
        for g in generate(&model, &prompts, &sampling).unwrap() {
            counts[g.ids[0] as usize] += 1;
        }
        let outside: usize = (0..vocab).filter(|&i| !nucleus[i]).map(|i| counts[i]).sum();
        assert_eq!(
            outside, 0,
            "T={temperature} top_p={top_p}: draws outside the nucleus"
        );
        let (stat, df) = chi_square(&counts, &probs, draws);
        // Far in the tail: mean df, standard deviation sqrt(2 df).
        let bound = df as f64 + 6.0 * (2.0 * df as f64).sqrt();
        assert!(
            df >= 5 && stat < bound,
            "T={temperature} top_p={top_p}: chi-square {stat:.1} over {df} degrees of freedom"
        );
    }
}

fn lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn generate_command_on_pre_tokenized_data() {
    let data = fx("tiny-mistral.reward.jsonl");
    let out = contralign_ok(&[
        "generate",
        "--model",
        &fx("tiny-mistral"),
        "--data",
        &data,
        "--max-new-tokens",
        "5",
    ]);
    let got = lines(&out);
    let groups =
        contralign::data::load::load_groups(std::path::Path::new(&data), None, &Default::default())
            .unwrap()
            .groups;
    assert_eq!(got.len(), groups.len());
    let model = load("tiny-mistral");
    let prompts: Vec<Vec<u32>> = groups.into_iter().map(|g| g.prompt).collect();
    let want = generate(&model, &prompts, &Sampling::greedy(5)).unwrap();
    for (i, (line, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(line["group"], i);
        assert_eq!(line["source"], format!("{data}:{}", i + 1));
        assert_eq!(line["ids"], serde_json::json!(w.ids));
        assert_eq!(line["stopped_at_eos"], w.stopped_at_eos);
        assert!(line["completion"].is_null());
    }
    // A data set folder whose only split is `test`, chosen by --split.
    let tmp = TempDir::new().unwrap();
    let split = tmp.path().join("data/test-00000-of-00001.jsonl");
    std::fs::create_dir_all(split.parent().unwrap()).unwrap();
    std::fs::copy(&data, &split).unwrap();
    let folder = tmp.path().to_string_lossy();
    let args = [
        "generate",
        "--model",
        &fx("tiny-mistral"),
        "--data",
        &folder,
    ];
    let out = contralign_ok(&[&args[..], &["--split", "test", "--max-new-tokens", "5"]].concat());
    let from_folder = lines(&out);
    assert_eq!(from_folder.len(), got.len());
    for (a, b) in from_folder.iter().zip(&got) {
        assert_eq!(a["ids"], b["ids"]);
        assert_eq!(
            a["source"],
            format!("{}:{}", split.display(), a["group"].as_u64().unwrap() + 1)
        );
    }
}

#[test]
fn generate_command_refuses_bad_requests() {
    let model = fx("tiny-mistral");
    let data = fx("tiny-mistral.reward.jsonl");
    let tmp = TempDir::new().unwrap();
    let oov_file = tmp.path().join("oov.jsonl");
    std::fs::write(
        &oov_file,
        r#"{"prompt_ids": [1, 999], "response_ids": [[7, 2], [9, 2]], "rewards": [1, 0]}"#,
    )
    .unwrap();
    let oov = oov_file.to_string_lossy().into_owned();
    let oov_message = format!("{oov}:1: prompt, token 1: id 999 is outside the vocabulary");
    for (args, needle) in [
        (vec!["--data", &oov], oov_message.as_str()),
        (vec!["--prompt", "hello"], "no tokenizer.json"),
        (
            vec!["--prompt", "hi", "--data", &data],
            "cannot be used with",
        ),
        (vec![], "--prompt"),
        (vec!["--data", &data, "--temperature", "-1"], "temperature"),
        (
            vec!["--data", &data, "--top-p", "0"],
            "--top-p must be in (0, 1]",
        ),
        (
            vec!["--data", &data, "--top-p", "1.5"],
            "--top-p must be in (0, 1]",
        ),
        (vec!["--data", &data, "--chat"], "cannot be used with"),
        (vec!["--data", &data, "--json"], "cannot be used with"),
        (
            vec!["--prompt", "hi", "--skip-invalid"],
            "cannot be used with",
        ),
    ] {
        let mut argv = vec!["generate", "--model", &model];
        argv.extend(&args);
        let out = contralign(&argv);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn generate_command_completes_text_prompts_through_the_tokenizer() {
    let tmp = TempDir::new().unwrap();
    let model_dir = tmp.path().join("model");
    common::tiny_mistral_with_tokenizer(&model_dir);
    let dir = model_dir.to_string_lossy().into_owned();
    let tokenizer = TextTokenizer::load(&model_dir).unwrap();
    let model = Model::load(&CpuOps, &model_dir).unwrap();
    let base = [
        "generate",
        "--model",
        &dir,
        "--prompt",
        "the heat",
        "--max-new-tokens",
        "12",
    ];
    for (flag, rendered) in [
        ("--chat", "<s>[INST] the heat [/INST]"),
        ("--no-chat", "the heat"),
    ] {
        let mut argv = base.to_vec();
        argv.extend([flag, "--json"]);
        let line = &lines(&contralign_ok(&argv))[0];
        assert_eq!(line["prompt"], rendered);
        let ids = if flag == "--chat" {
            tokenizer.encode(rendered).unwrap()
        } else {
            tokenizer.encode_with_special_tokens(rendered).unwrap()
        };
        let want = generate(&model, &[ids], &Sampling::greedy(12))
            .unwrap()
            .remove(0);
        assert_eq!(line["ids"], serde_json::json!(want.ids), "{flag}");
        assert_eq!(line["stopped_at_eos"], want.stopped_at_eos, "{flag}");
        assert_eq!(
            line["completion"],
            tokenizer.decode(&want.ids).unwrap(),
            "{flag}"
        );
    }
    // The tokenizer has a chat template: it is used by default, and the text is printed.
    let plain = String::from_utf8(contralign_ok(&base).stdout).unwrap();
    let mut argv = base.to_vec();
    argv.extend(["--chat", "--json"]);
    let line = &lines(&contralign_ok(&argv))[0];
    assert_eq!(plain, format!("{}\n", line["completion"].as_str().unwrap()));
    // Text data goes through the tokenizer too, each prompt tokenized alone: "hello there "
    // ends in a ▁ that training's split would cut (it merges into the responses' ▁the), and
    // generation continues the prompt as the user wrote it.
    let data = tmp.path().join("data.jsonl");
    let prompt = "hello there ";
    std::fs::write(
        &data,
        format!(r#"{{"prompt": "{prompt}", "responses": ["the end", "then"], "rewards": [1, 0]}}"#),
    )
    .unwrap();
    let alone = tokenizer.encode_with_special_tokens(prompt).unwrap();
    let split = tokenizer
        .tokenize_plain(prompt, &["the end".into(), "then".into()])
        .unwrap();
    assert!(
        !split.prompt_cut.is_empty(),
        "the case needs a prompt the split shortens"
    );
    let want = generate(&model, &[alone], &Sampling::greedy(4))
        .unwrap()
        .remove(0);
    let out = contralign_ok(&[
        "generate",
        "--model",
        &dir,
        "--data",
        &data.to_string_lossy(),
        "--max-new-tokens",
        "4",
    ]);
    let line = &lines(&out)[0];
    assert_eq!(line["ids"], serde_json::json!(want.ids));
    assert_eq!(line["completion"], tokenizer.decode(&want.ids).unwrap());
}

#[test]
fn a_sequence_past_the_trained_positions_is_noted() {
    let args = [
        "generate",
        "--model",
        &fx("tiny-mistral"),
        "--data",
        &fx("tiny-mistral.reward.jsonl"),
        "--max-new-tokens",
        "520",
    ];
    let out = common::contralign_ok(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pass the model's max_position_embeddings of 512"),
        "{stderr}"
    );
    let within = common::contralign_ok(&args[..5]);
    assert!(String::from_utf8_lossy(&within.stderr).is_empty());
}
