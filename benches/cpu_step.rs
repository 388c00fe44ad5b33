//! A CPU forward+backward step (NCA with the load-balancing loss) on the tiny Mixtral
//! fixture; throughput in tokens per second of the packed stream (each prompt counted once).

use contralign::data::pretokenized::read_file;
use contralign::loss::{LossKind, LossSpec};
use contralign::memory_plan::RecomputePolicy;
use contralign::model::{Model, StepOptions};
use contralign::ops::cpu::CpuOps;
use contralign::step;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn cpu_step(c: &mut Criterion) {
    let policy = Model::load(&CpuOps, &fixture("tiny-mixtral")).unwrap();
    let reference = Model::load(&CpuOps, &fixture("tiny-mixtral-ref")).unwrap();
    // The fixture's three groups repeated to a batch of 24 groups.
    let groups: Vec<_> = read_file(&fixture("tiny-mixtral.reward.jsonl"))
        .unwrap()
        .into_iter()
        .cycle()
        .take(24)
        .collect();
    let batch = step::pack(&policy, &groups).unwrap();
    let spec = LossSpec {
        beta: 0.1,
        alpha: 0.5,
        ..LossSpec::new(LossKind::Nca)
    };
    let mut group = c.benchmark_group("cpu_step_tiny_mixtral");
    group.throughput(Throughput::Elements(batch.len() as u64));
    for recompute in [
        RecomputePolicy::Full,
        RecomputePolicy::Selective,
        RecomputePolicy::None,
    ] {
        let opts = StepOptions {
            recompute,
            aux_coef: 0.02,
        };
        let name = format!("recompute_{}", recompute.name());
        group.bench_function(name, |b| {
            b.iter(|| {
                let ref_stats =
                    step::reference_stats(&CpuOps, &policy, Some(&reference), &groups, &spec)
                        .unwrap();
                step::loss_and_grads(
                    &CpuOps,
                    &policy,
                    ref_stats.as_deref(),
                    &groups,
                    &spec,
                    &opts,
                )
                .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, cpu_step);
criterion_main!(benches);
