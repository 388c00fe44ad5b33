//! The memory plan (`contralign::memory_plan`, `contralign plan`) of the shipped public
//! configs: parameter counts against the published ones, every category's bytes against
//! numbers worked out by hand from the shapes (not from the planner), fitting, the advice
//! when a plan does not fit, and the command line.

mod common;

use common::{contralign, contralign_fails, contralign_ok, fx};
use contralign::config::ModelConfig;
use contralign::memory_plan::layout::{ParamLayout, PARAM_ALIGN_ELEMS};
use contralign::memory_plan::{
    Category, MasterWeights, MemoryPlan, PlanOptions, PrecisionOptions, RecomputePolicy,
    ReferenceSource, StorageDtype, REGION_ALIGN,
};
use rand::Rng;
use std::path::PathBuf;

fn config_path(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/configs")
        .join(format!("{name}.json"))
        .to_string_lossy()
        .into_owned()
}

fn config(name: &str) -> ModelConfig {
    ModelConfig::load_file(std::path::Path::new(&config_path(name))).unwrap()
}

fn options(micro_tokens: usize, recompute: RecomputePolicy) -> PlanOptions {
    PlanOptions {
        recompute,
        ..PlanOptions::new(micro_tokens)
    }
}

/// Every category's bytes, in `Category::ALL` order.
fn bytes(plan: &MemoryPlan) -> Vec<(Category, u64)> {
    plan.categories()
}

#[test]
fn parameter_counts_are_the_published_ones() {
    // Mistral-7B-v0.1 (published: 7,241,732,096): embed + lm_head 2·32000·4096 = 262,144,000;
    // per layer q, o 2·4096² = 33,554,432, k, v 2·1024·4096 = 8,388,608, MLP 3·14336·4096 =
    // 176,160,768, norms 2·4096 = 8,192: 218,112,000 · 32 = 6,979,584,000; final norm 4,096.
    // v0.3: the vocabulary grows to 32768: + 2·768·4096 = 6,291,456 → 7,248,023,552.
    // Mixtral-8x7B (published: 46,702,792,704): per layer attention + norms 41,951,232,
    // router 8·4096 = 32,768, experts 8·176,160,768 = 1,409,286,144: 1,451,270,144 · 32 =
    // 46,440,644,608, + 262,144,000 + 4,096.
    for (name, want) in [
        ("mistral-7b-v0.1", 7_241_732_096usize),
        ("mistral-7b-v0.3", 7_248_023_552),
        ("mixtral-8x7b-v0.1", 46_702_792_704),
    ] {
        let layout = ParamLayout::new(&config(name));
        assert_eq!(layout.parameters, want, "{name}");
        // Every tensor of these models is a multiple of 128 elements: no padding.
        assert_eq!(layout.elements, want, "{name}");
    }
}

#[test]
fn shipped_configs_carry_the_public_values() {
    let v1 = config("mistral-7b-v0.1");
    assert_eq!(
        (
            v1.vocab_size,
            v1.hidden_size,
            v1.intermediate_size,
            v1.num_layers
        ),
        (32000, 4096, 14336, 32)
    );
    assert_eq!((v1.num_heads, v1.num_kv_heads, v1.head_dim), (32, 8, 128));
    assert_eq!((v1.rope_theta, v1.sliding_window), (10000.0, Some(4096)));
    assert_eq!((v1.rms_norm_eps, v1.tie_word_embeddings), (1e-5, false));
    assert_eq!(
        (v1.bos_token_id, v1.eos_token_ids.clone()),
        (Some(1), vec![2])
    );
    assert!(v1.moe.is_none());
    let v3 = config("mistral-7b-v0.3");
    assert_eq!(
        (v3.vocab_size, v3.rope_theta, v3.sliding_window),
        (32768, 1e6, None)
    );
    let mx = config("mixtral-8x7b-v0.1");
    let moe = mx.moe.as_ref().unwrap();
    assert_eq!((moe.num_experts, moe.experts_per_token), (8, 2));
    assert_eq!(
        (moe.router_aux_loss_coef, moe.output_router_logits),
        (0.02, false)
    );
    assert_eq!(
        (mx.vocab_size, mx.rope_theta, mx.sliding_window),
        (32000, 1e6, None)
    );
}

