//! The memory traffic of every kernel, counted by the emulator's probe
//! ([`emu::probed`]), against the ideal bytes of its op (each input read once, each output
//! written once), with the roofline model's time on an A100 and an H100 ([`Gpu`]), at the
//! profiled shapes and extrapolated to Mistral-7B's (`contralign selftest --profile`).
//!
//! The extrapolation assumes that an op's counted bytes scale like its ideal bytes (the
//! ratio measured at the profiled shape holds at the larger one) and that its coalescing
//! stays the same. It is a model, not a measurement.

use super::attention::AttentionKernels;
use super::attention_bench::{self, BenchMask, BenchProblem};
use super::device::{Buffer, Device, Float, View};
use super::embedding::IdRows;
use super::emu::{self, LaunchRecord, Probe, Traffic};
use super::fresh::GradWrite;
use super::gemm::Gemm;
use super::kernels::{AdamWStep, Kernels};
use super::lists::Uploads;
use super::moe::{DeviceRouting, ExpertStack, MoeKernels};
use super::pool::{Leased, Pool};
use super::roofline::{table_header, Gpu, Math};
use super::scoring::Spans;
use super::scoring_bench::{ScoringShape, Unfused};
use crate::ops::optimizer::AdamWConfig;
use crate::ops::{AttentionShape, ResponseSpan};
use anyhow::{ensure, Result};
use half::bf16;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// The sizes the ops run at: a transformer's widths and a batch of tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Shapes {
    pub tokens: usize,
    pub d: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// Mixtral's experts and the experts per token, for the MoE cases (at `d`).
    pub experts: usize,
    pub top_k: usize,
    /// Elements of the optimizer, cast, accumulation and gradient-norm cases.
    pub params: usize,
    /// The experts' grouped GEMM cases run at `d` and `ffn` divided by this: the emulator
    /// runs every thread of a tiled GEMM, and a tile's traffic and coalescing do not depend
    /// on how many tiles there are, so the counted/ideal ratio carries over to full widths.
    pub expert_width_divisor: usize,
}

impl Shapes {
    /// Mistral-7B's widths with 8192 tokens and a 50M-element tensor: the sizes of
    /// `benches/kernels.rs`.
    pub fn mistral_7b() -> Shapes {
        Shapes {
            tokens: 8192,
            d: 4096,
            ffn: 14336,
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            vocab: 32000,
            experts: 8,
            top_k: 2,
            params: 50 << 20,
            expert_width_divisor: 1,
        }
    }

    /// Mistral-7B's widths with `tokens` tokens, a vocabulary of 1024 (only the rows the ids
    /// touch move) and `params` elements: small enough for the instrumented emulator.
    pub fn small(tokens: usize, params: usize) -> Shapes {
        Shapes {
            tokens,
            vocab: 1024,
            params,
            expert_width_divisor: 32,
            ..Shapes::mistral_7b()
        }
    }
}

/// One op's counts at the profiled shapes.
#[derive(Clone, Debug)]
pub struct OpProfile {
    /// As `benches/kernels.rs` names the case: family and variant.
    pub op: String,
    pub launches: usize,
    /// The kernels its launches ran, sorted and distinct (`gemm` for the device's GEMM).
    pub kernels: Vec<String>,
    /// What the op must read and write at least, at the profiled shapes and at Mistral-7B's.
    pub ideal_bytes: u64,
    pub ideal_bytes_7b: u64,
    pub flops: u64,
    pub flops_7b: u64,
    pub traffic: Traffic,
    /// False for GEMMs: the host GEMM is not instrumented, its bytes are the ideal ones.
    pub counted: bool,
    /// Why the op is exempt from the traffic targets, where it is (the table lists it).
    pub exception: Option<&'static str>,
    /// The units its FLOPs run on.
    pub math: Math,
}

impl OpProfile {
    pub fn bytes(&self) -> u64 {
        self.traffic.dram_bytes()
    }

    pub fn bytes_over_ideal(&self) -> f64 {
        self.bytes() as f64 / self.ideal_bytes as f64
    }

    /// The model's bytes at Mistral-7B's shapes.
    pub fn bytes_7b(&self) -> f64 {
        self.ideal_bytes_7b as f64 * self.bytes_over_ideal()
    }

    /// Whether a memory-bound op meets the targets: at least 0.8 coalescing, at most 1.25
    /// times its ideal bytes.
    pub fn meets_targets(&self) -> bool {
        !self.counted || (self.traffic.coalescing() >= 0.8 && self.bytes_over_ideal() <= 1.25)
    }

    /// Whether the op meets the targets or is a listed exception.
    pub fn accepted(&self) -> bool {
        self.meets_targets() || self.exception.is_some()
    }
}

/// An op's ideal (bytes, FLOPs) at given shapes.
pub type Ideal = Box<dyn Fn(&Shapes) -> (u64, u64)>;
/// Runs an op once at given shapes, on fresh random inputs.
pub type Run = Box<dyn Fn(&Kernels, &Shapes, &mut StdRng) -> Result<()>>;

/// One op of the table: its name, how to run it once and its ideal (bytes, FLOPs). Layers
/// above `ops` add their own ([`profile`]'s `extra`).
pub struct Case {
    op: String,
    ideal: Ideal,
    run: Run,
    exception: Option<&'static str>,
    math: Math,
}

pub fn case(
    op: String,
    ideal: impl Fn(&Shapes) -> (u64, u64) + 'static,
    run: impl Fn(&Kernels, &Shapes, &mut StdRng) -> Result<()> + 'static,
) -> Case {
    Case {
        op,
        ideal: Box::new(ideal),
        run: Box::new(run),
        exception: None,
        math: Math::Bf16TensorCores,
    }
}

impl Case {
    /// The op's name, as its table row shows it.
    pub fn op(&self) -> &str {
        &self.op
    }

