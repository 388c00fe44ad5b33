//! The CUDA emulator (cuda/emu/) through the kernels of cuda/emu_checks.cu: correct kernels
//! give exact results on awkward shapes, kernels missing a `__syncthreads` or a `__syncwarp`
//! give wrong results under every seed (so the emulator neither runs threads in lockstep nor
//! in an order that hides the race), warp collectives, atomics, bf16/f16 conversions and WMMA
//! match independent computations, and broken launches fail with a message.

use contralign::ops::cuda::emu::{self, KernelArgs, LaunchConfig};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Seeds that the race tests try: each must expose the race.
const RACE_SEEDS: std::ops::Range<u64> = 0..8;

fn launch(name: &str, config: LaunchConfig, args: &KernelArgs, seed: Option<u64>) {
    let result = match seed {
        // SAFETY: every test passes pointers to live buffers of the sizes its kernel uses.
        Some(seed) => unsafe { emu::launch_seeded(name, config, args, seed) },
        None => unsafe { emu::launch(name, config, args) },
    };
    result.unwrap_or_else(|e| panic!("{e:#}"));
}

fn threads((x, y, z): (u32, u32, u32)) -> usize {
    (x * y * z) as usize
}

fn small_integers(rng: &mut StdRng, n: usize, max: i32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-max..=max) as f32).collect()
}

/// Runs `kernel` (one of the block_sum_* kernels) and returns one sum per block.
fn block_sums(
    kernel: &str,
    block: (u32, u32, u32),
    grid: (u32, u32, u32),
    x: &[f32],
    seed: Option<u64>,
) -> Vec<f32> {
    let blocks = threads(grid);
    let per_block = (x.len() / blocks) as i32;
    let mut out = vec![f32::NAN; blocks];
    let shared = if kernel == "block_sum_dynamic" {
        4 * threads(block) as u32
    } else {
        0
    };
    let mut args = KernelArgs::new();
    args.arg(x.as_ptr()).arg(out.as_mut_ptr()).arg(per_block);
    launch(kernel, LaunchConfig::new(grid, block, shared), &args, seed);
    out
}

fn expected_block_sums(x: &[f32], blocks: usize) -> Vec<f32> {
    x.chunks(x.len() / blocks).map(|c| c.iter().sum()).collect()
}

const BLOCKS: [(u32, u32, u32); 6] = [
    (96, 1, 1),
    (10, 10, 10),
    (33, 1, 1),
    (8, 4, 3),
    (1, 1, 1),
    (1024, 1, 1),
];
const GRIDS: [(u32, u32, u32); 3] = [(5, 1, 1), (3, 2, 1), (2, 3, 2)];