// The hand-worked numbers below use T = 4096 tokens, bf16 (2 bytes) weights and
// activations, d = 4096, qw = 32·128 = 4096, kvw = 8·128 = 1024, H = 32, I = 14336,
// 32 layers, V = 32000. Shapes: [T, d] bf16 = 4096·4096·2 = 33,554,432;
// [T, kvw] = 4096·1024·2 = 8,388,608; [T, I] = 4096·14336·2 = 117,440,512;
// lse [T, H] f32 = 4096·32·4 = 524,288; rstd [T] f32 = 16,384.

/// Logits at T = 4096 (chunk rows: 2^30 / (32000·4) = 8388.6 → 65·128 = 8320, capped at
/// T = 4096): chunk 4096·32000·4 = 524,288,000, rows and d_rows 2·33,554,432, scoring
/// 3·4096·4 = 49,152.
const LOGITS_T4096: u64 = 524_288_000 + 2 * 33_554_432 + 3 * 16_384;

/// Batch data at T = 4096 with a reference: 8 arrays [T]·4 = 8·16,384; responses and
/// response_stats [T, 4]·4 = 65,536 each; group_offsets 4097·4 = 16,388 → 16,640 (256
/// aligned); response_grads [T, 3]·4 = 49,152; reference_stats 65,536.
const BATCH_T4096: u64 = 8 * 16_384 + 65_536 * 2 + 16_640 + 49_152 + 65_536;

const CUBLAS: u64 = 32 * 1024 * 1024;

