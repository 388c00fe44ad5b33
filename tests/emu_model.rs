//! The emulator as a GPU model (cuda/README.md, "Traffic, races and limits"), through the
//! deliberately good and bad kernels of cuda/emu_probe_checks.cu: the probe measures a plain
//! copy as coalesced and a strided one as not, racecheck reports a missing barrier and two
//! blocks writing one address, a misaligned 16-byte load and a launch with more shared memory
//! than the architecture allows fail, the selftest runs clean under racecheck, and every
//! memory-bound kernel meets the traffic targets of the profile.

mod common;

use contralign::engine::loss;
use contralign::ops::cuda::attention::{tile_rows, AttentionKernels, DeviceLayout};
use contralign::ops::cuda::device::{Buffer, Device};
use contralign::ops::cuda::emu::{self, Arch, KernelArgs, LaunchConfig, Probe, Traffic};
use contralign::ops::cuda::pool::Pool;
use contralign::ops::cuda::profile::{self, Shapes};
use contralign::ops::{AttentionLayout, AttentionShape};
use contralign::selftest;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;
use std::path::Path;

const COUNT: Probe = Probe {
    count: true,
    racecheck: false,
};
const RACECHECK: Probe = Probe {
    count: false,
    racecheck: true,
};

fn launch(
    device: &Device,
    name: &str,
    config: LaunchConfig,
    args: &KernelArgs,
) -> Result<(), String> {
    // SAFETY: every test passes device buffers of the sizes its kernel touches.
    unsafe { device.launch(name, config, args) }.map_err(|e| format!("{e:#}"))
}

/// The traffic of one launch under the counting probe.
fn counted(device: &Device, name: &str, config: LaunchConfig, args: &KernelArgs) -> Traffic {
    let (result, records) = emu::probed(COUNT, || launch(device, name, config, args));
    result.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(records.len(), 1, "{name}: one launch, one record");
    records[0].traffic
}

fn random(device: &Device, rng: &mut StdRng, n: usize) -> Buffer<f32> {
    let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
    device.upload(&x).unwrap()
}

#[test]
fn a_plain_copy_is_coalesced_and_a_strided_one_is_not() {
    let device = Device::Emu;
    let rng = &mut StdRng::seed_from_u64(1);
    let n = 4099;
    let stride = 33;
    let input = random(&device, rng, n * stride);
    let out = device.alloc::<f32>(n).unwrap();
    let config = LaunchConfig::new(n.div_ceil(128) as u32, 128, 0);

    let mut args = KernelArgs::new();
    args.arg(input.device_ptr())
        .arg(out.device_ptr())
        .arg(n as i64);
    let plain = counted(&device, "probe_copy", config, &args);
    let x = device.download(&input).unwrap();
    assert_eq!(device.download(&out).unwrap(), x[..n]);
    // Each warp reads and writes 128 contiguous bytes: 4 sectors each, the fewest possible.
    assert_eq!(plain.requests, 2 * n.div_ceil(32) as u64);
    assert!(plain.coalescing() > 0.99, "{plain:?}");
    // Every byte read once and written once, in whole sectors.
    assert_eq!(plain.read_sectors, (4 * n).div_ceil(32) as u64);
    assert_eq!(plain.write_sectors, (4 * n).div_ceil(32) as u64);
    assert_eq!(plain.accesses_by_width[2], 2 * n as u64);

    let mut args = KernelArgs::new();
    args.arg(input.device_ptr())
        .arg(out.device_ptr())
        .arg(n as i64)
        .arg(stride as i32);
    let strided = counted(&device, "probe_strided_copy", config, &args);
    let want: Vec<f32> = (0..n).map(|i| x[i * stride]).collect();
    assert_eq!(device.download(&out).unwrap(), want);
    // Every lane's load in a sector of its own: 32 sectors for 4 sectors' worth of bytes.
    assert!(strided.coalescing() < 0.3, "{strided:?}");
    assert_eq!(strided.read_sectors, n as u64);
}

