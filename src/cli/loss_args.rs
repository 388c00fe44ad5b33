//! The model, data and loss flags shared by `eval` and `grads`.

use crate::cli::data_args::DataArgs;
use anyhow::{bail, Result};
use clap::Args;
use contralign::config::ModelConfig;
use contralign::data::pairs::{chosen_first, to_pairs, PairStrategy};
use contralign::data::Group;
use contralign::loss::{LossKind, LossSpec};
use contralign::model::{Model, ResponseStats};
use contralign::ops::Ops;
use contralign::step;
use serde::Serialize;
use std::path::PathBuf;

#[derive(Args, Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LossArgs {
    /// The loss (docs/losses.md). Reference-based: infonca, nca (any K), dpo, nca_pair (K = 2).
    /// Reference-free: simpo (K = 2), refa, infonca_free (REFA-InfoNCA), sft (token-mean NLL
    /// of the best response).
    #[arg(long, value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(LossKind::NAMES))]
    pub loss: String,
    /// Inverse temperature. Defaults: 0.01 for infonca/nca (NCA paper), 0.1 for dpo/nca_pair
    /// (DPO paper, TRL), 2.0 for simpo, 3.0 for refa (2.0 with --one-vs-all) and infonca_free
    /// (REFA v4, Mistral-7B base).
    #[arg(long, value_name = "F")]
    pub beta: Option<f64>,
    /// Reward temperature of the soft labels softmax(r/alpha) (infonca, nca, infonca_free;
    /// 0 = uniform over the best-rated), or REFA's deviation strength. Default 0.01.
    #[arg(long, value_name = "F")]
    pub alpha: Option<f64>,
    /// SimPO target margin (default 1.6) or REFA negative over-weighting (> 0, default 2.0).
    #[arg(long, value_name = "F")]
    pub gamma: Option<f64>,
    /// REFA deviation exponent: 1 (signed) or 2. Default 2.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub p: u32,
    /// Weight of the EOS-probability regularizer of refa and infonca_free. Default 5e-5.
    #[arg(long, value_name = "F")]
    pub lambda: Option<f64>,
    /// DPO label smoothing in [0, 0.5). Default 0.
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// REFA-1-vs-all: the best response is the only positive.
    #[arg(long)]
    pub one_vs_all: bool,
    /// REFA scores with the log-prob sum S instead of the length-normalized mean A.
    #[arg(long)]
    pub no_normalize: bool,
    /// Weight of an sft anchor (NLL of the best response) added to the loss. Default 0.
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    pub sft_weight: f64,
    /// Weight of the Mixtral load-balancing loss. Default: the config's router_aux_loss_coef
    /// when its output_router_logits is true, else 0 (as transformers does).
    #[arg(long, value_name = "F")]
    pub aux_coef: Option<f64>,
    /// Turn reward groups into pairs for a pairwise loss: best_vs_random (Zephyr, seeded by
    /// --seed), best_vs_each, all_pairs. Required for dpo/nca_pair/simpo on data with K > 2.
    #[arg(long, value_name = "STRATEGY", value_parser = clap::builder::PossibleValuesParser::new(PairStrategy::NAMES))]
    pub pairs: Option<String>,
    /// Seed of best_vs_random. Default 0.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u64).range(..=crate::cli::SAVED_INT_MAX))]
    pub seed: u64,
}

impl LossArgs {
    pub fn spec(&self) -> Result<LossSpec> {
        let kind = LossKind::parse(&self.loss)?;
        let (beta, alpha, gamma, lambda) = kind.defaults(self.one_vs_all);
        let spec = LossSpec {
            kind,
            beta: self.beta.unwrap_or(beta),
            alpha: self.alpha.unwrap_or(alpha),
            gamma: self.gamma.unwrap_or(gamma),
            p: self.p,
            lambda: self.lambda.unwrap_or(lambda),
            label_smoothing: self.label_smoothing,
            one_vs_all: self.one_vs_all,
            normalize: !self.no_normalize,
            sft_weight: self.sft_weight,
        };
        spec.validate()?;
        let ignored = self.ignored_flags(kind);
        if !ignored.is_empty() {
            eprintln!(
                "note: {} {} not apply to --loss {}; ignored",
                ignored.join(", "),
                if ignored.len() == 1 { "does" } else { "do" },
                kind.name()
            );
        }
        if let Some(c) = self.aux_coef {
            if !(c.is_finite() && c >= 0.0) {
                bail!("--aux-coef must be >= 0, found {c}");
            }
        }
        Ok(spec)
    }

    /// `--aux-coef`, else the config's own (as transformers takes it); a note when it is
    /// given for a model without experts.
    pub fn aux_coef_for(&self, cfg: &ModelConfig) -> f64 {
        if self.aux_coef.is_some() && cfg.moe.is_none() {
            eprintln!("note: --aux-coef weighs Mixtral's load-balancing loss; a Mistral has none");
        }
        self.aux_coef.unwrap_or(cfg.default_aux_coef())
    }

