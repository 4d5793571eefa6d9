"""Naive log-probs: log_softmax -> gather -> masked mean, as the source article's pseudocode does it."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def naive_token_logprobs(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``log_softmax(logits / temperature)[tokens]``, computed in ``dtype``: ``(..., T, V) -> (..., T)``."""
    logp = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def naive_token_entropy(logits: Tensor, temperature: float = 1.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """Entropy of ``softmax(logits / temperature)``, ``-sum_v p_v log p_v``, in ``dtype``:
    ``(..., T, V) -> (..., T)``."""
    logp = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    p = logp.exp()
    # p = 0 (a -inf logit) contributes 0 to the value and to the gradient (no 0 * -inf)
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def lengths_to_mask(lengths: Tensor, T: int) -> Tensor:
    return torch.arange(T, device=lengths.device) < lengths.unsqueeze(-1)


def naive_sequence_logprobs(
    logits: Tensor,
    tokens: Tensor,
    mask: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    temperature: float = 1.0,
    normalize: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(1/L) sum_t mask_t logp_t`` per sequence (sum if not normalize; 0 when L = 0): ``(..., T, V) -> (...)``."""
    logp = naive_token_logprobs(logits, tokens, temperature, dtype)
    if mask is None:
        mask = (
            torch.ones_like(tokens, dtype=torch.bool) if lengths is None else lengths_to_mask(lengths, tokens.shape[-1])
        )
    m = mask.to(dtype)
    total = (logp * m).sum(-1)
    if not normalize:
        return total
    L = m.sum(-1)
    return torch.where(L > 0, total / L.clamp(min=1), torch.zeros_like(total))
