//! Speed of the CUDA emulator (cuda/emu/), which every kernel test runs in: a block-wide
//! barrier workload and an element-wise kernel.

use contralign::ops::cuda::emu::{self, KernelArgs, LaunchConfig};
use criterion::{criterion_group, criterion_main, Criterion};

/// 64 blocks of 1000 threads, 11 barriers each (barrier_rounds with 5 rounds): 704,000
/// fiber resumptions.
fn barriers(c: &mut Criterion) {
    let (blocks, threads, rounds) = (64u32, 1000u32, 5i32);
    let mut out = vec![0f32; (blocks * threads) as usize];
    c.bench_function("emu barrier_rounds 64x1000 threads, 11 barriers", |b| {
        b.iter(|| {
            let mut args = KernelArgs::new();
            args.arg(out.as_mut_ptr()).arg(rounds);
            // SAFETY: `out` holds one float per thread of the launch.
            unsafe {
                emu::launch(
                    "barrier_rounds",
                    LaunchConfig::new(blocks, threads, 4 * threads),
                    &args,
                )
            }
            .unwrap();
        })
    });
}

/// SwiGLU forward over 2^20 bf16 elements, 256 threads per block, one element each.
fn swiglu(c: &mut Criterion) {
    let n = 1usize << 20;
    let gate = vec![0x3f80u16; n];
    let up = vec![0x4000u16; n];
    let mut out = vec![0u16; n];
    c.bench_function("emu swiglu_forward_bf16 2^20", |b| {
        b.iter(|| {
            let mut args = KernelArgs::new();
            args.arg(gate.as_ptr())
                .arg(up.as_ptr())
                .arg(out.as_mut_ptr())
                .arg(n as i64);
            // SAFETY: the three buffers hold n elements.
            unsafe {
                emu::launch(
                    "swiglu_forward_bf16",
                    LaunchConfig::new((n / 256) as u32, 256, 0),
                    &args,
                )
            }
            .unwrap();
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = barriers, swiglu
}
criterion_main!(benches);
