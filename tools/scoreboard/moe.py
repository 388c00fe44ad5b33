"""The MoE layer's baseline: transformers 5.17's MixtralSparseMoeBlock (the router's top-2
and its loop over experts, transformers/models/mixtral/modeling_mixtral.py) at Mixtral-8x7B's
shapes, forward and backward on random tokens, random weights.
"""

import json
import os

import torch

from common import dtype_of, emit, parser, timed

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
MIXTRAL = os.path.join(ROOT, "examples", "configs", "mixtral-8x7b-v0.1.json")


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--config", default=MIXTRAL)
    p.add_argument("--tokens", type=int, default=4096)
    a = p.parse_args()
    from transformers import AutoConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    cfg = AutoConfig.for_model(**{k: v for k, v in json.load(open(a.config)).items()
                                  if k not in ("architectures", "transformers_version")})
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
    emit({"row": "moe", "baseline": "transformers MixtralSparseMoeBlock", "tokens": a.tokens,
          "dtype": a.dtype, "forward_ms": fwd * 1e3, "forward_backward_ms": both * 1e3,
          "reps": [n, m]}, a.out)


if __name__ == "__main__":
    main()
