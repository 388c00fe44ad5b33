//! Checkpoints in configurations the two tiny fixtures do not exercise (explicit `head_dim`,
//! tied embeddings, bf16/f16 storage, MHA and MQA, `eos_token_id` lists, hub-style and
//! transformers-5 `config.json`, Mixtral top-1 and top-3-of-5, sharding), each against
//! transformers' float64 logits and statistics (tests/fixtures/configs/README.md).

mod common;

use common::{assert_stats, fixture, rel_err, Golden};
use contralign::data::pretokenized::read_file;
use contralign::model::Model;
use contralign::ops::cpu::CpuOps;
use contralign::step;

/// Every fixture folder must be one of these (and all of them must be there).
const FIXTURES: [&str; 5] = [
    "mistral-head-dim",
    "mistral-tied-bf16",
    "mistral-mqa-f16",
    "mixtral-top1-window",
    "mixtral-top3of5-bf16",
];

fn fixture_dirs() -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(fixture("configs"))
        .expect("tests/fixtures/configs")
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    found.sort();
    let mut want: Vec<String> = FIXTURES.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(found, want, "fixture folders under tests/fixtures/configs");
    FIXTURES.iter().map(|s| s.to_string()).collect()
}

fn load(name: &str) -> Model<Vec<f32>> {
    let dir = fixture(&format!("configs/{name}"));
    Model::load(&CpuOps, &dir).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

fn golden(name: &str) -> Golden {
    Golden::load(&format!("configs/{name}/golden.safetensors"))
}

/// What each config.json says, as the engine must read it.
#[test]
fn configs_read_as_written() {
    struct Want {
        name: &'static str,
        head_dim: usize,
        heads: usize,
        kv_heads: usize,
        rope_theta: f64,
        rms_norm_eps: f64,
        window: Option<usize>,
        tied: bool,
        eos: &'static [u32],
        experts: Option<(usize, usize)>,
    }
    let wants = [
        Want {
            name: "mistral-head-dim",
            head_dim: 12,
            heads: 4,
            kv_heads: 2,
            rope_theta: 1e6,
            rms_norm_eps: 1e-5,
            window: None,
            tied: false,
            eos: &[2],
            experts: None,
        },
        Want {
            name: "mistral-tied-bf16",
            head_dim: 8,
            heads: 4,
            kv_heads: 4,
            rope_theta: 1e4,
            rms_norm_eps: 1e-5,
            window: Some(3),
            tied: true,
            eos: &[2],
            experts: None,
        },
        Want {
            name: "mistral-mqa-f16",
            head_dim: 10,
            heads: 4,
            kv_heads: 1,
            rope_theta: 1e6,
            rms_norm_eps: 1e-6,
            window: None,
            tied: false,
            eos: &[2, 5],
            experts: None,
        },
        Want {
            name: "mixtral-top1-window",
            head_dim: 8,
            heads: 4,
            kv_heads: 2,
            rope_theta: 1e6,
            rms_norm_eps: 1e-5,
            window: Some(4),
            tied: false,
            eos: &[2],
            experts: Some((3, 1)),
        },
        Want {
            name: "mixtral-top3of5-bf16",
            head_dim: 12,
            heads: 4,
            kv_heads: 2,
            rope_theta: 5e5,
            rms_norm_eps: 1e-5,
            window: None,
            tied: false,
            eos: &[2],
            experts: Some((5, 3)),
        },
    ];
    assert_eq!(wants.len(), fixture_dirs().len());
    for w in &wants {
        let cfg = load(w.name).cfg;
        let n = w.name;
        assert_eq!(cfg.head_dim, w.head_dim, "{n} head_dim");
        assert_eq!(cfg.num_heads, w.heads, "{n} num_heads");
        assert_eq!(cfg.num_kv_heads, w.kv_heads, "{n} num_kv_heads");
        assert_eq!(cfg.rope_theta, w.rope_theta, "{n} rope_theta");
        assert_eq!(cfg.rms_norm_eps, w.rms_norm_eps, "{n} rms_norm_eps");
        assert_eq!(cfg.sliding_window, w.window, "{n} sliding_window");
        assert_eq!(cfg.tie_word_embeddings, w.tied, "{n} tie_word_embeddings");
        assert_eq!(cfg.eos_token_ids, w.eos, "{n} eos_token_ids");
        assert_eq!(cfg.bos_token_id, Some(1), "{n} bos_token_id");
        let experts = cfg
            .moe
            .as_ref()
            .map(|m| (m.num_experts, m.experts_per_token));
        assert_eq!(experts, w.experts, "{n} experts");
    }
}

#[test]
fn logits_match_transformers() {
    for name in fixture_dirs() {
        let model = load(&name);
        let golden = golden(&name);
        let groups = read_file(&fixture(&format!("configs/{name}/data.jsonl"))).unwrap();
        let (mut checked, mut worst) = (0, 0.0f64);
        for (g, group) in groups.iter().enumerate() {
            for (r, response) in group.responses.iter().enumerate() {
                let ids: Vec<u32> = group.prompt.iter().chain(response).copied().collect();
                let got = model.logits(&CpuOps, &ids);
                let key = format!("logits.{g}.{r}");
                let (shape, want) = golden
                    .0
                    .get(&key)
                    .unwrap_or_else(|| panic!("{name}: {key}"));
                assert_eq!(
                    shape,
                    &[ids.len(), model.cfg.vocab_size],
                    "{name} {key} shape"
                );
                let err = rel_err(&got, want);
                assert!(err < 1e-5, "{name} {key}: relative error {err:.3e}");
                worst = worst.max(err);
                checked += 1;
            }
        }
        let logit_keys = golden.0.keys().filter(|k| k.starts_with("logits.")).count();
        assert_eq!(
            checked, logit_keys,
            "{name}: golden logits not covered by data.jsonl"
        );
        eprintln!("{name}: {checked} sequences, worst logits relative error {worst:.2e}");
    }
}

#[test]
fn packed_statistics_match_transformers() {
    for name in fixture_dirs() {
        let model = load(&name);
        let golden = golden(&name);
        let groups = read_file(&fixture(&format!("configs/{name}/data.jsonl"))).unwrap();
        let batch = step::pack(&model, &groups).unwrap();
        let stats = model.score(&CpuOps, &batch);
        let want = golden.get("stats");
        assert_eq!(stats.len() * 4, want.len(), "{name}: number of responses");
        let worst = assert_stats(&name, &stats, want);
        eprintln!(
            "{name}: {} responses, worst S/E relative error {worst:.2e}",
            stats.len()
        );
    }
}
