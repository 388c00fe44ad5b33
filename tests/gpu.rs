//! The kernels, the GEMMs and a whole training step on a real GPU (`--features cuda` and a
//! CUDA driver), against the CPU reference within the selftest's bounds. Every test is
//! ignored where no GPU is asked for; tools/gpu-suite.sh runs them on a GPU machine with
//! `--ignored`, and there a missing GPU fails them.

mod common;

use common::device_step::check_step_on_device;
use contralign::memory_plan::RecomputePolicy;
use contralign::ops::cpu::scoring as cpu_scoring;
use contralign::ops::cuda::device::{Device, DeviceKind};
use contralign::ops::cuda::kernels::Kernels;
use contralign::ops::cuda::pool::Pool;
use contralign::ops::cuda::scoring::FusedScoring;
use contralign::selftest::scoring::ScoringCase;
use contralign::selftest::{self, Row};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::process::Command;

/// The first GPU; a test asked to run on one fails without it.
fn gpu() -> Device {
    match Device::open(DeviceKind::Cuda) {
        Ok(device) => {
            println!("GPU: {}", device.describe());
            device
        }
        Err(e) => panic!("no GPU for a GPU test: {e:#}"),
    }
}

/// A fresh seed, printed so that a failure can be rerun with
/// `contralign selftest --device cuda --seed N`.
fn fresh_seed() -> u64 {
    let seed = rand::random();
    println!("seed {seed}");
    seed
}

fn assert_pass(rows: &[Row], what: &str, seed: u64) {
    let failed = rows.iter().filter(|r| !r.pass).count();
    assert!(
        failed == 0,
        "{what}, seed {seed}: {failed} of {} checks fail\n{}",
        rows.len(),
        selftest::table(rows)
    );
}

#[test]
#[ignore = "needs a GPU: tools/gpu-suite.sh runs it with --ignored"]
fn selftest_passes_on_the_gpu() {
    let device = gpu();
    let seed = fresh_seed();
    let rows =
        selftest::run(&device, seed).unwrap_or_else(|e| panic!("selftest, seed {seed}: {e:#}"));
    print!("{}", selftest::table(&rows));
    assert_pass(&rows, "selftest", seed);
}

/// A whole training step of the dense and the MoE fixture on the GPU against the CPU: the
/// GEMMs, the kernels (attention included) and the host-side scoring together.
#[test]
#[ignore = "needs a GPU: tools/gpu-suite.sh runs it with --ignored"]
fn a_training_step_on_the_gpu_matches_the_cpu() {
    let device = gpu();
    for (name, recompute) in [
        ("tiny-mistral", RecomputePolicy::None),
        ("tiny-mistral", RecomputePolicy::Selective),
        ("tiny-mixtral", RecomputePolicy::Full),
    ] {
        check_step_on_device(&device, name, recompute);
    }
}

/// The launch shapes of the emulator's kernel tests (threads per block, most blocks): blocks
/// that are not whole warps, and grids too small for the data. A GPU runs warps in lockstep
/// where the emulator runs threads one after another, so what passes there can still fail
/// here.
const LAUNCH_SHAPES: [(u32, u32); 5] = [(256, 4096), (33, 3), (96, 7), (32, 1), (1024, 2)];

#[test]
#[ignore = "needs a GPU: tools/gpu-suite.sh runs it with --ignored"]
fn kernels_pass_with_every_launch_shape() {
    let device = gpu();
    let seed = fresh_seed();
    let rng = &mut StdRng::seed_from_u64(seed);
    for (block, max_grid) in LAUNCH_SHAPES {
        let k = Kernels {
            block,
            max_grid,
            ..Kernels::new(&device)
        };
        let rows = (|| -> anyhow::Result<Vec<Row>> {
            let mut rows = Vec::new();
            rows.extend(selftest::swiglu::<bf16>(&k, rng, 65537)?);
            rows.extend(selftest::embedding::<bf16>(&k, rng, 67, 13, 257)?);
            rows.extend(selftest::rmsnorm::<f32>(&k, rng, 37, 1001)?);
            rows.extend(selftest::rmsnorm::<bf16>(&k, rng, 37, 1001)?);
            rows.extend(selftest::rope::<bf16>(&k, rng, 29, 5, 66)?);
            rows.extend(selftest::casts(&k, rng, 3001)?);
            rows.extend(selftest::grad_norm::<f32>(&k, rng, &[1, 4099, 31, 70001])?);
            rows.extend(selftest::grad_norm::<bf16>(&k, rng, &[1, 4099, 31, 70001])?);
            rows.extend(selftest::adamw_exact(&k, rng, 5003)?);
            let case = ScoringCase::random(rng, 3, 9, 12, (4099, 33, 7));
            rows.extend(selftest::scoring::scoring::<f32>(&k, rng, &case)?);
            rows.extend(selftest::scoring::scoring::<bf16>(&k, rng, &case)?);
            device.synchronize()?;
            Ok(rows)
        })()
        .unwrap_or_else(|e| panic!("launch shape ({block}, {max_grid}), seed {seed}: {e:#}"));
        assert_pass(
            &rows,
            &format!("launch shape ({block} threads, {max_grid} blocks)"),
            seed,
        );
    }
}

