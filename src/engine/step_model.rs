//! A whole training step of the device engine as a roofline model (docs/cuda.md, "The step
//! model"): the emulator counts every launch of one step at small shapes, and the counts are
//! extrapolated by shape to the target's, then priced on an A100 and an H100
//! ([`crate::ops::cuda::roofline::Gpu`]). A model, not a measurement.
//!
//! The small shapes are the target's with its heads, KV heads, hidden size, MLP width and
//! vocabulary divided by one factor (the head dimension kept: attention pads it to 16) and
//! its prompt and response lengths by another. The emulator counts six steps: at those
//! shapes, with the widths doubled and with the lengths doubled, each with one layer and with
//! two. At a fixed layer count the launches of the three runs are the same launches, one for
//! one; each launch's bytes and FLOPs are taken to follow a power of the width and of the
//! length (the exponents read off the doublings), a GEMM's m, n and k each. A step is affine
//! in its layers (per-layer launches repeat, the flat stores grow by a layer's parameters), so
//! the target's `L` layers are `one + (L − 1) · (two − one)`, both extrapolated.

use super::bench::{BenchData, BenchSetup, StepShape};
use crate::config::ModelConfig;
use crate::model::init::random_params;
use crate::ops::cuda::device::Device;
use crate::ops::cuda::emu::{self, GemmShape, LaunchRecord, Probe};
use crate::ops::cuda::roofline::{table_header, Gpu, Math, LAUNCH_FLOOR_S};
use anyhow::{bail, ensure, Context, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::time::Instant;

/// What the small shapes divide the target's by.
#[derive(Clone, Copy, Debug)]
pub struct Divisors {
    /// Heads, KV heads, hidden size, MLP width and vocabulary.
    pub width: usize,
    /// Prompt, response and sliding-window lengths.
    pub length: usize,
}

/// One launch of a counted step: the bytes it moved (counted, or a GEMM's minimum), its
/// FLOPs and, for a GEMM, its shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub kernel: String,
    pub bytes: f64,
    pub flops: f64,
    pub gemm: Option<GemmShape>,
}

impl Launch {
    fn new(r: &LaunchRecord) -> Launch {
        Launch {
            kernel: r.kernel.clone(),
            bytes: r.traffic.dram_bytes() as f64,
            flops: r.traffic.flops as f64,
            gemm: r.gemm,
        }
    }
}

/// The launches of one step of `setup` on the emulator with the probe counting: a model of
/// `cfg` with random weights, after one uncounted step (which makes the engine's arena and
/// pool). The data comes from a stream of its own, so that the one- and two-layer counts see
/// the same token ids: the embedding's bytes follow the distinct ids, and a difference
/// between the two would be multiplied by the target's layers.
pub fn census(cfg: &ModelConfig, setup: &BenchSetup) -> Result<Vec<Launch>> {
    let initial = random_params(cfg, &mut StdRng::seed_from_u64(setup.seed))?;
    let mut data_rng = StdRng::seed_from_u64(setup.seed ^ 0xda7a_da7a_da7a_da7a);
    let data = BenchData::random(&mut data_rng, cfg, &setup.shape, setup.steps);
    let mut trainer = setup.trainer(Device::Emu, cfg, initial, &data)?;
    trainer.step_to_end()?;
    let probe = Probe {
        count: true,
        racecheck: false,
    };
    let (stepped, records) = emu::probed(probe, || trainer.step_to_end());
    stepped?;
    Ok(records.iter().map(Launch::new).collect())
}

/// One kernel's share of a step: launches, bytes, FLOPs and the roofline's seconds on each
/// GPU (each launch priced on its own, then summed), and the same with each launch taking at
/// least [`LAUNCH_FLOOR_S`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelTotals {
    pub launches: f64,
    pub bytes: f64,
    pub flops: f64,
    pub seconds: Vec<f64>,
    pub floored: Vec<f64>,
}

