"""The NCA row's baseline: TRL's step (trl_step.py) on K separate sequences per group, with
the NCA loss, which TRL has no K-response trainer for.

NCA as docs/losses.md §2 defines it: rho = beta (S - S_ref), q = softmax(r / alpha),
L = -sum_i q_i log sigmoid(rho_i) - (1/K) sum_i log sigmoid(-rho_i), the mean over groups.
"""

import torch
import torch.nn.functional as F

from common import emit
from trl_step import make_groups, run_step, step_parser


def nca_loss(s, ref, meta, rewards):
    rho = meta["beta"] * (s - ref)  # [K, G]
    q = torch.softmax(rewards / meta["alpha"], dim=0)
    k = s.shape[0]
    per_group = -(q * F.logsigmoid(rho)).sum(0) - F.logsigmoid(-rho).sum(0) / k
    return per_group.mean()


def main():
    a = step_parser(__doc__.splitlines()[0], loss="nca", responses=4).parse_args()
    groups, _ = make_groups(a, 1)
    rewards = torch.tensor([[g["rewards"][i] for g in groups]
                            for i in range(len(groups[0]["responses"]))], device=a.device)
    emit(run_step(a, lambda s, ref, meta: nca_loss(s, ref, meta, rewards), "nca-step",
                  "nca_step.py (TRL 1.13.0's step on K sequences, NCA loss)"), a.out)


if __name__ == "__main__":
    main()
