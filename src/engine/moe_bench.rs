//! Timing of the MoE feed-forward on a device (`contralign bench moe`): the layer as the model
//! runs it (`model::layer::moe_forward` / `moe_backward` through [`DeviceOps`], f32 or bf16
//! tensors, the MoE kernels of cuda/moe.cu and the grouped expert GEMMs of cuda/moe_gemm.cu)
//! on random inputs made in memory. The experts' weights and gradients each lie in one buffer at one
//! stride, as the engine's flat store lays them out, so the GEMMs run on them in place.
//!
//! Work is counted as the GEMMs' FLOPs: forward `2 T d E` for the router and `6 T k d F` for
//! the experts' three projections over the `T k` routed rows; backward twice that (input and
//! weight gradients). The dispatch alone (routing, counting sort, the row moves) is timed too:
//! it is the part the MoE kernels own.

use crate::model::layer::{moe_backward, moe_forward, MoeShape};
use crate::model::params::Expert;
use crate::ops::cuda::device::Device;
use crate::ops::cuda::ops::DeviceOps;
use crate::ops::cuda::pool::Tensor;
use crate::ops::storage::Dtype;
use crate::ops::{MoeAux, Ops};
use anyhow::{ensure, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::time::Instant;

#[derive(Clone, Debug, Serialize)]
pub struct MoeTiming {
    pub dtype: &'static str,
    pub tokens: usize,
    pub d: usize,
    pub ffn: usize,
    pub experts: usize,
    pub k: usize,
    /// Routing, counting sort, permute and weighted un-permute, without the GEMMs.
    pub dispatch_ms: f64,
    pub forward_ms: f64,
    pub forward_tflops: f64,
    pub backward_ms: f64,
    pub backward_tflops: f64,
    /// The times are the emulator's: they check the command, not a GPU.
    pub emulator_time: bool,
}

/// The median of `reps` synchronized runs of `run` after one warm-up.
fn median_seconds(
    ops: &DeviceOps,
    reps: usize,
    mut run: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let sync = || -> Result<()> {
        ops.check()?;
        ops.device().synchronize()
    };
    run()?;
    sync()?;
    let mut times = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        run()?;
        sync()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn random(ops: &DeviceOps, rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Tensor {
    let host: Vec<f32> = (0..n).map(|_| rng.gen_range(-scale..scale)).collect();
    ops.upload(&host)
}

/// `experts` experts' gate, up and down (`len` elements each, expert after expert) as views
/// of `flat`, as the engine's flat store lays them out: views that `flat` must outlive.
pub fn expert_views(flat: &Tensor, experts: usize, len: usize) -> Result<Vec<Expert<Tensor>>> {
    let view =
        |i: usize| -> Result<Tensor> { Ok(Tensor::borrowed(flat.storage().slice(i * len, len)?)) };
    (0..experts)
        .map(|e| {
            Ok(Expert {
                gate: view(3 * e)?,
                up: view(3 * e + 1)?,
                down: view(3 * e + 2)?,
            })
        })
        .collect()
}

/// Times the MoE layer's forward and backward on `tokens` random rows, its tensors stored as
/// `storage`.
pub fn time_moe(
    device: &Device,
    (s, storage): (MoeShape, Dtype),
    tokens: usize,
    reps: usize,
    seed: u64,
) -> Result<MoeTiming> {
    ensure!(
        tokens > 0 && s.d > 0 && s.ffn > 0,
        "bench moe: --tokens, --dim and --ffn must be positive"
    );
    ensure!(
        (1..=s.experts).contains(&s.k),
        "bench moe: --top-k {} of --experts {}",
        s.k,
        s.experts
    );
    let ops = DeviceOps::with_storage(device, storage);
    let rng = &mut ChaCha8Rng::seed_from_u64(seed);
    let (d, f) = (s.d, s.ffn);
    // Weights of the magnitude of a trained layer's (1/sqrt of the fan-in).
    let (wd, wf) = (1.0 / (d as f32).sqrt(), 1.0 / (f as f32).sqrt());
    let router = random(&ops, rng, s.experts * d, wd);
    // Each expert's gate, up and down, expert after expert (the flat store's order).
    let expert_len = 3 * f * d;
    let mut host = Vec::with_capacity(s.experts * expert_len);
    for _ in 0..s.experts {
        for scale in [wd, wd, wf] {
            host.extend((0..f * d).map(|_| rng.gen_range(-scale..scale)));
        }
    }
    let weights = ops.upload(&host);
    let grads_flat = ops.zeros(s.experts * expert_len);
    let experts = expert_views(&weights, s.experts, f * d)?;
    let mut grads = expert_views(&grads_flat, s.experts, f * d)?;
    let mut grouter = ops.zeros(s.experts * d);
    let x = random(&ops, rng, tokens * d, 1.0);
    let dy = random(&ops, rng, tokens * d, 1.0);
    let row_weights = vec![1.0; tokens];
    ops.check()?;

    let dispatch = median_seconds(&ops, reps, || {
        let logits = ops.matmul(&x, &router, tokens, d, s.experts);
        let routing = ops.moe_route(&logits, s.experts, s.k);
        let rows = ops.moe_permute(&x, &routing, false, d);
        ops.moe_unpermute(&rows, &routing, true, d);
        Ok(())
    })?;
    let forward = median_seconds(&ops, reps, || {
        moe_forward(&ops, s, &router, &experts, &x, tokens);
        Ok(())
    })?;
    let (_, acts) = moe_forward(&ops, s, &router, &experts, &x, tokens);
    let mut balance = ops.moe_balance(s.experts);
    ops.moe_balance_add(&mut balance, acts.routing(), &row_weights);
    let backward = median_seconds(&ops, reps, || {
        let aux = MoeAux {
            balance: &balance,
            coef: 0.02,
            row_weights: &row_weights,
        };
        moe_backward(
            &ops,
            s,
            (&router, &experts),
            (&mut grouter, &mut grads),
            (&x, tokens),
            &acts,
            &dy,
            Some(aux),
        );
        Ok(())
    })?;
    let (t, e, k) = (tokens as f64, s.experts as f64, s.k as f64);
    let forward_flops = 2.0 * t * d as f64 * e + 6.0 * t * k * d as f64 * f as f64;
    Ok(MoeTiming {
        dtype: storage.name(),
        tokens,
        d,
        ffn: f,
        experts: s.experts,
        k: s.k,
        dispatch_ms: dispatch * 1e3,
        forward_ms: forward * 1e3,
        forward_tflops: forward_flops / forward / 1e12,
        backward_ms: backward * 1e3,
        backward_tflops: 2.0 * forward_flops / backward / 1e12,
        emulator_time: matches!(device, Device::Emu),
    })
}
