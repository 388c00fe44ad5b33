//! The CPU reference against the transformers float64 goldens of both tiny fixtures:
//! logits, policy and reference statistics, losses and parameter gradients.

mod common;

use common::{
    assert_close, assert_stats, fixture, golden_json, golden_loss_name, hyperparameters,
    loss_and_grads_with_reference, rel_err, spec_from_json, Golden,
};
use contralign::data::pretokenized::read_file;
use contralign::data::Group;
use contralign::loss::{LossKind, LossSpec};
use contralign::memory_plan::RecomputePolicy;
use contralign::model::params::param_specs;
use contralign::model::{Model, StepOptions};
use contralign::ops::cpu::CpuOps;
use contralign::step;

const MODELS: [&str; 2] = ["tiny-mistral", "tiny-mixtral"];

fn load(name: &str) -> Model<Vec<f32>> {
    Model::load(&CpuOps, &fixture(name)).unwrap()
}

fn data(model: &str, kind: &str) -> Vec<Group> {
    read_file(&fixture(&format!("{model}.{kind}.jsonl"))).unwrap()
}

fn spec(model: &str, name: &str, kind: LossKind) -> LossSpec {
    spec_from_json(kind, &hyperparameters(model, name))
}

#[test]
fn logits_match_transformers() {
    for name in MODELS {
        let model = load(name);
        let golden = Golden::load(&format!("{name}.golden.safetensors"));
        for kind in ["reward", "pairs"] {
            for (g, group) in data(name, kind).iter().enumerate() {
                for (r, response) in group.responses.iter().enumerate() {
                    let ids: Vec<u32> = group.prompt.iter().chain(response).copied().collect();
                    let got = model.logits(&CpuOps, &ids);
                    let want = golden.get(&format!("{kind}.logits.{g}.{r}"));
                    let err = rel_err(&got, want);
                    assert!(
                        err < 1e-5,
                        "{name} {kind} logits {g}.{r}: relative error {err:.3e}"
                    );
                }
            }
        }
    }
}

#[test]
fn packed_statistics_match_transformers() {
    for name in MODELS {
        let golden = Golden::load(&format!("{name}.golden.safetensors"));
        for (model_dir, which) in [(name.to_string(), "policy"), (format!("{name}-ref"), "ref")] {
            let model = load(&model_dir);
            for kind in ["reward", "pairs"] {
                let batch = step::pack(&model, &data(name, kind)).unwrap();
                let stats = model.score(&CpuOps, &batch);
                let want = golden.get(&format!("{kind}.stats.{which}"));
                assert_stats(&format!("{model_dir} {kind}"), &stats, want);
            }
        }
    }
}

struct Case {
    golden_name: &'static str,
    kind: LossKind,
    data: &'static str,
    aux: bool,
}

const CASES: [Case; 4] = [
    Case {
        golden_name: "sft",
        kind: LossKind::Sft,
        data: "reward",
        aux: false,
    },
    Case {
        golden_name: "nca",
        kind: LossKind::Nca,
        data: "reward",
        aux: false,
    },
    Case {
        golden_name: "dpo",
        kind: LossKind::Dpo,
        data: "pairs",
        aux: false,
    },
    Case {
        golden_name: "refa",
        kind: LossKind::Refa,
        data: "reward",
        aux: false,
    },
];

fn check_grads(name: &str, case: &Case, recompute: RecomputePolicy) {
    let policy = load(name);
    let reference = load(&format!("{name}-ref"));
    let golden = Golden::load(&format!("{name}.golden.safetensors"));
    let base = case.golden_name;
    let spec = spec(name, base, case.kind);
    let aux_coef = if case.aux {
        policy.cfg.moe.as_ref().unwrap().router_aux_loss_coef
    } else {
        0.0
    };
    let opts = StepOptions {
        recompute,
        aux_coef,
    };
    let out =
        loss_and_grads_with_reference(&policy, &reference, &data(name, case.data), &spec, &opts);
    let key = if case.aux {
        format!("{base}+aux")
    } else {
        base.to_string()
    };
    assert_close(
        &format!("{name} loss.{key}"),
        out.logged.loss,
        golden.scalar(&format!("loss.{key}")),
        1e-5,
    );
    if case.aux {
        assert_close(
            &format!("{name} aux_loss"),
            out.logged.aux_loss.unwrap(),
            golden.scalar("aux_loss"),
            1e-5,
        );
    }
    for ((pname, _), grad) in param_specs(&policy.cfg).iter().zip(out.grads.iter()) {
        let want = golden.get(&format!("grad.{key}.{pname}"));
        let err = rel_err(grad, want);
        assert!(
            err < 1e-4,
            "{name} grad.{key}.{pname}: relative error {err:.3e}"
        );
    }
}

#[test]
fn gradients_match_transformers() {
    for name in MODELS {
        for case in &CASES {
            check_grads(name, case, RecomputePolicy::Full);
        }
    }
}

#[test]
fn mixtral_aux_loss_gradients_match_transformers() {
    let case = Case {
        golden_name: "nca",
        kind: LossKind::Nca,
        data: "reward",
        aux: true,
    };
    check_grads("tiny-mixtral", &case, RecomputePolicy::None);
    check_grads("tiny-mixtral", &case, RecomputePolicy::Selective);
}

#[test]
fn losses_match_transformers() {
    for name in MODELS {
        let golden = Golden::load(&format!("{name}.golden.safetensors"));
        let policy = load(name);
        let reference = load(&format!("{name}-ref"));
        let json = golden_json(name);
        let pairwise: Vec<&str> = json["pairwise_losses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let names: Vec<String> = json["hyperparameters"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(names.len(), 13);
        for golden_name in &names {
            let kind = LossKind::parse(golden_loss_name(golden_name)).unwrap();
            let kind_data = if pairwise.contains(&golden_name.as_str()) {
                "pairs"
            } else {
                "reward"
            };

            let spec = spec(name, golden_name, kind);
            let opts = StepOptions {
                recompute: RecomputePolicy::Full,
                aux_coef: 0.0,
            };
            let out = loss_and_grads_with_reference(
                &policy,
                &reference,
                &data(name, kind_data),
                &spec,
                &opts,
            );
            let want = golden.scalar(&format!("loss.{golden_name}"));
            assert_close(
                &format!("{name} loss.{golden_name}"),
                out.logged.loss,
                want,
                1e-5,
            );
        }
    }
}
