"""GSPO and GRPO losses over logits (or hidden states), on the fused log-prob op.

The policy's per-token log-probs come from one call of the fused kernel
(``token_logprobs``); everything after it (masked means, ratios, advantages,
clipping, KL, aggregation) works on ``(B, G, T)`` / ``(B, G)`` tensors. Autograd
hands the kernel's backward one per-token gradient, so a whole loss reads the
logits once forward and once backward and writes their gradient once. The
reference policy's logits, when given instead of log-probs, are reduced by the
same kernel under ``no_grad`` (one read, nothing saved).

Math: README.md, section "Losses".
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ._loss_inputs import _Inputs

GROUP_NORM_EPS = 1e-4  # as TRL and verl: keeps (r - mean)/(std + eps) finite when std = 0
ADVANTAGES = ("contrast", "group_norm")
KL_ESTIMATORS = ("k1", "k3")
LEVELS = ("sequence", "sequence_token")
AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "dr_grpo")


# ---------------------------------------------------------------- advantages
def contrast_advantage(rewards: Tensor, ratios: Tensor) -> Tensor:
    """The article's advantage, ``(B, G) -> (B, G)``: per group, good = ``r >= mean r``
    (ties to good), bad = ``r < mean r``; ``A = mean_good s - mean_bad s``; good
    sequences get ``+A``, bad ones ``-A``; a group with no bad sequence (all
    rewards equal) gets 0. ``ratios`` are used detached."""
    s = ratios.detach()
    mean = rewards.mean(-1, keepdim=True)
    good = (rewards >= mean) | (rewards.amax(-1, keepdim=True) == rewards.amin(-1, keepdim=True))
    bad = ~good
    n_good, n_bad = good.sum(-1), bad.sum(-1)
    mean_good = torch.where(good, s, 0).sum(-1) / n_good.clamp(min=1)
    mean_bad = torch.where(bad, s, 0).sum(-1) / n_bad.clamp(min=1)
    A = torch.where(n_bad > 0, mean_good - mean_bad, torch.zeros_like(mean_good))
    return torch.where(good, A.unsqueeze(-1), -A.unsqueeze(-1))


def group_norm_advantage(rewards: Tensor, eps: float = GROUP_NORM_EPS) -> Tensor:
    """The paper's advantage ``(r - mean) / (std + eps)`` per group, ``(B, G) -> (B, G)``;
    std is the unbiased one (as ``torch.std``), taken as 0 when ``G = 1``."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


def _across_ranks(x: Tensor, process_group):
    """All-gather ``x`` (B, G_local) along G over ``process_group`` (no gradient):
    returns ``(B, G_total)`` and this rank's column slice. For groups whose G
    completions are spread over the ranks of ``process_group``, in rank order."""
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(parts, x.detach().contiguous(), group=process_group)
    rank = dist.get_rank(process_group)
    G = x.shape[-1]
    return torch.cat(parts, dim=-1), slice(rank * G, (rank + 1) * G)


def _advantage(mode: str, rewards: Tensor, ratios: Optional[Tensor], process_group) -> Tensor:
    """(B, G) advantage of a named mode, over whole groups (gathered across ranks if asked)."""
    if process_group is not None:
        rewards, cols = _across_ranks(rewards, process_group)
        if ratios is not None:
            ratios, _ = _across_ranks(ratios, process_group)
    A = contrast_advantage(rewards, ratios) if mode == "contrast" else group_norm_advantage(rewards)
    return A if process_group is None else A[..., cols]