    /// The op with the reason it is exempt from the traffic targets.
    pub fn excepted(mut self, why: &'static str) -> Case {
        self.exception = Some(why);
        self
    }

    /// The op with FLOPs of element type `E`: an f32 op's run on the CUDA cores.
    pub fn math_of<E: Float>(mut self) -> Case {
        if E::DTYPE == f32::DTYPE {
            self.math = Math::F32;
        }
        self
    }
}

/// Flash attention at one causal sequence of the profile's tokens, Mistral's heads: q, k, v
/// read and the output and log-sum-exp written once (forward); q, k, v, the output, its
/// gradient and the log-sum-exp read and dq, dk, dv written once (backward). The FLOPs are
/// `bench attention`'s, over the pairs the mask lets through. The K/V tiles are re-read for
/// every query tile, so the counted bytes exceed the ideal ones: compute-bound by design.
fn attention_case<E: Float>(backward: bool) -> Case {
    let direction = if backward { "backward" } else { "forward" };
    case(
        format!("attention {direction} {}", E::DTYPE),
        move |s| {
            let pairs = (s.tokens * (s.tokens + 1) / 2) as u64;
            attention_bench::ideal::<E>(s.tokens, pairs, attention_shape(s))[usize::from(backward)]
        },
        move |k, s, _| {
            let shape = attention_shape(s);
            let mut problem = BenchProblem::<E>::new(k.device, BenchMask::Causal, s.tokens, shape)?;
            let kernels = AttentionKernels::new(k.device);
            if !backward {
                return problem.forward(&kernels);
            }
            uncounted(|| problem.forward(&kernels))?;
            problem.backward(&kernels)
        },
    )
    .excepted("compute-bound: the time is its FLOPs at the peak; K/V re-read per query tile")
    .math_of::<E>()
}

/// The kernels for head dims 129 to 256 (`*_d256`, correct, not tuned) at head dim 256 and the
/// profile's heads: the forward and the backward together, ideal as [`attention_case`]'s.
fn wide_attention_case<E: Float>() -> Case {
    let shape = |s: &Shapes| AttentionShape {
        head_dim: 256,
        ..attention_shape(s)
    };
    case(
        format!("attention forward + backward {}, head dim 256", E::DTYPE),
        move |s| {
            let pairs = (s.tokens * (s.tokens + 1) / 2) as u64;
            let [(fb, ff), (bb, bf)] = attention_bench::ideal::<E>(s.tokens, pairs, shape(s));
            (fb + bb, ff + bf)
        },
        move |k, s, _| {
            let mut problem =
                BenchProblem::<E>::new(k.device, BenchMask::Causal, s.tokens, shape(s))?;
            let kernels = AttentionKernels::new(k.device);
            problem.forward(&kernels)?;
            problem.backward(&kernels)
        },
    )
    .excepted("head dims above 128: the untuned kernels (twice the accumulators), compute-bound")
    .math_of::<E>()
}

fn attention_shape(s: &Shapes) -> AttentionShape {
    AttentionShape {
        heads: s.heads,
        kv_heads: s.kv_heads,
        head_dim: s.head_dim,
    }
}

/// AdamW on bf16 weights with `G` gradients and `M` moments, with or without an f32 master
/// copy: ideally each store read once and the updated ones written once (the bf16 weights are
/// written but, with a master, not read).
fn adamw_bf16_case<G: Float, M: Float>(op: &str, master: bool) -> Case {
    let (g, m) = (
        std::mem::size_of::<G>() as u64,
        std::mem::size_of::<M>() as u64,
    );
    let per_param = g + 4 * m + if master { 2 + 8 } else { 4 };
    case(
        op.into(),
        move |s| (per_param * s.params as u64, 0),
        move |k, s, rng| {
            let mut p = random::<bf16>(k.device, rng, s.params, 1.0)?;
            let copy = match master {
                true => Some(random::<f32>(k.device, rng, s.params, 1.0)?),
                false => None,
            };
            let grad = random::<G>(k.device, rng, s.params, 1e-2)?;
            let (mut m, mut v) = (
                random::<M>(k.device, rng, s.params, 1e-2)?,
                k.device.alloc::<M>(s.params)?,
            );
            let master = copy.as_ref().map(|c| c.view());
            k.adamw_bf16(&mut p, master, &grad, &mut m, &mut v, None, &adamw_step())
        },
    )
}

fn random<E: Float>(device: &Device, rng: &mut StdRng, n: usize, scale: f32) -> Result<Buffer<E>> {
    device.upload(
        &(0..n)
            .map(|_| E::from_f32(rng.gen_range(-scale..scale)))
            .collect::<Vec<E>>(),
    )
}

fn size<E>() -> u64 {
    size_of::<E>() as u64
}

/// The distinct ids among `s.tokens` ids drawn uniformly from the vocabulary, in expectation:
/// `V (1 - (1 - 1/V)^T)`, rounded (7229 of Mistral-7B's 8192 tokens and 32000 ids). An
/// embedding moves a table row per distinct id, so its ideal bytes count these.
fn distinct_ids(s: &Shapes) -> usize {
    let (t, v) = (s.tokens as f64, s.vocab as f64);
    (v * (1.0 - (1.0 - 1.0 / v).powf(t))).round() as usize
}

/// `s.tokens` ids of which exactly [`distinct_ids`] are distinct, in random order, on the
/// host: as many table rows as uniform draws touch on average, so that the counted bytes and
/// the ideal ones count the same rows.
fn host_ids(rng: &mut StdRng, s: &Shapes) -> Result<Vec<u32>> {
    ensure!(s.vocab > 0, "the profile's ids need a vocabulary");
    let distinct = distinct_ids(s);
    let unique: Vec<u32> = sample(rng, s.vocab, distinct)
        .into_iter()
        .map(|i| i as u32)
        .collect();
    let mut ids = unique.clone();
    ids.extend((distinct..s.tokens).map(|_| unique[rng.gen_range(0..distinct)]));
    ids.shuffle(rng);
    Ok(ids)
}