impl KernelTotals {
    fn add(&mut self, launch: &Launch, gpus: &[Gpu], math: Math) {
        self.launches += 1.0;
        self.bytes += launch.bytes;
        self.flops += launch.flops;
        self.seconds.resize(gpus.len(), 0.0);
        self.floored.resize(gpus.len(), 0.0);
        for ((s, f), gpu) in self.seconds.iter_mut().zip(&mut self.floored).zip(gpus) {
            let roofline = gpu.seconds_on(launch.bytes, launch.flops, math);
            *s += roofline;
            *f += roofline.max(LAUNCH_FLOOR_S);
        }
    }

    /// `one + (layers − 1) · (two − one)`, field by field.
    fn affine(one: &KernelTotals, two: &KernelTotals, layers: usize) -> KernelTotals {
        let extra = layers as f64 - 1.0;
        let mix = |a: f64, b: f64| a + extra * (b - a);
        let mix_all = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(&a, &b)| mix(a, b)).collect();
        KernelTotals {
            launches: mix(one.launches, two.launches),
            bytes: mix(one.bytes, two.bytes),
            flops: mix(one.flops, two.flops),
            seconds: mix_all(&one.seconds, &two.seconds),
            floored: mix_all(&one.floored, &two.floored),
        }
    }
}

/// Launches summed by kernel name (GEMMs as `gemm`), their FLOPs on `math`'s units (those of
/// the step's storage type: its GEMMs, attention and experts compute at it).
pub fn totals(launches: &[Launch], gpus: &[Gpu], math: Math) -> BTreeMap<String, KernelTotals> {
    let mut out: BTreeMap<String, KernelTotals> = BTreeMap::new();
    for l in launches {
        out.entry(l.kernel.clone()).or_default().add(l, gpus, math);
    }
    out
}

/// The six counted steps the model is read from: `[one layer, two layers]` at the small
/// shapes, with the widths doubled and with the lengths doubled.
pub struct Censuses {
    pub base: [Vec<Launch>; 2],
    pub wide: [Vec<Launch>; 2],
    pub long: [Vec<Launch>; 2],
}

/// `x0` times `(x_wide / x0)^log2(width)` times `(x_long / x0)^log2(length)`: a power law in
/// each factor through the two doublings.
fn power_law(x0: f64, x_wide: f64, x_long: f64, factors: (f64, f64)) -> Result<f64> {
    if x0 == 0.0 {
        ensure!(
            x_wide == 0.0 && x_long == 0.0,
            "a figure that is 0 at the small shapes grows when they double: no power law"
        );
        return Ok(0.0);
    }
    Ok(x0 * (x_wide / x0).powf(factors.0.log2()) * (x_long / x0).powf(factors.1.log2()))
}

/// The launch at the target's widths and lengths, from the same launch at the small shapes
/// and the two doublings. A GEMM's m, n and k are extrapolated each, and its bytes and FLOPs
/// follow from them.
fn extrapolate_launch(
    base: &Launch,
    wide: &Launch,
    long: &Launch,
    factors: (f64, f64),
) -> Result<Launch> {
    let gemm = match (base.gemm, wide.gemm, long.gemm) {
        (Some(b), Some(w), Some(l)) => {
            let dim = |b: usize, w: usize, l: usize| -> Result<usize> {
                Ok(power_law(b as f64, w as f64, l as f64, factors)?.round() as usize)
            };
            Some(GemmShape {
                m: dim(b.m, w.m, l.m)?,
                n: dim(b.n, w.n, l.n)?,
                k: dim(b.k, w.k, l.k)?,
                ..b
            })
        }
        (None, None, None) => None,
        _ => bail!("`{}` is a GEMM in one run and not in another", base.kernel),
    };
    Ok(match gemm {
        Some(g) => {
            let (read, write) = g.min_bytes();
            Launch {
                kernel: base.kernel.clone(),
                bytes: (read + write) as f64,
                flops: g.flops() as f64,
                gemm: Some(g),
            }
        }
        None => Launch {
            kernel: base.kernel.clone(),
            bytes: power_law(base.bytes, wide.bytes, long.bytes, factors)?,
            flops: power_law(base.flops, wide.flops, long.flops, factors)?,
            gemm: None,
        },
    })
}