#[test]
fn mistral_7b_categories_by_hand() {
    let cfg = config("mistral-7b-v0.1");
    let p = 7_241_732_096u64;

    // Selective: per layer input, q, attn, mid 4·33,554,432 + k, v 2·8,388,608 + lse
    // 524,288 + gate, up 2·117,440,512 = 386,400,256, ·32 layers = 12,364,808,192; plus
    // final_hidden, final_normed 2·33,554,432 and final_rstd 16,384.
    let kept_selective =
        32 * (4 * 33_554_432 + 2 * 8_388_608 + 524_288 + 2 * 117_440_512) + 2 * 33_554_432 + 16_384;
    assert_eq!(kept_selective, 12_431_933_440);
    // Backward buffers, every policy: d_hidden.0/1, d_mid, d_norm_in 4·33,554,432; d_act,
    // d_gate, d_up 3·117,440,512; d_attn, d_q 2·33,554,432; d_k, d_v 2·8,388,608; dq_accum
    // [T, qw] f32 67,108,864; delta [T, H] f32 524,288; d_final_normed 33,554,432.
    let backward = 4 * 33_554_432
        + 3 * 117_440_512
        + 2 * 33_554_432
        + 2 * 8_388_608
        + 67_108_864
        + 524_288
        + 33_554_432;
    assert_eq!(backward, 671_612_928);
    // Selective recomputes input_rstd, post_rstd 2·16,384, normed, ffn_in 2·33,554,432,
    // act 117,440,512.
    let work_selective = 2 * 16_384 + 2 * 33_554_432 + 117_440_512 + backward;
    // bf16 gradients over several logits chunks: the f32 accumulator that the LM head's
    // chunks add into, [V, d] = 32000·4096·4. The 4096 rows here are one chunk: none.
    let accumulator = 524_288_000;

    let plan = MemoryPlan::new(&cfg, &options(4096, RecomputePolicy::Selective)).unwrap();
    assert_eq!(plan.logits_chunk_rows, 4096);
    let want = vec![
        (Category::Weights, p * 2),
        (Category::MasterWeights, 0),
        (Category::Gradients, p * 2),
        (Category::Moments, p * 2 * 2),
        (Category::ReferenceWeights, 0),
        (Category::KeptActivations, kept_selective),
        (Category::RecomputeWorkspace, work_selective),
        (Category::LogitsChunk, LOGITS_T4096),
        (Category::CublasWorkspace, CUBLAS),
        (Category::BatchData, BATCH_T4096),
    ];
    assert_eq!(bytes(&plan), want);
    assert_eq!(plan.total(), 71_847_379_200);
    plan.fits(80_000_000_000).unwrap();
    let chunked = MemoryPlan::new(
        &cfg,
        &PlanOptions {
            logits_chunk_rows: Some(1024),
            ..options(4096, RecomputePolicy::Selective)
        },
    )
    .unwrap();
    assert_eq!(
        chunked.category_bytes(Category::RecomputeWorkspace),
        work_selective + accumulator
    );

    // Full: only the 32 layer inputs are kept per layer; the workspace holds the whole
    // layer once: normed, q, attn, mid, ffn_in 5·33,554,432, k, v 2·8,388,608, lse 524,288,
    // the two rstd 2·16,384, gate, up, act 3·117,440,512.
    let full = MemoryPlan::new(&cfg, &options(4096, RecomputePolicy::Full)).unwrap();
    let kept_full = 32 * 33_554_432 + 2 * 33_554_432 + 16_384;
    let layer = 5 * 33_554_432 + 2 * 8_388_608 + 524_288 + 2 * 16_384 + 3 * 117_440_512;
    assert_eq!(full.category_bytes(Category::KeptActivations), kept_full);
    assert_eq!(
        full.category_bytes(Category::RecomputeWorkspace),
        layer + backward
    );

    // None keeps the whole layer for each of the 32 layers and recomputes nothing.
    let none = MemoryPlan::new(&cfg, &options(4096, RecomputePolicy::None)).unwrap();
    assert_eq!(
        none.category_bytes(Category::KeptActivations),
        32 * (33_554_432 + layer) + 2 * 33_554_432 + 16_384
    );
    assert_eq!(none.category_bytes(Category::RecomputeWorkspace), backward);

    // A resident reference model adds its bf16 weights; fp32 master, moments and
    // gradients are 4 bytes per parameter each.
    let resident = MemoryPlan::new(
        &cfg,
        &PlanOptions {
            reference: ReferenceSource::Resident,
            ..options(4096, RecomputePolicy::Selective)
        },
    )
    .unwrap();
    assert_eq!(resident.category_bytes(Category::ReferenceWeights), p * 2);
    let wide = MemoryPlan::new(
        &cfg,
        &PlanOptions {
            precision: PrecisionOptions {
                precision: StorageDtype::Bf16,
                master: MasterWeights::F32,
                moments: StorageDtype::F32,
                grads: StorageDtype::F32,
            },
            ..options(4096, RecomputePolicy::Selective)
        },
    )
    .unwrap();
    assert_eq!(wide.category_bytes(Category::MasterWeights), p * 4);
    assert_eq!(wide.category_bytes(Category::Gradients), p * 4);
    assert_eq!(wide.category_bytes(Category::Moments), p * 4 * 2);
    // f32 gradients accumulate in place: no accumulator, in one chunk or several.
    let wide_chunked = MemoryPlan::new(
        &cfg,
        &PlanOptions {
            logits_chunk_rows: Some(1024),
            ..wide.options
        },
    )
    .unwrap();
    for plan in [&wide, &wide_chunked] {
        assert_eq!(
            plan.category_bytes(Category::RecomputeWorkspace),
            work_selective
        );
    }
}