/// A target token per row.
fn targets(device: &Device, rng: &mut StdRng, s: &Shapes) -> Result<Buffer<u32>> {
    let targets: Vec<u32> = (0..s.tokens)
        .map(|_| rng.gen_range(0..s.vocab as u32))
        .collect();
    device.upload(&targets)
}

/// The SwiGLU backward: gate, up and dy read, dgate and dup written; with
/// `writes_output`, the forward's output written again too (a backward that did not keep
/// it: one more write, where a recomputation of its own would read gate and up once more).
fn swiglu_backward_case<E: Float>(writes_output: bool) -> Case {
    let (e, dt) = (size::<E>(), E::DTYPE);
    let (name, tensors) = if writes_output {
        (format!("swiglu backward {dt}, output recomputed"), 6)
    } else {
        (format!("swiglu backward {dt}"), 5)
    };
    case(
        name,
        move |s| (tensors * (s.tokens * s.ffn) as u64 * e, 0),
        move |k, s, rng| {
            let n = s.tokens * s.ffn;
            let g = random::<E>(k.device, rng, n, 4.0)?;
            let (u, dy) = (
                random(k.device, rng, n, 2.0)?,
                random(k.device, rng, n, 1.0)?,
            );
            let (mut dg, mut du) = (k.device.alloc::<E>(n)?, k.device.alloc::<E>(n)?);
            let out = k.device.alloc::<E>(n)?;
            let out = writes_output.then(|| out.view());
            k.swiglu_backward((&g, &u, &dy), &mut dg, &mut du, out)
        },
    )
}

fn element_cases<E: Float>() -> Vec<Case> {
    let e = size::<E>();
    let dt = E::DTYPE;
    vec![
        case(
            format!("swiglu forward {dt}"),
            move |s| (3 * (s.tokens * s.ffn) as u64 * e, 0),
            |k, s, rng| {
                let n = s.tokens * s.ffn;
                let (g, u) = (
                    random::<E>(k.device, rng, n, 4.0)?,
                    random(k.device, rng, n, 2.0)?,
                );
                let mut out = k.device.alloc::<E>(n)?;
                k.swiglu_forward(&g, &u, &mut out)
            },
        ),
        swiglu_backward_case::<E>(false),
        swiglu_backward_case::<E>(true),
        // The ids read, each distinct id's table row read once, each token's output row
        // written.
        case(
            format!("embedding forward {dt}"),
            move |s| {
                let rows = (s.tokens + distinct_ids(s)) as u64;
                (4 * s.tokens as u64 + rows * s.d as u64 * e, 0)
            },
            |k, s, rng| {
                let table = random::<E>(k.device, rng, s.vocab * s.d, 1.0)?;
                let ids = k.device.upload(&host_ids(rng, s)?)?;
                let mut out = k.device.alloc::<E>(s.tokens * s.d)?;
                k.embedding_forward(&table, &ids, &mut out, s.d)
            },
        ),
        embedding_backward_case::<E, f32>(),
        embedding_backward_case::<E, bf16>(),
        // x and the residual read, h and y written; w once, rstd written.
        case(
            format!("rmsnorm forward {dt}"),
            move |s| {
                let n = (s.tokens * s.d) as u64;
                (4 * n * e + s.d as u64 * e + 4 * s.tokens as u64, 0)
            },
            |k, s, rng| {
                let n = s.tokens * s.d;
                let x = random::<E>(k.device, rng, n, 2.0)?;
                let r = random::<E>(k.device, rng, n, 2.0)?;
                let w = random::<E>(k.device, rng, s.d, 1.0)?;
                let (h, mut y) = (k.device.alloc::<E>(n)?, k.device.alloc::<E>(n)?);
                let mut rstd = k.device.alloc::<f32>(s.tokens)?;
                k.rmsnorm_forward(
                    &x,
                    Some(r.view()),
                    &w,
                    Some(h.view()),
                    &mut y,
                    &mut rstd,
                    1e-5,
                )
            },
        ),
        // h, dy and the incoming gradient read, dh written; w once; dw (stored as the
        // activations are, as the engine's default gradients) read and written.
        case(
            format!("rmsnorm backward {dt}"),
            move |s| {
                let n = (s.tokens * s.d) as u64;
                (4 * n * e + 3 * s.d as u64 * e, 0)
            },
            |k, s, rng| {
                let n = s.tokens * s.d;
                let h = random::<E>(k.device, rng, n, 2.0)?;
                let w = random::<E>(k.device, rng, s.d, 1.0)?;
                let dy = random::<E>(k.device, rng, n, 1.0)?;
                let dh_in = random::<E>(k.device, rng, n, 1.0)?;
                let mut dh = k.device.alloc::<E>(n)?;
                let mut dw = random::<E>(k.device, rng, s.d, 1.0)?;
                let dh_in = Some(dh_in.view());
                let dw = (&mut dw, GradWrite::Accumulate);
                k.rmsnorm_backward(&h, &w, &dy, dh_in, &mut dh, dw, 1e-5)
            },
        ),
        rope_case::<E>("forward", false),
        rope_case::<E>("backward", true),
        attention_case::<E>(false),
        attention_case::<E>(true),
        wide_attention_case::<E>(),
        // The logits read once; per row its target read, its log-sum-exp and log-prob written.
        case(
            format!("scoring rows {dt}"),
            move |s| ((s.tokens * s.vocab) as u64 * e + 12 * s.tokens as u64, 0),
            |k, s, rng| {
                let z = random::<E>(k.device, rng, s.tokens * s.vocab, 8.0)?;
                let targets = targets(k.device, rng, s)?;
                let (mut lse, mut logp) = (
                    k.device.alloc::<f32>(s.tokens)?,
                    k.device.alloc::<f32>(s.tokens)?,
                );
                k.scoring_rows(&z, s.tokens, s.vocab, &targets, 0, &mut lse, &mut logp)
            },
        ),
        // The logits read and overwritten by their gradient; per row its target, log-sum-exp
        // and coefficient read.
        case(
            format!("scoring backward {dt}"),
            move |s| {
                (
                    2 * (s.tokens * s.vocab) as u64 * e + 12 * s.tokens as u64,
                    0,
                )
            },
            |k, s, rng| {
                let mut z = random::<E>(k.device, rng, s.tokens * s.vocab, 8.0)?;
                let targets = targets(k.device, rng, s)?;
                let lse = random::<f32>(k.device, rng, s.tokens, 1.0)?;
                let coef = random::<f32>(k.device, rng, s.tokens, 1.0)?;
                k.scoring_backward(&mut z, s.tokens, s.vocab, &targets, &lse, &coef, 0)
            },
        ),
    ]
}