#[test]
fn sixteen_byte_loads_are_counted_whole_and_must_be_aligned() {
    let device = Device::Emu;
    let rng = &mut StdRng::seed_from_u64(2);
    let packs = 1001;
    let input = random(&device, rng, 4 * packs + 4);
    let out = device.alloc::<f32>(4 * packs + 4).unwrap();
    let config = LaunchConfig::new(packs.div_ceil(64) as u32, 64, 0);
    let args = |offset: i32| {
        let mut args = KernelArgs::new();
        args.arg(input.device_ptr())
            .arg(out.device_ptr())
            .arg(packs as i64)
            .arg(offset);
        args
    };
    let traffic = counted(&device, "probe_copy128", config, &args(0));
    assert_eq!(
        traffic.accesses_by_width[4],
        2 * packs as u64,
        "{traffic:?}"
    );
    assert_eq!(
        traffic.accesses_by_width.iter().sum::<u64>(),
        2 * packs as u64
    );
    assert!(traffic.coalescing() > 0.99, "{traffic:?}");
    let x = device.download(&input).unwrap();
    assert_eq!(device.download(&out).unwrap()[..4 * packs], x[..4 * packs]);

    // One float off: a misaligned 16-byte load, which a GPU faults on; with or without the
    // probe.
    for probe in [Probe::default(), COUNT] {
        let (result, _) = emu::probed(probe, || launch(&device, "probe_copy128", config, &args(1)));
        let message = result.expect_err("a misaligned 16-byte load must fail");
        assert!(message.contains("misaligned 16-byte access"), "{message}");
    }
}

/// A thread's consecutive scalar accesses stay apart, as on a GPU: each lane copying its 4
/// consecutive floats one at a time makes 4-byte requests spread over 4 times the sectors
/// they fill (coalescing 1/4), where the same bytes as one 16-byte access a lane are 1.0.
#[test]
fn consecutive_scalar_accesses_of_a_lane_are_not_joined() {
    let device = Device::Emu;
    let rng = &mut StdRng::seed_from_u64(3);
    let quads = 1001;
    let input = random(&device, rng, 4 * quads);
    let out = device.alloc::<f32>(4 * quads).unwrap();
    let config = LaunchConfig::new(quads.div_ceil(64) as u32, 64, 0);
    let mut args = KernelArgs::new();
    args.arg(input.device_ptr())
        .arg(out.device_ptr())
        .arg(quads as i64);
    let traffic = counted(&device, "probe_copy_quads_by_element", config, &args);
    assert_eq!(
        device.download(&out).unwrap(),
        device.download(&input).unwrap()
    );
    assert_eq!(
        traffic.accesses_by_width[2],
        8 * quads as u64,
        "{traffic:?}"
    );
    assert_eq!(
        traffic.accesses_by_width.iter().sum::<u64>(),
        8 * quads as u64
    );
    let coalescing = traffic.coalescing();
    assert!((0.24..0.27).contains(&coalescing), "{traffic:?}");
    // Every byte still read and written once: the DRAM traffic is the copy's.
    assert_eq!(traffic.read_sectors, (16 * quads).div_ceil(32) as u64);
    assert_eq!(traffic.write_sectors, (16 * quads).div_ceil(32) as u64);
}

/// Attention loads its tiles 16 bytes at a time where the rows allow (`load128`): a q two floats
/// past a 16-byte boundary (8-byte aligned) faults on a GPU, and fails here too. A raw `uint4`
/// load there, which the host compiler split into four 4-byte accesses (the emulator build's
/// assembly), passed their alignment checks.
#[test]
fn a_misaligned_sixteen_byte_load_in_attention_fails() {
    let device = Device::Emu;
    let rng = &mut StdRng::seed_from_u64(6);
    let shape = AttentionShape {
        heads: 2,
        kv_heads: 1,
        head_dim: 16,
    };
    let tokens = 20;
    let layout = DeviceLayout::new(
        &device,
        &Pool::default(),
        &AttentionLayout::causal(tokens, None),
        tile_rows::<f32>(),
    )
    .unwrap();
    let kernels = AttentionKernels::new(&device);
    let q = random(&device, rng, tokens * 32 + 2);
    let (k, v) = (
        random(&device, rng, tokens * 16),
        random(&device, rng, tokens * 16),
    );
    let (mut out, mut lse) = (
        device.alloc::<f32>(tokens * 32).unwrap(),
        device.alloc::<f32>(tokens * 2).unwrap(),
    );
    let mut forward = |offset: usize| {
        let q = q.view().slice(offset, tokens * 32).unwrap();
        kernels
            .forward(&q, &k, &v, &layout, shape, &mut out, &mut lse)
            .map_err(|e| format!("{e:#}"))
    };
    forward(0).unwrap();
    let message = forward(2).expect_err("a misaligned 16-byte load must fail");
    assert!(
        message.contains("load128: misaligned 16-byte access"),
        "{message}"
    );
}