#[test]
fn mixtral_8x7b_categories_by_hand() {
    let cfg = config("mixtral-8x7b-v0.1");
    let p = 46_702_792_704u64;
    // T = 4096, top-2 of 8 experts: the experts run over T·k = 8192 rows.
    // [T·k, I] bf16 = 8192·14336·2 = 234,881,024; [T·k, d] = 8192·4096·2 = 67,108,864.
    // Routing: router_probs [T, 8] f32 = 131,072; topk_experts, topk_weights [T, 2]·4 and
    // dispatch_rows [8192]·4 = 32,768 each; expert_offsets 9·4 = 36 → 256.
    let routing = 131_072 + 3 * 32_768 + 256;
    // Selective keeps per layer input, q, attn, mid 4·33,554,432, k, v 2·8,388,608, lse
    // 524,288, the routing, expert gate, up 2·234,881,024 and expert_out 67,108,864.
    let kept = 32
        * (4 * 33_554_432 + 2 * 8_388_608 + 524_288 + routing + 2 * 234_881_024 + 67_108_864)
        + 2 * 33_554_432
        + 16_384;
    assert_eq!(kept, 22_102_958_080);
    // Workspace: recomputed rstd 2·16,384, normed, ffn_in 2·33,554,432, expert_in
    // 67,108,864, act 234,881,024; backward d_hidden.0/1, d_mid, d_norm_in 4·33,554,432,
    // d_act, d_gate, d_up 3·234,881,024, d_expert_out, d_expert_in 2·67,108,864,
    // d_router_probs 131,072, d_topk_weights 32,768, d_attn, d_q 2·33,554,432, d_k, d_v
    // 2·8,388,608, dq_accum 67,108,864, delta 524,288, d_final_normed 33,554,432.
    let work = 2 * 16_384
        + 2 * 33_554_432
        + 67_108_864
        + 234_881_024
        + 4 * 33_554_432
        + 3 * 234_881_024
        + 2 * 67_108_864
        + 131_072
        + 32_768
        + 2 * 33_554_432
        + 2 * 8_388_608
        + 67_108_864
        + 524_288
        + 33_554_432;
    assert_eq!(work, 1_527_447_552);
    // The 4096 rows are one logits chunk: the LM head's GEMM writes its bf16 gradient, no
    // f32 accumulator.
    let plan = MemoryPlan::new(&cfg, &options(4096, RecomputePolicy::Selective)).unwrap();
    let want = vec![
        (Category::Weights, p * 2),
        (Category::MasterWeights, 0),
        (Category::Gradients, p * 2),
        (Category::Moments, p * 2 * 2),
        (Category::ReferenceWeights, 0),
        (Category::KeptActivations, kept),
        (Category::RecomputeWorkspace, work),
        (Category::LogitsChunk, LOGITS_T4096),
        (Category::CublasWorkspace, CUBLAS),
        (Category::BatchData, BATCH_T4096),
    ];
    assert_eq!(bytes(&plan), want);
    // 8 bytes per parameter alone is 373.6 GB: no 80 GB device holds it.
    let err = plan.fits(80_000_000_000).unwrap_err().to_string();
    assert!(err.contains("Largest: moments (m, v) 186.81 GB"), "{err}");
    assert!(
        err.contains("The parameters' state alone (weights, master, gradients, moments, reference) needs 373.62 GB"),
        "{err}"
    );
}

#[test]
fn mistral_7b_default_plan_with_a_cached_reference_fits_80_gb() {
    let cfg = config("mistral-7b-v0.1");
    let memory = 80_000_000_000;
    // At train's default 8192 micro-tokens selective keeps 24.9 GB of activations, which
    // with 58 GB of weights, gradients and moments does not fit: the default falls back to
    // full recompute, which does.
    let plan = MemoryPlan::with_default_recompute(&cfg, &PlanOptions::new(8192), memory).unwrap();
    assert_eq!(plan.options.recompute, RecomputePolicy::Full);
    assert_eq!(plan.options.reference, ReferenceSource::Cached);
    assert_eq!(plan.options.precision, PrecisionOptions::default());
    plan.fits(memory).unwrap();
    let selective = MemoryPlan::new(&cfg, &options(8192, RecomputePolicy::Selective)).unwrap();
    assert!(selective.fits(memory).is_err());
    // At 4096 selective fits, and is the default.
    let plan = MemoryPlan::with_default_recompute(&cfg, &PlanOptions::new(4096), memory).unwrap();
    assert_eq!(plan.options.recompute, RecomputePolicy::Selective);
}

