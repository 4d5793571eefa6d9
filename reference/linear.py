"""Naive log-probs from hidden states: materialise ``hidden @ weight.T + bias``, then the naive op."""

from __future__ import annotations

import torch

from .logprobs import naive_sequence_logprobs, naive_token_entropy, naive_token_logprobs


def naive_linear_token_logprobs(hidden, weight, tokens, bias=None, temperature=1.0, dtype=torch.float32):
    """``(..., T, H), (V, H) -> (..., T)`` through the full ``(..., T, V)`` logits."""
    return naive_token_logprobs(torch.nn.functional.linear(hidden, weight, bias), tokens, temperature, dtype)


def naive_linear_sequence_logprobs(
    hidden, weight, tokens, mask=None, lengths=None, bias=None, temperature=1.0, normalize=True, dtype=torch.float32
):
    """``(..., T, H), (V, H) -> (...)`` masked mean (or sum) through the full logits."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return naive_sequence_logprobs(logits, tokens, mask, lengths, temperature, normalize, dtype)


def naive_linear_token_entropy(hidden, weight, bias=None, temperature=1.0, dtype=torch.float32):
    """``(..., T, H), (V, H) -> (..., T)`` entropy of ``softmax(logits / tau)`` through the full logits."""
    return naive_token_entropy(torch.nn.functional.linear(hidden, weight, bias), temperature, dtype)


def naive_linear_token_outputs(hidden, weight, tokens, bias=None, temperature=1.0, valid=None, dtype=torch.float32):
    """``(logp, entropy)`` ``(..., T)`` through the full logits in ``dtype``, exact zeros where ``valid`` is
    False (the contract of ``linear_token_logprobs(valid=...)``: those outputs are constants)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    lp = naive_token_logprobs(logits, tokens.clamp(0, weight.shape[0] - 1), temperature, dtype)
    ent = naive_token_entropy(logits, temperature, dtype)
    if valid is not None:
        lp, ent = torch.where(valid, lp, torch.zeros_like(lp)), torch.where(valid, ent, torch.zeros_like(ent))
    return lp, ent


def naive_linear_grads(hidden, weight, bias, tokens, g, h=None, temperature=1.0, tile=None, threshold=None):
    """Gradients ``(hidden, weight, bias)`` of ``sum_r g_r logp_r + h_r H_r`` in float64 through the
    full ``dz = (g (1[v = y] - p) - h p (log p + H)) / tau``, and the fraction of (rows x vocabulary)
    tiles dropped. With ``tile = (bm, bn)`` and ``threshold``, gradient filtering's rule: ``dz`` is
    zeroed on every tile where no row with an upstream gradient has ``p >= threshold`` or samples
    a token (the fraction counts tiles holding such a row)."""
    x = torch.nn.functional.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    logp = torch.log_softmax(x / temperature, -1)
    p = logp.exp()
    R, V = p.shape
    g = g.double()[:, None]
    h = torch.zeros_like(g) if h is None else h.double()[:, None]
    H = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1, keepdim=True)
    onehot = torch.zeros_like(p)
    onehot[torch.arange(R), tokens.long()] = 1.0
    dz = (g * (onehot - p) - h * p * (torch.where(p > 0, logp, torch.zeros_like(logp)) + H)) / temperature
    dropped = 0.0
    if tile is not None:
        bm, bn = tile
        active = ((g != 0) | (h != 0)).squeeze(-1)
        keep = ((p >= threshold) | (onehot > 0)) & active[:, None]
        pad = torch.nn.functional.pad(keep, (0, (-V) % bn, 0, (-R) % bm))
        kept = pad.view(-(-R // bm), bm, -(-V // bn), bn).any(3, keepdim=True).any(1, keepdim=True)
        rows = torch.nn.functional.pad(active, (0, (-R) % bm)).view(-1, bm).any(1)
        dropped = 1.0 - kept.squeeze(3).squeeze(1)[rows].double().mean().item()
        dz = dz * kept.expand(-1, bm, -1, bn).reshape(pad.shape)[:R, :V]
    return (dz @ weight.double(), dz.T @ hidden.double(), None if bias is None else dz.sum(0)), dropped
