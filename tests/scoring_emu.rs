//! The fused LM-head scoring (cuda/scoring.cu, `ops::cuda::scoring`) in the emulator against
//! the CPU reference, forward and backward, on fresh random inputs of awkward shapes: chunk
//! boundaries inside responses, groups of 2 to 9 responses, responses of one token and
//! without EOS, vocabularies that are no multiple of a 16-byte vector (so rows start
//! unaligned), smaller than one vector or than a warp, and launch shapes with partial warps
//! and grid-stride loops. The bounds are derived in `selftest::scoring`.

mod common;

use contralign::data::packing::ResponseSpan;
use contralign::ops::cuda::device::Device;
use contralign::ops::cuda::kernels::Kernels;
use contralign::ops::cuda::pool::Pool;
use contralign::ops::cuda::scoring::{FusedScoring, Spans};
use contralign::ops::cuda::scoring_bench::{self, ScoringBench, ScoringShape, Unfused};
use contralign::ops::storage::Dtype;
use contralign::selftest::scoring::{scoring, ScoringCase};
use contralign::selftest::{self, Row};
use half::bf16;
use rand::Rng;

/// (threads per block, most blocks): the usual shape, partial warps, one warp, the largest
/// block, and grids small enough that the kernels loop over rows and responses.
const LAUNCHES: [(u32, u32); 5] = [(256, 4096), (33, 3), (96, 7), (32, 1), (1024, 2)];

fn kernels(device: &Device, (block, max_grid): (u32, u32)) -> Kernels<'_> {
    Kernels {
        block,
        max_grid,
        ..Kernels::new(device)
    }
}

fn assert_pass(rows: Vec<Row>, what: &str) {
    assert!(
        rows.iter().all(|r| r.pass),
        "{what}:\n{}",
        selftest::table(&rows)
    );
}

fn check(case: &ScoringCase, rng: &mut rand::rngs::StdRng) {
    let device = Device::Emu;
    for launch in LAUNCHES {
        let k = kernels(&device, launch);
        let what = format!("launch {launch:?}, {case:?}");
        assert_pass(scoring::<f32>(&k, rng, case).unwrap(), &what);
        assert_pass(scoring::<bf16>(&k, rng, case).unwrap(), &what);
    }
}

#[test]
fn scoring_matches_the_cpu_reference_on_awkward_shapes() {
    let mut rng = common::rng("scoring");
    // (groups, most responses per group, longest response, (vocab, d, rows per chunk)).
    for (groups, max_k, max_len, shape) in [
        // Fewer logits than one vector: every row is head and tail.
        (2, 3, 4, (5, 3, 1)),
        // Chunks of 7 rows cut through responses; K up to 9; rows unaligned.
        (3, 9, 12, (1001, 19, 7)),
        // More logits than a block has threads, 4 bytes short of a vector multiple.
        (2, 4, 9, (4099, 33, 64)),
        // A multiple of 8: every row aligned, only whole vectors.
        (3, 5, 6, (1024, 16, 5)),
    ] {
        let case = ScoringCase::random(&mut rng, groups, max_k, max_len, shape);
        check(&case, &mut rng);
    }
}

#[test]
fn one_token_responses_and_one_response_over_many_chunks() {
    let mut rng = common::rng("scoring_spans");
    let span = |first, len, ends_with_eos| ResponseSpan {
        group: 0,
        first,
        len,
        ends_with_eos,
    };
    // One token with EOS, one without, then a response of 40 rows through chunks of 3.
    let case = ScoringCase {
        spans: vec![span(0, 1, true), span(1, 1, false), span(2, 40, true)],
        vocab: 77,
        d: 9,
        chunk_rows: 3,
    };
    check(&case, &mut rng);
}

#[test]
fn scoring_is_deterministic_and_chunking_changes_only_roundings() {
    let device = Device::Emu;
    let mut rng = common::rng("scoring_determinism");
    let k = Kernels::new(&device);
    let (rows, vocab, d) = (37, 501, 24);
    let h: Vec<f32> = (0..rows * d).map(|_| rng.gen_range(-2.0..2.0)).collect();
    let w: Vec<f32> = (0..vocab * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let targets: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..vocab as u32)).collect();
    let (h, w, targets) = (
        device.upload(&h).unwrap(),
        device.upload(&w).unwrap(),
        device.upload(&targets).unwrap(),
    );
    let run = |chunk_rows| {
        let scoring = FusedScoring {
            kernels: &k,
            chunk_rows,
        };
        let (mut lse, mut logp) = (device.alloc(rows).unwrap(), device.alloc(rows).unwrap());
        scoring
            .forward(&h, &w, &targets, d, &mut lse, &mut logp)
            .unwrap();
        (
            device.download::<f32>(&lse).unwrap(),
            device.download::<f32>(&logp).unwrap(),
        )
    };
    let whole = run(rows);
    assert_eq!(run(rows), whole, "two runs differ");
    // Chunks move rows to other 16-byte alignments, so each row's terms are summed in another
    // order: the same values within a few roundings.
    let chunked = run(5);
    assert_eq!(run(5), chunked, "two chunked runs differ");
    for (a, b) in whole.1.iter().zip(&chunked.1) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "{a} vs {b}");
    }
    assert!(whole.1.iter().all(|&v| v.is_finite() && v < 0.0));
}