/// One chunk of 65,600 rows of 32,768 f32 logits (8.6 GB) holds more than 2^31 elements: the
/// rows past the 2^31st element must score as the CPU scores them (32-bit offsets would
/// wrap to the chunk's first rows).
#[test]
#[ignore = "needs a GPU: tools/gpu-suite.sh runs it with --ignored"]
fn scoring_indexes_a_chunk_past_two_to_the_31_elements() {
    let device = gpu();
    let seed = fresh_seed();
    let rng = &mut StdRng::seed_from_u64(seed);
    let (rows, vocab, d) = (65_600, 32_768, 8);
    let h: Vec<f32> = (0..rows * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let w: Vec<f32> = (0..vocab * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let targets: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..vocab as u32)).collect();
    let k = Kernels::new(&device);
    let scoring = FusedScoring {
        kernels: &k,
        chunk_rows: rows,
    };
    let (mut lse, mut logp) = (device.alloc(rows).unwrap(), device.alloc(rows).unwrap());
    scoring
        .forward(
            &device.upload(&h).unwrap(),
            &device.upload(&w).unwrap(),
            &device.upload(&targets).unwrap(),
            d,
            &mut lse,
            &mut logp,
        )
        .unwrap();
    let got = device.download(&logp).unwrap();
    let first = (1usize << 31) / vocab - 2;
    let (want, _) = cpu_scoring::token_logprobs(&h[first * d..], &w, &targets[first..], d, vocab);
    for (i, (&g, &w)) in got[first..].iter().zip(&want).enumerate() {
        // Logits of at most 8, an fp32 sum of 32,768 terms: well within 1e-4.
        assert!(
            (g as f64 - w).abs() <= 1e-4,
            "row {}: {g}, want {w} (seed {seed})",
            first + i
        );
    }
}

/// Set in the child process that runs the trapping launch.
const TRAP_CHILD: &str = "CONTRALIGN_GPU_TEST_TRAP_CHILD";
const TRAP_TEST: &str = "embedding_fails_on_an_id_past_the_table";

