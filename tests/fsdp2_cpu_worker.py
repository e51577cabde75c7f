"""One CPO optimizer step of a tiny Llama under FSDP2 (``fully_shard``) on CPU with gloo, run by torchrun from
tests/test_fsdp.py. Each of the ranks scores its half of a fixed batch with seqcpo's log-probs (the LM head
inside the forward, as the trainer does for sharded weights) and the CPO + MLE loss; the updated full weights
are written by rank 0 for comparison with one process on the whole batch.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp2_cpu_worker.py OUT.pt
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import make_tiny_llama  # noqa: E402
from seqcpo.logps import sequence_logps  # noqa: E402
from seqcpo.losses import cpo_loss, mle_loss  # noqa: E402
from seqcpo.types import CandidateBatch  # noqa: E402

# four examples, continuations of equal length so the token-mean MLE term splits evenly
PREFIXES = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15]]
GOLDS = [[20, 21, 22, 2], [23, 24, 25, 2], [26, 27, 28, 2], [29, 30, 31, 2]]
NEGATIVES = [[[20, 2], [40, 41, 2]], [[23, 24, 2], [42, 2]], [[26, 2], [43, 44, 45, 2]], [[29, 30, 2], [46, 2]]]


def loss_on(model, rows, ref):
    batch = CandidateBatch(
        prefix_ids=[PREFIXES[i] for i in rows],
        candidate_ids=[[GOLDS[i]] + NEGATIVES[i] for i in rows],
        candidate_mask=[[True, True, True] for _ in rows],
    )
    out = sequence_logps(model, batch, layout="shared", head_in_forward=True)
    return mle_loss(out.summed[:, 0], out.token_counts[:, 0]) + cpo_loss(out.logps, ref[rows], 0.5)


def main(out_path: str) -> None:
    torch.manual_seed(0)
    sharded = "RANK" in os.environ
    if sharded:
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
    model = make_tiny_llama(seed=0).train()
    ref = torch.tensor([[-20.0, -9.0, -15.0], [-21.0, -12.0, -8.0], [-19.0, -7.0, -25.0], [-22.0, -13.0, -9.0]])
    if sharded:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        rank, world = dist.get_rank(), dist.get_world_size()
        rows = list(range(rank, len(PREFIXES), world))
        shapes = {type(p).__name__ for p in model.parameters()}
    else:
        rows, shapes = list(range(len(PREFIXES))), set()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = loss_on(model, rows, ref)
    loss.backward()  # FSDP2 reduce-scatters the gradients: their mean over ranks
    opt.step()
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()}
    if not sharded or dist.get_rank() == 0:
        torch.save({"state": state, "param_types": sorted(shapes)}, out_path)
    if sharded:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
