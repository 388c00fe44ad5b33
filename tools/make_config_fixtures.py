#!/usr/bin/env python3
"""Golden fixtures for Mistral/Mixtral configurations the two tiny fixtures do not exercise.

Writes `tests/fixtures/configs/NAME/` for each fixture below: the checkpoint as HF
transformers' `save_pretrained` writes it (config.json, safetensors, generation_config.json),
`data.jsonl` (pre-tokenized reward groups, the format of tests/fixtures/README.md) and
`golden.safetensors` (all F64):

    logits.G.R   [T, V]  logits of group G, response R, over the whole prompt+response
    stats        [N, 4]  S, n, A, E per response in file order (E = nan without a final EOS)

How it was run (by hand, from the crate root; not part of CI — `cargo test` only reads the
files it wrote):

    /tmp/hfenv/bin/python tools/make_config_fixtures.py

in a virtual environment with Python 3.11.7, torch 2.15.0 (run on CPU), transformers 5.23.0,
safetensors 0.8.0 and numpy 2.4.6. The script prints the versions it runs with; with other
versions, regenerate and review the diff. Everything is seeded, so a rerun with the same
versions rewrites the same bytes (checked).

The golden is transformers itself: `MistralForCausalLM` / `MixtralForCausalLM` reloaded from
the saved directory with `from_pretrained`, cast with `.double()` (exact for f32, bf16 and
f16 storage, so the golden sees the very weights our loader reads), eager attention, one
sequence per forward. transformers drops to float32 in four places even in a float64 model
(RMSNorm variance, RoPE inv_freq/cos/sin, the eager attention softmax `dtype=torch.float32`,
the Mixtral router softmax `.float()`); while the golden is computed those four are replaced
by the same formulas kept in float64 (see `float64_everywhere`). The result is then checked
against an independent float64 implementation of docs/model.md (`reference_logits`), which reads
config.json and the safetensors files directly, to ~1e-12; the script stops otherwise.
"""

import contextlib
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import safetensors
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM
import transformers.models.mistral.modeling_mistral as hf_mistral
import transformers.models.mixtral.modeling_mixtral as hf_mixtral

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "configs"
F64 = torch.float64


# --------------------------------------------------------------------------------------------
# transformers in float64 end to end


def _rms_forward(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rope_forward(self, x, position_ids):
    params = self.config.rope_parameters
    assert params["rope_type"] == "default" and self.attention_scaling == 1.0
    cfg = self.config
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=F64) / dim))
    freqs = position_ids[..., None].to(F64) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _eager_for(module_of):
    def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key_states = module_of.repeat_kv(key, module.num_key_value_groups)
        value_states = module_of.repeat_kv(value, module.num_key_value_groups)
        attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        attn_weights = F.softmax(attn_weights, dim=-1)  # in the query's dtype: float64
        attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
        return attn_output, attn_weights

    return eager_attention_forward


def _router_forward(self, hidden_states):
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    router_probs = F.softmax(router_logits, dim=-1)  # float64, no .float()
    top_value, top_index = torch.topk(router_probs, self.top_k, dim=-1)
    top_value = top_value / top_value.sum(dim=-1, keepdim=True)
    return router_logits, top_value, top_index


