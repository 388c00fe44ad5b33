//! Timing of the MoE feed-forward on a device (`contralign bench moe`): the layer as the model
//! runs it (`model::layer::moe_forward` / `moe_backward` through [`DeviceOps`], f32 or bf16
//! tensors, the MoE kernels of cuda/moe.cu and the grouped expert GEMMs of cuda/moe_gemm.cu)
//! on random inputs made in memory. The experts' weights and gradients each lie in one buffer at one
//! stride, as the engine's flat store lays them out, so the GEMMs run on them in place.
//!
//! Work is counted as the GEMMs' FLOPs: forward `2 T d E` for the router and `6 T k d F` for
//! the experts' three projections over the `T k` routed rows; backward twice that (input and
//! weight gradients). The dispatch alone (routing, counting sort, the row moves) is timed too:
//! it is the part the MoE kernels own. With a dump folder ([`dump_moe`]) it also writes the
//! inputs, the output and the input gradient for the scoreboard's PyTorch side to recompute.

use crate::checkpoint::{save_f32, Tensor as SavedTensor};
use crate::model::layer::{moe_backward, moe_forward, MoeShape};
use crate::model::params::Expert;
use crate::ops::cuda::device::Device;
use crate::ops::cuda::ops::DeviceOps;
use crate::ops::cuda::pool::Tensor;
use crate::ops::cuda::roofline::{Gpu, Math, Modeled};
use crate::ops::storage::Dtype;
use crate::ops::{MoeAux, Ops};
use anyhow::{ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::path::Path;
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
    /// The roofline model beside the measured times (issue 15's calibration): each input
    /// read once and each output written once (the routed rows and activations free, but the
    /// dispatch's permuted rows, which it exists to move), the FLOPs above, on the published
    /// figures of the GPU.
    pub dispatch_model: Modeled,
    pub forward_model: Modeled,
    pub backward_model: Modeled,
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

/// The layer's random inputs of one seed on the device: the router, the experts' weights in
/// one flat buffer, zeroed gradients, the input rows `x` and the output's gradient `dy`.
struct MoeProblem<'a> {
    ops: DeviceOps<'a>,
    router: Tensor,
    weights: Tensor,
    grads_flat: Tensor,
    grouter: Tensor,
    x: Tensor,
    dy: Tensor,
}

impl<'a> MoeProblem<'a> {
    fn new(
        device: &'a Device,
        (s, storage): (MoeShape, Dtype),
        tokens: usize,
        seed: u64,
    ) -> Result<Self> {
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
        let mut host = Vec::with_capacity(s.experts * 3 * f * d);
        for _ in 0..s.experts {
            for scale in [wd, wd, wf] {
                host.extend((0..f * d).map(|_| rng.gen_range(-scale..scale)));
            }
        }
        let weights = ops.upload(&host);
        let grads_flat = ops.zeros(host.len());
        let grouter = ops.zeros(s.experts * d);
        let x = random(&ops, rng, tokens * d, 1.0);
        let dy = random(&ops, rng, tokens * d, 1.0);
        ops.check()?;
        Ok(MoeProblem {
            ops,
            router,
            weights,
            grads_flat,
            grouter,
            x,
            dy,
        })
    }
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
    let p = &mut MoeProblem::new(device, (s, storage), tokens, seed)?;
    let (ops, d, f) = (&p.ops, s.d, s.ffn);
    let experts = expert_views(&p.weights, s.experts, f * d)?;
    let mut grads = expert_views(&p.grads_flat, s.experts, f * d)?;
    let row_weights = vec![1.0; tokens];