/// The embedding backward from `E` gradient rows into a `G` table: ideally the ids read, each
/// token's gradient row read, each distinct id's table row read and written once. The kernel
/// reads the ids grouped by value instead (`order`, `unique`, `starts`: 4 bytes a token and 8 a
/// distinct id, where the op needs the 4 bytes a token of the ids).
fn embedding_backward_case<E: Float, G: Float>() -> Case {
    let (e, g) = (size::<E>(), size::<G>());
    case(
        format!("embedding backward {} -> {}", E::DTYPE, G::DTYPE),
        move |s| {
            let (t, d) = (s.tokens as u64, s.d as u64);
            (4 * t + t * d * e + distinct_ids(s) as u64 * d * 2 * g, 0)
        },
        |k, s, rng| {
            let dout = random::<E>(k.device, rng, s.tokens * s.d, 1.0)?;
            let pool = Pool::default();
            let rows = IdRows::new(&host_ids(rng, s)?).on_device(&Uploads {
                device: k.device,
                pool: &pool,
            })?;
            let mut dtable = random::<G>(k.device, rng, s.vocab * s.d, 1.0)?;
            k.embedding_backward(&dout, &rows, &mut dtable, s.d)
        },
    )
}

/// q rotated in place (read and written), and the positions.
fn rope_case<E: Float>(direction: &str, inverse: bool) -> Case {
    let e = size::<E>();
    case(
        format!("rope {direction} {}", E::DTYPE),
        move |s| {
            let n = (s.tokens * s.heads * s.head_dim) as u64;
            (2 * n * e + 4 * s.tokens as u64, 0)
        },
        move |k, s, rng| {
            let mut x = random::<E>(k.device, rng, s.tokens * s.heads * s.head_dim, 2.0)?;
            let positions: Vec<u32> = (0..s.tokens as u32).collect();
            let positions = k.device.upload(&positions)?;
            k.rope(&mut x, &positions, s.heads, s.head_dim, 1e6, inverse)
        },
    )
}

/// Router logits of `s`'s tokens, routed (uncounted): random, with token `t`'s expert
/// `t mod E` raised by 8 so that every expert gets rows even at 16 tokens (as a router trained
/// with the load-balancing loss spreads them), and the grouped GEMMs move every expert's
/// weights, as their ideal bytes count.
fn routing<'a>(moe: &MoeKernels<'a>, s: &Shapes, rng: &mut StdRng) -> Result<DeviceRouting> {
    let logits: Vec<f32> = (0..s.tokens * s.experts)
        .map(|i| {
            let (t, e) = (i / s.experts, i % s.experts);
            rng.gen_range(-4.0..4.0) + if t % s.experts == e { 8.0 } else { 0.0 }
        })
        .collect();
    let logits = moe.device.upload(&logits)?;
    uncounted(|| moe.route(&logits, s.experts, s.top_k))
}

/// `f`'s launches left out of the count: a case's inputs made by other kernels.
fn uncounted<R>(f: impl FnOnce() -> R) -> R {
    let probe = Probe {
        count: false,
        racecheck: false,
    };
    emu::probed(probe, f).0
}

/// A lease of `data` from `moe`'s pool.
fn leased<T: bytemuck::Pod>(moe: &MoeKernels, data: &[T]) -> Result<Leased<T>> {
    moe.pool.upload(moe.device, data)
}

/// Why the routing's kernels are exempt from the traffic targets.
const PER_TOKEN_ROUTING: &str =
    "one thread per token walks its row of E experts: strided, but T·E bytes against the row \
     moves' T·k·d";

/// A per-token routing kernel on a fresh routing, its ideal bytes a function of the tokens,
/// experts and slots; exempt from the targets ([`PER_TOKEN_ROUTING`]).
fn routing_case(
    op: &str,
    ideal: impl Fn(u64, u64, u64) -> u64 + 'static,
    run: impl Fn(&MoeKernels, &DeviceRouting, &Shapes, &mut StdRng) -> Result<()> + 'static,
) -> Case {
    case(
        op.into(),
        move |s| {
            let slots = (s.tokens * s.top_k) as u64;
            (ideal(s.tokens as u64, s.experts as u64, slots), 0)
        },
        move |k, s, rng| {
            let moe = MoeKernels::new(k.device, Pool::default());
            let r = routing(&moe, s, rng)?;
            run(&moe, &r, s, rng)
        },
    )
    .excepted(PER_TOKEN_ROUTING)
}