#[test]
fn a_bf16_lm_head_gradient_is_refused_over_several_chunks() {
    use contralign::ops::cuda::fresh::GradWrite;
    let device = Device::Emu;
    let k = Kernels::new(&device);
    let (rows, vocab, d) = (5, 11, 8);
    let bf16s = |n: usize, v: f32| device.upload(&vec![bf16::from_f32(v); n]).unwrap();
    let (h, w) = (bf16s(rows * d, 0.5), bf16s(vocab * d, 0.25));
    let targets = device.upload(&[1u32, 3, 2, 0, 9]).unwrap();
    let (lse, coef) = (
        device.upload(&[3.0f32; 5]).unwrap(),
        device.upload(&[0.5f32; 5]).unwrap(),
    );
    let (mut dh, mut dhead) = (bf16s(rows * d, 0.0), bf16s(vocab * d, 1.0));
    let backward = |chunk_rows, dh: &mut _, dhead: &mut _| {
        FusedScoring {
            kernels: &k,
            chunk_rows,
        }
        .backward(
            &h,
            &w,
            &targets,
            &lse,
            &coef,
            d,
            dh,
            (dhead, GradWrite::Accumulate),
        )
    };
    let err = backward(2, &mut dh, &mut dhead).unwrap_err();
    assert!(
        format!("{err:#}").contains("5 rows take 3 chunks of 2"),
        "{err:#}"
    );
    assert!(
        device
            .download(&dhead)
            .unwrap()
            .iter()
            .all(|&v| v == bf16::ONE),
        "nothing written"
    );
    backward(5, &mut dh, &mut dhead).unwrap();
    assert!(device
        .download(&dhead)
        .unwrap()
        .iter()
        .any(|&v| v != bf16::ONE));
}

#[test]
fn a_target_past_the_vocabulary_traps_and_bad_spans_are_errors() {
    let device = Device::Emu;
    let k = Kernels::new(&device);
    let (rows, vocab, d) = (3, 10, 4);
    let h = device.upload(&vec![0.5f32; rows * d]).unwrap();
    let w = device.upload(&vec![0.25f32; vocab * d]).unwrap();
    let targets = device.upload(&[1u32, 10, 2]).unwrap();
    let (mut lse, mut logp) = (device.alloc(rows).unwrap(), device.alloc(rows).unwrap());
    let err = FusedScoring::new::<f32>(&k, vocab)
        .forward(&h, &w, &targets, d, &mut lse, &mut logp)
        .unwrap_err();
    assert!(format!("{err:#}").contains("trap"), "{err:#}");

    let spans = [ResponseSpan {
        group: 0,
        first: 2,
        len: 2,
        ends_with_eos: true,
    }];
    let err = Spans::upload(&device, &Pool::default(), &spans, rows)
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("response 0 spans rows 2..4 of a batch of 3"),
        "{err:#}"
    );
    let wrong_width = FusedScoring::new::<f32>(&k, vocab)
        .forward(&h, &w, &targets, 3, &mut lse, &mut logp)
        .unwrap_err();
    assert!(
        format!("{wrong_width:#}").contains("LM head"),
        "{wrong_width:#}"
    );
}

#[test]
fn eval_agrees_on_the_cpu_and_the_emulated_device() {
    for name in ["tiny-mistral", "tiny-mixtral"] {
        let eval = |device: &str| -> serde_json::Value {
            let out = common::contralign_ok(&[
                "eval",
                "--model",
                &common::fx(name),
                "--ref-model",
                &common::fx(&format!("{name}-ref")),
                "--data",
                &common::fx(&format!("{name}.reward.jsonl")),
                "--loss",
                "nca",
                "--device",
                device,
            ]);
            serde_json::from_slice(&out.stdout).unwrap()
        };
        let (cpu, emu) = (eval("cpu"), eval("emu"));
        let metrics = cpu["metrics"].as_object().unwrap();
        assert_eq!(metrics.len(), emu["metrics"].as_object().unwrap().len());
        for (key, want) in metrics {
            let (g, w) = (
                emu["metrics"][key].as_f64().unwrap(),
                want.as_f64().unwrap(),
            );
            // The device's fp32 statistics against the CPU's f64 (common::device_step's
            // bound), absolute for metrics near zero.
            assert!(
                (g - w).abs() <= 1e-5 * (w.abs() + 1.0),
                "{name} {key}: emu {g}, cpu {w}"
            );
        }
        assert_eq!(cpu["loss"], cpu["metrics"]["loss"]);
    }
}

