"""Vocab-parallel collectives for the fused LM-head losses.

Megatron shards the LM-head weight by vocabulary rows: TP rank r holds global rows
r*V_loc ... (r+1)*V_loc - 1. Each rank computes its partial softmax statistics; this
module merges them so every rank ends with the full-vocabulary log-sum-exp:

1. all-reduce MAX of the per-row max ``m``;
2. rescale the local sum-exp to that common max;
3. all-reduce SUM of (rescaled sum-exp, target logit) packed in ONE tensor. Exactly one
   rank owns each target id; the others contribute 0.

The backward needs no further statistics; only dX is summed across ranks
(:func:`all_reduce_sum_`). Process groups are always passed explicitly: ``group=None``
means "no tensor parallelism" (NOT the default world group), so a caller can never pick
up a wrong global group by accident.
"""
from __future__ import annotations

import torch


def group_rank_world(group) -> tuple[int, int]:
    """(rank, world size) of this process inside ``group``; (0, 1) for ``None``."""
    if group is None:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(group=group), dist.get_world_size(group=group)


def all_reduce_sum_(t: torch.Tensor, group) -> torch.Tensor:
    """In-place SUM over ``group`` (no-op without TP)."""
    if group is None or group_rank_world(group)[1] == 1:
        return t
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def combine_stats(m: torch.Tensor, s: torch.Tensor, t: torch.Tensor, group
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-rank (row max, sum exp(z - max), target logit) into (lse, target logit).

    All inputs are float32 [N]. A rank whose whole shard is Megatron padding has
    m = -inf and s = 0; it then contributes nothing. The result is identical on every rank.
    """
    world = group_rank_world(group)[1]
    if world == 1:
        return m + torch.log(s), t
    import torch.distributed as dist

    m_glob = m.clone()
    dist.all_reduce(m_glob, op=dist.ReduceOp.MAX, group=group)
    # exp(-inf - finite) = 0 for an all-padding shard; the global max is finite as long
    # as the true vocabulary is non-empty (checked on the host).
    m_safe = torch.where(torch.isinf(m_glob), torch.zeros_like(m_glob), m_glob)
    packed = torch.stack([s * torch.exp(m - m_safe), t])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return m_safe + torch.log(packed[0]), packed[1]