/// A MoE row move on a fresh routing: `T` rows of `d` on one side and `T k` on the other
/// (`e` bytes an element), and `index_bytes` of routing per slot.
fn routed_case(
    op: &str,
    (e, index_bytes): (u64, u64),
    run: impl Fn(&MoeKernels, &DeviceRouting, &Shapes, &mut StdRng) -> Result<()> + 'static,
) -> Case {
    case(
        op.into(),
        move |s| {
            let (rows, slots) = ((s.tokens * s.d) as u64, (s.tokens * s.top_k) as u64);
            (e * rows + e * slots * s.d as u64 + index_bytes * slots, 0)
        },
        move |k, s, rng| {
            let moe = MoeKernels::new(k.device, Pool::default());
            let r = routing(&moe, s, rng)?;
            run(&moe, &r, s, rng)
        },
    )
}

/// Which of the experts' grouped GEMMs a profile case runs.
#[derive(Clone, Copy)]
enum ExpertGemm {
    Forward,
    InputGrad,
    WeightGrad(GradWrite),
}

/// One of the experts' grouped GEMMs (`T` in, `G` out for the weight gradient) at Mixtral's
/// routing over the `T k` rows, from `d` to `ffn` (the gate and up projections) at the widths
/// of [`Shapes::expert_width_divisor`]: each operand read once and the output written once
/// (read too when accumulated into, not when a fresh gradient is overwritten), the expert
/// offsets read by every block.
fn expert_gemm_case<T: Float, G: Float>(op: ExpertGemm) -> Case {
    let widths = |s: &Shapes| (s.d / s.expert_width_divisor, s.ffn / s.expert_width_divisor);
    let dt = T::DTYPE;
    let name = match op {
        ExpertGemm::Forward => format!("forward {dt}"),
        ExpertGemm::InputGrad => format!("input grad {dt}"),
        ExpertGemm::WeightGrad(GradWrite::Accumulate) => {
            format!("weight grad {dt} -> {}", G::DTYPE)
        }
        ExpertGemm::WeightGrad(GradWrite::Overwrite) => {
            format!("weight grad {dt} -> {}, fresh (overwritten)", G::DTYPE)
        }
    };
    case(
        format!("moe expert gemm {name}"),
        move |s| {
            let (rows, e) = ((s.tokens * s.top_k) as u64, s.experts as u64);
            let (d, f) = widths(s);
            let (d, f) = (d as u64, f as u64);
            let (t, g) = (size::<T>(), size::<G>());
            let bytes = match op {
                ExpertGemm::Forward | ExpertGemm::InputGrad => t * (rows * (d + f) + e * f * d),
                ExpertGemm::WeightGrad(GradWrite::Accumulate) => {
                    t * rows * (f + d) + 2 * g * e * f * d
                }
                ExpertGemm::WeightGrad(GradWrite::Overwrite) => t * rows * (f + d) + g * e * f * d,
            };
            (bytes + 4 * (e + 1), 2 * rows * d * f)
        },
        move |k, s, rng| {
            let moe = MoeKernels::new(k.device, Pool::default());
            let r = routing(&moe, s, rng)?;
            let (d, f) = widths(s);
            let rows = r.slots();
            let weights = random::<T>(k.device, rng, s.experts * f * d, 0.1)?;
            let stack = |w: View<T>| -> Result<ExpertStack<T>> {
                let views = (0..s.experts)
                    .map(|e| w.slice(e * f * d, f * d))
                    .collect::<Result<Vec<_>>>()?;
                ExpertStack::new("expert weights", &views)
            };
            let w = stack(weights.view())?;
            match op {
                ExpertGemm::Forward => {
                    let x = random::<T>(k.device, rng, rows * d, 1.0)?;
                    let y = k.device.alloc::<T>(rows * f)?;
                    moe.expert_forward(x.view(), w, &r, (d, f), y.view())
                }
                ExpertGemm::InputGrad => {
                    let dy = random::<T>(k.device, rng, rows * f, 1.0)?;
                    let dx = k.device.alloc::<T>(rows * d)?;
                    moe.expert_input_grad(dy.view(), w, &r, (d, f), dx.view())
                }
                ExpertGemm::WeightGrad(write) => {
                    let dy = random::<T>(k.device, rng, rows * f, 1.0)?;
                    let x = random::<T>(k.device, rng, rows * d, 1.0)?;
                    let grads = random::<G>(k.device, rng, s.experts * f * d, 0.1)?;
                    let views = (0..s.experts)
                        .map(|e| grads.view().slice(e * f * d, f * d))
                        .collect::<Result<Vec<_>>>()?;
                    let dw = ExpertStack::new("expert gradients", &views)?;
                    moe.expert_weight_grad((dy.view(), x.view()), &r, (d, f), dw, write)
                }
            }
        },
    )
    .math_of::<T>()
}

fn permute_case<E: Float>() -> Case {
    let op = format!("moe permute {}", E::DTYPE);
    routed_case(&op, (size::<E>(), 8), |moe, r, s, rng| {
        let x = random::<E>(moe.device, rng, s.tokens * s.d, 1.0)?;
        let mut out = moe.device.alloc::<E>(s.tokens * s.top_k * s.d)?;
        moe.permute(&x, r, true, &mut out, s.d)
    })
}

fn unpermute_case<E: Float>() -> Case {
    let op = format!("moe unpermute {}", E::DTYPE);
    routed_case(&op, (size::<E>(), 12), |moe, r, s, rng| {
        let y = random::<E>(moe.device, rng, s.tokens * s.top_k * s.d, 1.0)?;
        let mut out = moe.device.alloc::<E>(s.tokens * s.d)?;
        moe.unpermute(&y, r, true, &mut out, s.d)
    })
}

/// The router backward's dot of each slot's expert output with its token's output gradient:
/// both read, a dot (f64) per slot written; per slot its row read.
fn slot_dots_case<E: Float>() -> Case {
    let op = format!("moe slot dots {} (router backward)", E::DTYPE);
    routed_case(&op, (size::<E>(), 12), |moe, r, s, rng| {
        let dout = random::<E>(moe.device, rng, s.tokens * s.d, 1.0)?;
        let y = random::<E>(moe.device, rng, s.tokens * s.top_k * s.d, 1.0)?;
        moe.slot_dots(&dout, &y, r, s.d).map(drop)
    })
}

