//! `contralign demo`: alignment visibly working on a CPU in two minutes, with nothing
//! downloaded. A digit-sorting task with a programmatic judge stands in for a rated data
//! set; a tiny Mistral learns it imperfectly with `sft` on mixed-quality answers, then is
//! aligned with NCA on the judged K = 4 groups and, for comparison, with DPO on the
//! binarized pairs. Each model is scored by greedy decoding on held-out lists.

pub mod setup;
pub mod task;

use crate::data::load::{load_groups, DataOptions};
use crate::data::Group;
use crate::generate::{generate, Sampling};
use crate::loss::{LossKind, LossSpec};
use crate::memory_plan::RecomputePolicy;
use crate::model::Model;
use crate::ops::cpu::CpuOps;
use crate::step;
use crate::tokenizer::TextTokenizer;
use crate::train::optimizer::AdamWConfig;
use crate::train::plan::{Length, StepBudget};
use crate::train::run_dir::{RunDir, SaveOptions};
use crate::train::schedule::ScheduleKind;
use crate::train::session;
use crate::train::trainer::{Reference, StepRecord, TrainOptions, Trainer, Warmup};
use anyhow::{ensure, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

/// The inverse temperature of both alignment losses: DPO's default. (With the NCA paper's
/// 0.01 NCA barely moves this model in the demo's steps: README, "The demo".)
const ALIGN_BETA: f64 = 0.1;
const ALIGN_LR: f64 = 1e-3;
const SFT_LR: f64 = 3e-3;

/// The size of a demo run.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub out: PathBuf,
    pub seed: u64,
    pub train_groups: usize,
    pub heldout: usize,
    pub sft_steps: u64,
    pub align_steps: u64,
    pub groups_per_step: usize,
}

impl DemoOptions {
    /// The demo as `contralign demo` runs it.
    pub fn full(out: PathBuf, seed: u64) -> Self {
        DemoOptions {
            out,
            seed,
            train_groups: 2000,
            heldout: 200,
            sft_steps: 250,
            align_steps: 120,
            groups_per_step: 32,
        }
    }

    /// A shorter run (about a third of the steps) for tests.
    pub fn short(out: PathBuf, seed: u64) -> Self {
        DemoOptions {
            train_groups: 800,
            heldout: 100,
            sft_steps: 100,
            align_steps: 40,
            ..Self::full(out, seed)
        }
    }
}

/// One model's row of the demo's table.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseReport {
    /// Mean judge score of greedy answers to the held-out lists.
    pub accuracy: f64,
    /// The fraction of held-out lists sorted exactly.
    pub exact: f64,
    /// How often the implicit reward `S − S_ref` (reference: the SFT model) ranks the best
    /// held-out answer above the worst; none for the SFT model itself.
    pub reward_accuracy: Option<f64>,
    /// Mean change of the best held-out answer's log-likelihood from the SFT model.
    pub chosen_logp_change: Option<f64>,
    /// Training throughput of the phase, packed tokens per second.
    pub tokens_per_s: f64,
    pub run_dir: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
pub struct DemoReport {
    pub sft: PhaseReport,
    pub nca: PhaseReport,
    pub dpo: PhaseReport,
}

/// Progress of a phase: its name, the step just taken and the phase's total.
pub type Progress<'a> = dyn FnMut(&str, &StepRecord, u64) + 'a;

struct Phase<'a> {
    name: &'static str,
    init: &'a Path,
    spec: LossSpec,
    reference: Reference,
    groups: Vec<Group>,
    steps: u64,
    lr: f64,
}

/// Trains one phase into `out/NAME`; returns its final model directory and tokens/s.
fn train_phase(
    opts: &DemoOptions,
    phase: Phase,
    progress: &mut Progress,
) -> Result<(PathBuf, f64)> {
    let policy = Model::load(&CpuOps, phase.init)?;
    let train = TrainOptions {
        precision: crate::memory_plan::PrecisionOptions::all_f32(),
        spec: phase.spec,
        aux_coef: 0.0,
        recompute: RecomputePolicy::None,
        budget: StepBudget::Groups(opts.groups_per_step),
        micro_tokens: usize::MAX,
        seed: opts.seed,
        length: Length::Steps(phase.steps),
        adamw: AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        schedule: ScheduleKind::Cosine,
        lr: phase.lr,
        warmup: Warmup::Ratio(0.05),
        max_grad_norm: 1.0,
        max_bad_steps: 5,
    };
    let mut trainer = Trainer::new(train, policy, phase.reference, phase.groups)?;
    let dir = opts.out.join(phase.name);
    // The demo owns its output directory (`claim_out`): a rerun replaces the previous run.
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    let run = RunDir::create(&dir)?;
    let save = SaveOptions {
        dtype: None,
        max_shard_bytes: usize::MAX,
        source: phase.init.to_path_buf(),
        total_limit: None,
        keep: None,
    };
    let start = Instant::now();
    let mut tokens = 0;
    let total = trainer.total_steps();
    let outcome = session::run(
        &mut trainer,
        &run,
        &save,
        0,
        &AtomicBool::new(false),
        |_| false,
        |r, _| {
            tokens += r.tokens;
            progress(phase.name, r, total);
            Ok(())
        },
    )?;
    let session::Outcome::Finished(final_dir) = outcome else {
        unreachable!("the demo's runs are not interrupted")
    };
    crate::plot::plot_run(&dir)?;
    Ok((final_dir, tokens as f64 / start.elapsed().as_secs_f64()))
}