# ---------------------------------------------------------------- checks
def _check_hparams(epsilon, epsilon_high, beta, kl, entropy_coef=0.0) -> float:
    for name, v in (("epsilon", epsilon), ("beta", beta), ("entropy_coef", entropy_coef)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite float, got {v!r}")
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must lie in (0, 1), got {epsilon}")
    eh = epsilon if epsilon_high is None else epsilon_high
    if isinstance(eh, bool) or not isinstance(eh, (int, float)) or not (math.isfinite(eh) and eh > 0):
        raise ValueError(f"epsilon_high must be a finite float > 0, got {epsilon_high!r}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if kl not in KL_ESTIMATORS:
        raise ValueError(f"kl must be one of {KL_ESTIMATORS}, got {kl!r}")
    return float(eh)


def _check_options(advantage, advantages, temperature, level=None, loss_agg=None) -> None:
    """Constructor-time checks of the string and temperature options (so a typo fails at once)."""
    from ._validate import check_temperature

    if not isinstance(advantage, Tensor) and advantage not in advantages:
        raise ValueError(f"advantage must be one of {advantages} or a tensor, got {advantage!r}")
    if level is not None and level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if loss_agg is not None and loss_agg not in AGGREGATIONS:
        raise ValueError(f"loss_agg must be one of {AGGREGATIONS}, got {loss_agg!r}")
    check_temperature(temperature)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` (..., T) over the tokens where ``mask``; 0 for an empty row."""
    m = mask.to(x.dtype)
    L = m.sum(-1)
    return torch.where(L > 0, (x * m).sum(-1) / L.clamp(min=1), torch.zeros_like(L))


def _token_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Detached mean of ``x`` over the valid tokens of the whole batch (0 if there are none)."""
    return (torch.where(mask, x.detach(), 0).sum() / mask.sum().clamp(min=1)).to(x.dtype)


def _kl_tokens(logp: Tensor, ref: Tensor, kl: str) -> Tensor:
    """Per-token KL estimator against the reference: k1 = logp - ref; k3 = e^(ref-logp) - (ref-logp) - 1."""
    if kl == "k1":
        return logp - ref
    d = ref - logp
    return torch.exp(d) - d - 1


def _denominator(inp: _Inputs) -> Tensor:
    """Per-token log-probs of the ratio's denominator (``inp.denominator``): the old policy's,
    the reference's, or the detached policy itself (on-policy: ratio 1, gradient intact)."""
    den = {"old": inp.old_tok, "ref": inp.ref_tok}.get(inp.denominator)
    den = inp.logp.detach() if den is None else den.to(inp.logp.dtype)
    return torch.where(inp.mask, den, torch.zeros_like(den))


def _ratio(log_r: Tensor, A: Tensor) -> Tensor:
    """``exp(log_r)``, except where the advantage is 0: there the ratio is taken as 1, so an
    overflowing ratio (log_r > 88 in fp32) times a zero advantage gives 0, not inf * 0 = NaN,
    with a zero gradient (the exp is never evaluated there). Elsewhere no clamp: see README."""
    return torch.exp(torch.where(A == 0, torch.zeros_like(log_r), log_r))


def _clip(x: Tensor, A: Tensor, eps_low: float, eps_high: float):
    """``-min(x A, clip(x, 1-eps_low, 1+eps_high) A)`` and the indicator that the clipped term won."""
    clipped = torch.clamp(x, 1.0 - eps_low, 1.0 + eps_high)
    loss = -torch.minimum(x * A, clipped * A)
    is_clipped = ((A > 0) & (x > 1.0 + eps_high)) | ((A < 0) & (x < 1.0 - eps_low))
    return loss, is_clipped


# ---------------------------------------------------------------- losses
def gspo_loss(logits: Optional[Tensor] = None, tokens: Optional[Tensor] = None, rewards: Optional[Tensor] = None,
              mask: Optional[Tensor] = None, *, lengths: Optional[Tensor] = None,
              ref_logprobs: Optional[Tensor] = None, ref_logits: Optional[Tensor] = None,
              old_logprobs: Optional[Tensor] = None, advantage: Union[str, Tensor] = "contrast",
              epsilon: float = 0.2, epsilon_high: Optional[float] = None, beta: float = 0.05, kl: str = "k1",
              temperature: float = 1.0, level: str = "sequence", group_size: Optional[int] = None,
              hidden: Optional[Tensor] = None, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
              ref_hidden: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
              ref_bias: Optional[Tensor] = None, chunk_size: Optional[int] = None, process_group=None,
              entropy_coef: float = 0.0, denominator: Optional[str] = None, vocab_group=None):
    """GSPO: sequence-level importance ratio, sequence-level clipping.

    Per sequence ``s = exp(seqlogp_theta - seqlogp_den)`` (masked means over the
    completion, "1/L"), ``policy = -min(s A, clip(s, 1-eps, 1+eps_high) A)``,
    ``loss = mean over the N sequences of (policy + beta * KL)``, KL the masked
    per-token mean of the k1 or k3 estimator against the reference. An empty
    sequence (L = 0) has ratio 1 and contributes 0 (it still counts in N), as
    it does at the ``sequence_token`` level.

    Args:
        logits: ``(B, G, T, V)``, or ``(N, T, V)`` with ``group_size=G``; or pass
            ``hidden`` ``(..., T, H)`` and ``weight`` ``(V, H)`` (and ``bias``) instead.
        tokens: ``(B, G, T)`` (or ``(N, T)``) sampled ids. mask ``(B, G, T)`` or lengths ``(B, G)``.
        rewards: ``(B, G)`` (or ``(N,)``), needed by the "contrast" and "group_norm" advantages.
        ref_logprobs / ref_logits / ref_hidden(+ref_weight): the reference policy, for the KL
            term (and the ratio's denominator with ``denominator="ref"``).
        old_logprobs: ``(B, G, T)`` behaviour-policy log-probs (the ratio's denominator by default).
        denominator: what divides the policy in the importance ratio: ``"old"`` (old_logprobs,
            the paper's form), ``"ref"`` (the reference: the article's form), ``"detached"``
            (the detached current policy: ratio 1 on-policy, as TRL, verl and Liger-Kernel).
            ``None`` (default): ``"old"`` if old_logprobs is given, else ``"detached"`` when no
            reference is given; a reference without old_logprobs is ambiguous and raises.
        advantage: "contrast" (the article's, default), "group_norm" (the paper's), or a
            ``(B, G)`` tensor (``(B, G, T)`` with ``level="sequence_token"``). Always detached.
        epsilon, epsilon_high: clip range ``[1 - epsilon, 1 + epsilon_high]``; epsilon_high defaults to epsilon.
        beta: KL weight (``beta=0`` needs no reference). kl: "k1" or "k3".
        level: "sequence" (GSPO) or "sequence_token" (GSPO-token: per-token ratio
            ``sg[s] * pi(y_t) / sg[pi(y_t)]``, per-token advantages, mean over tokens).
        process_group: data parallel with groups split across ranks. By default
            each rank's ``(B, G)`` rows are whole groups (place every group's G
            completions on one rank). When a group's completions are spread over
            the ranks of ``process_group`` along G (every rank holds the same B
            prompts, ``G_local`` completions each, in rank order), pass it: rewards
            and detached ratios are all-gathered so the advantage sees whole groups.
        vocab_group: the vocabulary is sharded over this process group (tensor parallel):
            ``logits`` / ``ref_logits`` (or ``weight`` / ``ref_weight``) are this rank's
            contiguous shard of ``V/P`` ids, tokens global; see :mod:`gspo_kernels.vocab_parallel`.
        entropy_coef: entropy bonus, as verl's ``entropy_coeff``: ``loss -= coef * mean over
            sequences of each sequence's token-mean entropy`` (GSPO's own aggregation). The
            entropy comes from the same pass over the logits as the log-probs; with
            ``coef = 0`` (default) no entropy gradient is computed.

    Returns:
        ``(loss, metrics)``: ``loss`` a scalar; ``metrics`` detached tensors:
        ``ratio`` (B, G), ``advantage`` (B, G) (per-sequence mean for token
        advantages), ``seq_logprobs`` (B, G), ``kl`` scalar (mean per-sequence KL,
        0 without reference), ``clip_fraction`` scalar (share of non-empty
        sequences, or of valid tokens at ``sequence_token`` level, whose clipped term won),
        ``policy_loss`` scalar, ``entropy`` scalar (mean entropy over valid tokens, same pass).
    """
    eh = _check_hparams(epsilon, epsilon_high, beta, kl, entropy_coef)
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    inp = _Inputs(logits, tokens, rewards, mask, lengths, ref_logprobs, ref_logits, old_logprobs, advantage,
                  beta, temperature, group_size, hidden, weight, bias, ref_hidden, ref_weight, ref_bias,
                  chunk_size, ADVANTAGES, level == "sequence_token", denominator, vocab_group)
    mask, logp = inp.mask, inp.logp
    seq_logp = _masked_mean(logp, mask)
    log_s = seq_logp - _masked_mean(_denominator(inp), mask)
    s_raw = torch.exp(log_s.detach())  # reported, and seen by the contrast advantage
    if isinstance(inp.advantage, Tensor):
        A = inp.advantage.to(s_raw.dtype)
    else:
        A = _advantage(inp.advantage, inp.rewards.to(s_raw.dtype), s_raw, process_group).to(s_raw.dtype)
    A_s = A if A.dim() == 2 else _masked_mean(A, mask)
    s = _ratio(log_s, A_s if level == "sequence" else torch.ones_like(A_s))
    nonempty = mask.any(-1)
    if level == "sequence":
        policy, clipped = _clip(s, A, epsilon, eh)
        policy = torch.where(nonempty, policy, torch.zeros_like(policy))  # L = 0: nothing to reinforce
        clip_fraction = (clipped & nonempty).sum() / nonempty.sum().clamp(min=1)
        A_seq = A
    else:
        A_t = A if A.dim() == 3 else A.unsqueeze(-1).expand(mask.shape)
        s_t = _ratio(log_s.detach().unsqueeze(-1) + (logp - logp.detach()), A_t)
        per_tok, clipped = _clip(s_t, A_t, epsilon, eh)
        policy = _masked_mean(per_tok, mask)
        clip_fraction = (clipped & mask).sum() / mask.sum().clamp(min=1)
        A_seq = _masked_mean(A_t, mask) if A.dim() == 3 else A
    if inp.ref_tok is not None:
        kl_seq = _masked_mean(_kl_tokens(logp, inp.ref_tok.to(logp.dtype), kl), mask)
    else:
        kl_seq = torch.zeros_like(seq_logp)
    per_seq = policy + beta * kl_seq
    if entropy_coef:
        per_seq = per_seq - entropy_coef * _masked_mean(inp.entropy, mask)
    loss = per_seq.mean()
    metrics = {
        "ratio": s_raw, "advantage": A_seq.detach(), "seq_logprobs": seq_logp.detach(),
        "kl": kl_seq.detach().mean(), "clip_fraction": clip_fraction.detach().to(s_raw.dtype),
        "policy_loss": policy.detach().mean(), "entropy": _token_mean(inp.entropy, mask),
    }
    return loss, metrics


def grpo_loss(logits: Optional[Tensor] = None, tokens: Optional[Tensor] = None, rewards: Optional[Tensor] = None,
              mask: Optional[Tensor] = None, *, lengths: Optional[Tensor] = None,
              ref_logprobs: Optional[Tensor] = None, ref_logits: Optional[Tensor] = None,
              old_logprobs: Optional[Tensor] = None, advantage: Union[str, Tensor] = "group_norm",
              epsilon: float = 0.2, epsilon_high: Optional[float] = None, beta: float = 0.05, kl: str = "k1",
              temperature: float = 1.0, loss_agg: str = "seq-mean-token-mean", group_size: Optional[int] = None,
              hidden: Optional[Tensor] = None, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
              ref_hidden: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
              ref_bias: Optional[Tensor] = None, chunk_size: Optional[int] = None, process_group=None,
              entropy_coef: float = 0.0, denominator: Optional[str] = None, vocab_group=None):
    """GRPO: token-level ratio ``r_t = exp(logp_t - logp_den,t)``, token-level clipping,
    per-token loss ``-min(r_t A_t, clip(r_t) A_t) + beta * KL_t``, aggregated by ``loss_agg``:

    - "seq-mean-token-mean" (the article's): mean over each sequence's tokens, then over sequences;
    - "token-mean" (DAPO): sum over all valid tokens / their count;
    - "seq-mean-token-sum": sum over each sequence's tokens, mean over sequences;
    - "dr_grpo": sum over all valid tokens / (N * T), T the padded length.

    Arguments as :func:`gspo_loss`; ``advantage`` is "group_norm" (default) or a
    ``(B, G)`` / ``(B, G, T)`` tensor. Returns ``(loss, metrics)`` with ``ratio``
    (B, G, T) token ratios, ``advantage`` (B, G) or (B, G, T), ``kl`` (mean
    per-sequence token-mean KL), ``clip_fraction`` (share of valid tokens clipped), ``policy_loss``.
    """
    eh = _check_hparams(epsilon, epsilon_high, beta, kl, entropy_coef)
    if loss_agg not in AGGREGATIONS:
        raise ValueError(f"loss_agg must be one of {AGGREGATIONS}, got {loss_agg!r}")
    inp = _Inputs(logits, tokens, rewards, mask, lengths, ref_logprobs, ref_logits, old_logprobs, advantage,
                  beta, temperature, group_size, hidden, weight, bias, ref_hidden, ref_weight, ref_bias,
                  chunk_size, ("group_norm",), True, denominator, vocab_group)
    mask, logp = inp.mask, inp.logp
    log_r = logp - _denominator(inp)
    A = inp.advantage.to(logp.dtype) if isinstance(inp.advantage, Tensor) else \
        _advantage("group_norm", inp.rewards, None, process_group).to(logp.dtype)
    A_t = A if A.dim() == 3 else A.unsqueeze(-1).expand(mask.shape)
    r = _ratio(log_r, A_t)
    policy_tok, clipped = _clip(r, A_t, epsilon, eh)
    if inp.ref_tok is not None:
        kl_tok = torch.where(mask, _kl_tokens(logp, inp.ref_tok.to(logp.dtype), kl), torch.zeros_like(logp))
    else:
        kl_tok = torch.zeros_like(logp)
    per_tok = policy_tok + beta * kl_tok
    if entropy_coef:
        per_tok = per_tok - entropy_coef * inp.entropy
    per_tok = torch.where(mask, per_tok, torch.zeros_like(logp))
    B, G, T = inp.shape
    if loss_agg == "seq-mean-token-mean":
        loss = _masked_mean(per_tok, mask).mean()
    elif loss_agg == "token-mean":
        loss = per_tok.sum() / mask.sum().clamp(min=1)
    elif loss_agg == "seq-mean-token-sum":
        loss = per_tok.sum(-1).mean()
    else:
        loss = per_tok.sum() / max(B * G * T, 1)  # T = 0: no token, loss 0
    metrics = {
        "ratio": torch.exp(log_r.detach()), "advantage": A.detach(),
        "kl": _masked_mean(kl_tok, mask).mean().detach(),
        "clip_fraction": ((clipped & mask).sum() / mask.sum().clamp(min=1)).to(r.dtype),
        "policy_loss": _masked_mean(torch.where(mask, policy_tok, 0), mask).mean().detach(),
        "entropy": _token_mean(inp.entropy, mask),
    }
    return loss, metrics


class GSPOLoss(nn.Module):
    """``nn.Module`` holding GSPO's hyper-parameters; ``forward`` takes the tensors of :func:`gspo_loss`."""

    def __init__(self, *, advantage="contrast", epsilon=0.2, epsilon_high=None, beta=0.05, kl="k1",
                 temperature=1.0, level="sequence", chunk_size=None, entropy_coef=0.0):
        super().__init__()
        self.hparams = dict(advantage=advantage, epsilon=epsilon, epsilon_high=epsilon_high, beta=beta, kl=kl,
                            temperature=temperature, level=level, chunk_size=chunk_size, entropy_coef=entropy_coef)
        _check_hparams(epsilon, epsilon_high, beta, kl, entropy_coef)
        _check_options(advantage=advantage, advantages=ADVANTAGES, level=level, temperature=temperature)

    def forward(self, logits=None, tokens=None, rewards=None, mask=None, **tensors):
        return gspo_loss(logits, tokens, rewards, mask, **{**self.hparams, **tensors})


class GRPOLoss(nn.Module):
    """``nn.Module`` holding GRPO's hyper-parameters; ``forward`` takes the tensors of :func:`grpo_loss`."""

    def __init__(self, *, advantage="group_norm", epsilon=0.2, epsilon_high=None, beta=0.05, kl="k1",
                 temperature=1.0, loss_agg="seq-mean-token-mean", chunk_size=None, entropy_coef=0.0):
        super().__init__()
        self.hparams = dict(advantage=advantage, epsilon=epsilon, epsilon_high=epsilon_high, beta=beta, kl=kl,
                            temperature=temperature, loss_agg=loss_agg, chunk_size=chunk_size,
                            entropy_coef=entropy_coef)
        _check_hparams(epsilon, epsilon_high, beta, kl, entropy_coef)
        _check_options(advantage=advantage, advantages=("group_norm",), loss_agg=loss_agg, temperature=temperature)

    def forward(self, logits=None, tokens=None, rewards=None, mask=None, **tensors):
        return grpo_loss(logits, tokens, rewards, mask, **{**self.hparams, **tensors})
