"""The attention baseline: PyTorch SDPA (the flash backend on a GPU), forward and backward.

As transformers 5.17's Mistral runs it (sdpa_attention_forward in
transformers/integrations/sdpa_attention.py: key/value heads repeated to the query heads,
`scaled_dot_product_attention(..., is_causal=True)`). A plain causal stream is one sequence;
contralign's packed group (one prompt, K responses that see the prompt and themselves) has no
SDPA mask of its own, so, as TRL's padded batches do, it runs as K sequences of prompt +
response, the prompt computed K times.
"""

import json
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import bounded, compare, dtype_of, emit, parser, timed


def attend(q, k, v):
    """q [B, T, H, hd], k, v [B, T, KV, hd] -> [B, T, H, hd], causal."""
    rep = q.shape[2] // k.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def packed_sequences(tokens, prompt, responses, response_len):
    """Per sequence, the stream positions of prompt + response i of each group."""
    per_group = prompt + responses * response_len
    seqs = []
    for g0 in range(0, tokens - per_group + 1, per_group):
        p = list(range(g0, g0 + prompt))
        for i in range(responses):
            r0 = g0 + prompt + i * response_len
            seqs.append(p + list(range(r0, r0 + response_len)))
    return seqs


def packed_forward(q, k, v, mask, tokens):
    """contralign's packed attention from SDPA over the K sequences of each group: each
    response's rows from its own sequence, the prompt's rows from the group's first."""
    seqs = packed_sequences(tokens, mask["prompt"], mask["responses"], mask["response_len"])
    idx = torch.tensor(seqs, device=q.device)
    out = attend(q[idx], k[idx], v[idx])
    placed = torch.zeros_like(q)
    prompt = mask["prompt"]
    for s, (positions, o) in enumerate(zip(idx, out)):
        keep = slice(0 if s % mask["responses"] == 0 else prompt, None)
        placed = placed.index_copy(0, positions[keep], o[keep])
    return placed


def check_one(dir, name, device):
    from safetensors.torch import load_file
    t = load_file(os.path.join(dir, f"{name}.safetensors"), device=device)
    meta = json.load(open(os.path.join(dir, f"{name}.json")))
    q, k, v = (t[n].requires_grad_() for n in ("q", "k", "v"))
    with sdpa_kernel(SDPBackend.MATH):
        if meta["mask"] == "causal":
            out = attend(q[None], k[None], v[None])[0]
        else:
            out = packed_forward(q, k, v, meta["mask"]["packed"], meta["tokens"])
    loss = (out.double() * t["dout"].double()).sum()
    loss.backward()
    result = {"loss": compare(f"{name} loss", loss.item(), meta["loss"])}
    for n, grad in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        rel = ((grad - t[n]).norm() / t[n].norm()).item()
        result[n] = bounded(f"{name} {n}, norm", rel)
    return result


def time_case(a, tokens, packed):
    dtype = dtype_of(a.dtype)
    g = torch.Generator(device=a.device).manual_seed(7)
    if packed:
        per = a.prompt + a.response_len
        batch = a.responses * max(tokens // (a.prompt + a.responses * a.response_len), 1)
        shape_q, shape_kv = (batch, per, a.heads, a.head_dim), (batch, per, a.kv_heads, a.head_dim)
    else:
        shape_q, shape_kv = (1, tokens, a.heads, a.head_dim), (1, tokens, a.kv_heads, a.head_dim)
    q, k, v = (torch.randn(s, device=a.device, generator=g).to(dtype).requires_grad_()
               for s in (shape_q, shape_kv, shape_kv))
    dout = torch.randn(shape_q, device=a.device, generator=g).to(dtype)
    backend = SDPBackend.FLASH_ATTENTION if torch.device(a.device).type == "cuda" \
        else SDPBackend.MATH
    with sdpa_kernel(backend):
        def forward():
            with torch.no_grad():
                attend(q, k, v)
        fwd, n = timed(forward, a.device, a.reps, a.budget_s / 4)
        out = attend(q, k, v)
        bwd, m = timed(lambda: out.backward(dout, retain_graph=True), a.device, a.reps,
                       a.budget_s / 4)
    return {"mask": "packed" if packed else "causal", "tokens": tokens,
            "sequences": shape_q[0], "sequence_len": shape_q[1],
            "backend": backend.name.lower(), "forward_ms": fwd * 1e3,
            "backward_ms": bwd * 1e3, "reps": [n, m]}


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4352, help="a causal stream and a packed "
                   "one of as many whole groups as fit (one group: 512 + 8 x 256 = 2560)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--responses", type=int, default=8)
    p.add_argument("--response-len", type=int, default=256)
    a = p.parse_args()
    result = {"row": "attention", "baseline": "torch sdpa (transformers 5.17 sdpa_attention)"}
    if a.check:
        result["check"] = {}
        for mask in ("causal", "packed"):
            for n, c in check_one(a.check, f"attention-{mask}-{a.tokens}", a.device).items():
                result["check"][f"{mask} {n}"] = c
    result["cases"] = [time_case(a, a.tokens, packed) for packed in (False, True)]
    emit(result, a.out)


if __name__ == "__main__":
    main()