/// The MoE row moves at Mixtral's routing (rows of `d`; `T k` slots).
fn moe_cases() -> Vec<Case> {
    let slots = |s: &Shapes| (s.tokens * s.top_k) as u64;
    vec![
        // The logits read; the probabilities (f64), the choices and weights, each slot's row,
        // each row's token and weight written (the sort's per-block counts are extra).
        case(
            "moe route (softmax, top-k, counting sort)".into(),
            move |s| {
                let (t, e) = (s.tokens as u64, s.experts as u64);
                (4 * t * e + 8 * t * e + 20 * slots(s) + 4 * (e + 1), 0)
            },
            |k, s, rng| {
                let moe = MoeKernels::new(k.device, Pool::default());
                let logits = random::<f32>(k.device, rng, s.tokens * s.experts, 4.0)?;
                moe.route(&logits, s.experts, s.top_k).map(drop)
            },
        )
        .excepted(PER_TOKEN_ROUTING),
        // Every token's row read once, its weighted copies written; per slot its token and
        // weight read.
        permute_case::<f32>(),
        permute_case::<bf16>(),
        // The expert rows read, each token's weighted sum written; per slot its row, expert
        // and weight read.
        unpermute_case::<f32>(),
        unpermute_case::<bf16>(),
        slot_dots_case::<f32>(),
        slot_dots_case::<bf16>(),
        // The probabilities (f64), the choices, each slot's dL/dweight, each row's weight and
        // the balance's expert counts and total read, dz written.
        routing_case(
            "moe router backward (with the aux loss)",
            |t, e, slots| 12 * t * e + 12 * slots + 8 * t + 8 * (e + 1),
            |moe, r, s, rng| {
                let d_weights: Vec<f64> =
                    (0..r.slots()).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let d_weights = leased(moe, &d_weights)?;
                let row_weights = leased(moe, &vec![1.0f64; s.tokens])?;
                let mut balance = moe.balance(s.experts)?;
                uncounted(|| moe.balance_add(&mut balance, r, &row_weights))?;
                let mut dz = moe.device.alloc::<f32>(s.tokens * s.experts)?;
                let aux = Some((&balance, 0.01, &row_weights));
                moe.route_backward(r, &d_weights, aux, &mut dz)
            },
        ),
        // The probabilities, the choices and each row's weight read, the sums written (the
        // per-block partials are extra).
        routing_case(
            "moe load-balancing sums",
            |t, e, slots| 8 * t * e + 4 * slots + 8 * t + 8 * (2 * e + 1),
            |moe, r, s, _| {
                let row_weights = leased(moe, &vec![1.0f64; s.tokens])?;
                let mut balance = moe.balance(s.experts)?;
                moe.balance_add(&mut balance, r, &row_weights)
            },
        ),
    ]
}

/// Rows per response in the scoring's per-response cases: the bench step's default response
/// length.
const RESPONSE_ROWS: usize = 256;

/// The responses of the scoring's per-response cases: spans of [`RESPONSE_ROWS`] rows (the
/// last one shorter) that tile the tokens, every other one ending with an EOS.
fn response_spans(s: &Shapes) -> Vec<ResponseSpan> {
    (0..s.tokens)
        .step_by(RESPONSE_ROWS)
        .enumerate()
        .map(|(i, first)| ResponseSpan {
            group: 0,
            first,
            len: RESPONSE_ROWS.min(s.tokens - first),
            ends_with_eos: i % 2 == 0,
        })
        .collect()
}

/// A per-response scoring kernel, exempt from the traffic targets: at a response of 16 rows
/// (the test's profile) its 100 bytes round up to 128 in whole sectors; from 64 rows it meets
/// them.
fn per_response(c: Case) -> Case {
    c.excepted(
        "a few bytes per response: whole sectors round them up at 16 tokens (1.28), not from \
         64; under 0.1 µs modeled at 7B",
    )
}

/// The scoring's per-response kernels around the loss, and the bench's unfused baseline.
fn scoring_cases() -> Vec<Case> {
    let responses = |s: &Shapes| s.tokens.div_ceil(RESPONSE_ROWS) as u64;
    vec![
        // Each row's log-prob and each response's span read once, its (S, A, E) (f64)
        // written.
        per_response(case(
            "scoring response stats (S, A, E)".into(),
            move |s| (4 * s.tokens as u64 + (12 + 24) * responses(s), 0),
            |k, s, rng| {
                let logp = random::<f32>(k.device, rng, s.tokens, 8.0)?;
                let pool = Pool::default();
                let spans = Spans::upload(k.device, &pool, &response_spans(s), s.tokens)?;
                let mut stats = k.device.alloc::<f64>(3 * spans.responses())?;
                k.response_stats(&logp, &spans, &mut stats)
            },
        )),
        // Each response's span and (dL/dS, dL/dA, dL/dE) (f64) read once, each row's
        // coefficient written.
        per_response(case(
            "scoring row coefficients".into(),
            move |s| (4 * s.tokens as u64 + (12 + 24) * responses(s), 0),
            |k, s, rng| {
                let pool = Pool::default();
                let spans = Spans::upload(k.device, &pool, &response_spans(s), s.tokens)?;
                let grads: Vec<f64> = (0..3 * spans.responses())
                    .map(|_| rng.gen_range(-1.0..1.0))
                    .collect();
                let grads = k.device.upload(&grads)?;
                let mut coef = k.device.alloc::<f32>(s.tokens)?;
                k.row_coef(&spans, &grads, 0.5, &mut coef)
            },
        )),
        // `bench scoring`'s unfused baseline after its GEMM: the fp32 logits read and their
        // log-probs written once, each row's target read and its log-prob written.
        case(
            "scoring unfused baseline f32 (log-softmax, gather; bench only)".into(),
            |s| (8 * (s.tokens * s.vocab) as u64 + 8 * s.tokens as u64, 0),
            |k, s, rng| {
                let shape = ScoringShape {
                    rows: s.tokens,
                    vocab: s.vocab,
                    dim: s.d,
                    chunk_rows: None,
                };
                let mut unfused = Unfused::new(k.device, &shape)?;
                let targets = targets(k.device, rng, s)?;
                let mut logp = k.device.alloc::<f32>(s.tokens)?;
                unfused.log_softmax_gather(k, (s.tokens, s.vocab), &targets, &mut logp)
            },
        ),
    ]
}