/// The step at the target: every launch of the small step extrapolated by `divisors`, one
/// layer and two combined into `layers`, summed by kernel and priced on `gpus`.
pub fn extrapolate(
    censuses: &Censuses,
    divisors: Divisors,
    layers: usize,
    gpus: &[Gpu],
    math: Math,
) -> Result<BTreeMap<String, KernelTotals>> {
    let factors = (divisors.width as f64, divisors.length as f64);
    let mut at_target = Vec::new();
    for l in 0..2 {
        let (base, wide, long) = (&censuses.base[l], &censuses.wide[l], &censuses.long[l]);
        ensure!(
            base.len() == wide.len() && base.len() == long.len(),
            "the step at {} layer(s) makes {} launches at the small shapes, {} with the widths \
             doubled and {} with the lengths doubled: the step model needs the same launches \
             at every shape",
            l + 1,
            base.len(),
            wide.len(),
            long.len()
        );
        let mut launches = Vec::with_capacity(base.len());
        for (i, ((b, w), g)) in base.iter().zip(wide).zip(long).enumerate() {
            ensure!(
                b.kernel == w.kernel && b.kernel == g.kernel,
                "launch {i} of the step at {} layer(s) is `{}` at the small shapes, `{}` with \
                 the widths doubled and `{}` with the lengths doubled",
                l + 1,
                b.kernel,
                w.kernel,
                g.kernel
            );
            launches.push(
                extrapolate_launch(b, w, g, factors)
                    .with_context(|| format!("launch {i} (`{}`)", b.kernel))?,
            );
        }
        at_target.push(totals(&launches, gpus, math));
    }
    let names: std::collections::BTreeSet<&String> =
        at_target.iter().flat_map(|t| t.keys()).collect();
    // A kernel that one layer count does not launch: none of it there.
    let empty = KernelTotals {
        seconds: vec![0.0; gpus.len()],
        floored: vec![0.0; gpus.len()],
        ..KernelTotals::default()
    };
    names
        .into_iter()
        .map(|name| {
            let one = at_target[0].get(name).unwrap_or(&empty);
            let two = at_target[1].get(name).unwrap_or(&empty);
            let t = KernelTotals::affine(one, two, layers);
            ensure!(
                t.bytes >= 0.0 && t.flops >= 0.0,
                "`{name}` extrapolates to {} bytes and {} FLOPs at {layers} layers: its two-layer \
                 count is below its one-layer count, which a step affine in its layers cannot be",
                t.bytes,
                t.flops
            );
            Ok((name.clone(), t))
        })
        .collect()
}

/// `cfg` and `shape` with widths times `width_mult / divisors.width`, lengths times
/// `length_mult / divisors.length`, and `layers` layers.
pub fn shrink(
    cfg: &ModelConfig,
    shape: &StepShape,
    divisors: Divisors,
    (width_mult, length_mult): (usize, usize),
    layers: usize,
) -> Result<(ModelConfig, StepShape)> {
    ensure!(
        cfg.moe.is_none(),
        "the step model needs a dense (Mistral) config: a mixture of experts' launches depend \
         on its routing, which differs from shape to shape"
    );
    ensure!(
        divisors.width >= 1 && divisors.length >= 1,
        "the divisors must be positive"
    );
    let divide = |what: &str, n: usize, d: usize, mult: usize| -> Result<usize> {
        ensure!(
            n.is_multiple_of(d),
            "{what} ({n}) is not a multiple of the divisor {d}"
        );
        Ok(n / d * mult)
    };
    let (w, l) = (divisors.width, divisors.length);
    let heads = divide("num_attention_heads", cfg.num_heads, w, width_mult)?;
    let kv_heads = divide("num_key_value_heads", cfg.num_kv_heads, w, width_mult)?;
    let hidden = divide("hidden_size", cfg.hidden_size, w, width_mult)?;
    let ffn = divide("intermediate_size", cfg.intermediate_size, w, width_mult)?;
    let vocab = divide("vocab_size", cfg.vocab_size, w, width_mult)?;
    let mut raw = cfg.raw.clone();
    raw["num_attention_heads"] = heads.into();
    raw["num_key_value_heads"] = kv_heads.into();
    raw["hidden_size"] = hidden.into();
    raw["intermediate_size"] = ffn.into();
    raw["vocab_size"] = vocab.into();
    raw["head_dim"] = cfg.head_dim.into();
    raw["num_hidden_layers"] = layers.into();
    if let Some(window) = cfg.sliding_window {
        raw["sliding_window"] = (window.div_ceil(l) * length_mult).into();
    }
    let small = ModelConfig::from_json(raw).context("the step model's small config")?;
    let shape = StepShape {
        prompt: divide("--prompt", shape.prompt, l, length_mult)?,
        response_len: divide("--response-len", shape.response_len, l, length_mult)?,
        ..*shape
    };
    Ok((small, shape))
}

