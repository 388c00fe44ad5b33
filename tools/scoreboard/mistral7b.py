"""The Mistral-7B row's baseline: TRL's DPO step (trl_step.py) on all 32 layers of
Mistral-7B with random weights and the cached reference, in bf16, under
torch.cuda.set_per_process_memory_fraction at 80 GB (1e9 bytes a GB, as contralign's
--memory 80GB reads it) of the GPU's memory: tokens/s and peak memory, or the out-of-memory.
"""

from common import emit
from trl_step import dpo_loss, run_step, step_parser

LIMIT_BYTES = 80e9


def main():
    a = step_parser(__doc__.splitlines()[0], layers=32).parse_args()
    emit(run_step(a, dpo_loss, "mistral-7b", "trl_step.py at 80 GB", LIMIT_BYTES), a.out)


if __name__ == "__main__":
    main()