#[test]
fn block_reductions_through_shared_memory_are_exact() {
    let mut rng = StdRng::seed_from_u64(1);
    for block in BLOCKS {
        for grid in GRIDS {
            let per_block = threads(block) * 3 + 7;
            // Small integers: every order of summation gives the same float.
            let x = small_integers(&mut rng, per_block * threads(grid), 8);
            let want = expected_block_sums(&x, threads(grid));
            for kernel in ["block_sum_static", "block_sum_dynamic"] {
                for seed in [None, Some(1), Some(2)] {
                    let got = block_sums(kernel, block, grid, &x, seed);
                    assert_eq!(
                        got, want,
                        "{kernel} block {block:?} grid {grid:?} seed {seed:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_missing_syncthreads_gives_wrong_sums_under_every_seed() {
    let mut rng = StdRng::seed_from_u64(2);
    for block in [(96, 1, 1), (10, 10, 10), (33, 1, 1)] {
        let grid = (3, 2, 1);
        let per_block = threads(block) * 2 + 5;
        let x = small_integers(&mut rng, per_block * threads(grid), 8);
        let want = expected_block_sums(&x, threads(grid));
        for seed in RACE_SEEDS {
            assert_eq!(
                block_sums("block_sum_static", block, grid, &x, Some(seed)),
                want
            );
            let broken = block_sums("block_sum_no_barrier", block, grid, &x, Some(seed));
            assert_ne!(
                broken, want,
                "the race went unnoticed: block {block:?} seed {seed}"
            );
            // Deterministic: the same seed, the same wrong answer (to the bit: NaN from
            // reading shared memory that no thread of the block has written yet).
            let again = block_sums("block_sum_no_barrier", block, grid, &x, Some(seed));
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&again), bits(&broken));
        }
    }
}

fn warp_exchange(
    kernel: &str,
    block: (u32, u32, u32),
    blocks: u32,
    x: &[f32],
    seed: u64,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; x.len()];
    let mut args = KernelArgs::new();
    args.arg(x.as_ptr()).arg(out.as_mut_ptr());
    launch(
        kernel,
        LaunchConfig::new(blocks, block, 0),
        &args,
        Some(seed),
    );
    out
}

#[test]
fn a_missing_syncwarp_gives_wrong_exchanges_under_every_seed() {
    let mut rng = StdRng::seed_from_u64(3);
    for block in [(32, 1, 1), (96, 1, 1), (32, 3, 2)] {
        let blocks = 3;
        let n = threads(block) * blocks as usize;
        let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        // Each lane reads the next lane of its half warp, cyclically.
        let want: Vec<f32> = (0..n).map(|i| x[(i & !15) | ((i + 1) % 16)]).collect();
        for seed in RACE_SEEDS {
            assert_eq!(
                warp_exchange("warp_exchange_synced", block, blocks, &x, seed),
                want
            );
            let broken = warp_exchange("warp_exchange_unsynced", block, blocks, &x, seed);
            assert_ne!(
                broken, want,
                "the race went unnoticed: block {block:?} seed {seed}"
            );
        }
    }
}

#[test]
fn shuffle_reductions_are_exact_with_partial_warps() {
    let mut rng = StdRng::seed_from_u64(4);
    for block in [
        (96, 1, 1),
        (33, 1, 1),
        (1000, 1, 1),
        (1, 1, 1),
        (16, 2, 3),
        (20, 1, 1),
    ] {
        for grid in [(4, 1, 1), (2, 2, 2)] {
            let n = threads(block) * threads(grid);
            let x: Vec<i32> = (0..n).map(|_| rng.gen_range(-1000..=1000)).collect();
            let want: Vec<i32> = x.chunks(threads(block)).map(|c| c.iter().sum()).collect();
            for seed in [None, Some(5)] {
                let mut out = vec![i32::MIN; threads(grid)];
                let mut args = KernelArgs::new();
                args.arg(x.as_ptr()).arg(out.as_mut_ptr());
                launch(
                    "block_sum_shuffle",
                    LaunchConfig::new(grid, block, 0),
                    &args,
                    seed,
                );
                assert_eq!(out, want, "block {block:?} grid {grid:?}");
            }
        }
    }
}

/// What warp_collectives writes for each thread of one block, by the emulator's rules: a lane
/// reading from a lane that does not exist gets all-ones bits (-1).
fn expected_collectives(x: &[i32], width: usize) -> Vec<[i32; 12]> {
    let mut out = Vec::new();
    for warp in x.chunks(32) {
        let lanes = warp.len();
        let read = |src: usize| if src < lanes { warp[src] } else { -1 };
        let ballot = warp
            .iter()
            .enumerate()
            .fold(0u32, |b, (l, &v)| b | (((v & 1) as u32) << l));
        for (l, _) in warp.iter().enumerate() {
            let seg = l & !(width - 1);
            let up = if l - seg >= 3 { l - 3 } else { l };
            let down = if l - seg + 5 < width { l + 5 } else { l };
            let xor = if (l ^ 6) < seg + width { l ^ 6 } else { l };
            out.push([
                read(seg + ((l * 7 + 3) & (width - 1))),
                read(up),
                read(down),
                read(xor),
                warp.iter().all(|&v| v > -90) as i32,
                warp.iter().any(|&v| v > 90) as i32,
                ballot as i32,
                warp.iter().sum(),
                *warp.iter().min().unwrap(),
                warp.iter().map(|&v| v as u32).max().unwrap() as i32,
                read(l & 16),
                0, // __activemask: checked separately
            ]);
        }
    }
    out
}

#[test]
fn warp_shuffles_votes_and_reductions_match_their_definitions() {
    let mut rng = StdRng::seed_from_u64(5);
    for block in [(96, 1, 1), (50, 1, 1), (32, 2, 2), (7, 1, 1)] {
        for width in [32, 8, 1] {
            let blocks = 2usize;
            let per_block = threads(block);
            let x: Vec<i32> = (0..per_block * blocks)
                .map(|_| rng.gen_range(-100..=100))
                .collect();
            let mut out = vec![i32::MIN; 12 * x.len()];
            let mut args = KernelArgs::new();
            args.arg(x.as_ptr()).arg(out.as_mut_ptr()).arg(width as i32);
            launch(
                "warp_collectives",
                LaunchConfig::new(blocks as u32, block, 0),
                &args,
                Some(9),
            );
            for (b, xb) in x.chunks(per_block).enumerate() {
                for (t, want) in expected_collectives(xb, width).iter().enumerate() {
                    let got = &out[12 * (b * per_block + t)..][..12];
                    assert_eq!(
                        got[..11],
                        want[..11],
                        "block {block:?} width {width} thread {t}"
                    );
                    // __activemask: the calling lane, within the lanes that exist.
                    let lanes = (per_block - t / 32 * 32).min(32);
                    let existing = if lanes == 32 {
                        u32::MAX
                    } else {
                        (1 << lanes) - 1
                    };
                    let mask = got[11] as u32;
                    assert!(
                        mask >> (t % 32) & 1 == 1 && mask & !existing == 0,
                        "{mask:#x}"
                    );
                }
            }
        }
    }
}

#[test]
fn atomic_adds_from_many_threads_are_exact() {
    let mut rng = StdRng::seed_from_u64(6);
    let (block, grid) = ((96, 1, 1), (7, 3, 1));
    let n = threads(block) * threads(grid);
    let x = small_integers(&mut rng, n, 100);
    let mut sum = 0f32;
    let mut counts = vec![0i32; 7];
    let mut args = KernelArgs::new();
    args.arg(x.as_ptr())
        .arg(&mut sum as *mut f32)
        .arg(counts.as_mut_ptr());
    launch(
        "atomic_adds",
        LaunchConfig::new(grid, block, 0),
        &args,
        None,
    );
    assert_eq!(sum, x.iter().sum::<f32>());
    let want: Vec<i32> = (0..7)
        .map(|r| (0..n).filter(|i| i % 7 == r).count() as i32)
        .collect();
    assert_eq!(counts, want);
}

#[test]
fn every_thread_runs_once_with_its_coordinates() {
    for (block, grid) in [
        ((10, 10, 10), (2, 3, 2)),
        ((33, 1, 1), (5, 1, 1)),
        ((4, 8, 2), (1, 1, 3)),
    ] {
        let per_block = threads(block);
        let n = per_block * threads(grid);
        let mut out = vec![u32::MAX; 10 * n];
        let mut args = KernelArgs::new();
        args.arg(out.as_mut_ptr());
        launch(
            "thread_coordinates",
            LaunchConfig::new(grid, block, 0),
            &args,
            None,
        );
        let count_div3 = (0..per_block)
            .filter(|t| (t % block.0 as usize).is_multiple_of(3))
            .count() as u32;
        for g in 0..n {
            let (b, t) = (g / per_block, (g % per_block) as u32);
            let (b, gx, gy) = (b as u32, grid.0, grid.1);
            let want = [
                t % block.0,
                t / block.0 % block.1,
                t / (block.0 * block.1),
                b % gx,
                b / gx % gy,
                b / (gx * gy),
                per_block as u32,
                threads(grid) as u32,
                count_div3,
                1 + 2 * u32::from(block.0 > 5),
            ];
            assert_eq!(
                out[10 * g..][..10],
                want,
                "block {block:?} grid {grid:?} thread {g}"
            );
        }
    }
}

/// Floats that probe every rounding case of f32 -> bf16/f16: ties (exact halfway values, both
/// parities), one ulp either side of them, subnormals of both formats, overflow boundaries,
/// infinities, NaNs, and random bit patterns of every class.
fn conversion_probes() -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(7);
    let mut x = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001),
        f32::from_bits(0xffc0_1234),
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::from_bits(0x8000_0001),
        65504.0,
        65519.99,
        65520.0,
        65536.0,
        -65520.0,
        6.0e-8,
        5.96e-8,
        2.98e-8,
        2.9802322e-8,
        6.1035156e-5,
        6.1e-5,
        3.0e38,
        3.3961775e38,
        3.4e38,
    ];
    for _ in 0..4000 {
        // bf16 ties and their neighbours.
        let hi = rng.gen::<u32>() & 0xffff_0000;
        for low in [0x8000u32, 0x7fff, 0x8001, 0x0000, 0xffff] {
            x.push(f32::from_bits(hi | low));
        }
        // f16 ties and their neighbours, over the finite f16 range, subnormals included.
        let h = f16::from_bits(rng.gen_range(0..0x7bffu16) | (rng.gen::<u16>() & 0x8000));
        let next = f16::from_bits(h.to_bits() + 1);
        let tie = ((h.to_f64() + next.to_f64()) / 2.0) as f32;
        x.extend([
            tie,
            f32::from_bits(tie.to_bits() + 1),
            f32::from_bits(tie.to_bits() - 1),
        ]);
    }
    x.extend((0..100_000).map(|_| f32::from_bits(rng.gen())));
    // Values in f16's subnormal and small-normal range.
    x.extend((0..20_000).map(|_| rng.gen_range(-1e-4f32..1e-4)));
    x
}