#[test]
fn racecheck_reports_a_missing_barrier() {
    let device = Device::Emu;
    let rng = &mut StdRng::seed_from_u64(3);
    let (blocks, threads) = (3, 96);
    let input = random(&device, rng, blocks * threads);
    let out = device.alloc::<f32>(blocks * threads).unwrap();
    let config = LaunchConfig::new(blocks as u32, threads as u32, 0);
    let args = |sync: i32| {
        let mut args = KernelArgs::new();
        args.arg(input.device_ptr()).arg(out.device_ptr()).arg(sync);
        args
    };
    let (result, _) = emu::probed(RACECHECK, || {
        launch(&device, "probe_shared_neighbour", config, &args(1))
    });
    result.unwrap();
    let x = device.download(&input).unwrap();
    let want: Vec<f32> = (0..blocks * threads)
        .map(|i| x[i / threads * threads + (i % threads + 1) % threads])
        .collect();
    assert_eq!(device.download(&out).unwrap(), want);

    // Without the barrier: under every seed, whatever the order the threads happen to run in.
    for seed in 0..4 {
        let (result, _) = emu::probed(RACECHECK, || {
            // SAFETY: as in `launch`.
            unsafe { emu::launch_seeded("probe_shared_neighbour", config, &args(0), seed) }
                .map_err(|e| format!("{e:#}"))
        });
        let message = result.expect_err("racecheck must report the missing barrier");
        assert!(
            message.contains("racecheck: static shared memory")
                && message.contains("a __syncthreads or __syncwarp is missing"),
            "{message}"
        );
    }
}

#[test]
fn racecheck_reports_two_blocks_writing_one_address_without_atomics() {
    let device = Device::Emu;
    let blocks = 5;
    let values: Vec<f32> = (1..=blocks).map(|b| b as f32).collect();
    let input = device.upload(&values).unwrap();
    let config = LaunchConfig::new(blocks as u32, 32, 0);
    for atomic in [1, 0] {
        let out = device.alloc::<f32>(1).unwrap();
        let mut args = KernelArgs::new();
        args.arg(input.device_ptr())
            .arg(out.device_ptr())
            .arg(atomic);
        let (result, _) = emu::probed(RACECHECK, || {
            launch(&device, "probe_block_sum", config, &args)
        });
        if atomic == 1 {
            result.unwrap();
            assert_eq!(device.download(&out).unwrap(), [15.0]);
        } else {
            let message = result.expect_err("racecheck must report the blocks' race");
            assert!(
                message.contains("racecheck: global memory")
                    && message.contains("blocks are unordered"),
                "{message}"
            );
        }
    }
}

