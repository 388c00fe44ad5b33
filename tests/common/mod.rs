//! Helpers shared by the integration tests: fixture paths, golden tensors, error measures.
#![allow(dead_code)]

pub mod device_step;

use std::collections::HashMap;
use std::path::PathBuf;

/// A test fixture: under `CONTRALIGN_FIXTURES` when set (test executables carried to a
/// machine where the checkout sits elsewhere, as tools/gpu-suite.sh does), else this crate's
/// tests/fixtures.
pub fn fixture(name: &str) -> PathBuf {
    std::env::var_os("CONTRALIGN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
        .join(name)
}

/// A model directory with the tiny tokenizer.json and the given tokenizer_config.json.
pub fn tokenizer_dir(config: Option<serde_json::Value>) -> tempfile::TempDir {
    let dir = tempfile::TempDir::new().unwrap();
    std::fs::copy(
        fixture("tiny-tokenizer/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    if let Some(config) = config {
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    }
    dir
}

/// A chat template like Mistral-7B-Instruct-v0.3's, which writes the system message into
/// the last user turn: the prompt alone (`[INST] brief Hi [/INST]`) and the prompt with a
/// response (`[INST] Hi [/INST]..`) render it differently.
pub const SYSTEM_IN_LAST_USER_TURN: &str = "{% set ns = namespace(system='') %}\
    {% for m in messages %}{% if m.role == 'system' %}{% set ns.system = m.content %}\
    {% elif m.role == 'user' %}[INST] {% if loop.last %}{{ ns.system }} {% endif %}\
    {{ m.content }} [/INST]{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}";

/// A golden safetensors file (all F64), by name: `(shape, values)`.
pub struct Golden(pub HashMap<String, (Vec<usize>, Vec<f64>)>);

impl Golden {
    pub fn load(name: &str) -> Self {
        let bytes = std::fs::read(fixture(name)).expect("golden file");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("golden safetensors");
        let mut map = HashMap::new();
        for (k, v) in st.tensors() {
            assert_eq!(v.dtype(), safetensors::Dtype::F64, "{k}");
            let vals = v
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect();
            map.insert(k, (v.shape().to_vec(), vals));
        }
        Golden(map)
    }

    pub fn get(&self, key: &str) -> &[f64] {
        &self
            .0
            .get(key)
            .unwrap_or_else(|| panic!("golden key {key} missing"))
            .1
    }

    pub fn scalar(&self, key: &str) -> f64 {
        self.get(key)[0]
    }
}

/// `‖a − b‖ / ‖b‖` (absolute when `b` is all zeros).
pub fn rel_err<A: Copy + Into<f64>>(a: &[A], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((*x).into() - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if norm == 0.0 {
        diff
    } else {
        diff / norm
    }
}

pub fn assert_close(what: &str, got: f64, want: f64, rel: f64) {
    let err = (got - want).abs() / want.abs().max(1e-12);
    assert!(
        err <= rel,
        "{what}: got {got}, want {want} (relative error {err:.3e} > {rel:.0e})"
    );
}

/// The golden json's hyperparameters of one loss entry.
pub fn hyperparameters(model: &str, loss: &str) -> serde_json::Value {
    golden_json(model)["hyperparameters"][loss].clone()
}

/// `MODEL.golden.json`: hyperparameters, pairwise losses, descriptions.
pub fn golden_json(model: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(&format!("{model}.golden.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The loss behind a golden entry's name (`nca_a0`, `dpo_ls`, `refa_p1`, `refa_1vall`, …).
pub fn golden_loss_name(entry: &str) -> &str {
    ["_a0", "_ls", "_p1", "_1vall"]
        .iter()
        .fold(entry, |n, suffix| n.trim_end_matches(suffix))
}

/// A random generator seeded afresh each run (or from `CONTRALIGN_TEST_SEED`); the seed is
/// printed so that a failure can be replayed.
pub fn rng(test: &str) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    let seed = std::env::var("CONTRALIGN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: CONTRALIGN_TEST_SEED={seed}");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// Random groups: prompts of 1..=max_prompt tokens (BOS first), K in 2..=max_k responses of
/// 1..=max_response tokens, most ending with EOS 2, rewards with ties.
pub fn random_groups(
    rng: &mut impl rand::Rng,
    count: usize,
    vocab: u32,
    max_prompt: usize,
    max_k: usize,
    max_response: usize,
) -> Vec<contralign::data::Group> {
    (0..count)
        .map(|g| {
            let plen = rng.gen_range(1..=max_prompt);
            let mut prompt: Vec<u32> = (0..plen).map(|_| rng.gen_range(3..vocab)).collect();
            prompt[0] = 1;
            let k = rng.gen_range(2..=max_k);
            let responses = (0..k)
                .map(|_| {
                    let n = rng.gen_range(1..=max_response);
                    let mut r: Vec<u32> = (0..n).map(|_| rng.gen_range(3..vocab)).collect();
                    if rng.gen_bool(0.7) {
                        r[n - 1] = 2;
                    }
                    r
                })
                .collect();
            let rewards = (0..k).map(|_| rng.gen_range(0..4) as f64 * 2.5).collect();
            contralign::data::Group {
                prompt,
                responses,
                rewards,
                source: format!("random:{g}"),
            }
        })
        .collect()
}

/// Checks statistics against a golden `[responses, 4]` table of `S, n, A, E` (E nan when
/// absent) to 1e-5 relative; returns the worst relative error of S and E.
pub fn assert_stats(what: &str, stats: &[contralign::model::ResponseStats], want: &[f64]) -> f64 {
    assert_eq!(stats.len() * 4, want.len(), "{what}: response count");
    let mut worst = 0.0f64;
    for (i, s) in stats.iter().enumerate() {
        let w = &want[i * 4..i * 4 + 4];
        let what = format!("{what} response {i}");
        worst = worst.max((s.logp_sum - w[0]).abs() / w[0].abs());
        assert_close(&format!("{what} S"), s.logp_sum, w[0], 1e-5);
        assert_eq!(s.tokens as f64, w[1], "{what} n");
        assert_close(&format!("{what} A"), s.logp_mean, w[2], 1e-5);
        match s.eos_logp {
            Some(e) => {
                worst = worst.max((e - w[3]).abs() / w[3].abs());
                assert_close(&format!("{what} E"), e, w[3], 1e-5)
            }
            None => assert!(w[3].is_nan(), "{what}: E missing, golden {}", w[3]),
        }
    }
    worst
}

/// A loss spec from a golden json's hyperparameters (`beta`, `alpha`, `gamma`, `p`, `lam`,
/// `label_smoothing`, `one_vs_all`, `normalize`); absent ones are 0 / off / on.
pub fn spec_from_json(
    kind: contralign::loss::LossKind,
    hp: &serde_json::Value,
) -> contralign::loss::LossSpec {
    let num = |k: &str, default: f64| hp.get(k).and_then(|v| v.as_f64()).unwrap_or(default);
    let flag = |k: &str, default: bool| hp.get(k).and_then(|v| v.as_bool()).unwrap_or(default);
    contralign::loss::LossSpec {
        kind,
        beta: num("beta", 0.1),
        alpha: num("alpha", 0.0),
        gamma: num("gamma", 1.0),
        p: num("p", 2.0) as u32,
        lambda: num("lam", 0.0),
        label_smoothing: num("label_smoothing", 0.0),
        one_vs_all: flag("one_vs_all", false),
        normalize: flag("normalize", true),
        sft_weight: 0.0,
    }
}

/// The 37 cases of `losses.golden.json` (name and spec, in file order) and the golden
/// tensors of `losses.golden.safetensors` (`CASE.S`, `CASE.loss`, ...).
pub fn golden_loss_cases() -> (Vec<(String, contralign::loss::LossSpec)>, Golden) {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("losses.golden.json")).unwrap())
            .unwrap();
    let cases: Vec<_> = json["cases"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(case, info)| {
            let kind = contralign::loss::LossKind::parse(info["loss"].as_str().unwrap()).unwrap();
            (case.clone(), spec_from_json(kind, &info["hyperparameters"]))
        })
        .collect();
    assert_eq!(cases.len(), 37);
    (cases, Golden::load("losses.golden.safetensors"))
}

/// The loss and gradients of `groups` with the reference statistics computed by `reference`.
pub fn loss_and_grads_with_reference(
    policy: &contralign::model::Model<Vec<f32>>,
    reference: &contralign::model::Model<Vec<f32>>,
    groups: &[contralign::data::Group],
    spec: &contralign::loss::LossSpec,
    opts: &contralign::model::StepOptions,
) -> contralign::step::StepOutput<Vec<f32>> {
    use contralign::{ops::cpu::CpuOps, step};
    let ref_stats = step::reference_stats(&CpuOps, policy, Some(reference), groups, spec).unwrap();
    step::loss_and_grads(&CpuOps, policy, ref_stats.as_deref(), groups, spec, opts).unwrap()
}

/// Runs the `contralign` binary.
pub fn contralign(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_contralign"))
        .args(args)
        .output()
        .unwrap()
}

/// Runs the binary and requires success; the message shows the arguments and stderr.
pub fn contralign_ok(args: &[&str]) -> std::process::Output {
    let out = contralign(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A model directory at `dir` (created): tiny-mistral with the tiny tokenizer.
pub fn tiny_mistral_with_tokenizer(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (from, file) in [
        ("tiny-mistral", "config.json"),
        ("tiny-mistral", "model.safetensors"),
        ("tiny-tokenizer", "tokenizer.json"),
        ("tiny-tokenizer", "tokenizer_config.json"),
    ] {
        std::fs::copy(fixture(from).join(file), dir.join(file)).unwrap();
    }
}

/// A fixture's path as a string, for command lines.
pub fn fx(name: &str) -> String {
    fixture(name).to_string_lossy().into_owned()
}

/// A run directory's metrics.jsonl without the timing, which differs between runs.
pub fn metrics_without_timing(run: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("tokens_per_s");
            v
        })
        .collect()
}

/// Runs the binary, requires it to fail with status 1 and a message containing `message`
/// (and no panic); returns stderr.
pub fn contralign_fails(args: &[&str], message: &str) -> String {
    let out = contralign(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(
        stderr.contains(message),
        "{args:?}: {stderr:?} lacks {message:?}"
    );
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    stderr
}

/// Metrics (`name`, value) from two backends, each within `rel` of its size, where a reward
/// metric's size is at least `beta ·` the larger `logps/*` mean: rewards `β·(S − S_ref)` are
/// differences of nearly equal log-probs, which carry S's error, not their own.
pub fn assert_metrics_close(
    what: &str,
    got: &[(String, f64)],
    want: &[(String, f64)],
    rel: f64,
    beta: f64,
) {
    let value = |name: &str| {
        want.iter()
            .find(|(n, _)| n == name)
            .map_or(0.0, |(_, v)| v.abs())
    };
    let logps = value("logps/chosen").max(value("logps/rejected"));
    assert_eq!(got.len(), want.len(), "{what}: metric names");
    for ((name, g), (want_name, w)) in got.iter().zip(want) {
        assert_eq!(name, want_name, "{what}: metric order");
        let size = if name.starts_with("rewards/") && name != "rewards/accuracies" {
            w.abs().max(beta * logps)
        } else {
            w.abs()
        };
        let err = (g - w).abs();
        assert!(
            err <= rel * size.max(1e-12) || (g.is_nan() && w.is_nan()),
            "{what} {name}: got {g}, want {w} (error {err:.3e} > {rel:.0e} of {size:.3e})"
        );
    }
}

/// A device trainer's steps against the CPU trainer's: some step clipped at `max_grad_norm`,
/// none skipped, each loss within `rel` relative, and each gradient norm within `rel` of the
/// run's largest. A gradient's rounding error is relative to the per-token terms summed into
/// it, which are of the run's usual size, not to the sum: a step whose terms cancel (a batch
/// whose responses the loss already ranks evenly, its loss ln K) has a norm a thousand times
/// smaller than its neighbours', and a relative bound on it would bound noise.
pub fn assert_steps_close(
    what: &str,
    got: &[contralign::train::trainer::StepRecord],
    want: &[contralign::train::trainer::StepRecord],
    max_grad_norm: f64,
    rel: f64,
) {
    assert!(
        want.iter().any(|r| r.grad_norm > max_grad_norm),
        "{what}: no step was clipped"
    );
    let norm_scale = want.iter().map(|r| r.grad_norm).fold(0.0, f64::max);
    for (step, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.skipped.is_none() && w.skipped.is_none(),
            "{what}: a step was skipped"
        );
        assert_close(&format!("{what} loss"), g.loss, w.loss, rel);
        let err = (g.grad_norm - w.grad_norm).abs();
        assert!(
            err <= rel * norm_scale,
            "{what} grad_norm of step {step}: got {}, want {} (error {err:.3e} > {rel:.0e} of \
             the run's largest norm {norm_scale:.3e})",
            g.grad_norm,
            w.grad_norm
        );
    }
}

/// Runs `steps` steps of `trainer` back to back, as a run does (on a device each step's
/// scalars are read while the next one runs), and returns their records in order.
pub fn train_steps(
    trainer: &mut contralign::train::trainer::Trainer,
    steps: u64,
) -> Vec<contralign::train::trainer::StepRecord> {
    let mut records: Vec<_> = (0..steps)
        .filter_map(|_| trainer.train_step().unwrap())
        .collect();
    records.extend(trainer.flush().unwrap());
    assert_eq!(records.len() as u64, steps, "one record per step");
    records
}

/// [`train_steps`] to the run's last step.
pub fn train_to_end(
    trainer: &mut contralign::train::trainer::Trainer,
) -> Vec<contralign::train::trainer::StepRecord> {
    let left = trainer.total_steps() - trainer.step;
    train_steps(trainer, left)
}

/// `score`'s JSON lines without the `source` each names (the file a record came from), so
/// that the statistics of the same records read from two places compare equal.
pub fn score_statistics(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| {
            let mut line: serde_json::Value = serde_json::from_str(l).unwrap();
            line.as_object_mut().unwrap().remove("source");
            line
        })
        .collect()
}
