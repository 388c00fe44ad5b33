//! `contralign bench ... --dump DIR`: what the scoreboard's PyTorch side reads
//! (docs/cuda.md, "The scoreboard") holds contralign's inputs and results, checked here
//! against f64 recomputations on the CPU (the fp32 comparison with PyTorch itself is the
//! dry run's, `tools/gpu-suite.sh dry-run`, which CI cannot run).

mod common;

use contralign::checkpoint::{load_weights, read_tensors};
use contralign::config::ModelConfig;
use contralign::model::init::random_params_parallel;
use contralign::model::params::param_specs;
use contralign::ops::cuda::gemm::CUBLAS_WORKSPACE_BYTES;
use tempfile::TempDir;

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// log σ(x) = −softplus(−x), stable for both signs (docs/losses.md §1).
fn log_sigmoid(x: f64) -> f64 {
    -((-x).max(0.0) + (-x.abs()).exp().ln_1p())
}

#[test]
fn scoring_dump_holds_the_sums_and_dpo_loss_of_its_inputs() {
    let dir = TempDir::new().unwrap();
    let (rows, vocab, dim) = (700usize, 97usize, 24usize);
    let out = common::contralign_ok(&[
        "bench",
        "scoring",
        "--device",
        "emu",
        "--dtype",
        "f32",
        "--rows",
        &rows.to_string(),
        "--vocab",
        &vocab.to_string(),
        "--dim",
        &dim.to_string(),
        "--reps",
        "1",
        "--dump",
        dir.path().to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tensors = read_tensors(&dir.path().join("scoring.safetensors")).unwrap();
    let meta = json(&dir.path().join("scoring.json"));
    let (h_shape, h) = &tensors["h"];
    let (head_shape, head) = &tensors["head"];
    assert_eq!(
        (h_shape.as_slice(), head_shape.as_slice()),
        (&[rows, dim][..], &[vocab, dim][..])
    );
    let targets: Vec<usize> = meta["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as usize)
        .collect();
    // Per-row log-probabilities in f64 from the dumped f32 inputs.
    let logp: Vec<f64> = (0..rows)
        .map(|r| {
            let z: Vec<f64> = (0..vocab)
                .map(|v| {
                    (0..dim)
                        .map(|k| h[r * dim + k] as f64 * head[v * dim + k] as f64)
                        .sum()
                })
                .collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            z[targets[r]] - lse
        })
        .collect();
    let spans = meta["spans"].as_array().unwrap();
    let s: Vec<f64> = meta["s"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    // 700 rows of 256: two whole responses and one of 188, so one (chosen, rejected) pair.
    assert_eq!((spans.len(), s.len()), (2, 2));
    for (span, &got) in spans.iter().zip(&s) {
        let (first, len) = (
            span[0].as_u64().unwrap() as usize,
            span[1].as_u64().unwrap() as usize,
        );
        let want: f64 = logp[first..first + len].iter().sum();
        // Each fp32 row's logp is off by at most ~(dim + vocab) 2^-24 |z|max ≈ 121 · 6e-8 · 5 ≈
        // 4e-5 of |logp| ≈ 4.6, and 256 rows sum those: 1e-5 relative of the sum is the bound.
        assert!(
            (got - want).abs() <= 1e-5 * want.abs(),
            "S: {got} vs {want}"
        );
    }
    // The dumped loss is DPO's of those sums with a zero reference: -log σ(β (S_0 - S_1)).
    let beta = meta["beta"].as_f64().unwrap();
    let loss = -log_sigmoid(beta * (s[0] - s[1]));
    let dumped = meta["loss"].as_f64().unwrap();
    assert!(
        (loss - dumped).abs() <= 1e-12 * loss.abs(),
        "{loss} vs {dumped}"
    );
    assert_eq!(report["dumped"]["loss"].as_f64(), Some(dumped));
}

#[test]
fn step_dump_holds_the_benchmarked_model_groups_and_reference() {
    let dir = TempDir::new().unwrap();
    let config = format!(
        "{}/tools/scoreboard/tiny-mistral.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let (groups, responses, prompt, response_len) = (3usize, 4usize, 7usize, 5usize);
    let out = common::contralign_ok(&[
        "bench",
        "step",
        "--device",
        "emu",
        "--config",
        &config,
        "--layers",
        "1",
        "--groups",
        &groups.to_string(),
        "--responses",
        &responses.to_string(),
        "--prompt",
        &prompt.to_string(),
        "--response-len",
        &response_len.to_string(),
        "--steps",
        "1",
        "--gemm-size",
        "32",
        "--seed",
        "5",
        "--dump",
        dir.path().to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The model directory holds exactly the weights the bench drew from its seed.
    let model = dir.path().join("model");
    let cfg = ModelConfig::load(&model).unwrap();
    assert_eq!(cfg.num_layers, 1);
    let (weights, _) = load_weights(&model, &cfg, contralign::ops::storage::Dtype::F32).unwrap();
    let drawn = random_params_parallel(&cfg, 5).unwrap();
    for ((name, _), want) in param_specs(&cfg).iter().zip(&drawn) {
        assert_eq!(&weights[name], want, "{name}");
    }
    let meta = json(&dir.path().join("step.json"));
    assert_eq!(meta["loss"], "nca");
    let dumped = meta["groups"].as_array().unwrap();
    assert_eq!(dumped.len(), groups);
    for g in dumped {
        assert_eq!(g["prompt"].as_array().unwrap().len(), prompt);
        let rs = g["responses"].as_array().unwrap();
        assert_eq!(rs.len(), responses);
        assert!(rs
            .iter()
            .all(|r| r.as_array().unwrap().len() == response_len));
        // The made-up cached reference: S_ref = -n · U(1, 3) per response.
        for s in g["ref_logp_sum"].as_array().unwrap() {
            let per_token = -s.as_f64().unwrap() / response_len as f64;
            assert!((1.0..3.0).contains(&per_token), "{per_token}");
        }
    }
    let first = meta["first_step_loss"].as_f64().unwrap();
    assert_eq!(report["first_step_loss"].as_f64(), Some(first));
    assert!(first.is_finite() && first > 0.0);
    // The engine's memory and cuBLAS's workspace are the plan (regions rounded up to their
    // alignment); the driver's figure exists only on a GPU.
    let (held, planned) = (
        report["device_bytes"].as_u64().unwrap() as f64,
        report["plan_bytes"].as_u64().unwrap() as f64,
    );
    let with_cublas = held + CUBLAS_WORKSPACE_BYTES as f64;
    // 256-byte alignment of a few dozen regions at most.
    assert!(
        planned > 0.0 && (with_cublas - planned).abs() <= 16384.0,
        "{report}"
    );
    assert!(report["device_used_bytes"].is_null(), "{report}");
}

/// `bench step --memory` plans the step as `train --memory` does: a plan over the limit
/// prints why, with the plan's bytes (those `contralign plan` prints), and runs nothing; one
/// under it runs the step.
#[test]
fn step_under_a_memory_limit_is_planned_first() {
    let config = format!(
        "{}/tools/scoreboard/tiny-mistral.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let bench = |memory: &str| -> serde_json::Value {
        let out = common::contralign_ok(&[
            "bench",
            "step",
            "--device",
            "emu",
            "--config",
            &config,
            "--layers",
            "1",
            "--groups",
            "1",
            "--responses",
            "2",
            "--prompt",
            "5",
            "--response-len",
            "3",
            "--steps",
            "1",
            "--gemm-size",
            "16",
            "--memory",
            memory,
        ]);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let refused = bench("100KB");
    let why = refused["out_of_memory"].as_str().unwrap();
    assert!(why.contains("--memory is"), "{why}");
    assert!(refused["plan_bytes"].as_u64().unwrap() > 100_000);
    assert!(refused.get("tokens_per_s").is_none());
    let planned = bench("1GB");
    assert!(planned.get("out_of_memory").is_none(), "{planned}");
    assert!(planned["tokens_per_s"].as_f64().unwrap() > 0.0);
}

/// `bench moe --dump` holds the layer's inputs and its output: the output recomputed in f64
/// from the dumped router and experts (softmax, top-k renormalized, SwiGLU experts, as
/// Mixtral), and the loss Σ out·dy of the dumped tensors.
#[test]
fn moe_dump_holds_the_inputs_and_output_of_the_layer() {
    let dir = TempDir::new().unwrap();
    let (t, d, f, e, k) = (24usize, 16usize, 12usize, 4usize, 2usize);
    let out = common::contralign_ok(&[
        "bench",
        "moe",
        "--device",
        "emu",
        "--dtype",
        "f32",
        "--tokens",
        &t.to_string(),
        "--dim",
        &d.to_string(),
        "--ffn",
        &f.to_string(),
        "--experts",
        &e.to_string(),
        "--top-k",
        &k.to_string(),
        "--reps",
        "1",
        "--dump",
        dir.path().to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tensors = read_tensors(&dir.path().join("moe.safetensors")).unwrap();
    let get = |name: &str, shape: &[usize]| -> Vec<f64> {
        let (s, data) = &tensors[name];
        assert_eq!(s.as_slice(), shape, "{name}");
        data.iter().map(|&x| x as f64).collect()
    };
    let (router, gate, up, down) = (
        get("router", &[e, d]),
        get("gate", &[e, f, d]),
        get("up", &[e, f, d]),
        get("down", &[e, d, f]),
    );
    let (x, dy, dumped) = (get("x", &[t, d]), get("dy", &[t, d]), get("out", &[t, d]));
    get("dx", &[t, d]);
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>();
    for r in 0..t {
        let xr = &x[r * d..(r + 1) * d];
        let logits: Vec<f64> = (0..e)
            .map(|j| dot(&router[j * d..(j + 1) * d], xr))
            .collect();
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        // Softmax then renormalized over the top k: the top k's own softmax.
        let top = &order[..k];
        let z: f64 = top
            .iter()
            .map(|&j| (logits[j] - logits[top[0]]).exp())
            .sum();
        let mut want = vec![0.0; d];
        for &j in top {
            let weight = (logits[j] - logits[top[0]]).exp() / z;
            let h: Vec<f64> = (0..f)
                .map(|i| {
                    let g = dot(&gate[(j * f + i) * d..(j * f + i + 1) * d], xr);
                    let u = dot(&up[(j * f + i) * d..(j * f + i + 1) * d], xr);
                    g / (1.0 + (-g).exp()) * u
                })
                .collect();
            for (c, w) in want.iter_mut().enumerate() {
                *w += weight * dot(&down[(j * d + c) * f..(j * d + c + 1) * f], &h);
            }
        }
        for (c, &w) in want.iter().enumerate() {
            let got = dumped[r * d + c];
            assert!(
                (got - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "out[{r}, {c}]: {got} vs {w}"
            );
        }
    }
    let meta = json(&dir.path().join("moe.json"));
    let loss = meta["loss"].as_f64().unwrap();
    assert!((dot(&dumped, &dy) - loss).abs() <= 1e-12 * loss.abs().max(1.0));
    assert_eq!(report["dumped"]["loss"].as_f64(), Some(loss));
    assert_eq!(
        (meta["experts"].as_u64(), meta["top_k"].as_u64()),
        (Some(4), Some(2))
    );
}

/// A dump replaces nothing: a folder that holds what it would write (here the very model that
/// `--config` reads, and an earlier dump) is refused before any work and left as it was, while
/// other files may be there (the GPU suite dumps several runs into one folder).
#[test]
fn a_dump_that_would_replace_a_file_is_refused() {
    let dir = TempDir::new().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(common::fixture("tiny-mistral").join(file), model.join(file)).unwrap();
    }
    for file in [
        "scoring.json",
        "attention-causal-64.safetensors",
        "moe.json",
    ] {
        std::fs::write(dir.path().join(file), b"earlier").unwrap();
    }
    let before = std::fs::read(model.join("model.safetensors")).unwrap();
    let (config, dump) = (model.to_string_lossy(), dir.path().to_string_lossy());
    fn bench<'a>(case: &[&'a str], dump: &'a str) -> Vec<&'a str> {
        [&["bench"], case, &["--device", "emu", "--dump", dump]].concat()
    }
    let attention = [
        "attention",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--head-dim",
        "8",
    ];
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec![
                "step",
                "--config",
                &config,
                "--steps",
                "1",
                "--gemm-size",
                "16",
            ],
            "model",
        ),
        (
            vec![
                "scoring", "--rows", "600", "--vocab", "16", "--dim", "8", "--reps", "1",
            ],
            "scoring.json",
        ),
        (
            [&attention[..], &["--tokens", "32,64", "--mask", "causal"]].concat(),
            "attention-causal-64.safetensors",
        ),
        (
            vec![
                "moe",
                "--tokens",
                "8",
                "--dim",
                "16",
                "--ffn",
                "16",
                "--experts",
                "4",
            ],
            "moe.json",
        ),
    ];
    for (case, name) in &cases {
        common::contralign_fails(
            &bench(case, &dump),
            &format!("--dump {dump}: {name} is there already; a dump replaces nothing"),
        );
    }
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        before
    );
    // Beside them, a case of its own.
    let other = [
        &attention[..],
        &["--tokens", "32", "--mask", "causal", "--reps", "1"],
    ]
    .concat();
    common::contralign_ok(&bench(&other, &dump));
    assert!(dir.path().join("attention-causal-32.json").is_file());
    let file = model.join("config.json");
    common::contralign_fails(
        &bench(&cases[3].0, &file.to_string_lossy()),
        &format!("--dump {}: not a directory", file.display()),
    );
}