#[test]
fn bf16_and_f16_conversions_round_to_nearest_even_like_the_half_crate() {
    let x = conversion_probes();
    let n = x.len().max(65536);
    let mut input = x.clone();
    input.resize(n, 0.0);
    let mut bf = vec![0u16; n];
    let mut hf = vec![0u16; n];
    let mut bf_back = vec![0f32; n];
    let mut hf_back = vec![0f32; n];
    let mut args = KernelArgs::new();
    args.arg(input.as_ptr())
        .arg(bf.as_mut_ptr())
        .arg(hf.as_mut_ptr())
        .arg(bf_back.as_mut_ptr())
        .arg(hf_back.as_mut_ptr())
        .arg(n as i32);
    launch(
        "convert_halves",
        LaunchConfig::new(n.div_ceil(256) as u32, 256, 0),
        &args,
        None,
    );
    for (i, &v) in x.iter().enumerate() {
        let (b, h) = (bf16::from_bits(bf[i]), f16::from_bits(hf[i]));
        if v.is_nan() {
            assert!(
                b.is_nan() && h.is_nan(),
                "{v:e}: {:#06x} {:#06x}",
                bf[i],
                hf[i]
            );
        } else {
            assert_eq!(
                bf[i],
                bf16::from_f32(v).to_bits(),
                "bf16 of {v:e} ({:#010x})",
                v.to_bits()
            );
            assert_eq!(
                hf[i],
                f16::from_f32(v).to_bits(),
                "f16 of {v:e} ({:#010x})",
                v.to_bits()
            );
        }
    }
    // Back to f32: exact for all 2^16 patterns of each.
    for bits in 0..=u16::MAX {
        let i = bits as usize;
        let (b, h) = (
            bf16::from_bits(bits).to_f32(),
            f16::from_bits(bits).to_f32(),
        );
        assert!(
            bf_back[i].to_bits() == b.to_bits() || (b.is_nan() && bf_back[i].is_nan()),
            "bf16 {bits:#06x}"
        );
        assert!(
            hf_back[i].to_bits() == h.to_bits() || (h.is_nan() && hf_back[i].is_nan()),
            "f16 {bits:#06x}"
        );
    }
}

