"""The MoE layer's baseline: transformers 5.17's MixtralSparseMoeBlock (the router's top-2
and its experts, transformers/models/mixtral/modeling_mixtral.py) at Mixtral-8x7B's shapes,
forward and backward on random tokens, random weights. The experts run as a Mixtral model runs
them by default (`experts_implementation="grouped_mm"`, PyTorch's grouped GEMM where it can
dispatch, transformers' per-expert fallback elsewhere), or as `--experts-implementation eager`
says (a loop over the experts).

With --check DIR (a `contralign bench moe --dump DIR`) the block is loaded with contralign's
router and experts (gate and up concatenated into gate_up_proj, as transformers stores them)
and run in fp32 on its x and dy: the output, the input gradient and the loss sum(out * dy)
are compared with contralign's.
"""

import json
import os

import torch

from common import bounded, compare, dtype_of, emit, parser, timed

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
MIXTRAL = os.path.join(ROOT, "examples", "configs", "mixtral-8x7b-v0.1.json")


def config_of(path, implementation, **dims):
    from transformers import AutoConfig
    cfg = {k: v for k, v in json.load(open(path)).items()
           if k not in ("architectures", "transformers_version")}
    cfg = AutoConfig.for_model(**{**cfg, **dims})
    # Said outright: a standalone block has no implementation set (a model's from_pretrained
    # picks grouped_mm) and warns.
    cfg._experts_implementation = implementation
    return cfg


def relative(ours, theirs):
    """The largest difference over the largest magnitude of contralign's tensor."""
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30)).item()


def check(dir, config, implementation, device):
    from safetensors.torch import load_file
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    t = load_file(os.path.join(dir, "moe.safetensors"), device=device)
    meta = json.load(open(os.path.join(dir, "moe.json")))
    cfg = config_of(config, implementation, hidden_size=meta["dim"], intermediate_size=meta["ffn"],
                    num_local_experts=meta["experts"], num_experts_per_tok=meta["top_k"])
    with torch.device(device):
        block = MixtralSparseMoeBlock(cfg).float()
    with torch.no_grad():
        block.gate.weight.copy_(t["router"])
        block.experts.gate_up_proj.copy_(torch.cat([t["gate"], t["up"]], dim=1))
        block.experts.down_proj.copy_(t["down"])
    x = t["x"][None].clone().requires_grad_()
    out = block(x)
    out = (out[0] if isinstance(out, tuple) else out)[0]
    (out * t["dy"]).sum().backward()
    loss = (out.detach().double() * t["dy"].double()).sum().item()
    return {"loss": compare("moe loss sum(out * dy)", loss, meta["loss"]),
            "out": bounded("moe output, largest", relative(out.detach(), t["out"])),
            "dx": bounded("moe input gradient, largest", relative(x.grad[0], t["dx"]))}


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--config", default=MIXTRAL)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--experts-implementation", choices=("grouped_mm", "eager"),
                   default="grouped_mm")
    a = p.parse_args()
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    implementation = a.experts_implementation
    checked = check(a.check, a.config, implementation, a.device) if a.check else None
    cfg = config_of(a.config, implementation)
    torch.manual_seed(0)
    dtype = dtype_of(a.dtype)
    with torch.device(a.device):
        block = MixtralSparseMoeBlock(cfg).to(dtype)
        for w in block.parameters():
            torch.nn.init.normal_(w, std=cfg.initializer_range)
        x = torch.randn(1, a.tokens, cfg.hidden_size, dtype=dtype).requires_grad_()
        dout = torch.randn(1, a.tokens, cfg.hidden_size, dtype=dtype)

    def out_of(y):
        return y[0] if isinstance(y, tuple) else y

    def forward():
        with torch.no_grad():
            block(x)

    def forward_backward():
        out_of(block(x)).backward(dout)

    fwd, n = timed(forward, a.device, a.reps, a.budget_s / 2)
    both, m = timed(forward_backward, a.device, a.reps, a.budget_s / 2)
    result = {"row": "moe",
              "baseline": f"transformers MixtralSparseMoeBlock, experts {implementation}",
              "tokens": a.tokens, "dtype": a.dtype, "forward_ms": fwd * 1e3,
              "forward_backward_ms": both * 1e3, "reps": [n, m]}
    if checked:
        result["check"] = checked
    emit(result, a.out)


if __name__ == "__main__":
    main()