#[test]
fn fp32_master_and_moments_do_not_fit_and_the_error_names_the_flags() {
    let cfg = config("mistral-7b-v0.1");
    let plan = MemoryPlan::new(
        &cfg,
        &PlanOptions {
            precision: PrecisionOptions {
                precision: StorageDtype::Bf16,
                master: MasterWeights::F32,
                moments: StorageDtype::F32,
                grads: StorageDtype::Bf16,
            },
            ..options(4096, RecomputePolicy::Selective)
        },
    )
    .unwrap();
    // 7,241,732,096 · (2 + 4 + 2 + 8) = 115,867,713,536 bytes of parameter state alone.
    let err = plan.fits(80_000_000_000).unwrap_err().to_string();
    for needle in [
        "but --memory is 80.00 GB (80000000000 bytes)",
        "Largest: moments (m, v) 57.93 GB",
        "--moments bf16",
        "--master none",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from {err}");
    }
    // Neither flag alone fits (100.4 GB and 86.9 GB): both are listed as not enough.
    assert!(err.contains("Not enough on its own"), "{err}");
    assert!(err.contains("Combine them"), "{err}");

    // f32 everywhere: 16 bytes per parameter too; --precision bf16 is the way out.
    let f32_plan = MemoryPlan::new(
        &cfg,
        &PlanOptions {
            precision: PrecisionOptions::all_f32(),
            ..options(4096, RecomputePolicy::Selective)
        },
    )
    .unwrap();
    assert_eq!(
        f32_plan.category_bytes(Category::Weights),
        7_241_732_096 * 4
    );
    assert_eq!(f32_plan.category_bytes(Category::MasterWeights), 0);
    let err = f32_plan.fits(80_000_000_000).unwrap_err().to_string();
    assert!(
        err.contains("Each of these fits: --precision bf16"),
        "{err}"
    );
}

#[test]
fn resolving_precision_flags() {
    let r = PrecisionOptions::resolve;
    assert_eq!(
        r(StorageDtype::Bf16, None, None, None).unwrap(),
        PrecisionOptions::default()
    );
    let o = r(
        StorageDtype::Bf16,
        Some(MasterWeights::F32),
        Some(StorageDtype::F32),
        None,
    )
    .unwrap();
    assert_eq!(
        (o.master, o.moments, o.grads),
        (MasterWeights::F32, StorageDtype::F32, StorageDtype::Bf16)
    );
    assert_eq!(
        r(StorageDtype::F32, None, Some(StorageDtype::F32), None).unwrap(),
        PrecisionOptions::all_f32()
    );
    let err = r(StorageDtype::F32, None, Some(StorageDtype::Bf16), None).unwrap_err();
    assert!(err
        .to_string()
        .contains("--moments bf16 with --precision f32"));
    let err = r(StorageDtype::F32, Some(MasterWeights::F32), None, None).unwrap_err();
    assert!(err
        .to_string()
        .contains("--master f32 with --precision f32"));
}

/// A random Mistral or Mixtral config of awkward sizes.
fn random_config(rng: &mut impl Rng) -> ModelConfig {
    let kv = rng.gen_range(1..4usize);
    let heads = kv * rng.gen_range(1..4usize);
    let head_dim = 2 * rng.gen_range(1..20usize);
    let mut raw = serde_json::json!({
        "model_type": "mistral",
        "vocab_size": rng.gen_range(3..5000),
        "hidden_size": rng.gen_range(1..300),
        "intermediate_size": rng.gen_range(1..700),
        "num_hidden_layers": rng.gen_range(1..5),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "tie_word_embeddings": rng.gen_bool(0.5),
    });
    if rng.gen_bool(0.5) {
        let experts = rng.gen_range(1..9);
        raw["model_type"] = "mixtral".into();
        raw["num_local_experts"] = experts.into();
        // What the device engine routes: at most 4 experts per token.
        raw["num_experts_per_tok"] = rng.gen_range(1..=experts.min(4)).into();
    }
    ModelConfig::from_json(raw).unwrap()
}