/// The kernel traps on an id past the table rather than read another tensor's memory. A trap
/// leaves the CUDA context unusable for the rest of the process, so the launch runs in a child
/// process (this test binary, running only this test) and the other tests keep a working GPU.
#[test]
#[ignore = "needs a GPU: tools/gpu-suite.sh runs it with --ignored"]
fn embedding_fails_on_an_id_past_the_table() {
    if std::env::var_os(TRAP_CHILD).is_some() {
        return trap_in_this_process();
    }
    // The parent needs no context of its own: only that there is a GPU.
    gpu();
    let exe = std::env::current_exe().expect("the path of this test executable");
    let out = Command::new(&exe)
        .args([
            TRAP_TEST,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(TRAP_CHILD, "1")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("child process:\n{stdout}{stderr}");
    assert!(
        out.status.success() && stdout.contains("launch failed as it should: "),
        "the child process ({}) did not see the launch fail",
        out.status
    );
}

fn trap_in_this_process() {
    let device = gpu();
    let k = Kernels::new(&device);
    let (vocab, d) = (3, 4);
    let table = device.upload(&vec![1f32; vocab * d]).unwrap();
    let ids = device.upload(&[0u32, vocab as u32]).unwrap();
    let mut out = device.alloc::<f32>(2 * d).unwrap();
    // A GPU reports the trap at the next synchronizing call, the emulator at the launch.
    let result = k
        .embedding_forward(&table, &ids, &mut out, d)
        .and_then(|()| device.synchronize())
        .and_then(|()| device.download(&out));
    match result {
        Err(e) => println!("launch failed as it should: {e:#}"),
        Ok(values) => panic!("an id past the table of {vocab} rows passed: {values:?}"),
    }
}

/// Attention at Mistral-7B's head shape (32 query heads, 8 KV heads, head dim 128) over a
/// packed group of a 512-token prompt and two responses with a 128-token window: many tiles
/// and blocks at once against the CPU, and the backward's bits the same on a second run.
#[test]
#[ignore = "needs a GPU: tools/gpu-suite.sh runs it with --ignored"]
fn attention_at_mistral_head_shapes_matches_the_cpu_and_repeats_its_bits() {
    use contralign::ops::cuda::attention::DeviceLayout;
    use contralign::ops::cuda::attention::{tile_rows, AttentionKernels};
    use contralign::ops::AttentionLayout;
    use contralign::ops::AttentionShape;
    let device = gpu();
    let seed = fresh_seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let case = selftest::AttentionCase {
        name: "mistral heads",
        layout: AttentionLayout::packed(&[(512, vec![128, 200])], Some(128)),
        shape: AttentionShape {
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
        },
    };
    let mut rows = selftest::attention::<bf16>(&device, &mut rng, &case).unwrap();
    rows.extend(selftest::attention::<f32>(&device, &mut rng, &case).unwrap());
    print!("{}", selftest::table(&rows));
    assert_pass(&rows, "attention", seed);

    let s = case.shape;
    let t = case.layout.len();
    let layout =
        DeviceLayout::new(&device, &Pool::default(), &case.layout, tile_rows::<bf16>()).unwrap();
    let random = |n: usize, rng: &mut StdRng| {
        use rand::Rng;
        let x: Vec<bf16> = (0..n)
            .map(|_| bf16::from_f32(rng.gen_range(-2.0..2.0)))
            .collect();
        device.upload(&x).unwrap()
    };
    let (q, k, v, dout) = (
        random(t * s.heads * s.head_dim, &mut rng),
        random(t * s.kv_heads * s.head_dim, &mut rng),
        random(t * s.kv_heads * s.head_dim, &mut rng),
        random(t * s.heads * s.head_dim, &mut rng),
    );
    let kernels = AttentionKernels::new(&device);
    let mut out = device.alloc::<bf16>(q.len()).unwrap();
    let mut lse = device.alloc::<f32>(t * s.heads).unwrap();
    kernels
        .forward(&q, &k, &v, &layout, s, &mut out, &mut lse)
        .unwrap();
    let backward = || {
        let mut dq = device.alloc::<bf16>(q.len()).unwrap();
        let mut dk = device.alloc::<bf16>(k.len()).unwrap();
        let mut dv = device.alloc::<bf16>(v.len()).unwrap();
        kernels
            .backward(
                &q, &k, &v, &out, &lse, &dout, &layout, s, &mut dq, &mut dk, &mut dv,
            )
            .unwrap();
        [dq, dk, dv].map(|g| {
            let g: Vec<u16> = device
                .download(&g)
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect();
            g
        })
    };
    assert!(
        backward() == backward(),
        "the backward's bits differ between runs"
    );
}

/// An upload returns once its data is staged in pinned memory and the copy runs later on the
/// stream: the host may change or drop its data at once, and an upload longer than both
/// staging halves (8 MiB each, reused as their copies finish) arrives whole.
#[test]
#[ignore = "needs a GPU: tools/gpu-suite.sh runs it with --ignored"]
fn uploads_are_staged_so_the_host_may_reuse_its_data_at_once() {
    let device = gpu();
    let seed = fresh_seed();
    let mut rng = StdRng::seed_from_u64(seed);
    // 20 MB: two and a half halves, so the first half is reused while the second copies.
    let n = 5_000_003;
    let given: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let mut host = given.clone();
    let first = device.upload(&host).unwrap();
    host.iter_mut().for_each(|x| *x = -*x);
    let second = device.upload(&host).unwrap();
    drop(host);
    let small = device.upload(&[7.0f32, 8.0, 9.0]).unwrap();
    assert!(
        device.download(&first).unwrap() == given,
        "seed {seed}: the first upload"
    );
    let negated: Vec<f32> = given.iter().map(|x| -x).collect();
    assert!(
        device.download(&second).unwrap() == negated,
        "seed {seed}: the second upload"
    );
    assert_eq!(device.download(&small).unwrap(), [7.0, 8.0, 9.0]);
}

/// Copies to pinned memory queued on the stream (a step's logged scalars, read a step late)
/// carry the values of their point in the stream and arrive whole.
#[test]
#[ignore = "needs a GPU: tools/gpu-suite.sh runs it with --ignored"]
fn queued_downloads_carry_the_values_of_their_point_in_the_stream() {
    common::device_step::check_readback(&gpu(), fresh_seed());
}

/// A non-finite loss flagged on the GPU drops the step there (`device_step::check_drop`).
#[test]
#[ignore = "needs a GPU: tools/gpu-suite.sh runs it with --ignored"]
fn a_flagged_non_finite_loss_drops_the_step_on_the_gpu() {
    common::device_step::check_drop(&gpu(), fresh_seed());
}

/// A host buffer (here the emulator's) given to a GPU kernel or GEMM is refused before the
/// GPU sees its address, naming the kernel and the argument.
#[test]
#[ignore = "needs a GPU: tools/gpu-suite.sh runs it with --ignored"]
fn host_buffers_never_reach_a_gpu_kernel_or_gemm() {
    use contralign::ops::cuda::emu::{KernelArgs, LaunchConfig};
    use contralign::ops::cuda::gemm::Gemm;
    let device = gpu();
    let host = Device::Emu.upload(&[1.0f32; 64]).unwrap();
    let out = device.alloc::<bf16>(64).unwrap();
    let mut args = KernelArgs::new();
    args.buffer(&host).buffer(&out).arg(64i64);
    // SAFETY: refused before the launch; nothing runs.
    let err = unsafe { device.launch("cast_f32_to_bf16", LaunchConfig::new(1, 64, 0), &args) }
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("cast_f32_to_bf16") && text.contains("argument 0 is a host buffer"),
        "{text}"
    );
    let on_gpu = device.upload(&[1.0f32; 64]).unwrap();
    let g = Gemm::projection(8, 8, 8);
    let mut c = device.alloc::<f32>(64).unwrap();
    let err = device.gemm(&g, &on_gpu, &host, &mut c).unwrap_err();
    assert!(format!("{err:#}").contains("host buffer"), "{err:#}");
    device.synchronize().unwrap();
}