/// The six censuses of `target` at `shape`, in parallel threads, with a line on stderr as
/// each ends.
pub fn count_steps(
    target: &ModelConfig,
    setup: &BenchSetup,
    divisors: Divisors,
) -> Result<Censuses> {
    let runs: Vec<((usize, usize), usize)> = [(1, 1), (2, 1), (1, 2)]
        .into_iter()
        .flat_map(|m| [(m, 1), (m, 2)])
        .collect();
    let mut jobs = Vec::new();
    for &(mults, layers) in &runs {
        let (cfg, shape) = shrink(target, &setup.shape, divisors, mults, layers)?;
        let setup = BenchSetup {
            shape,
            spec: setup.spec.clone(),
            ..*setup
        };
        jobs.push((cfg, setup));
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // A work queue, the costliest runs first (the widths doubled cost most, then the lengths,
    // then a second layer), so that no thread waits on a long run started last.
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse((runs[i].0 .0 * 4 + runs[i].0 .1 * 2) * runs[i].1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let start = Instant::now();
    let results: Vec<std::sync::Mutex<Option<Result<Vec<Launch>>>>> = (0..jobs.len())
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    std::thread::scope(|scope| {
        for _ in 0..threads.min(jobs.len()) {
            scope.spawn(|| loop {
                let taken = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&i) = order.get(taken) else { break };
                let (cfg, setup) = &jobs[i];
                let counted =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| census(cfg, setup)))
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a census panicked")));
                eprintln!(
                    "step model: counted {} layer(s), d {}, {} tokens in {:.0} s",
                    cfg.num_layers,
                    cfg.hidden_size,
                    setup.shape.tokens(),
                    start.elapsed().as_secs_f64()
                );
                *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(counted);
            });
        }
    });
    let mut counted = results.into_iter().map(|r| {
        r.into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .expect("every job ran")
    });
    let mut next_pair = || -> Result<[Vec<Launch>; 2]> {
        let one = counted.next().expect("six runs")?;
        let two = counted.next().expect("six runs")?;
        Ok([one, two])
    };
    Ok(Censuses {
        base: next_pair()?,
        wide: next_pair()?,
        long: next_pair()?,
    })
}

/// Query-key pairs that attention computes in one group of `shape` under a sliding `window`:
/// each prompt token sees the prompt up to itself, each response token the prompt and its own
/// response up to itself, at most `window` keys back.
pub fn visible_pairs(shape: &StepShape, window: Option<usize>) -> usize {
    let limit = |keys: usize| window.map_or(keys, |w| keys.min(w));
    let prompt: usize = (1..=shape.prompt).map(limit).sum();
    let response: usize = (1..=shape.response_len)
        .map(|j| limit(shape.prompt + j))
        .sum();
    shape.groups * (prompt + shape.responses * response)
}