#[test]
fn regions_tile_the_arena_aligned_and_the_parameter_spans_follow_param_specs() {
    let mut rng = common::rng("regions_tile_the_arena");
    for _ in 0..50 {
        let cfg = random_config(&mut rng);
        let t = rng.gen_range(1..3000);
        let policy = [
            RecomputePolicy::None,
            RecomputePolicy::Full,
            RecomputePolicy::Selective,
        ][rng.gen_range(0..3)];
        let plan = MemoryPlan::new(&cfg, &options(t, policy)).unwrap();
        let ctx = format!("T {t}, {policy:?}, {:?}", cfg.raw);
        let mut end = 0;
        for r in &plan.regions {
            assert_eq!(
                r.offset, end,
                "{ctx}: {} does not follow its predecessor",
                r.name
            );
            assert!(
                r.bytes > 0 && r.bytes % REGION_ALIGN == 0,
                "{ctx}: {}",
                r.name
            );
            end += r.bytes;
        }
        assert_eq!(end, plan.total(), "{ctx}");
        let total: u64 = plan.categories().iter().map(|c| c.1).sum();
        assert_eq!(total, plan.total(), "{ctx}");
        let specs = contralign::model::params::param_specs(&cfg);
        let layout = &plan.layout;
        assert_eq!(layout.spans.len(), specs.len(), "{ctx}");
        let mut next = 0;
        for (span, (name, shape)) in layout.spans.iter().zip(&specs) {
            assert_eq!((&span.name, &span.shape), (name, shape), "{ctx}");
            assert_eq!(span.offset % PARAM_ALIGN_ELEMS, 0, "{ctx}: {name}");
            assert!(span.offset >= next, "{ctx}: {name} overlaps");
            next = span.offset + span.len;
        }
        assert!(layout.elements >= next && layout.elements < next + PARAM_ALIGN_ELEMS);
        let weights = plan.region("weights").unwrap().bytes;
        assert_eq!(
            weights,
            (layout.elements as u64 * 2).next_multiple_of(256),
            "{ctx}"
        );
        assert_eq!(
            plan.region("kept.layer.0.input").unwrap().bytes,
            (t as u64 * cfg.hidden_size as u64 * 2).next_multiple_of(256),
            "{ctx}"
        );
        if let Some(moe) = &cfg.moe {
            // The experts' rows are T·k, whatever the routing.
            let rows = (t * moe.experts_per_token) as u64;
            let want = (rows * cfg.intermediate_size as u64 * 2).next_multiple_of(256);
            assert_eq!(plan.region("backward.d_act").unwrap().bytes, want, "{ctx}");
        }
    }
}

