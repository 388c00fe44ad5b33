"""TRL's DPO training step reproduced in plain PyTorch, for when TRL itself does not run.

Follows TRL 1.13.0 (trl/trainer/dpo_trainer.py): DataCollatorForPreference.torch_call (each
pair as prompt + chosen and prompt + rejected, all chosen rows first, right-padded, a
completion mask), DPOTrainer._compute_loss (one forward of the concatenated batch,
`selective_log_softmax` of the shifted logits in fp32, completion-masked sums, the sigmoid
loss -logsigmoid(beta * (chosen - ref_chosen - rejected + ref_rejected)) averaged, reference
log-probs read from the batch as `precompute_ref_log_probs=True` leaves them), and the step of
transformers' Trainer as DPOConfig sets it up (backward with gradient checkpointing, gradient
norm clipped to max_grad_norm 1.0, `adamw_torch_fused`). K responses generalize it: K rows
per group, which is the NCA row's baseline (nca_step.py) and the Mistral-7B row's
(mistral7b.py).
"""

import json
import os
import random

import torch
import torch.nn.functional as F

from common import compare, dtype_of, emit, parser, peak_bytes, reset_peak, timed

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
MISTRAL_7B = os.path.join(ROOT, "examples", "configs", "mistral-7b-v0.1.json")


def step_parser(description, loss="dpo", responses=2, layers=4):
    p = parser(description)
    p.add_argument("--config", default=MISTRAL_7B)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--responses", type=int, default=responses)
    p.add_argument("--response-len", type=int, default=256)
    p.add_argument("--loss", default=loss)
    return p


def make_model(a, dtype):
    """The --check dump's model (fp32), or --config with --layers layers, random weights."""
    from transformers import AutoConfig, MistralForCausalLM
    if a.check:
        return MistralForCausalLM.from_pretrained(
            os.path.join(a.check, "model"), dtype=torch.float32,
            attn_implementation="sdpa").to(a.device)
    cfg = AutoConfig.for_model(**{k: v for k, v in json.load(open(a.config)).items()
                                  if k not in ("architectures", "transformers_version")})
    cfg.num_hidden_layers = a.layers
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(a.device):
        return MistralForCausalLM._from_config(cfg, dtype=dtype)


def make_groups(a, vocab):
    """The dump's groups, or random ones of contralign's `bench step` shape (its cached
    reference: S_ref = -n * U(1, 3))."""
    if a.check:
        meta = json.load(open(os.path.join(a.check, "step.json")))
        return meta["groups"], meta
    rng = random.Random(0)
    ids = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    groups = [{"prompt": ids(a.prompt),
               "responses": [ids(a.response_len) for _ in range(a.responses)],
               "rewards": [float(a.responses - 1 - i) for i in range(a.responses)],
               "ref_logp_sum": [-a.response_len * rng.uniform(1, 3)
                                for _ in range(a.responses)]}
              for _ in range(a.groups)]
    return groups, {"beta": 0.1 if a.loss == "dpo" else 0.01, "alpha": 0.01}


def collate(groups, device):
    """TRL's padded batch: row i * G + g is prompt g + its response i; the completion mask."""
    rows = [(g["prompt"], r) for i in range(len(groups[0]["responses"])) for g in groups
            for r in [g["responses"][i]]]
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for j, (p, r) in enumerate(rows):
        ids[j, :len(p) + len(r)] = torch.tensor(p + r)
        attention[j, :len(p) + len(r)] = 1
        completion[j, len(p):len(p) + len(r)] = 1
    ref = torch.tensor([[g["ref_logp_sum"][i] for g in groups]
                        for i in range(len(groups[0]["responses"]))])
    return {"input_ids": ids.to(device), "attention_mask": attention.to(device),
            "completion_mask": completion.to(device), "ref": ref.to(device)}


def response_sums(model, batch, k):
    """S [K, G]: TRL's shifted fp32 log-softmax gather, summed over each completion."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits
    labels = batch["input_ids"][:, 1:]
    logps = torch.gather(logits[:, :-1].float().log_softmax(-1), 2, labels[..., None])[..., 0]
    sums = (logps * batch["completion_mask"][:, 1:]).sum(1)
    return sums.view(k, -1)


def dpo_loss(s, ref, meta):
    rho = s - ref
    return -F.logsigmoid(meta["beta"] * (rho[0] - rho[1])).mean()


def stream_tokens(groups):
    return sum(len(g["prompt"]) + sum(map(len, g["responses"])) for g in groups)


def model_flops(model, groups):
    """contralign's count (src/engine/bench.rs): 6 per parameter per stream token plus
    12 * head_dim * heads per visible (query, key) pair per layer of the packed groups."""
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    pairs = 0
    for g in groups:
        p = len(g["prompt"])
        pairs += p * (p + 1) // 2 + sum(len(r) * p + len(r) * (len(r) + 1) // 2
                                        for r in g["responses"])
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 6 * params * stream_tokens(groups) + \
        12 * hd * cfg.num_attention_heads * pairs * cfg.num_hidden_layers


def run_step(a, loss_fn, row, baseline, memory_fraction=None):
    """Builds the model and batch, checks the first step's loss against a dump, times the
    step; an out-of-memory is a result, not an error."""
    result = {"row": row, "baseline": baseline, "dtype": a.dtype}
    if memory_fraction is not None and torch.device(a.device).type == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(memory_fraction / total, 1.0))
        result["memory_limit_bytes"] = memory_fraction
    try:
        model = make_model(a, dtype_of(a.dtype))
        groups, meta = make_groups(a, model.config.vocab_size)
        k = len(groups[0]["responses"])
        model.gradient_checkpointing_enable()
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, fused=True)
        batch = collate(groups, a.device)
        losses = []

        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(response_sums(model, batch, k), batch["ref"], meta)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())

        floor = reset_peak(a.device)
        seconds, reps = timed(step, a.device, a.reps, a.budget_s)
    except torch.OutOfMemoryError as e:
        result["out_of_memory"] = str(e).splitlines()[0]
        return result
    if a.check:
        result["check"] = {"first step loss": compare(f"{row} first step", losses[0],
                                                      meta["first_step_loss"])}
    tokens = stream_tokens(groups)
    result.update({
        "layers": model.config.num_hidden_layers, "groups": len(groups), "responses": k,
        "stream_tokens": tokens,
        "padded_tokens": int(batch["attention_mask"].numel()),
        "seconds_per_step": seconds, "reps": reps, "tokens_per_s": tokens / seconds,
        "model_tflop_per_step": model_flops(model, groups) / 1e12,
        "peak_bytes": peak_bytes(a.device), "floor_bytes": floor,
        "first_step_loss": losses[0],
    })
    return result


def main():
    a = step_parser(__doc__.splitlines()[0]).parse_args()
    emit(run_step(a, dpo_loss, "dpo-step", "trl_step.py (TRL 1.13.0's step reproduced)"),
         a.out)


if __name__ == "__main__":
    main()
