//! The activations of a training step, read off the model's forward and backward
//! (`model::layer::forward_with` and `backward`, `Model::loss_and_grads`), and which of them
//! each recompute policy keeps.
//!
//! Notation: `T` tokens of the micro-batch, `d` hidden size, `qw = heads · head_dim`,
//! `kvw = kv_heads · head_dim`, `H` heads, `I` intermediate size, `E` experts, `k` experts
//! per token, `a` bytes of an activation (2 in bf16, 4 in f32). Statistics (RMSNorm's
//! `rstd`, attention's log-sum-exp, router probabilities) are fp32 whatever `a` is.
//! Activation gradients are stored like activations (`a` bytes). A dense layer's MLP runs
//! over `T` rows; a top-k MoE layer's experts together run over exactly `T · k` rows (every
//! token goes to k distinct experts), one buffer sorted by expert with each expert's rows a
//! contiguous view.

use super::{Category, RecomputePolicy, Regions};
use crate::config::ModelConfig;
use anyhow::Result;

/// One per-layer tensor of the forward pass.
struct LayerTensor {
    name: &'static str,
    rows: usize,
    cols: usize,
    elem_bytes: u64,
    /// The policies under which the forward's value is kept for the backward; under the
    /// others the backward recomputes it into the recompute workspace.
    kept_by: &'static [RecomputePolicy],
}

const NONE: &[RecomputePolicy] = &[RecomputePolicy::None];
const NONE_SELECTIVE: &[RecomputePolicy] = &[RecomputePolicy::None, RecomputePolicy::Selective];

