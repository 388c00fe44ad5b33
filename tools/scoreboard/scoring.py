"""The scoring + loss baseline: PyTorch as TRL writes it.

Follows TRL 1.13.0's DPOTrainer._compute_loss (trl/trainer/dpo_trainer.py): logits of the
LM head, `selective_log_softmax` (trl/trainer/utils.py: per row the fp32 log-softmax
gathered at the labels), completion-masked sums per sequence, the sigmoid loss
`-logsigmoid(beta * (chosen - rejected))` averaged, then backward into h and the head.
The batch is contralign's `bench scoring` batch: T prediction rows cut into responses of 256,
consecutive responses a (chosen, rejected) pair with a zero reference.
"""

import json
import os

import torch
import torch.nn.functional as F

from common import bounded, compare, dtype_of, emit, parser, peak_bytes, reset_peak, timed

RESPONSE_LEN = 256  # as src/ops/cuda/scoring_bench.rs


def loss_of(h, head, targets, mask, beta):
    """TRL's path from hidden states to the DPO loss; mask [responses, rows] picks each
    response's rows (TRL's completion mask over the padded chosen/rejected batch)."""
    logits = h @ head.T
    logps = torch.gather(logits.float().log_softmax(-1), 1, targets[:, None])[:, 0]
    sums = (mask * logps[None, :]).sum(1)
    chosen, rejected = sums[0::2], sums[1::2]
    return -F.logsigmoid(beta * (chosen - rejected)).mean(), sums


def spans_mask(spans, rows, device):
    mask = torch.zeros(len(spans), rows, device=device)
    for i, (first, n) in enumerate(spans):
        mask[i, first:first + n] = 1
    return mask


def check(dir, device):
    from safetensors.torch import load_file
    t = load_file(os.path.join(dir, "scoring.safetensors"), device=device)
    meta = json.load(open(os.path.join(dir, "scoring.json")))
    targets = torch.tensor(meta["targets"], device=device)
    mask = spans_mask(meta["spans"], len(targets), device)
    h = t["h"].requires_grad_()
    head = t["head"].requires_grad_()
    loss, sums = loss_of(h, head, targets, mask, meta["beta"])
    loss.backward()
    worst = max(abs(a - b) / abs(b) for a, b in zip(sums.tolist(), meta["s"]))
    return {"loss": compare("scoring loss", loss.item(), meta["loss"]),
            "sums": bounded("scoring sums, largest", worst)}


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dim", type=int, default=4096)
    a = p.parse_args()
    result = {"row": "scoring", "baseline": "pytorch-as-trl (trl 1.13.0 _compute_loss)"}
    if a.check:
        result["check"] = check(a.check, a.device)
    dtype = dtype_of(a.dtype)
    g = torch.Generator(device=a.device).manual_seed(0)
    h = torch.randn(a.rows, a.dim, device=a.device, generator=g).to(dtype).requires_grad_()
    head = (torch.randn(a.vocab, a.dim, device=a.device, generator=g) * 2 / a.dim ** 0.5)
    head = head.to(dtype).requires_grad_()
    targets = torch.randint(0, a.vocab, (a.rows,), device=a.device, generator=g)
    spans = [(f, min(RESPONSE_LEN, a.rows - f)) for f in range(0, a.rows, RESPONSE_LEN)]
    mask = spans_mask(spans[:len(spans) // 2 * 2], a.rows, a.device)
    floor = reset_peak(a.device)

    def forward():
        with torch.no_grad():
            loss_of(h, head, targets, mask, 0.1)

    def forward_backward():
        h.grad = head.grad = None
        loss_of(h, head, targets, mask, 0.1)[0].backward()

    fwd, n_fwd = timed(forward, a.device, a.reps, a.budget_s / 2)
    both, n_both = timed(forward_backward, a.device, a.reps, a.budget_s / 2)
    peak = peak_bytes(a.device)
    grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in (h, head))
    result.update({
        "rows": a.rows, "vocab": a.vocab, "dim": a.dim, "dtype": a.dtype,
        "forward_s": fwd, "forward_backward_s": both, "reps": [n_fwd, n_both],
        # Beyond the inputs and the outputs, as contralign's fused_extra_bytes counts (its
        # planned buffers, dh and dW not among them): the measured peak less the floor (h,
        # head) and less h.grad and head.grad, which the backward leaves allocated. What
        # remains: logits, the fp32 log-softmax, autograd's saved tensors and temporaries.
        "extra_bytes": None if peak is None else peak - floor - grad_bytes,
        "peak_bytes_with_grads": None if peak is None else peak - floor,
    })
    emit(result, a.out)


if __name__ == "__main__":
    main()
