"""The attention baseline: PyTorch SDPA (the flash backend on a GPU), forward and backward.

As transformers 5.17's Mistral runs it (sdpa_attention_forward in
transformers/integrations/sdpa_attention.py: without an attention mask and with a head
dimension of at most 256, `scaled_dot_product_attention(..., is_causal=True,
enable_gqa=True)`, the key/value heads shared by their query heads inside the kernel rather
than repeated, `use_gqa_in_sdpa`). A plain causal stream is one sequence;
contralign's packed group (one prompt, K responses that see the prompt and themselves) has no
SDPA mask of its own, so, as TRL's padded batches do, it runs as K sequences of prompt +
response, the prompt computed K times.

The cases are those of `contralign bench attention` with the same flags: every --tokens with
every --mask, a packed case holding as many whole groups as fit (at least one: 512 + 8 x 256
= 2560 tokens at the defaults), tokens outer. --mask and --tokens may each be given several
times: the i-th --mask goes with the i-th --tokens, one process timing what several
contralign invocations do (the GPU suite runs `--mask causal --tokens 2048,8192 --mask packed
--tokens 2560`). Each case reports the tokens of its stream, as contralign does, and with
--check recomputes contralign's dump `attention-MASK-TOKENS` (TOKENS as given).
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import bounded, compare, dtype_of, emit, parser, timed


def attend(q, k, v):
    """q [B, T, H, hd], k, v [B, T, KV, hd] -> [B, T, H, hd], causal."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                          enable_gqa=gqa).transpose(1, 2)


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


def cases(p, a):
    """(mask, tokens as given) in contralign's order: per pairing of --mask and --tokens,
    tokens outer, mask inner."""
    masks = a.mask or [["causal", "packed"]]
    tokens = a.tokens or [[2048, 8192]]
    if len(masks) == 1:
        masks = masks * len(tokens)
    if len(tokens) == 1:
        tokens = tokens * len(masks)
    if len(masks) != len(tokens):
        p.error(f"--mask given {len(masks)} times and --tokens {len(tokens)}: the i-th of "
                "each go together")
    out = []
    for ms, ts in zip(masks, tokens):
        out += [(m, t) for t in ts for m in ms]
    return out


def comma_list(kind, choices=None):
    def parse(text):
        try:
            items = [kind(x) for x in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma list of {kind.__name__}: {text}")
        bad = [x for x in items if (x not in choices if choices else x <= 0)]
        if bad:
            raise argparse.ArgumentTypeError(
                f"{bad[0]}: " + (f"one of {', '.join(choices)}" if choices else
                                 "every stream needs at least one token"))
        return items
    return parse


def time_case(a, mask, tokens, budget_s):
    dtype = dtype_of(a.dtype)
    g = torch.Generator(device=a.device).manual_seed(7)
    packed = mask == "packed"
    if packed:
        per = a.prompt + a.response_len
        groups = max(tokens // (a.prompt + a.responses * a.response_len), 1)
        batch = a.responses * groups
        stream = groups * (a.prompt + a.responses * a.response_len)
        shape_q, shape_kv = (batch, per, a.heads, a.head_dim), (batch, per, a.kv_heads, a.head_dim)
    else:
        stream = tokens
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
        fwd, n = timed(forward, a.device, a.reps, budget_s / 2)
        out = attend(q, k, v)
        bwd, m = timed(lambda: out.backward(dout, retain_graph=True), a.device, a.reps,
                       budget_s / 2)
    return {"mask": mask, "tokens": stream, "requested_tokens": tokens,
            "sequences": shape_q[0], "sequence_len": shape_q[1],
            "backend": backend.name.lower(), "forward_ms": fwd * 1e3,
            "backward_ms": bwd * 1e3, "reps": [n, m]}


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", action="append", type=comma_list(int), help="stream lengths, "
                   "a comma list (default 2048,8192); may be repeated, see --mask")
    p.add_argument("--mask", action="append", type=comma_list(str, ("causal", "packed")),
                   help="causal and/or packed, a comma list (default causal,packed); the i-th "
                   "--mask goes with the i-th --tokens")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--responses", type=int, default=8)
    p.add_argument("--response-len", type=int, default=256)
    a = p.parse_args()
    todo = cases(p, a)
    result = {"row": "attention", "baseline": "torch sdpa (transformers 5.17 sdpa_attention)"}
    if a.check:
        result["check"] = {}
        for mask, tokens in todo:
            name = f"attention-{mask}-{tokens}"
            for n, c in check_one(a.check, name, a.device).items():
                result["check"][f"{mask} {tokens} {n}"] = c
    # --budget-s shared out: each case's forward and backward get their part of it.
    result["cases"] = [time_case(a, mask, tokens, a.budget_s / len(todo))
                       for mask, tokens in todo]
    emit(result, a.out)


if __name__ == "__main__":
    main()