/// Every tensor one layer's forward produces besides its input `x` (held as the layer
/// input) and its output (the next layer's input):
///
/// | tensor | shape | kept by | why |
/// |---|---|---|---|
/// | `input_rstd`, `normed` | `[T]` f32, `[T, d]` | none | RMSNorm: recomputed from `x` |
/// | `q`, `k`, `v` | `[T, qw]`, `[T, kvw]` ×2 | none, selective | GEMM outputs (q, k after the in-place RoPE) |
/// | `attn`, `lse` | `[T, qw]`, `[T, H]` f32 | none, selective | attention: the most expensive to recompute |
/// | `mid` | `[T, d]` | none, selective | `x + o_proj(attn)`, a GEMM output |
/// | `post_rstd`, `ffn_in` | `[T]` f32, `[T, d]` | none | RMSNorm of `mid` |
/// | dense `gate`, `up` | `[T, I]` ×2 | none, selective | GEMM outputs |
/// | dense `act` | `[T, I]` | none | SwiGLU of gate and up |
/// | MoE `router_probs` | `[T, E]` f32 | none, selective | router GEMM + softmax |
/// | MoE `topk_experts`, `topk_weights` | `[T, k]` u32, f32 | none, selective | the routing |
/// | MoE `dispatch_rows`, `expert_offsets` | `[T·k]`, `[E+1]` u32 | none, selective | rows sorted by expert |
/// | MoE `expert_in` | `[T·k, d]` | none | a gather of `ffn_in` |
/// | MoE `gate`, `up` | `[T·k, I]` ×2 | none, selective | GEMM outputs |
/// | MoE `act` | `[T·k, I]` | none | SwiGLU |
/// | MoE `expert_out` | `[T·k, d]` | none, selective | down GEMM output (its dot with `dy` is the routing weight's gradient) |
///
/// `full` keeps none of them: it recomputes the whole layer from `x`.
fn layer_tensors(cfg: &ModelConfig, t: usize, a: u64) -> Vec<LayerTensor> {
    let (d, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (qw, kvw, h) = (cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.num_heads);
    let tensor = |name, rows, cols, elem_bytes, kept_by| LayerTensor {
        name,
        rows,
        cols,
        elem_bytes,
        kept_by,
    };
    let mut out = vec![
        tensor("input_rstd", t, 1, 4, NONE),
        tensor("normed", t, d, a, NONE),
        tensor("q", t, qw, a, NONE_SELECTIVE),
        tensor("k", t, kvw, a, NONE_SELECTIVE),
        tensor("v", t, kvw, a, NONE_SELECTIVE),
        tensor("attn", t, qw, a, NONE_SELECTIVE),
        tensor("lse", t, h, 4, NONE_SELECTIVE),
        tensor("mid", t, d, a, NONE_SELECTIVE),
        tensor("post_rstd", t, 1, 4, NONE),
        tensor("ffn_in", t, d, a, NONE),
    ];
    match &cfg.moe {
        None => out.extend([
            tensor("gate", t, i, a, NONE_SELECTIVE),
            tensor("up", t, i, a, NONE_SELECTIVE),
            tensor("act", t, i, a, NONE),
        ]),
        Some(moe) => {
            let (e, k) = (moe.num_experts, moe.experts_per_token);
            let rows = t * k;
            out.extend([
                tensor("router_probs", t, e, 4, NONE_SELECTIVE),
                tensor("topk_experts", t, k, 4, NONE_SELECTIVE),
                tensor("topk_weights", t, k, 4, NONE_SELECTIVE),
                tensor("dispatch_rows", rows, 1, 4, NONE_SELECTIVE),
                tensor("expert_offsets", e + 1, 1, 4, NONE_SELECTIVE),
                tensor("expert_in", rows, d, a, NONE),
                tensor("gate", rows, i, a, NONE_SELECTIVE),
                tensor("up", rows, i, a, NONE_SELECTIVE),
                tensor("act", rows, i, a, NONE),
                tensor("expert_out", rows, d, a, NONE_SELECTIVE),
            ]);
        }
    }
    out
}

/// The buffers of one layer's backward, under every policy (read off `layer::backward`):
///
/// - `d_hidden.0`, `d_hidden.1` `[T, d]`: the residual stream's gradient into and out of
///   the layer, swapped from layer to layer (the first also takes the final norm's);
/// - `d_mid` `[T, d]`, and `d_norm_in` `[T, d]`: `dL/dffn_in`, then, once the post-norm's
///   backward has consumed it, `dL/dnormed` (q, k and v's input gradients accumulated into
///   it by GEMMs with beta = 1);
/// - `d_act`, `d_gate`, `d_up` `[R, I]` with `R = T` (dense) or `T·k` (MoE);
/// - MoE: `d_expert_out`, `d_expert_in` `[T·k, d]` (the weighted `dy` rows of each expert,
///   its input gradient before the scatter), `d_router_probs` `[T, E]` f32 and
///   `d_topk_weights` `[T, k]` f32;
/// - attention: `d_attn`, `d_q` `[T, qw]`, `d_k`, `d_v` `[T, kvw]`, and as a
///   FlashAttention-2 backward needs them, `dq_accum` `[T, qw]` f32 (dq summed over key
///   blocks) and `delta` `[T, H]` f32 (the row sums of `dO ∘ O`);
/// - `d_final_normed` `[T, d]`: the head's input gradient, scattered from the logits chunks.
///
/// Sharing one buffer between phases whose lifetimes do not overlap (the MLP's and the
/// attention's gradients) would save up to `3·R·I·a`; the plan keeps them apart (an upper
/// bound).
fn backward_tensors(cfg: &ModelConfig, t: usize, a: u64) -> Vec<(&'static str, usize, usize, u64)> {
    let (d, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (qw, kvw, h) = (cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.num_heads);
    let ffn_rows = t * cfg.moe.as_ref().map_or(1, |m| m.experts_per_token);
    let mut out = vec![
        ("d_hidden.0", t, d, a),
        ("d_hidden.1", t, d, a),
        ("d_mid", t, d, a),
        ("d_norm_in", t, d, a),
        ("d_act", ffn_rows, i, a),
        ("d_gate", ffn_rows, i, a),
        ("d_up", ffn_rows, i, a),
    ];
    if let Some(moe) = &cfg.moe {
        out.extend([
            ("d_expert_out", ffn_rows, d, a),
            ("d_expert_in", ffn_rows, d, a),
            ("d_router_probs", t, moe.num_experts, 4),
            ("d_topk_weights", t, moe.experts_per_token, 4),
        ]);
    }
    out.extend([
        ("d_attn", t, qw, a),
        ("d_q", t, qw, a),
        ("d_k", t, kvw, a),
        ("d_v", t, kvw, a),
        ("dq_accum", t, qw, 4),
        ("delta", t, h, 4),
        ("d_final_normed", t, d, a),
    ]);
    out
}

/// Kept activations and the recompute workspace:
///
/// - kept, every policy: `layer.{l}.input` `[T, d]` for each layer (the embedding's output
///   is layer 0's), `final_hidden` `[T, d]` (the last layer's output), `final_rstd` `[T]`
///   f32 and `final_normed` `[T, d]` (the final norm's output, the LM head's input, read by
///   every logits chunk forward and backward);
/// - kept, per layer: the tensors of [`layer_tensors`] that the policy keeps;
/// - workspace: one copy of the tensors the policy recomputes (one layer at a time; the
///   forward writes them there too) plus [`backward_tensors`].
///
/// A resident reference model's forward runs before the policy's, layer by layer, keeping
/// nothing, in these same regions: it needs none of its own.
pub(super) fn add(
    regions: &mut Regions,
    cfg: &ModelConfig,
    t: usize,
    a: u64,
    policy: RecomputePolicy,
) -> Result<()> {
    let d = cfg.hidden_size;
    let kept = Category::KeptActivations;
    let tensors = layer_tensors(cfg, t, a);
    for l in 0..cfg.num_layers {
        regions.tensor(format!("kept.layer.{l}.input"), kept, &[t, d], a)?;
        for x in tensors.iter().filter(|x| x.kept_by.contains(&policy)) {
            let name = format!("kept.layer.{l}.{}", x.name);
            regions.tensor(name, kept, &[x.rows, x.cols], x.elem_bytes)?;
        }
    }
    regions.tensor("kept.final_hidden".into(), kept, &[t, d], a)?;
    regions.tensor("kept.final_rstd".into(), kept, &[t], 4)?;
    regions.tensor("kept.final_normed".into(), kept, &[t, d], a)?;

    let work = Category::RecomputeWorkspace;
    for x in tensors.iter().filter(|x| !x.kept_by.contains(&policy)) {
        let name = format!("recompute.{}", x.name);
        regions.tensor(name, work, &[x.rows, x.cols], x.elem_bytes)?;
    }
    for (name, rows, cols, elem) in backward_tensors(cfg, t, a) {
        regions.tensor(format!("backward.{name}"), work, &[rows, cols], elem)?;
    }
    Ok(())
}