fn other_cases() -> Vec<Case> {
    let gemm = |s: &Shapes| Gemm::projection(s.tokens, s.d, s.d);
    vec![
        case(
            "cast f32 to bf16".into(),
            |s| (6 * s.params as u64, 0),
            |k, s, rng| {
                let x = random::<f32>(k.device, rng, s.params, 4.0)?;
                let mut out = k.device.alloc::<bf16>(s.params)?;
                k.cast_to_bf16(&x, &mut out)
            },
        ),
        case(
            "cast bf16 to f32".into(),
            |s| (6 * s.params as u64, 0),
            |k, s, rng| {
                let x = random::<bf16>(k.device, rng, s.params, 4.0)?;
                let mut out = k.device.alloc::<f32>(s.params)?;
                k.cast_to_f32(&x, &mut out)
            },
        ),
        case(
            "add_assign f32".into(),
            |s| (12 * s.params as u64, 0),
            |k, s, rng| {
                let mut acc = random::<f32>(k.device, rng, s.params, 1.0)?;
                let x = random::<f32>(k.device, rng, s.params, 1.0)?;
                k.add_assign(&mut acc, &x)
            },
        ),
        case(
            "add_assign bf16".into(),
            |s| (6 * s.params as u64, 0),
            |k, s, rng| {
                let mut acc = random::<bf16>(k.device, rng, s.params, 1.0)?;
                let x = random::<bf16>(k.device, rng, s.params, 1.0)?;
                k.add_assign(&mut acc, &x)
            },
        ),
        grad_norm_case::<f32>(false),
        grad_norm_case::<f32>(true),
        grad_norm_case::<bf16>(false),
        grad_norm_case::<bf16>(true),
        case(
            "adamw f32".into(),
            |s| (28 * s.params as u64, 0),
            |k, s, rng| {
                let (mut p, g) = (
                    random(k.device, rng, s.params, 1.0)?,
                    random(k.device, rng, s.params, 1e-2)?,
                );
                let (mut m, mut v) = (
                    random(k.device, rng, s.params, 1e-2)?,
                    k.device.alloc(s.params)?,
                );
                k.adamw_f32(&mut p, &g, &mut m, &mut v, None, &adamw_step())
            },
        ),
        adamw_bf16_case::<f32, f32>("adamw bf16 with f32 master", true),
        adamw_bf16_case::<f32, f32>("adamw bf16 stochastic rounding", false),
        adamw_bf16_case::<f32, bf16>("adamw bf16, f32 gradients and bf16 moments", false),
        adamw_bf16_case::<bf16, f32>("adamw bf16, bf16 gradients and f32 moments", false),
        adamw_bf16_case::<bf16, bf16>("adamw bf16, bf16 gradients and moments", false),
        // Not counted: the emulator's GEMM is host code. Its bytes are the ideal ones.
        case(
            "gemm bf16 forward".into(),
            move |s| {
                let g = gemm(s);
                (
                    2 * (g.m * g.k + g.k * g.n + g.m * g.n) as u64,
                    2 * (g.m * g.n * g.k) as u64,
                )
            },
            move |k, s, rng| {
                let g = gemm(s);
                let a = random::<bf16>(k.device, rng, g.m * g.k, 1.0)?;
                let b = random::<bf16>(k.device, rng, g.k * g.n, 1.0)?;
                let mut c = k.device.alloc::<bf16>(g.m * g.n)?;
                k.device.gemm(&g, &a, &b, &mut c)
            },
        ),
    ]
}

/// The gradient norm of `E` gradients (each read once) after a micro-batch's loss was checked
/// for the step's drop (8 bytes read), or with `clip` their scaling by the clip factor (each
/// read and written once; the norm computed outside the count).
fn grad_norm_case<E: Float>(clip: bool) -> Case {
    let e = size::<E>();
    let what = if clip { "clip" } else { "norm" };
    case(
        format!("grad_norm {what} {}", E::DTYPE),
        move |s| match clip {
            true => (2 * e * s.params as u64, 0),
            false => (e * s.params as u64 + 8, 0),
        },
        move |k, s, rng| {
            let g = random::<E>(k.device, rng, s.params, 1.0)?;
            let ws = uncounted(|| k.grad_norm_workspace(&[g.view()]))?;
            if !clip {
                let loss = uncounted(|| k.device.upload(&[0.5f64]))?;
                k.flag_nonfinite(&loss, &ws)?;
                return k.grad_norm(&ws, 1e-3).map(drop);
            }
            uncounted(|| k.grad_norm(&ws, 1e-3))?;
            k.clip(&ws)
        },
    )
}

fn adamw_step() -> AdamWStep {
    let config = AdamWConfig {
        betas: (0.9, 0.95),
        eps: 1e-8,
        weight_decay: 0.1,
    };
    AdamWStep::new(&config, 3, 1e-4, 7)
}