#[test]
fn shared_memory_beyond_the_architecture_fails_the_launch() {
    let device = Device::Emu;
    let out = device.alloc::<f32>(1).unwrap();
    let dynamic = |floats: u32, arch: Arch| {
        let mut args = KernelArgs::new();
        args.arg(out.device_ptr()).arg(floats as i32);
        let config = LaunchConfig::new(1, 32, 4 * floats);
        emu::with_arch(arch, || {
            launch(&device, "probe_dynamic_shared", config, &args)
        })
    };
    // 48 KiB of dynamic shared memory without an opt-in, not a byte more.
    dynamic(12 * 1024, Arch::Sm80).unwrap();
    assert_eq!(device.download(&out).unwrap(), [12.0 * 1024.0]);
    let message = dynamic(12 * 1024 + 1, Arch::Sm80).unwrap_err();
    assert!(message.contains("unless the kernel opts in"), "{message}");

    // Static and dynamic together count against the 48 KiB: 32 KiB static and 20 KiB dynamic
    // fail.
    let mut args = KernelArgs::new();
    args.arg(out.device_ptr());
    launch(
        &device,
        "probe_static_shared",
        LaunchConfig::new(1, 32, 0),
        &args,
    )
    .unwrap();
    assert_eq!(device.download(&out).unwrap(), [8192.0]);
    let message = launch(
        &device,
        "probe_static_shared",
        LaunchConfig::new(1, 32, 20 * 1024),
        &args,
    )
    .unwrap_err();
    assert!(
        message.contains("32768 bytes of static and 20480 of dynamic"),
        "{message}"
    );

    // With the opt-in: 170 KiB is more than an A100's 163 KiB, within an H100's 227 KiB.
    emu::set_max_dynamic_shared("probe_dynamic_shared", 170 * 1024).unwrap();
    let message = dynamic(170 * 256, Arch::Sm80).unwrap_err();
    assert!(message.contains("sm_80 allows at most 166912"), "{message}");
    dynamic(170 * 256, Arch::Sm90).unwrap();
    assert_eq!(device.download(&out).unwrap(), [170.0 * 256.0]);
    let message = dynamic(170 * 256 + 1, Arch::Sm90).unwrap_err();
    assert!(
        message.contains("the size the kernel opted in to"),
        "{message}"
    );
}

#[test]
fn wmma_counts_its_flops_and_bytes_and_is_race_free() {
    let device = Device::Emu;
    let rng = &mut StdRng::seed_from_u64(4);
    let (m, n, k) = (48usize, 32usize, 64usize);
    let bf16s = |len: usize, rng: &mut StdRng| -> Vec<half::bf16> {
        (0..len)
            .map(|_| half::bf16::from_f32(rng.gen_range(-2.0..2.0)))
            .collect()
    };
    let a = device.upload(&bf16s(m * k, rng)).unwrap();
    let w = device.upload(&bf16s(n * k, rng)).unwrap();
    let c = random(&device, rng, m * n);
    let mut args = KernelArgs::new();
    args.arg(a.device_ptr())
        .arg(w.device_ptr())
        .arg(c.device_ptr())
        .arg(m as i32)
        .arg(n as i32)
        .arg(k as i32)
        .arg(0i32);
    let config = LaunchConfig::new(((n / 16) as u32, (m / 16).div_ceil(2) as u32), (32, 2), 0);
    let probe = Probe {
        count: true,
        racecheck: true,
    };
    let (result, records) =
        emu::probed(probe, || launch(&device, "wmma_matmul_bf16", config, &args));
    result.unwrap_or_else(|e| panic!("{e}"));
    let traffic = records[0].traffic;
    assert_eq!(traffic.flops, 2 * (m * n * k) as u64);
    // a and w read, c read and written: each once.
    assert_eq!(
        traffic.dram_bytes(),
        (2 * (m * k + n * k) + 8 * m * n) as u64
    );
}

#[test]
fn the_selftest_runs_clean_under_racecheck() {
    let device = Device::Emu;
    let seed = rand::random();
    let (rows, _) = emu::probed(RACECHECK, || selftest::run(&device, seed));
    let rows = rows.unwrap_or_else(|e| panic!("seed {seed}: {e:#}"));
    let failed: Vec<_> = rows.iter().filter(|r| !r.pass).collect();
    assert!(failed.is_empty(), "seed {seed}: {failed:?}");
}

