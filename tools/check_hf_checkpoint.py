#!/usr/bin/env python3
"""Checks that a checkpoint written by `contralign train` loads in Hugging Face transformers
and scores like contralign does.

    contralign score --model CKPT --data DATA.jsonl > scores.jsonl
    python tools/check_hf_checkpoint.py CKPT DATA.jsonl scores.jsonl

DATA is pre-tokenized (reward groups or pairs, tests/fixtures/README.md). The checkpoint is
loaded with `AutoModelForCausalLM.from_pretrained` (which reads config.json, the
safetensors file or the sharded index, and refuses missing or unexpected tensors), cast to
float64 (exact for f32, bf16 and f16 storage), and every response's log-prob sum is
recomputed one sequence at a time and compared with `contralign score`'s. transformers keeps
a few float32 islands (RMSNorm variance, RoPE tables, the attention softmax), so agreement is
expected to ~1e-6 relative, not to float64 precision. Needs torch and transformers; not part
of CI (run by hand, see README).
"""

import json
import sys

import torch
import transformers


def groups(path):
    for line in open(path):
        if not line.strip():
            continue
        g = json.loads(line)
        if "response_ids" in g:
            yield g["prompt_ids"], g["response_ids"]
        else:
            yield g["prompt_ids"], [g["chosen_ids"], g["rejected_ids"]]


def main():
    ckpt, data, scores = sys.argv[1:4]
    config = transformers.AutoConfig.from_pretrained(ckpt)
    # Mixtral: the experts' loop (the default grouped_mm path refuses float64).
    extra = {"experts_implementation": "eager"} if config.model_type == "mixtral" else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        ckpt, attn_implementation="eager", **extra
    )
    print(f"loaded {type(model).__name__} ({model.dtype}) from {ckpt} with transformers "
          f"{transformers.__version__}")
    model = model.double().eval()
    ours = [json.loads(line) for line in open(scores) if line.strip()]
    worst = 0.0
    i = 0
    with torch.no_grad():
        for prompt, responses in groups(data):
            for r in responses:
                ids = torch.tensor([prompt + r])
                logp = torch.log_softmax(model(ids).logits[0], dim=-1)
                targets = ids[0, len(prompt):]
                rows = logp[len(prompt) - 1 : len(prompt) - 1 + len(r)]
                s = rows.gather(1, targets[:, None]).sum().item()
                rel = abs(s - ours[i]["logp_sum"]) / abs(s)
                worst = max(worst, rel)
                i += 1
    assert i == len(ours), f"{i} responses in the data, {len(ours)} scores"
    print(f"{i} responses: worst relative difference of logp_sum {worst:.2e}")
    if worst > 1e-5:
        sys.exit("FAIL: transformers and contralign disagree")
    print("OK")


if __name__ == "__main__":
    main()