#[test]
fn bench_scoring_runs_on_the_emulator_and_prints_every_figure() {
    let out = common::contralign_ok(&[
        "bench",
        "scoring",
        "--device",
        "emu",
        "--rows",
        "300",
        "--vocab",
        "257",
        "--dim",
        "24",
        "--chunk-rows",
        "128",
        "--reps",
        "1",
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["emulator_time"], true);
    assert_eq!(report["chunk_rows"], 128);
    assert_eq!(report["fused_extra_bytes"], 128 * 257 * 2);
    assert_eq!(report["unfused_extra_bytes"], 2 * 300 * 257 * 4);
    for key in [
        "fused_forward_s",
        "fused_forward_backward_s",
        "gemms_forward_s",
        "gemms_forward_backward_s",
        "unfused_forward_s",
        "copy_gb_s",
        "rows_pass_gb_s",
        "backward_pass_gb_s",
        "rows_pass_of_copy",
    ] {
        let v = report[key].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "{key} = {}", report[key]);
    }
}

#[test]
fn the_unfused_baseline_computes_what_the_fused_scoring_does() {
    let device = Device::Emu;
    let shape = ScoringShape {
        rows: 70,
        vocab: 333,
        dim: 20,
        chunk_rows: Some(16),
    };
    let mut bench = ScoringBench::<f32>::new(&device, shape, 5).unwrap();
    bench.fused_forward().unwrap();
    let fused = scoring_bench::logp(&bench).unwrap();
    Unfused::new(&device, &shape)
        .unwrap()
        .forward(&mut bench)
        .unwrap();
    let unfused = scoring_bench::logp(&bench).unwrap();
    for (a, b) in fused.iter().zip(&unfused) {
        // Both in fp32 from the same logits: a few roundings of log-probs of about ln 333.
        assert!((a - b).abs() <= 1e-5 * (a.abs() + 1.0), "{a} vs {b}");
    }
}

/// The engine's scoring holds at most the memory plan's logits chunk: a chunk of 3 rows
/// leases less of the pool than the default budget's one chunk for all rows, and gives the
/// same statistics up to the roundings of the chunked GEMMs (the CPU reference's bound,
/// tests/common/device_step.rs).
#[test]
fn the_scoring_holds_at_most_the_chunk_it_is_given() {
    use contralign::ops::cuda::ops::DeviceOps;
    use contralign::ops::Ops;
    let device = Device::Emu;
    let mut rng = common::rng("the_scoring_holds_at_most_the_chunk_it_is_given");
    let (rows, d, vocab) = (41, 24, 300);
    let h: Vec<f32> = (0..rows * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let head: Vec<f32> = (0..vocab * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let targets: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..vocab as u32)).collect();
    let spans: Vec<ResponseSpan> = [(0, 17, true), (17, 1, false), (18, 23, true)]
        .iter()
        .map(|&(first, len, ends_with_eos)| ResponseSpan {
            group: 0,
            first,
            len,
            ends_with_eos,
        })
        .collect();
    let score = |chunk: Option<usize>| {
        let pool = Pool::default();
        let mut ops = DeviceOps::with_pool(&device, pool.clone(), Dtype::F32);
        if let Some(rows) = chunk {
            ops = ops.with_scoring_chunk_rows(rows);
        }
        let (h, head) = (ops.upload(&h), ops.upload(&head));
        let before = pool.peak();
        let (table, _lse) = ops.response_scores(&h, &head, &targets, &spans, d, vocab);
        let table = ops.table_to_host(&table);
        ops.check().unwrap();
        (table, pool.peak() - before)
    };
    let (whole, whole_peak) = score(None);
    let (chunked, chunked_peak) = score(Some(3));
    // The logits of all rows against those of 3: (rows − 3) · vocab f32 fewer at the peak,
    // up to the pool's 256-byte alignment of the two chunk leases.
    assert!(
        chunked_peak + (rows - 3) * vocab * 4 <= whole_peak + 2 * 256,
        "extra peak {chunked_peak} with 3-row chunks, {whole_peak} with one chunk of {rows}"
    );
    for (i, (g, w)) in chunked.iter().zip(&whole).enumerate() {
        if !w.is_nan() {
            common::assert_close(&format!("table[{i}]"), *g, *w, 1e-5);
        }
    }
}
