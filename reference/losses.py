"""Plain PyTorch GSPO / GRPO losses, written from the math in docs/losses.md.

Deliberately naive: the full log-softmax is materialised (via
``naive_token_logprobs``) and advantages are computed with Python loops over
groups, so that they share no code path with ``gspo_kernels.losses``.
Shapes: logits ``(B, G, T, V)``, tokens/mask ``(B, G, T)``, rewards ``(B, G)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .logprobs import naive_token_entropy, naive_token_logprobs


def contrast_advantage_reference(rewards: Tensor, ratios: Tensor) -> Tensor:
    """The article's good-minus-bad advantage, per group, with Python loops.

    good = r >= mean r (ties to good); A = mean_good s - mean_bad s; good gets +A,
    bad gets -A; a group with no bad sequence gets 0.
    """
    B, G = rewards.shape
    out = torch.zeros(B, G, dtype=ratios.dtype)
    for b in range(B):
        r = [float(v) for v in rewards[b]]
        if max(r) == min(r):
            continue
        mean_r = sum(r) / G
        good = [g for g in range(G) if r[g] >= mean_r]
        bad = [g for g in range(G) if r[g] < mean_r]
        A = sum(float(ratios[b, g]) for g in good) / len(good) - sum(float(ratios[b, g]) for g in bad) / len(bad)
        for g in range(G):
            out[b, g] = A if g in good else -A
    return out.to(ratios.device)


def group_norm_advantage_reference(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """The paper's (r - mean) / (std + eps) per group; std is the unbiased one, 0 for G = 1."""
    B, G = rewards.shape
    out = torch.zeros(B, G, dtype=torch.float64)
    for b in range(B):
        r = [float(v) for v in rewards[b]]
        mean = sum(r) / G
        std = (sum((v - mean) ** 2 for v in r) / (G - 1)) ** 0.5 if G > 1 else 0.0
        for g in range(G):
            out[b, g] = (r[g] - mean) / (std + eps)
    return out.to(rewards.device)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(x.dtype)
    L = m.sum(-1)
    return torch.where(L > 0, (x * m).sum(-1) / L.clamp(min=1), torch.zeros_like(L))


def _kl_tokens(logp: Tensor, ref: Tensor, kl: str) -> Tensor:
    if kl == "k1":
        return logp - ref
    d = ref - logp
    return torch.exp(d) - d - 1


def _den(denominator, old, ref):
    """The ratio's denominator: "old", "ref" or "detached" (None: old if given, else detached)."""
    if denominator is None:
        return old
    return {"old": old, "ref": ref, "detached": None}[denominator]