#[test]
fn plan_prints_the_table_and_json() {
    let path = config_path("mistral-7b-v0.1");
    let out = contralign_ok(&["plan", "--model", &path, "--micro-tokens", "4096"]);
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "parameters   7,241,732,096",
        "precision    bf16 (master none, moments bf16, grads bf16)",
        "recompute    selective (the default where it fits)",
        "weights                 14.48 GB     14,483,464,192   20.2%",
        "moments (m, v)          28.97 GB     28,966,928,384   40.3%",
        "kept activations        12.43 GB     12,431,933,440   17.3%",
        "recompute workspace     856.2 MB        856,195,072    1.2%",
        "total                   71.85 GB     71,847,379,200  100.0%",
        "fits in 80.00 GB: yes (free 8.15 GB)",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from\n{text}");
    }
    // A model directory works as well as its config.json; --json holds every region.
    let out = contralign_ok(&[
        "plan",
        "--model",
        &fx("tiny-mixtral"),
        "--micro-tokens",
        "100",
        "--recompute",
        "none",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cfg = ModelConfig::load(std::path::Path::new(&fx("tiny-mixtral"))).unwrap();
    let plan = MemoryPlan::new(&cfg, &options(100, RecomputePolicy::None)).unwrap();
    assert_eq!(v["total"], plan.total());
    assert_eq!(v["fits"], true);
    assert_eq!(v["options"]["recompute"], "none");
    assert_eq!(v["recompute_default"], false);
    assert_eq!(
        v["categories"]["kept_activations"],
        plan.category_bytes(Category::KeptActivations)
    );
    assert_eq!(v["regions"].as_array().unwrap().len(), plan.regions.len());
    assert_eq!(v["regions"][0]["name"], "weights");
}

/// The default plan of Mistral-7B at 8192 tokens falls back to full recompute and names the
/// largest micro-batch at which selective fits 80 GB.
#[test]
fn a_plan_that_falls_back_to_full_recompute_names_where_selective_fits() {
    let path = config_path("mistral-7b-v0.1");
    let out = contralign_ok(&["plan", "--model", &path]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(
            "recompute    full (the default: selective does not fit; at --micro-tokens 6400 \
             it does: about 6N FLOPs a token against full's 8N)"
        ),
        "{text}"
    );
    let cfg = config("mistral-7b-v0.1");
    let selective = |t| {
        MemoryPlan::new(&cfg, &options(t, RecomputePolicy::Selective))
            .unwrap()
            .total()
    };
    assert!(selective(6400) <= 80_000_000_000);
    assert!(selective(6528) > 80_000_000_000);
}

#[test]
fn plan_that_does_not_fit_exits_1_naming_the_flag() {
    let path = config_path("mistral-7b-v0.1");
    let stderr = contralign_fails(
        &[
            "plan",
            "--model",
            &path,
            "--micro-tokens",
            "4096",
            "--moments",
            "f32",
            "--memory",
            "80",
        ],
        "--moments bf16",
    );
    assert!(
        stderr.contains("Largest: moments (m, v) 57.93 GB"),
        "{stderr}"
    );
    // Memory in GiB: 79.5 GiB = 85,362,475,008 bytes holds the selective plan.
    contralign_ok(&[
        "plan",
        "--model",
        &path,
        "--micro-tokens",
        "4096",
        "--memory",
        "79.5GiB",
    ]);
    let stderr = contralign_fails(
        &[
            "plan",
            "--model",
            &path,
            "--micro-tokens",
            "4096",
            "--recompute",
            "selective",
            "--memory",
            "65GB",
        ],
        "Each of these fits: --recompute full (60.91 GB), --micro-tokens 2048.",
    );
    assert!(!stderr.contains("--master none"), "{stderr}");
    // The default recompute is full already when selective does not fit: the way out is a
    // smaller micro-batch, the largest multiple of 128 that fits.
    let stderr = contralign_fails(
        &[
            "plan",
            "--model",
            &path,
            "--micro-tokens",
            "4096",
            "--memory",
            "60GB",
        ],
        "Each of these fits: --micro-tokens 2816.",
    );
    assert!(!stderr.contains("--recompute"), "{stderr}");
    contralign_ok(&[
        "plan",
        "--model",
        &path,
        "--micro-tokens",
        "2816",
        "--memory",
        "60GB",
    ]);
    contralign_fails(
        &[
            "plan",
            "--model",
            &path,
            "--micro-tokens",
            "2944",
            "--memory",
            "60GB",
        ],
        "--micro-tokens 2816",
    );
}

#[test]
fn plan_rejects_bad_input_with_a_clear_message() {
    let path = config_path("mistral-7b-v0.1");
    let out = contralign(&["plan", "--model", &path, "--precision", "f16"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid value 'f16' for '--precision"),
        "{stderr}"
    );
    assert!(stderr.contains("[possible values: bf16, f32]"), "{stderr}");
    assert!(out.stdout.is_empty());

    let out = contralign(&["plan", "--model", &path, "--micro-tokens", "0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid value '0' for '--micro-tokens <N>': 0 is not in 1.."),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());

    let missing = "/nonexistent/dir/config.json";
    let out = contralign(&["plan", "--model", missing]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains(&format!("--model {missing}: no such file or directory")));
    assert!(out.stdout.is_empty());

    for (args, needle) in [
        (
            vec!["--memory", "80XB"],
            "--memory \"80XB\": unknown unit \"XB\"",
        ),
        (
            vec!["--memory", "1e-10"],
            "--memory must be at least 1 byte and below 2^64, found \"1e-10\"",
        ),
        (
            vec!["--precision", "f32", "--moments", "bf16"],
            "--moments bf16 with --precision f32",
        ),
    ] {
        let mut all = vec!["plan", "--model", &path];
        all.extend(args);
        let out = contralign(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{all:?}: {stderr}");
        assert!(stderr.contains(needle), "{needle:?} missing from {stderr}");
        assert!(out.stdout.is_empty(), "{all:?} printed a partial plan");
    }
}