/// The modeled step as a Markdown table, the kernels by their time on the last GPU, with the
/// step's modeled time, tokens/s and model-FLOPs utilization on each GPU.
pub fn report(
    target: &ModelConfig,
    shape: &StepShape,
    divisors: Divisors,
    rows: &BTreeMap<String, KernelTotals>,
    gpus: &[Gpu],
) -> String {
    let tokens = shape.tokens();
    let mut out = format!(
        "Modeled training step: {} layers, d {}, ffn {}, {} heads ({} KV) of {}, vocabulary {}; \
         {} group(s) of a {}-token prompt and {} responses of {} ({} tokens). Read from six \
         steps counted by the emulator at widths / {} and lengths / {} (one and two layers, \
         and each doubling), extrapolated by shape. Each launch is priced at its roofline (FLOPs at the \
         peak of the step's storage type, the tensor cores' for bf16; no launch overhead or \
         latency in the table): a bound that no GPU reaches. A model, not a \
         measurement.\n\n",
        target.num_layers,
        target.hidden_size,
        target.intermediate_size,
        target.num_heads,
        target.num_kv_heads,
        target.head_dim,
        target.vocab_size,
        shape.groups,
        shape.prompt,
        shape.responses,
        shape.response_len,
        tokens,
        divisors.width,
        divisors.length,
    );
    let last = gpus.len().saturating_sub(1);
    let mut sorted: Vec<(&String, &KernelTotals)> = rows.iter().collect();
    sorted.sort_by(|a, b| {
        let time = |t: &KernelTotals| t.seconds.get(last).copied().unwrap_or(0.0);
        time(b.1).total_cmp(&time(a.1))
    });
    let step_sum = |field: fn(&KernelTotals) -> &Vec<f64>| -> Vec<f64> {
        (0..gpus.len())
            .map(|i| {
                rows.values()
                    .map(|t| field(t).get(i).copied().unwrap_or(0.0))
                    .sum()
            })
            .collect()
    };
    let step_seconds = step_sum(|t| &t.seconds);
    let step_floored = step_sum(|t| &t.floored);
    out.push_str(&table_header(
        &[
            ("kernel", ":--"),
            ("launches", "--:"),
            ("GB moved", "--:"),
            ("TFLOP", "--:"),
        ],
        gpus,
        "ms",
        ("share", "--:"),
    ));
    let mut line = |name: &str, t: &KernelTotals| {
        out.push_str(&format!(
            "| {name} | {:.0} | {:.2} | {:.2} |",
            t.launches,
            t.bytes / 1e9,
            t.flops / 1e12
        ));
        for s in &t.seconds {
            out.push_str(&format!(" {:.2} |", s * 1e3));
        }
        let share = t.seconds.get(last).copied().unwrap_or(0.0) / step_seconds[last];
        out.push_str(&format!(" {:.1}% |\n", 100.0 * share));
    };
    for (name, t) in &sorted {
        line(name, t);
    }
    let all = KernelTotals {
        launches: rows.values().map(|t| t.launches).sum(),
        bytes: rows.values().map(|t| t.bytes).sum(),
        flops: rows.values().map(|t| t.flops).sum(),
        seconds: step_seconds.clone(),
        floored: step_floored.clone(),
    };
    line("**step**", &all);
    let pairs = visible_pairs(shape, target.sliding_window);
    let model_flops = super::bench::model_flops(target, tokens, pairs);
    out.push('\n');
    for ((gpu, s), floored) in gpus.iter().zip(&step_seconds).zip(&step_floored) {
        out.push_str(&format!(
            "- {}: {:.1} ms a step, {:.0} tokens/s, {:.1} model TFLOP/s ({:.1}% of the {:.0} \
             TFLOP/s bf16 peak); with each launch taking at least {:.0} µs (an assumed launch \
             cost, not a measurement): {:.1} ms, {:.0} tokens/s, {:.1}% of the peak.\n",
            gpu.describe(),
            s * 1e3,
            tokens as f64 / s,
            model_flops / s / 1e12,
            100.0 * model_flops / s / gpu.bf16_flops,
            gpu.bf16_flops / 1e12,
            LAUNCH_FLOOR_S * 1e6,
            floored * 1e3,
            tokens as f64 / floored,
            100.0 * model_flops / floored / gpu.bf16_flops,
        ));
    }
    out.push_str(&format!(
        "- Model FLOPs of the step ({:.1} TFLOP: 6 per parameter per token and attention's \
         pairs) against the counted FLOPs ({:.1} TFLOP, recompute and padding included).\n",
        model_flops / 1e12,
        all.flops / 1e12
    ));
    out
}