/// Greedy answers to the held-out prompts, judged; and the implicit-reward metrics of the
/// held-out groups against the SFT model.
fn evaluate(
    policy: &Model<Vec<f32>>,
    sft: &Model<Vec<f32>>,
    tokenizer: &TextTokenizer,
    lists: &[Vec<u8>],
    heldout: &[Group],
) -> Result<(f64, f64, f64, f64)> {
    let prompts: Vec<Vec<u32>> = heldout.iter().map(|g| g.prompt.clone()).collect();
    let sampling = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        max_new_tokens: 12,
        seed: 0,
    };
    let answers = generate(policy, &prompts, &sampling)?;
    let mut scores = Vec::new();
    for (digits, answer) in lists.iter().zip(&answers) {
        let text = tokenizer.decode(&answer.ids)?;
        scores.push(task::judge(digits, &text));
    }
    let accuracy = scores.iter().sum::<f64>() / scores.len() as f64;
    let exact = scores.iter().filter(|&&s| s == 1.0).count() as f64 / scores.len() as f64;
    let spec = LossSpec::new(LossKind::Nca);
    let ref_stats = sft.score(&CpuOps, &step::pack(sft, heldout)?);
    let metric = |m: &Model<Vec<f32>>, name: &str| -> Result<f64> {
        let eval = step::evaluate(&CpuOps, m, Some(&ref_stats), heldout, &spec, 0.0)?;
        eval.metrics
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| *v)
            .with_context(|| format!("no {name} metric"))
    };
    let reward_accuracy = metric(policy, "rewards/accuracies")?;
    let chosen_change = metric(policy, "logps/chosen")? - metric(sft, "logps/chosen")?;
    Ok((accuracy, exact, reward_accuracy, chosen_change))
}

/// Marks a directory as the demo's: a rerun replaces what is in it, and only there.
const MARKER: &str = ".contralign-demo";

/// Makes `out` the demo's: a new or empty directory gets the marker; one that holds it is a
/// previous demo's; anything else holds files the demo did not write, which a rerun would
/// replace, so it is refused.
fn claim_out(out: &Path) -> Result<()> {
    if out.join(MARKER).is_file() {
        return Ok(());
    }
    if out.exists() {
        ensure!(
            out.is_dir(),
            "--out {}: exists and is not a directory",
            out.display()
        );
        let mut entries = std::fs::read_dir(out)
            .with_context(|| format!("--out {}: cannot read the directory", out.display()))?;
        ensure!(
            entries.next().is_none(),
            "--out {}: holds files the demo did not write (it marks its own directories with \
             {MARKER}), which it would replace; give a new or empty directory",
            out.display()
        );
    }
    std::fs::create_dir_all(out)
        .with_context(|| format!("--out {}: cannot create the directory", out.display()))?;
    crate::fsutil::write_atomically(&out.join(MARKER), b"")
}

pub fn run(opts: &DemoOptions, progress: &mut Progress) -> Result<DemoReport> {
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let out = &opts.out;
    claim_out(out)?;
    let tokenizer_dir = out.join("tokenizer");
    let vocab = setup::write_tokenizer(&tokenizer_dir)?;
    let init = out.join("init");
    setup::write_model(&init, &tokenizer_dir, vocab, &mut rng)?;
    let data = out.join("data");
    let lists = setup::write_data(&data, opts.train_groups, opts.heldout, &mut rng)?;
    let tokenizer = TextTokenizer::load(&init)?;
    let load = |file: &str| -> Result<Vec<Group>> {
        Ok(load_groups(&data.join(file), Some(&tokenizer), &DataOptions::default())?.groups)
    };

    let sft = Phase {
        name: "sft",
        init: &init,
        spec: LossSpec::new(LossKind::Sft),
        reference: Reference::None,
        groups: load("sft.jsonl")?,
        steps: opts.sft_steps,
        lr: SFT_LR,
    };
    let (sft_dir, sft_speed) = train_phase(opts, sft, progress)?;
    let sft_model = Model::load(&CpuOps, &sft_dir)?;
    let reference =
        || -> Result<Reference> { Ok(Reference::Model(Box::new(Model::load(&CpuOps, &sft_dir)?))) };
    let nca = Phase {
        name: "nca",
        init: &sft_dir,
        // DPO's beta for both, so that the two differ only in their loss.
        spec: LossSpec {
            beta: ALIGN_BETA,
            ..LossSpec::new(LossKind::Nca)
        },
        reference: reference()?,
        groups: load("train.jsonl")?,
        steps: opts.align_steps,
        lr: ALIGN_LR,
    };
    let (nca_dir, nca_speed) = train_phase(opts, nca, progress)?;
    let dpo = Phase {
        name: "dpo",
        init: &sft_dir,
        spec: LossSpec {
            beta: ALIGN_BETA,
            ..LossSpec::new(LossKind::Dpo)
        },
        reference: reference()?,
        groups: load("train.binarized.jsonl")?,
        steps: opts.align_steps,
        lr: ALIGN_LR,
    };
    let (dpo_dir, dpo_speed) = train_phase(opts, dpo, progress)?;

    let heldout = load("heldout.jsonl")?;
    let report = |dir: &Path, speed: f64, aligned: bool| -> Result<PhaseReport> {
        let model = Model::load(&CpuOps, dir)?;
        let (accuracy, exact, reward_accuracy, chosen) =
            evaluate(&model, &sft_model, &tokenizer, &lists, &heldout)?;
        Ok(PhaseReport {
            accuracy,
            exact,
            reward_accuracy: aligned.then_some(reward_accuracy),
            chosen_logp_change: aligned.then_some(chosen),
            tokens_per_s: speed,
            run_dir: dir.parent().unwrap_or(dir).to_path_buf(),
        })
    };
    Ok(DemoReport {
        sft: report(&sft_dir, sft_speed, false)?,
        nca: report(&nca_dir, nca_speed, true)?,
        dpo: report(&dpo_dir, dpo_speed, true)?,
    })
}
