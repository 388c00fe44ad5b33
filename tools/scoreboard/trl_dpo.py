"""The DPO row's baseline: TRL's own DPOTrainer step (TRL 1.13.0), on the token stream of
contralign's `bench step --loss dpo`.

The dataset is already tokenized (prompt_ids, chosen_ids, rejected_ids) and carries the
cached reference (ref_chosen_logps, ref_rejected_logps), so DPOTrainer's _prepare_dataset
(tokenization of text) and _precompute_ref_logps (a reference pass, which would overwrite the
cache) are replaced by the identity; everything else is TRL's and transformers': the
collator, _compute_loss, Trainer.training_step, clipping and the fused AdamW. The dataset
holds one step's pairs, so every step is one epoch of the same batch and the first step's
loss is theirs.
"""

import tempfile
import time

import torch

from common import compare, emit, sync
from trl_step import make_groups, make_model, model_flops, step_parser, stream_tokens

TOKENIZER = "tests/fixtures/tiny-tokenizer"  # pads only: the ids are already there


def dataset_of(groups):
    from datasets import Dataset
    return Dataset.from_list([{
        "prompt_ids": g["prompt"], "chosen_ids": g["responses"][0],
        "rejected_ids": g["responses"][1], "ref_chosen_logps": g["ref_logp_sum"][0],
        "ref_rejected_logps": g["ref_logp_sum"][1]} for g in groups])


def main():
    import os
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    import trl
    from trl import DPOConfig, DPOTrainer
    from trl_step import ROOT

    a = step_parser(__doc__.splitlines()[0]).parse_args()
    cpu = torch.device(a.device).type == "cpu"
    model = make_model(a, torch.bfloat16 if a.dtype == "bf16" else torch.float32)
    groups, meta = make_groups(a, model.config.vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(ROOT, TOKENIZER, "tokenizer.json"), eos_token="</s>")
    DPOTrainer._prepare_dataset = lambda self, dataset, *_: dataset
    DPOTrainer._precompute_ref_logps = lambda self, dataset, *_: dataset
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(groups),
        max_steps=a.reps + 1, learning_rate=1e-6, beta=meta["beta"], max_length=None,
        precompute_ref_log_probs=True, gradient_checkpointing=True, bf16=a.dtype == "bf16",
        optim="adamw_torch_fused", max_grad_norm=1.0, use_cpu=cpu, report_to="none",
        save_strategy="no", logging_strategy="no", dataloader_num_workers=0, seed=0,
        disable_tqdm=True)
    times, losses, started = [], [], time.perf_counter()

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync(a.device)
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(a.device)
            times.append(time.perf_counter() - self.t)
            if time.perf_counter() - started > a.budget_s and len(times) >= 2:
                control.should_training_stop = True

    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset_of(groups),
                         processing_class=tokenizer, callbacks=[Clock()])
    compute_loss = trainer.compute_loss

    def recorded(*args, **kwargs):
        out = compute_loss(*args, **kwargs)
        losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
        return out

    trainer.compute_loss = recorded
    if not cpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = sorted(times[1:]) or times
    seconds = timed[len(timed) // 2]
    tokens = stream_tokens(groups)
    result = {"row": "dpo-step", "baseline": f"trl {trl.__version__} DPOTrainer",
              "dtype": a.dtype, "layers": model.config.num_hidden_layers,
              "groups": len(groups), "responses": 2, "stream_tokens": tokens,
              "seconds_per_step": seconds, "reps": len(timed), "tokens_per_s": tokens / seconds,
              "model_tflop_per_step": model_flops(model, groups) / 1e12,
              "peak_bytes": None if cpu else torch.cuda.max_memory_allocated(),
              "first_step_loss": losses[0]}
    if a.check:
        result["check"] = {"first step loss": compare("dpo-step (TRL) first step", losses[0],
                                                      meta["first_step_loss"])}
    emit(result, a.out)


if __name__ == "__main__":
    main()
