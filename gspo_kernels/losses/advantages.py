"""Advantages from rewards, per group of G completions: ``(B, G) -> (B, G)``.

Computed in float64 whatever the rewards' dtype (O(N) values): rewards near
the float32 maximum (3e38) would overflow a float32 mean or variance.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

GROUP_NORM_EPS = 1e-4  # as TRL and verl: keeps (r - mean)/(std + eps) finite when std = 0


def group_norm_advantage(rewards: Tensor, eps: float = GROUP_NORM_EPS) -> Tensor:
    """The GSPO/GRPO papers' advantage ``(r - mean r) / (std r + eps)`` per group (TRL's
    ``scale_rewards="group"``), ``(B, G) -> (B, G)`` in the rewards' float dtype; std is the
    unbiased one (as ``torch.std``), taken as 0 when ``G = 1``."""
    r = rewards.double()
    mean = r.mean(-1, keepdim=True)
    std = r.std(-1, keepdim=True) if r.shape[-1] > 1 else torch.zeros_like(mean)
    out_dtype = rewards.dtype if rewards.dtype.is_floating_point else torch.float32
    return ((r - mean) / (std + eps)).to(out_dtype)


def contrast_advantage(rewards: Tensor, ratios: Tensor) -> Tensor:
    """The source article's advantage, ``(B, G) -> (B, G)``: per group, good = ``r >= mean r``
    (ties to good), bad = ``r < mean r``; ``A = mean_good s - mean_bad s``; good sequences get
    ``+A``, bad ones ``-A``; a group with no bad sequence (all rewards equal) gets 0.
    ``ratios`` (the sequence importance ratios) are used detached. Note that ``A`` is exactly 0
    whenever every ratio is 1 (on-policy): this advantage learns only off-policy."""
    s = ratios.detach()
    r = rewards.double()
    mean = r.mean(-1, keepdim=True)
    good = (r >= mean) | (r.amax(-1, keepdim=True) == r.amin(-1, keepdim=True))
    bad = ~good
    n_good, n_bad = good.sum(-1), bad.sum(-1)
    mean_good = torch.where(good, s, 0).sum(-1) / n_good.clamp(min=1)
    mean_bad = torch.where(bad, s, 0).sum(-1) / n_bad.clamp(min=1)
    A = torch.where(n_bad > 0, mean_good - mean_bad, torch.zeros_like(mean_good))
    return torch.where(good, A.unsqueeze(-1), -A.unsqueeze(-1))


def _across_ranks(x: Tensor, process_group):
    """All-gather ``x`` (B, G_local) along G over ``process_group`` (no gradient): returns
    ``(B, G_total)`` and this rank's column slice (groups spread over ranks in rank order)."""
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(parts, x.detach().contiguous(), group=process_group)
    rank = dist.get_rank(process_group)
    G = x.shape[-1]
    return torch.cat(parts, dim=-1), slice(rank * G, (rank + 1) * G)


def advantage_from_rewards(mode: str, rewards: Tensor, ratios: Optional[Tensor], process_group=None) -> Tensor:
    """``(B, G)`` advantage of a named mode over whole groups (gathered across ranks if asked)."""
    if process_group is not None:
        rewards, cols = _across_ranks(rewards, process_group)
        if ratios is not None:
            ratios, _ = _across_ranks(ratios, process_group)
    r = rewards.double()  # float64 result: the caller casts to the log-probs' dtype
    if mode == "contrast":
        assert ratios is not None, "the contrast advantage needs the sequences' ratios"
        A = contrast_advantage(r, ratios)
    else:
        A = group_norm_advantage(r)
    return A if process_group is None else A[..., cols]