/// Every op of `ops`, then those of `extra`.
pub fn cases(extra: Vec<Case>) -> Vec<Case> {
    let mut cases = element_cases::<f32>();
    cases.extend(element_cases::<bf16>());
    cases.extend(scoring_cases());
    cases.extend(moe_cases());
    cases.push(expert_gemm_case::<bf16, bf16>(ExpertGemm::Forward));
    cases.push(expert_gemm_case::<bf16, bf16>(ExpertGemm::InputGrad));
    let accumulate = ExpertGemm::WeightGrad(GradWrite::Accumulate);
    cases.push(expert_gemm_case::<bf16, f32>(accumulate));
    cases.push(expert_gemm_case::<bf16, bf16>(accumulate));
    cases.push(expert_gemm_case::<bf16, bf16>(ExpertGemm::WeightGrad(
        GradWrite::Overwrite,
    )));
    cases.push(expert_gemm_case::<f32, f32>(ExpertGemm::Forward));
    cases.push(expert_gemm_case::<f32, f32>(ExpertGemm::InputGrad));
    cases.push(expert_gemm_case::<f32, f32>(accumulate));
    cases.extend(other_cases());
    cases.extend(extra);
    cases
}

/// Every op of `ops` once at `shapes`, then those of `extra`, on the emulator, with the probe
/// counting.
pub fn profile(
    device: &Device,
    shapes: &Shapes,
    seed: u64,
    extra: Vec<Case>,
) -> Result<Vec<OpProfile>> {
    profile_cases(device, shapes, seed, &cases(extra))
}

/// `cases` once each at `shapes`, on the emulator, with the probe counting.
pub fn profile_cases(
    device: &Device,
    shapes: &Shapes,
    seed: u64,
    cases: &[Case],
) -> Result<Vec<OpProfile>> {
    ensure!(
        matches!(device, Device::Emu),
        "the profile counts memory traffic in the emulator: use --device emu"
    );
    let k = Kernels::new(device);
    let rng = &mut StdRng::seed_from_u64(seed);
    let big = Shapes::mistral_7b();
    let mut out = Vec::new();
    for c in cases {
        let (result, records) = emu::probed(
            Probe {
                count: true,
                racecheck: false,
            },
            || (c.run)(&k, shapes, rng),
        );
        result?;
        // Kernels only: a memset of the op's accumulators is the step model's to price.
        let records: Vec<LaunchRecord> = records
            .into_iter()
            .filter(|r| r.kernel != emu::MEMSET)
            .collect();
        let mut traffic = Traffic::default();
        for r in &records {
            traffic.add(&r.traffic);
        }
        let mut kernels: Vec<String> = records.iter().map(|r| r.kernel.clone()).collect();
        kernels.sort_unstable();
        kernels.dedup();
        let (ideal_bytes, flops) = (c.ideal)(shapes);
        let (ideal_bytes_7b, flops_7b) = (c.ideal)(&big);
        out.push(OpProfile {
            op: c.op.clone(),
            launches: records.len(),
            kernels,
            ideal_bytes,
            ideal_bytes_7b,
            flops,
            flops_7b,
            traffic,
            counted: records.iter().all(|r| r.counted),
            exception: c.exception,
            math: c.math,
        });
    }
    Ok(out)
}

/// The profile as a Markdown table, with the modeled times at Mistral-7B's shapes on `gpus`.
pub fn table(rows: &[OpProfile], shapes: &Shapes, gpus: &[Gpu]) -> String {
    let figures: Vec<String> = gpus.iter().map(Gpu::describe).collect();
    let mut out = format!(
        "Counted by the emulator's probe at {} tokens (d {}, ffn {}, {} heads of {}, {} \
         optimizer elements); times are the roofline model at Mistral-7B's shapes ({} tokens, \
         50M optimizer elements), extrapolated with each op's counted/ideal ratio, on {}; an \
         f32 op's FLOPs at the fp32 peak of the CUDA cores ({}: the f32 paths check the \
         engine, they are not its fast path). A model, not a measurement.\n\n",
        shapes.tokens,
        shapes.d,
        shapes.ffn,
        shapes.heads,
        shapes.head_dim,
        shapes.params,
        Shapes::mistral_7b().tokens,
        figures.join(" and "),
        gpus.iter()
            .map(|g| format!("{} {} TFLOP/s", g.name, g.f32_flops / 1e12))
            .collect::<Vec<_>>()
            .join(", ")
    );
    out.push_str(&table_header(
        &[
            ("op", ":--"),
            ("launches", "--:"),
            ("ideal bytes", "--:"),
            ("counted bytes", "--:"),
            ("counted/ideal", "--:"),
            ("coalescing", "--:"),
            ("accesses by width (1/2/4/8/16 B)", ":--"),
        ],
        gpus,
        "µs (7B)",
        ("note", ":--"),
    ));
    for r in rows {
        let widths = r.traffic.accesses_by_width;
        let (counted, ratio, coalescing, widths) = if r.counted {
            (
                r.bytes().to_string(),
                format!("{:.3}", r.bytes_over_ideal()),
                format!("{:.3}", r.traffic.coalescing()),
                format!(
                    "{}/{}/{}/{}/{}",
                    widths[0], widths[1], widths[2], widths[3], widths[4]
                ),
            )
        } else {
            ("(ideal)".into(), "-".into(), "-".into(), "-".into())
        };
        out.push_str(&format!(
            "| {} | {} | {} | {counted} | {ratio} | {coalescing} | {widths} |",
            r.op, r.launches, r.ideal_bytes
        ));
        for gpu in gpus {
            let micros = gpu.seconds_on(r.bytes_7b(), r.flops_7b as f64, r.math) * 1e6;
            out.push_str(&format!(" {micros:.1} |"));
        }
        let note = match (r.accepted(), r.exception) {
            (false, _) => "MISSES the targets",
            (true, Some(why)) => why,
            (true, None) => "",
        };
        out.push_str(&format!(" {note} |\n"));
    }
    out
}
