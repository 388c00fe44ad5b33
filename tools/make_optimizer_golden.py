"""Golden values for contralign's AdamW, schedules and clipping, from PyTorch itself.

Run by hand (not in CI), with torch 2.15.0 and transformers 5.23.0:

    python tools/make_optimizer_golden.py > tests/fixtures/optimizer.golden.json

Two float32 parameter tensors take 6 steps of torch.optim.AdamW with gradients drawn from a
seeded generator (stored in the output), clipped by torch.nn.utils.clip_grad_norm_, under
each of transformers' constant/linear/cosine schedules with warmup.
"""
import json

import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

STEPS, WARMUP, LR, MAX_NORM = 6, 2, 1e-2, 1.0
BETAS, EPS, WD = (0.9, 0.95), 1e-6, 0.1

gen = torch.Generator().manual_seed(0)
init = [torch.randn(3, generator=gen), torch.randn(2, generator=gen)]
grads = [[torch.randn(3, generator=gen) * (0.2 + s), torch.randn(2, generator=gen) * (0.2 + s)] for s in range(STEPS)]
schedules = {
    "constant": lambda o: get_constant_schedule_with_warmup(o, WARMUP),
    "linear": lambda o: get_linear_schedule_with_warmup(o, WARMUP, STEPS),
    "cosine": lambda o: get_cosine_schedule_with_warmup(o, WARMUP, STEPS),
}
out = {
    "steps": STEPS, "warmup_steps": WARMUP, "lr": LR, "max_grad_norm": MAX_NORM,
    "betas": BETAS, "eps": EPS, "weight_decay": WD,
    "init": [t.tolist() for t in init],
    "grads": [[g.tolist() for g in step] for step in grads],
    "runs": {},
}
for name, make in schedules.items():
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    sched = make(opt)
    run = {"lr": [], "grad_norm": [], "params": []}
    for step in range(STEPS):
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        run["lr"].append(opt.param_groups[0]["lr"])
        run["grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(params, MAX_NORM)))
        opt.step()
        sched.step()
        run["params"].append([p.detach().tolist() for p in params])
    out["runs"][name] = run
print(json.dumps(out, indent=1))