    /// The hyperparameter flags given that `kind` does not read (docs/losses.md §5).
    fn ignored_flags(&self, kind: LossKind) -> Vec<&'static str> {
        use LossKind::*;
        let reads_alpha = matches!(kind, Infonca | Nca | InfoncaFree | Refa);
        [
            ("--alpha", self.alpha.is_some() && !reads_alpha),
            (
                "--gamma",
                self.gamma.is_some() && !matches!(kind, Simpo | Refa),
            ),
            // Its default (2) cannot be told from a `--p 2`, which changes nothing anyway.
            ("--p", self.p != 2 && kind != Refa),
            (
                "--lambda",
                self.lambda.is_some() && !matches!(kind, Refa | InfoncaFree),
            ),
            (
                "--label-smoothing",
                self.label_smoothing != 0.0 && kind != Dpo,
            ),
            ("--one-vs-all", self.one_vs_all && kind != Refa),
            ("--no-normalize", self.no_normalize && kind != Refa),
        ]
        .into_iter()
        .filter_map(|(flag, ignored)| ignored.then_some(flag))
        .collect()
    }

    /// The groups the loss sees: pairs when a strategy is given. Checks group sizes before
    /// any model is loaded; with `skip_invalid` (`--skip-invalid`), a group of one response
    /// is skipped and counted instead.
    pub fn prepare(
        &self,
        spec: &LossSpec,
        mut groups: Vec<Group>,
        skip_invalid: bool,
    ) -> Result<Vec<Group>> {
        if skip_invalid {
            let before = groups.len();
            let first = groups
                .iter()
                .find(|g| g.responses.len() < 2)
                .map(|g| g.source.clone());
            groups.retain(|g| g.responses.len() >= 2);
            let skipped = before - groups.len();
            if let Some(first) = first {
                eprintln!(
                    "skipped {skipped} groups of one response (the first: {first}): the loss \
                     compares two or more"
                );
            }
            if groups.is_empty() {
                bail!("no group has two responses, which the loss needs");
            }
        }
        let groups = match &self.pairs {
            Some(name) => {
                let pairs = to_pairs(&groups, PairStrategy::parse(name)?, self.seed);
                if pairs.is_empty() {
                    bail!("--pairs {name}: no group has two responses with different rewards");
                }
                pairs
            }
            None => groups,
        };
        groups
            .into_iter()
            .map(|g| {
                let k = g.responses.len();
                if k < 2 {
                    bail!(
                        "{}: the loss needs a group of at least 2 responses, found {k}",
                        g.source
                    );
                }
                if !spec.kind.is_pairwise() {
                    return Ok(g);
                }
                if k != 2 {
                    bail!(
                        "{}: {} is pairwise but the group has {k} responses; give --pairs \
                         best_vs_random|best_vs_each|all_pairs",
                        g.source,
                        spec.kind.name()
                    );
                }
                chosen_first(g, spec.kind.name())
            })
            .collect()
    }
}

/// The model and data flags shared by `eval` and `grads`.
#[derive(Args, Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct InputArgs {
    /// The policy: a Hugging Face model directory, or a Hub id (org/name[@revision]) from
    /// the local Hugging Face cache, downloaded when missing.
    #[arg(long, value_name = "DIR|ID", value_parser = crate::cli::model_arg::parse)]
    pub model: PathBuf,
    /// The frozen reference model (a directory or a Hub id), required by reference-based
    /// losses (infonca, nca, dpo, nca_pair); ignored by the others.
    #[arg(long, value_name = "DIR|ID", value_parser = crate::cli::model_arg::parse)]
    pub ref_model: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub loss: LossArgs,
}

/// Everything a loss evaluation needs, loaded and checked.
pub struct Loaded<B> {
    pub spec: LossSpec,
    pub groups: Vec<Group>,
    pub policy: Model<B>,
    /// The reference model's statistics of every response, when the loss needs them.
    pub ref_stats: Option<Vec<ResponseStats>>,
    pub aux_coef: f64,
}

/// A note naming the reference flags given (`(flag, given)`) to a loss that reads no
/// reference: they are not read, so nothing checks them either.
pub fn note_reference_free(kind: LossKind, flags: &[(&str, bool)]) {
    if kind.needs_reference() {
        return;
    }
    let given: Vec<&str> = flags.iter().filter(|f| f.1).map(|f| f.0).collect();
    if !given.is_empty() {
        eprintln!(
            "note: --loss {} is reference-free: {} ignored",
            kind.name(),
            given.join(", ")
        );
    }
}

impl InputArgs {
    /// Checks the flags and the data first (and runs `precheck`, e.g. that the output can be
    /// written), then loads the models: bad requests fail before any heavy work. The
    /// reference is scored in passes of at most `max_tokens` packed tokens.
    pub fn load<O: Ops>(
        &self,
        ops: &O,
        max_tokens: usize,
        precheck: impl FnOnce() -> Result<()>,
    ) -> Result<Loaded<O::Buf>> {
        let spec = self.loss.spec()?;
        if spec.kind.needs_reference() && self.ref_model.is_none() {
            bail!(
                "--loss {} compares the policy with a reference model: give --ref-model DIR",
                spec.kind.name()
            );
        }
        note_reference_free(spec.kind, &[("--ref-model", self.ref_model.is_some())]);
        precheck()?;
        self.data.refuse_flags_a_file_ignores()?;
        let groups =
            self.loss
                .prepare(&spec, self.data.load(&self.model)?, self.data.skip_invalid)?;
        let policy = Model::load(ops, &self.model)?;
        let reference = match &self.ref_model {
            Some(dir) if spec.kind.needs_reference() => Some(Model::load(ops, dir)?),
            _ => None,
        };
        let ref_stats = step::reference_stats_in_passes(
            ops,
            &policy,
            reference.as_ref(),
            &groups,
            &spec,
            max_tokens,
        )?;
        let aux_coef = self.loss.aux_coef_for(&policy.cfg);
        Ok(Loaded {
            spec,
            groups,
            policy,
            ref_stats,
            aux_coef,
        })
    }
}