#[test]
fn every_memory_bound_kernel_meets_the_traffic_targets() {
    let device = Device::Emu;
    let shapes = Shapes::small(16, 1 << 16);
    let rows = profile::profile(&device, &shapes, 5, vec![loss::profile_case()]).unwrap();
    let table = profile::table(&rows, &shapes, &[]);
    for r in &rows {
        assert!(r.launches >= 1, "{}: no launch recorded\n{table}", r.op);
        if !r.counted {
            assert!(r.flops > 0, "{}: a GEMM counts its FLOPs", r.op);
            continue;
        }
        // Nothing moves fewer bytes than it must.
        assert!(r.bytes_over_ideal() >= 0.99, "{}\n{table}", r.op);
        assert!(r.accepted(), "{} misses the targets\n{table}", r.op);
        // bf16 elements move in packs at these widths, rows of whole 16-byte chunks
        // (cuda/contralign.cuh's load_chunk and RowChunks): a 1- or 2-byte access costs a GPU
        // an instruction per element.
        let [one, two, ..] = r.traffic.accesses_by_width;
        assert!(
            one == 0 && two == 0,
            "{}: {one} 1-byte and {two} 2-byte accesses\n{table}",
            r.op
        );
    }
    // The exceptions are these, each with its reason in the table.
    let excepted: Vec<&str> = rows
        .iter()
        .filter(|r| r.exception.is_some())
        .map(|r| r.op.as_str())
        .collect();
    assert_eq!(
        excepted,
        [
            "attention forward f32",
            "attention backward f32",
            "attention forward + backward f32, head dim 256",
            "attention forward bf16",
            "attention backward bf16",
            "attention forward + backward bf16, head dim 256",
            "scoring response stats (S, A, E)",
            "scoring row coefficients",
            "moe route (softmax, top-k, counting sort)",
            "moe router backward (with the aux loss)",
            "moe load-balancing sums",
            "loss nca (per group, then the batch)",
        ],
        "{table}"
    );
    // Every kernel of cuda/*.cu has a row: those its launches ran cover the CONTRALIGN_KERNEL
    // lines of every file but the emulator's own checks.
    let profiled: BTreeSet<&str> = rows
        .iter()
        .flat_map(|r| r.kernels.iter().map(String::as_str))
        .collect();
    let kernels = project_kernels();
    let emulated: BTreeSet<&str> = emu::kernel_names().collect();
    for kernel in &kernels {
        assert!(emulated.contains(kernel.as_str()), "{kernel} not emulated");
    }
    let missing: Vec<&String> = kernels
        .iter()
        .filter(|k| !profiled.contains(k.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "kernels without a profile row: {missing:?}"
    );
}

/// Rows that are not whole 16-byte chunks (a width that is not a multiple of 8 bf16 or 4 f32
/// elements) fall back to single elements (cuda/contralign.cuh's RowChunks; RoPE's pairs), a
/// warp's lanes on consecutive ones: still coalesced, where a lane's P consecutive elements
/// spread each request over P times the sectors (coalescing 1/P: 0.125 for bf16, 0.25 for f32,
/// which the kernels measured before they took this order). A warp's 32 elements at an offset
/// that is not a sector's touch one sector more than they fill (3 for the 2 of 64 bytes of
/// bf16, 5 for the 4 of 128 bytes of f32), and RoPE's runs break at each head: hence the
/// floors of 0.6 with a bf16 side and 0.75 for f32.
#[test]
fn row_kernels_stay_coalesced_where_rows_are_not_whole_chunks() {
    let shapes = Shapes {
        d: 1002,
        heads: 3,
        kv_heads: 1,
        head_dim: 100,
        ..Shapes::small(24, 1 << 12)
    };
    let rows_ops = [
        "rmsnorm forward",
        "rmsnorm backward",
        "rope forward",
        "rope backward",
        "embedding backward",
        "moe slot dots",
    ];
    let cases: Vec<_> = profile::cases(Vec::new())
        .into_iter()
        .filter(|c| rows_ops.iter().any(|op| c.op().starts_with(op)))
        .collect();
    assert_eq!(
        cases.len(),
        14,
        "two types each, the embedding's into two tables"
    );
    let rows = profile::profile_cases(&Device::Emu, &shapes, 3, &cases).unwrap();
    let table = profile::table(&rows, &shapes, &[]);
    for r in &rows {
        let t = &r.traffic;
        // The rows moved one element at a time: no 16-byte vector ran.
        assert_eq!(t.accesses_by_width[4], 0, "{}\n{table}", r.op);
        let floor = if r.op.contains("bf16") { 0.6 } else { 0.75 };
        assert!(t.coalescing() >= floor, "{}: below {floor}\n{table}", r.op);
        assert!(r.bytes_over_ideal() <= 1.25, "{}\n{table}", r.op);
    }
}

/// The kernels the `CONTRALIGN_KERNEL(name)` lines of cuda/*.cu define, but for the emulator's
/// own checks (cuda/emu_*.cu).
fn project_kernels() -> Vec<String> {
    let cuda = Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
    let mut kernels = Vec::new();
    for entry in std::fs::read_dir(&cuda).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".cu") || name.starts_with("emu_") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        kernels.extend(text.lines().filter_map(|line| {
            let rest = line.trim().strip_prefix("CONTRALIGN_KERNEL(")?;
            Some(rest.strip_suffix(')')?.to_string())
        }));
    }
    assert!(kernels.len() > 50, "{kernels:?}");
    kernels.sort();
    kernels
}

