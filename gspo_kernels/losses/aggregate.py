"""Aggregation: how masked per-token losses ``l`` (N, T) become one scalar.

| mode | formula | used by |
|---|---|---|
| ``seq-mean-token-mean`` | ``mean_i (sum_t m l) / max(L_i, 1)`` | TRL grpo, sapo; GSPO |
| ``token-mean`` | ``sum m l / max(sum m, 1)`` | TRL bnpo; verl's default |
| ``seq-mean-token-sum`` | ``mean_i sum_t m l`` | TRL luspo |
| ``dr_grpo`` | ``sum m l / (N * max_completion_length)`` | TRL dr_grpo |
| ``token-sum-norm`` | ``sum m l / max(num_items_in_batch, 1)`` | TRL dapo, cispo, vespo |
| ``seq-mean-token-sum-norm`` | ``sum m l / (N * max_completion_length)`` | verl (its ``loss_scale_factor``) |
| ``token-sum`` | ``sum m l`` | verl |

verl's own loss types aggregate with verl's semantics (``losses/verl.py``: its ``seq-mean-*``
modes average over non-empty sequences only).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def aggregate(
    l: Tensor,
    m: Tensor,
    mode: str,
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Optional[Tensor] = None,
) -> Tensor:
    N, T = m.shape
    lm = torch.where(m, l, torch.zeros((), dtype=l.dtype, device=l.device))
    if mode == "seq-mean-token-mean":
        return (lm.sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if mode == "token-mean":
        return lm.sum() / m.sum().clamp(min=1)
    if mode == "seq-mean-token-sum":
        return lm.sum(-1).mean()
    if mode == "token-sum":
        return lm.sum()
    if mode in ("dr_grpo", "seq-mean-token-sum-norm"):
        return lm.sum() / max(N * (max_completion_length or T), 1)
    nib = m.sum() if num_items_in_batch is None else num_items_in_batch.to(lm.dtype)
    return lm.sum() / nib.clamp(min=1)