    let dispatch = median_seconds(ops, reps, || {
        let logits = ops.matmul(&p.x, &p.router, tokens, d, s.experts);
        let routing = ops.moe_route(&logits, s.experts, s.k);
        let rows = ops.moe_permute(&p.x, &routing, false, d);
        ops.moe_unpermute(&rows, &routing, true, d);
        Ok(())
    })?;
    let forward = median_seconds(ops, reps, || {
        moe_forward(ops, s, &p.router, &experts, &p.x, tokens);
        Ok(())
    })?;
    let (_, acts) = moe_forward(ops, s, &p.router, &experts, &p.x, tokens);
    let mut balance = ops.moe_balance(s.experts);
    ops.moe_balance_add(&mut balance, acts.routing(), &row_weights);
    let backward = median_seconds(ops, reps, || {
        let aux = MoeAux {
            balance: &balance,
            coef: 0.02,
            row_weights: &row_weights,
        };
        moe_backward(
            ops,
            s,
            (&p.router, &experts),
            (&mut p.grouter, &mut grads),
            (&p.x, tokens),
            &acts,
            &p.dy,
            Some(aux),
        );
        Ok(())
    })?;
    let (t, e, k) = (tokens as f64, s.experts as f64, s.k as f64);
    let forward_flops = 2.0 * t * d as f64 * e + 6.0 * t * k * d as f64 * f as f64;
    let gpu = Gpu::published_for(&device.describe());
    let size = match storage {
        Dtype::F32 => 4.0,
        Dtype::Bf16 => 2.0,
    };
    let (rows, router, weights) = (t * d as f64, e * d as f64, 3.0 * e * (f * d) as f64);
    let math = Math::of(storage.name());
    let model = |elements: f64, flops: f64| Modeled::new(&gpu, size * elements, flops, math);
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
        // x and the router read, T k rows written and read back, T rows written.
        dispatch_model: model(2.0 * rows + router + 2.0 * k * rows, 2.0 * t * d as f64 * e),
        // x, the router and the experts read, the output written.
        forward_model: model(2.0 * rows + router + weights, forward_flops),
        // x, dy, the router and the experts read, dx written, the gradients read and written.
        backward_model: model(3.0 * rows + 3.0 * (router + weights), 2.0 * forward_flops),
    })
}

/// Writes what the scoreboard's MoE baseline (tools/scoreboard/moe.py --check) recomputes:
/// `dir/moe.safetensors` holds the inputs of [`time_moe`]'s seed as the device stores them
/// (`router` [E, d]; `gate`, `up` [E, F, d] and `down` [E, d, F], each expert's projections
/// stacked; `x` and `dy` [T, d]) and the layer's `out` and input gradient `dx` [T, d] (the
/// backward of `dy` alone: no load-balancing term, which the baseline's block leaves to the
/// model's loss); `dir/moe.json` the shape and the loss `Σ out · dy` whose gradient `dx` is.
/// Returns that loss.
pub fn dump_moe(
    device: &Device,
    (s, storage): (MoeShape, Dtype),
    tokens: usize,
    seed: u64,
    dir: &Path,
) -> Result<f64> {
    let p = &mut MoeProblem::new(device, (s, storage), tokens, seed)?;
    let (ops, d, f) = (&p.ops, s.d, s.ffn);
    let experts = expert_views(&p.weights, s.experts, f * d)?;
    let mut grads = expert_views(&p.grads_flat, s.experts, f * d)?;
    let (out, acts) = moe_forward(ops, s, &p.router, &experts, &p.x, tokens);
    let dx = moe_backward(
        ops,
        s,
        (&p.router, &experts),
        (&mut p.grouter, &mut grads),
        (&p.x, tokens),
        &acts,
        &p.dy,
        None,
    );
    ops.check()?;
    let weights = ops.download(&p.weights);
    // The flat store holds gate, up, down expert after expert: gather each projection.
    let stacked = |which: usize| -> Vec<f32> {
        weights
            .chunks(3 * f * d)
            .flat_map(|e| &e[which * f * d..(which + 1) * f * d])
            .copied()
            .collect()
    };
    let (out, dy) = (ops.download(&out), ops.download(&p.dy));
    let loss: f64 = out
        .iter()
        .zip(&dy)
        .map(|(&o, &g)| o as f64 * g as f64)
        .sum();
    let (e, rows) = (s.experts, tokens);
    let tensors = [
        ("router", vec![e, d], ops.download(&p.router)),
        ("gate", vec![e, f, d], stacked(0)),
        ("up", vec![e, f, d], stacked(1)),
        ("down", vec![e, d, f], stacked(2)),
        ("x", vec![rows, d], ops.download(&p.x)),
        ("dy", vec![rows, d], dy),
        ("out", vec![rows, d], out),
        ("dx", vec![rows, d], ops.download(&dx)),
    ];
    std::fs::create_dir_all(dir)
        .with_context(|| format!("--dump: cannot create {}", dir.display()))?;
    let named: Vec<SavedTensor> = tensors
        .iter()
        .map(|(name, shape, data)| SavedTensor {
            name: name.to_string(),
            shape: shape.clone(),
            data,
        })
        .collect();
    save_f32(&dir.join("moe.safetensors"), &named)?;
    let record = serde_json::json!({
        "tokens": tokens,
        "dim": d,
        "ffn": f,
        "experts": e,
        "top_k": s.k,
        "dtype": storage.name(),
        "loss": loss,
    });
    let path = dir.join("moe.json");
    crate::fsutil::write_atomically(&path, record.to_string().as_bytes())
        .with_context(|| format!("--dump: cannot write {}", path.display()))?;
    Ok(loss)
}
