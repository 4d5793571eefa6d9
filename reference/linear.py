"""Naive log-probs from hidden states: materialise ``hidden @ weight.T + bias``, then the naive op."""
from __future__ import annotations

import torch

from .logprobs import naive_sequence_logprobs, naive_token_entropy, naive_token_logprobs


def naive_linear_token_logprobs(hidden, weight, tokens, bias=None, temperature=1.0, dtype=torch.float32):
    """``(..., T, H), (V, H) -> (..., T)`` through the full ``(..., T, V)`` logits."""
    return naive_token_logprobs(torch.nn.functional.linear(hidden, weight, bias), tokens, temperature, dtype)


def naive_linear_sequence_logprobs(hidden, weight, tokens, mask=None, lengths=None, bias=None, temperature=1.0,
                                   normalize=True, dtype=torch.float32):
    """``(..., T, H), (V, H) -> (...)`` masked mean (or sum) through the full logits."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return naive_sequence_logprobs(logits, tokens, mask, lengths, temperature, normalize, dtype)


def naive_linear_token_entropy(hidden, weight, bias=None, temperature=1.0, dtype=torch.float32):
    """``(..., T, H), (V, H) -> (..., T)`` entropy of ``softmax(logits / tau)`` through the full logits."""
    return naive_token_entropy(torch.nn.functional.linear(hidden, weight, bias), temperature, dtype)