@contextlib.contextmanager
def float64_everywhere():
    patches = [
        (hf_mistral.MistralRMSNorm, "forward", _rms_forward),
        (hf_mixtral.MixtralRMSNorm, "forward", _rms_forward),
        (hf_mistral.MistralRotaryEmbedding, "forward", _rope_forward),
        (hf_mixtral.MixtralRotaryEmbedding, "forward", _rope_forward),
        (hf_mistral, "eager_attention_forward", _eager_for(hf_mistral)),
        (hf_mixtral, "eager_attention_forward", _eager_for(hf_mixtral)),
        (hf_mixtral.MixtralTopKRouter, "forward", _router_forward),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, new in patches:
        setattr(obj, name, new)
    try:
        yield
    finally:
        for obj, name, old in saved:
            setattr(obj, name, old)


# --------------------------------------------------------------------------------------------
# an independent float64 implementation of docs/model.md, straight from the files on disk


def read_checkpoint(path):
    cfg = json.loads((path / "config.json").read_text())
    weights = {}
    for f in sorted(path.glob("*.safetensors")):
        if f.name == "golden.safetensors":
            continue
        for k, v in load_file(f).items():
            assert k not in weights, k
            weights[k] = v.to(F64)
    return cfg, weights


def rope_theta_of(cfg):
    if cfg.get("rope_parameters"):
        return cfg["rope_parameters"]["rope_theta"]
    return cfg["rope_theta"]


def reference_logits(cfg, w, ids, theta=None, window="config", top_k=None, renormalize=True):
    d, H = cfg["hidden_size"], cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H
    hd = cfg.get("head_dim") or d // H
    eps = cfg["rms_norm_eps"]
    theta = rope_theta_of(cfg) if theta is None else theta
    win = cfg.get("sliding_window") if window == "config" else window
    T = len(ids)
    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    ang = torch.arange(T, dtype=F64)[:, None] * theta ** (-torch.arange(0, hd, 2, dtype=F64) / hd)
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]

    def rope(z):
        a, b = z[..., : hd // 2], z[..., hd // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    def rms(z, g):
        return g * z / torch.sqrt((z * z).mean(-1, keepdim=True) + eps)

    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = j <= i
    if win is not None:
        allowed &= i - win < j
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        a = rms(x, w[p + "input_layernorm.weight"])
        q = rope((a @ w[p + "self_attn.q_proj.weight"].T).view(T, H, hd))
        k = rope((a @ w[p + "self_attn.k_proj.weight"].T).view(T, KV, hd))
        v = (a @ w[p + "self_attn.v_proj.weight"].T).view(T, KV, hd)
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        s = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
        s = s.masked_fill(~allowed, -math.inf)
        o = torch.einsum("hts,shd->thd", torch.softmax(s, -1), v).reshape(T, H * hd)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        b = rms(x, w[p + "post_attention_layernorm.weight"])
        if cfg["model_type"] == "mixtral":
            m = p + "block_sparse_moe."
            probs = torch.softmax(b @ w[m + "gate.weight"].T, -1)
            top, idx = torch.topk(probs, top_k or cfg["num_experts_per_tok"], dim=-1)
            if renormalize:
                top = top / top.sum(-1, keepdim=True)
            out = torch.zeros_like(b)
            for t in range(T):
                for wt, e in zip(top[t], idx[t].tolist()):
                    e_ = f"{m}experts.{e}."
                    hid = F.silu(w[e_ + "w1.weight"] @ b[t]) * (w[e_ + "w3.weight"] @ b[t])
                    out[t] += wt * (w[e_ + "w2.weight"] @ hid)
        else:
            hid = F.silu(b @ w[p + "mlp.gate_proj.weight"].T) * (b @ w[p + "mlp.up_proj.weight"].T)
            out = hid @ w[p + "mlp.down_proj.weight"].T
        x = x + out
    x = rms(x, w["model.norm.weight"])
    lm_head = w["lm_head.weight"] if not cfg.get("tie_word_embeddings") else w["model.embed_tokens.weight"]
    return x @ lm_head.T


# --------------------------------------------------------------------------------------------
# the fixtures

COMMON = dict(vocab_size=64, num_hidden_layers=2, bos_token_id=1, max_position_embeddings=64)

FIXTURES = [
    dict(
        name="mistral-head-dim",
        what="explicit `head_dim` 12 != hidden_size/heads = 8 (Mistral-Nemo style), GQA 4 heads / 2 KV "
        "heads, float32; config.json rewritten hub style (top-level `rope_theta` 1e6, `torch_dtype`)",
        cls=(MistralConfig, MistralForCausalLM),
        config=dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                    intermediate_size=48, sliding_window=None, rms_norm_eps=1e-5, eos_token_id=2,
                    rope_parameters=dict(rope_type="default", rope_theta=1e6)),
        dtype=torch.float32,
        hub_style=True,
        seed=1001,
        groups=[(5, [3, 1, 9, 6]), (2, [4, 7]), (7, [2, 8, 5])],
    ),
    dict(
        name="mistral-tied-bf16",
        what="`tie_word_embeddings: true` (no `lm_head.weight` in the file), bfloat16 storage, MHA "
        "(4 KV heads = 4 heads), `sliding_window` 3 (cuts into every prompt longer than 3); "
        "transformers-5 config (`rope_parameters`, `dtype`)",
        cls=(MistralConfig, MistralForCausalLM),
        config=dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, intermediate_size=48,
                    sliding_window=3, rms_norm_eps=1e-5, eos_token_id=2, tie_word_embeddings=True,
                    rope_parameters=dict(rope_type="default", rope_theta=1e4)),
        dtype=torch.bfloat16,
        hub_style=False,
        seed=1002,
        groups=[(6, [4, 9, 2]), (3, [1, 5]), (7, [8, 3, 6, 4])],
    ),
    dict(
        name="mistral-mqa-f16",
        what="multi-query attention (1 KV head for 4 heads, head_dim 10), float16 storage, "
        "`sliding_window: null`, `rope_parameters.rope_theta` 1e6, `rms_norm_eps` 1e-6, "
        "`eos_token_id: [2, 5]` (responses end in either)",
        cls=(MistralConfig, MistralForCausalLM),
        config=dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=1, intermediate_size=48,
                    sliding_window=None, rms_norm_eps=1e-6, eos_token_id=[2, 5],
                    rope_parameters=dict(rope_type="default", rope_theta=1e6)),
        dtype=torch.float16,
        hub_style=False,
        seed=1003,
        groups=[(4, [5, 2, 9]), (7, [1, 6]), (2, [3, 8, 4, 7])],
    ),
    dict(
        name="mixtral-top1-window",
        what="Mixtral, 3 experts, `num_experts_per_tok` 1 (the renormalised weight is 1), "
        "`sliding_window` 4, float32 sharded into several files with `model.safetensors.index.json`; "
        "config.json rewritten hub style (top-level `rope_theta` 1e6, `torch_dtype`, no `head_dim`, "
        "no `router_jitter_noise`)",
        cls=(MixtralConfig, MixtralForCausalLM),
        config=dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
                    num_local_experts=3, num_experts_per_tok=1, sliding_window=4, rms_norm_eps=1e-5,
                    eos_token_id=2, router_aux_loss_coef=0.02,
                    rope_parameters=dict(rope_type="default", rope_theta=1e6)),
        dtype=torch.float32,
        hub_style=True,
        max_shard_size="40KB",
        seed=1004,
        groups=[(5, [6, 2, 9]), (3, [4, 1, 7, 5]), (7, [3, 8])],
    ),
    dict(
        name="mixtral-top3of5-bf16",
        what="Mixtral, 5 experts, top-3, bfloat16 storage, d=48 (head_dim 12 from the quotient), "
        "no window; transformers-5 config (`rope_parameters.rope_theta` 5e5, `dtype`)",
        cls=(MixtralConfig, MixtralForCausalLM),
        config=dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, intermediate_size=24,
                    num_local_experts=5, num_experts_per_tok=3, sliding_window=None, rms_norm_eps=1e-5,
                    eos_token_id=2, router_aux_loss_coef=0.02,
                    rope_parameters=dict(rope_type="default", rope_theta=5e5)),
        dtype=torch.bfloat16,
        hub_style=False,
        seed=1005,
        groups=[(4, [7, 3, 1]), (6, [5, 9]), (2, [2, 6, 8, 4])],
    ),
]