def gspo_loss_reference(
    logits,
    tokens,
    rewards=None,
    mask=None,
    *,
    ref_logprobs=None,
    old_logprobs=None,
    advantage="group_norm",
    epsilon=3e-4,
    epsilon_high=4e-4,
    beta=0.0,
    kl="k3",
    temperature=1.0,
    level="sequence",
    entropy_coef=0.0,
    denominator=None,
    dtype=torch.float64,
):
    """GSPO loss (and metrics dict) with everything materialised. Returns (loss, metrics).
    ``entropy_coef``: ``loss -= coef * mean entropy over the valid tokens``; ``metrics["kl"]``
    is the mean per-token KL over the valid tokens."""
    eh = epsilon if epsilon_high is None else epsilon_high
    logp = naive_token_logprobs(logits, tokens, temperature, dtype)
    mask = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
    logp = torch.where(mask, logp, torch.zeros_like(logp))
    den = _den(denominator, old_logprobs, ref_logprobs)
    den = logp.detach() if den is None else den.to(dtype)
    log_s = _masked_mean(logp, mask) - _masked_mean(torch.where(mask, den, torch.zeros_like(den)), mask)
    s = torch.exp(log_s)
    if isinstance(advantage, Tensor):  # per-token advantages count only at valid positions (0 elsewhere)
        A = advantage.to(dtype)
        A = A * mask if A.dim() == 3 else A
    elif advantage == "contrast":
        A = contrast_advantage_reference(rewards, s.detach())
    else:
        A = group_norm_advantage_reference(rewards).to(dtype)
    if level == "sequence":
        A_seq = A
        policy = -torch.minimum(s * A, torch.clamp(s, 1 - epsilon, 1 + eh) * A)
        policy = policy * mask.any(-1)  # an empty sequence contributes 0 (and counts in N)
    else:  # sequence_token: s_t = sg[s] * pi(y_t) / sg[pi(y_t)]
        A_t = A if A.dim() == 3 else A.unsqueeze(-1).expand(mask.shape)
        s_t = s.detach().unsqueeze(-1) * torch.exp(logp - logp.detach())
        per_tok = -torch.minimum(s_t * A_t, torch.clamp(s_t, 1 - epsilon, 1 + eh) * A_t)
        policy = _masked_mean(per_tok, mask)
        A_seq = _masked_mean(A_t, mask) if A.dim() == 3 else A
    if ref_logprobs is not None:
        kl_seq = _masked_mean(_kl_tokens(logp, ref_logprobs.to(dtype), kl), mask)
    else:
        kl_seq = torch.zeros_like(s)
    ent = torch.where(mask, naive_token_entropy(logits, temperature, dtype), 0.0)
    n_valid = mask.sum().clamp(min=1)
    loss = (policy + beta * kl_seq).mean() - entropy_coef * ent.sum() / n_valid
    kl_tok = _kl_tokens(logp, ref_logprobs.to(dtype), kl) if ref_logprobs is not None else torch.zeros_like(logp)
    metrics = {
        "ratio": s.detach(),
        "advantage": A_seq.detach(),
        "kl": torch.where(mask, kl_tok, 0).detach().sum() / n_valid,
        "entropy": ent.detach().sum() / mask.sum().clamp(min=1),
        "policy_loss": policy.detach().mean(),
        "policy_per_sequence": policy.detach(),
    }
    return loss, metrics


def grpo_loss_reference(
    logits,
    tokens,
    rewards=None,
    mask=None,
    *,
    ref_logprobs=None,
    old_logprobs=None,
    advantage="group_norm",
    epsilon=0.2,
    epsilon_high=None,
    beta=0.0,
    kl="k3",
    temperature=1.0,
    loss_agg="seq-mean-token-mean",
    entropy_coef=0.0,
    denominator=None,
    dtype=torch.float64,
):
    """Token-level GRPO loss with every aggregation, materialised. Returns (loss, metrics).
    ``entropy_coef``: ``loss -= coef * mean entropy over the valid tokens``."""
    eh = epsilon if epsilon_high is None else epsilon_high
    logp = naive_token_logprobs(logits, tokens, temperature, dtype)
    mask = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
    den = _den(denominator, old_logprobs, ref_logprobs)
    den = logp.detach() if den is None else den.to(dtype)
    r = torch.exp(logp - den)
    if isinstance(advantage, Tensor):  # given advantages count only at valid positions (0 elsewhere)
        A = advantage.to(dtype)
        A = A * (mask if A.dim() == 3 else mask.any(-1))
    else:
        A = group_norm_advantage_reference(rewards).to(dtype)
    A_t = A if A.dim() == 3 else A.unsqueeze(-1).expand(mask.shape)
    per_tok = -torch.minimum(r * A_t, torch.clamp(r, 1 - epsilon, 1 + eh) * A_t)
    if ref_logprobs is not None:
        per_tok = per_tok + beta * _kl_tokens(logp, ref_logprobs.to(dtype), kl)
    ent = naive_token_entropy(logits, temperature, dtype)
    m = mask.to(dtype)
    N, T = m.shape[0] * m.shape[1], m.shape[-1]
    if loss_agg == "seq-mean-token-mean":
        loss = _masked_mean(per_tok, mask).mean()
    elif loss_agg == "token-mean":
        loss = (per_tok * m).sum() / m.sum().clamp(min=1)
    elif loss_agg == "seq-mean-token-sum":
        loss = (per_tok * m).sum(-1).mean()
    else:  # dr_grpo
        loss = (per_tok * m).sum() / (N * T)
    loss = loss - entropy_coef * (ent * m).sum() / m.sum().clamp(min=1)
    return loss, {"ratio": r.detach(), "entropy": (ent.detach() * m).sum() / m.sum().clamp(min=1)}