/// `len` elements of a vector, starting 256-byte aligned (cudaMalloc's alignment, which WMMA's
/// 256-bit pointer rule relies on).
fn aligned<T: Copy + Default>(storage: &mut Vec<T>, len: usize) -> &mut [T] {
    storage.clear();
    storage.resize(len + 256, T::default());
    let offset = storage.as_ptr().align_offset(256);
    &mut storage[offset..offset + len]
}

#[test]
fn wmma_matches_a_plain_matmul() {
    let mut rng = StdRng::seed_from_u64(8);
    let (m, n, k) = (48usize, 32usize, 64usize);
    let (mut a_store, mut w_store, mut c_store) = (Vec::new(), Vec::new(), Vec::new());
    let a = aligned(&mut a_store, m * k);
    let w = aligned(&mut w_store, n * k);
    for v in a.iter_mut().chain(w.iter_mut()) {
        *v = bf16::from_f32(rng.gen_range(-2.0..2.0)).to_bits();
    }
    let c0: Vec<f32> = (0..m * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
    for col_major in [0i32, 1] {
        let c = aligned(&mut c_store, m * n);
        c.copy_from_slice(&c0);
        let mut args = KernelArgs::new();
        args.arg(a.as_ptr()).arg(w.as_ptr()).arg(c.as_mut_ptr());
        args.arg(m as i32)
            .arg(n as i32)
            .arg(k as i32)
            .arg(col_major);
        // Two warps per block along m; the second block's second warp has no tile.
        let config = LaunchConfig::new(((n / 16) as u32, (m / 16).div_ceil(2) as u32), (32, 2), 0);
        launch("wmma_matmul_bf16", config, &args, None);
        let at = |i: usize, j: usize| if col_major == 1 { j * m + i } else { i * n + j };
        for i in 0..m {
            for j in 0..n {
                let terms = (0..k).map(|kk| {
                    bf16::from_bits(a[i * k + kk]).to_f64()
                        * bf16::from_bits(w[j * k + kk]).to_f64()
                });
                let (sum, magnitude) = terms.fold(
                    (c0[at(i, j)] as f64, c0[at(i, j)].abs() as f64),
                    |(s, m), t| (s + t, m + t.abs()),
                );
                // fp32 accumulation of exact products: at most (k + 1) roundings.
                let bound = (k + 1) as f64 * f32::EPSILON as f64 / 2.0 * magnitude;
                let got = c[at(i, j)] as f64;
                assert!(
                    (got - sum).abs() <= bound,
                    "c[{i},{j}] = {got}, want {sum} ± {bound}"
                );
            }
        }
    }
}

#[test]
fn barrier_rounds_match_a_sequential_model() {
    for (block, blocks, rounds) in [(1000u32, 3u32, 5i32), (37, 4, 9), (1, 2, 3)] {
        let n = block as usize;
        let mut out = vec![f32::NAN; n * blocks as usize];
        let mut args = KernelArgs::new();
        args.arg(out.as_mut_ptr()).arg(rounds);
        launch(
            "barrier_rounds",
            LaunchConfig::new(blocks, block, 4 * block),
            &args,
            None,
        );
        let mut v: Vec<f32> = (0..n).map(|t| t as f32).collect();
        for _ in 0..rounds {
            v = (0..n).map(|t| v[t] + v[(t + 1) % n]).collect();
        }
        for b in out.chunks(n) {
            assert_eq!(b, v, "block {block} rounds {rounds}");
        }
    }
}

fn launch_error(name: &str, config: LaunchConfig, args: &KernelArgs) -> String {
    // SAFETY: the kernels these tests name take no pointers.
    match unsafe { emu::launch(name, config, args) } {
        Ok(()) => panic!("{name} {config:?} should fail"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn broken_launches_fail_with_a_message() {
    let one = |v: i32| {
        let mut args = KernelArgs::new();
        args.arg(v);
        args
    };
    let warp = LaunchConfig::new(2, 64, 0);
    let cases: [(&str, LaunchConfig, KernelArgs, &str); 10] = [
        ("no_such_kernel", warp, one(0), "no kernel named"),
        (
            "failing",
            warp,
            KernelArgs::new(),
            "takes 1 arguments, got 0",
        ),
        (
            "failing",
            warp,
            {
                let mut a = KernelArgs::new();
                a.arg(0i64);
                a
            },
            "argument 0 has 8 bytes",
        ),
        (
            "failing",
            LaunchConfig::new(1, 1025, 0),
            one(5),
            "at most 1024 threads",
        ),
        (
            "failing",
            LaunchConfig::new(1, 32, 300_000),
            one(5),
            "dynamic shared memory",
        ),
        ("failing", warp, one(0), "__trap()"),
        ("failing", warp, one(1), "warp collectives do not match"),
        ("failing", warp, one(2), "deadlock"),
        ("failing", warp, one(3), "leaves out the calling lane"),
        (
            "failing",
            warp,
            one(4),
            "assertion `threadIdx.x != 3` failed",
        ),
    ];
    for (name, config, args, want) in &cases {
        let message = launch_error(name, *config, args);
        assert!(
            message.contains(want),
            "{name}: {message:?} should contain {want:?}"
        );
    }
    // The thread that saw those failures still launches correctly.
    launch("failing", warp, &one(5), None);
    let x = vec![1.0f32; 96 * 7];
    assert_eq!(
        block_sums("block_sum_static", (96, 1, 1), (1, 1, 1), &x, None),
        vec![672.0]
    );
}

#[test]
fn the_kernel_table_lists_every_kernel() {
    let names: Vec<&str> = emu::kernel_names().collect();
    for kernel in [
        "block_sum_static",
        "failing",
        "swiglu_forward_bf16",
        "wmma_matmul_bf16",
    ] {
        assert!(names.contains(&kernel), "{kernel} missing from {names:?}");
    }
    assert!(
        names.windows(2).all(|w| w[0] < w[1]),
        "not sorted: {names:?}"
    );
}