/// Calibration: `bench attention`, `bench moe` and `bench scoring` print the roofline model's
/// time beside each measured one (here on the emulator, priced as an H100): max(bytes /
/// bandwidth, FLOPs / peak) of the part's ideal bytes and FLOPs, the peak of f32 ops (these
/// runs) that of the CUDA cores.
#[test]
fn the_benches_print_the_model_beside_their_times() {
    let run = |args: &[&str]| -> serde_json::Value {
        let out = common::contralign_ok(args);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let check = |what: &str, model: &serde_json::Value| {
        let number = |key: &str| model[key].as_f64().unwrap_or(f64::NAN);
        assert_eq!(model["gpu"]["name"], "H100", "{what}: {model}");
        assert_eq!(model["math"], "f32", "{what}: {model}");
        let want = (number("bytes") / 3350e9).max(number("flops") / 67e12) * 1e3;
        assert!(
            number("bytes") > 0.0 && (number("ms") - want).abs() <= 1e-12 * want,
            "{what}: {model}"
        );
    };
    let attention = run(&[
        "bench",
        "attention",
        "--device",
        "emu",
        "--dtype",
        "f32",
        "--tokens",
        "48",
        "--mask",
        "causal",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--head-dim",
        "16",
        "--reps",
        "1",
    ]);
    let case = &attention["cases"][0];
    check("attention forward", &case["forward_model"]);
    check("attention backward", &case["backward_model"]);
    // 48 tokens, 2 heads of 16: 1176 causal pairs per head at 4 FLOPs per pair and dimension.
    assert_eq!(case["forward_model"]["flops"], 4.0 * 1176.0 * 2.0 * 16.0);

    let moe = run(&[
        "bench",
        "moe",
        "--device",
        "emu",
        "--dtype",
        "f32",
        "--tokens",
        "16",
        "--dim",
        "32",
        "--ffn",
        "48",
        "--experts",
        "4",
        "--top-k",
        "2",
        "--reps",
        "1",
    ]);
    for part in ["dispatch", "forward", "backward"] {
        check(part, &moe["case"][format!("{part}_model")]);
    }

    let scoring = run(&[
        "bench", "scoring", "--device", "emu", "--dtype", "f32", "--rows", "64", "--vocab", "97",
        "--dim", "16", "--reps", "1",
    ]);
    for part in [
        "fused_forward",
        "fused_forward_backward",
        "rows_pass",
        "backward_pass",
    ] {
        check(part, &scoring["model"][part]);
    }
}

/// `--bandwidth` and `--tflops` price the profile's model; a figure that is not positive, or
/// one without `--profile`, is refused before anything runs.
#[test]
fn measured_figures_are_checked_before_the_profile_runs() {
    for (args, want) in [
        (
            &["--profile", "--bandwidth", "0"][..],
            "--bandwidth must be a finite number above 0, found 0",
        ),
        (
            &["--profile", "--bandwidth", "inf"][..],
            "--bandwidth must be a finite number above 0, found inf",
        ),
        (
            &["--profile", "--tflops=-3"][..],
            "--tflops must be a finite number above 0, found -3",
        ),
        (
            &["--bandwidth", "2000"][..],
            "--bandwidth and --tflops price the model of --profile",
        ),
    ] {
        let out = common::contralign(&[&["selftest", "--device", "emu"][..], args].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(want),
            "{args:?}: {stderr}"
        );
    }
}