def reinit(model, seed):
    """Norm weights 1 + 0.2·N(0,1), everything else 0.08·N(0,1), so a missing op shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied lm_head is the embedding: listed once
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.08 * noise)


def hub_style(path, theta):
    """Rewrites config.json as hub checkpoints spell it: top-level rope_theta, torch_dtype."""
    cfg = json.loads((path / "config.json").read_text())
    out = {}
    for k, v in cfg.items():
        if k == "rope_parameters":
            assert v == {"rope_type": "default", "rope_theta": theta}, v
            continue
        if k == "dtype":
            k = "torch_dtype"
        if v is None and k == "head_dim":
            continue
        if k == "router_jitter_noise":
            assert v == 0.0
            continue
        out[k] = v
    out["rope_theta"] = theta
    (path / "config.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")


def make_data(rng, vocab, eos_ids, groups):
    """Groups of (prompt length, response lengths); in each group with K > 2 the last response
    is truncated (no final EOS), the others end with an EOS id (cycling through the list)."""
    ordinary = [t for t in range(3, vocab) if t not in eos_ids]
    lines, e = [], 0
    for plen, rlens in groups:
        prompt = [1] + rng.choice(ordinary, plen - 1).tolist()
        responses = []
        for r, rlen in enumerate(rlens):
            truncated = len(rlens) > 2 and r == len(rlens) - 1
            body = rng.choice(ordinary, rlen if truncated else rlen - 1).tolist()
            if not truncated:
                body.append(eos_ids[e % len(eos_ids)])
                e += 1
            responses.append(body)
        rewards = (rng.integers(0, 6, len(rlens)) / 2.0).tolist()
        if len(set(rewards)) == len(rewards):  # make sure every group has a tie
            rewards[-1] = rewards[0]
        lines.append(dict(prompt_ids=prompt, response_ids=responses, rewards=rewards))
    return lines


def build(fx):
    path = OUT / fx["name"]
    if path.exists():
        shutil.rmtree(path)
    cfg_cls, model_cls = fx["cls"]
    torch.manual_seed(fx["seed"])
    config = cfg_cls(**COMMON, **fx["config"], attn_implementation="eager")
    model = model_cls(config)
    reinit(model, fx["seed"])
    model = model.to(fx["dtype"])
    model.save_pretrained(path, max_shard_size=fx.get("max_shard_size", "50GB"))
    theta = fx["config"]["rope_parameters"]["rope_theta"]
    if fx["hub_style"]:
        hub_style(path, theta)
    written = json.loads((path / "config.json").read_text())
    print(f"== {fx['name']}: config.json\n{json.dumps(written, sort_keys=True)}")

    # The golden: transformers reloads what it wrote, upcast exactly to float64.
    # Mixtral: the experts' loop of modeling_mixtral (the default grouped_mm path refuses float64).
    extra = dict(experts_implementation="eager") if model_cls is MixtralForCausalLM else {}
    hf = model_cls.from_pretrained(path, attn_implementation="eager", **extra).double().eval()
    assert hf.config.rope_parameters["rope_theta"] == theta, hf.config.rope_parameters
    assert hf.config.sliding_window == fx["config"]["sliding_window"]
    disk_cfg, disk = read_checkpoint(path)
    assert ("lm_head.weight" in disk) != bool(fx["config"].get("tie_word_embeddings")), "lm_head"
    want_dtype = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[fx["dtype"]]
    for f in path.glob("model*.safetensors"):
        with safetensors.safe_open(f, "pt") as st:
            for name in st.keys():
                assert st.get_slice(name).get_dtype() == want_dtype, (f, name)
    hf_state = hf.state_dict()
    # transformers' float64 weights are exactly the stored ones. Mixtral's experts are fused in
    # memory under other names (mlp.experts.gate_up_proj ...): for those, the agreement with
    # reference_logits (which reads the files) below is the check.
    for name, t in disk.items():
        if name in hf_state:
            assert torch.equal(hf_state[name], t), name
    if disk_cfg.get("tie_word_embeddings"):
        assert torch.equal(hf.lm_head.weight, disk["model.embed_tokens.weight"])

    rng = np.random.default_rng(fx["seed"])
    eos_ids = written["eos_token_id"] if isinstance(written["eos_token_id"], list) else [written["eos_token_id"]]
    data = make_data(rng, written["vocab_size"], eos_ids, fx["groups"])
    (path / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in data))

    golden, stats = {}, []
    worst_ref, worst_f32 = 0.0, 0.0
    sens = {}  # how far the logits move if the engine got one thing of the config wrong

    def sensitivity(what, alt, ref, scale):
        sens[what] = max(sens.get(what, 0.0), (alt - ref).norm().item() / scale)
    for g, line in enumerate(data):
        prompt = line["prompt_ids"]
        for r, resp in enumerate(line["response_ids"]):
            ids = prompt + resp
            with torch.no_grad():
                plain = hf(torch.tensor([ids])).logits[0]  # transformers as shipped (f32 drops)
                with float64_everywhere():
                    logits = hf(torch.tensor([ids])).logits[0]
            assert logits.dtype == F64
            ref = reference_logits(disk_cfg, disk, ids)
            scale = logits.norm().item()
            worst_ref = max(worst_ref, (logits - ref).norm().item() / scale)
            worst_f32 = max(worst_f32, (logits - plain).norm().item() / scale)
            if theta != 1e4:
                sensitivity("rope_theta 1e4", reference_logits(disk_cfg, disk, ids, theta=1e4), ref, scale)
            if disk_cfg.get("sliding_window"):
                sensitivity("no window", reference_logits(disk_cfg, disk, ids, window=None), ref, scale)
            if disk_cfg["model_type"] == "mixtral":
                k = disk_cfg["num_experts_per_tok"]
                sensitivity("top-k + 1", reference_logits(disk_cfg, disk, ids, top_k=k + 1), ref, scale)
                sensitivity("no renormalisation", reference_logits(disk_cfg, disk, ids, renormalize=False), ref, scale)
            golden[f"logits.{g}.{r}"] = logits.contiguous()
            logp = torch.log_softmax(logits, dim=-1)
            P = len(prompt)
            lp = [logp[P - 1 + k, tok].item() for k, tok in enumerate(resp)]
            S, n = sum(lp), len(resp)
            E = lp[-1] if resp[-1] in eos_ids else math.nan
            stats.append([S, n, S / n, E])
    assert worst_ref < 1e-12, f"transformers and the float64 reference disagree: {worst_ref:.3e}"
    golden["stats"] = torch.tensor(stats, dtype=F64)
    save_file(golden, path / "golden.safetensors")
    size = sum(f.stat().st_size for f in path.iterdir())
    print(
        f"   transformers vs float64 reference {worst_ref:.1e}; as-shipped (float32 drops) vs "
        f"float64 {worst_f32:.1e}; {len(stats)} responses; {size} bytes\n   logits move if the "
        f"engine misread: " + ", ".join(f"{k} {v:.1e}" for k, v in sens.items())
    )
    return size


def main():
    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, safetensors {safetensors.__version__}, numpy {np.__version__}"
    )
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    total = sum(build(fx) for fx in FIXTURES)
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
