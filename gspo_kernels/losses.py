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

from ._validate import check_index_dtype, check_logits, finite_where, resolve_mask
from .logprobs import token_logprobs

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


def _check_float(t: Optional[Tensor], name: str, shape, flat_ok: bool, device) -> Optional[Tensor]:
    """A per-token float tensor of shape ``(B, G, T)``; ``(N, T)`` only when the
    logits came as ``(N, T, V)`` (``flat_ok``): no other reshape is guessed."""
    if t is None:
        return None
    if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor of shape {tuple(shape)}, got "
                        f"{type(t).__name__ if not isinstance(t, Tensor) else t.dtype}")
    B, G, T = shape
    if flat_ok and tuple(t.shape) == (B * G, T):
        t = t.reshape(shape)
    if tuple(t.shape) != tuple(shape):
        want = f"{tuple(shape)}" + (f" or {(B * G, T)}" if flat_ok else "")
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the logits are on {device}; put them on one device")
    return t


DENOMINATORS = ("old", "ref", "detached")


def _resolve_denominator(denominator, has_old: bool, has_ref: bool) -> str:
    """Which per-token log-probs divide the policy's in the importance ratio (see README, "Behaviour")."""
    if denominator is None:
        if has_old:
            return "old"
        if has_ref:
            raise ValueError(
                "ambiguous ratio denominator: a reference is given but no old_logprobs. Pass "
                "denominator='ref' (ratio against the reference policy, the article's form) or "
                "denominator='detached' (ratio against the detached current policy, = 1 on-policy, as TRL, "
                "verl and Liger-Kernel do; the reference then enters only through the KL term)"
            )
        return "detached"
    if denominator not in DENOMINATORS:
        raise ValueError(f"denominator must be one of {DENOMINATORS} or None, got {denominator!r}")
    if denominator == "old" and not has_old:
        raise ValueError("denominator='old' needs old_logprobs (B, G, T)")
    if denominator == "ref" and not has_ref:
        raise ValueError("denominator='ref' needs a reference: ref_logprobs, ref_logits or ref_hidden")
    return denominator


class _Inputs:
    """Resolved per-token quantities of one loss call, all shaped ``(B, G, T)``.
    Everything at a masked position (logits, old/ref log-probs, per-token
    advantages) is replaced by exact zeros before use, so it never reaches a
    value or a gradient; the same quantities at valid positions must be finite."""

    def __init__(self, logits, tokens, rewards, mask, lengths, ref_logprobs, ref_logits, old_logprobs,
                 advantage, beta, temperature, group_size, hidden, weight, bias, ref_hidden, ref_weight,
                 ref_bias, chunk_size, adv_modes, adv_token_ok, denominator, vocab_group=None):
        if (logits is None) == (hidden is None):
            raise ValueError("give exactly one of logits (..., T, V) or hidden (..., T, H) with weight (V, H)")
        if hidden is not None and weight is None:
            raise ValueError("hidden needs weight, the (V, H) LM head")
        src_name, src = ("logits", logits) if logits is not None else ("hidden", hidden)
        if logits is not None:
            check_logits(logits)
        elif not isinstance(hidden, Tensor):
            raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
        if tokens is None:
            raise ValueError("tokens (B, G, T) are required")
        lead = tuple(src.shape[:-1])
        if len(lead) == 3:
            B, G, T = lead
            if group_size is not None and group_size != G:
                raise ValueError(f"group_size={group_size!r} does not match G = {G} of {src_name} of shape "
                                 f"{tuple(src.shape)}; omit group_size for 4-D input")
        elif len(lead) == 2:
            if group_size is None:
                raise ValueError(f"(N, T, V) input of shape {tuple(src.shape)} needs group_size=G")
            if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 \
                    or lead[0] % group_size:
                raise ValueError(f"group_size must be a positive divisor of N = {lead[0]}, got {group_size!r}")
            G, T = group_size, lead[1]
            B = lead[0] // G
        else:
            raise ValueError(f"{src_name} must be (B, G, T, {'V' if logits is not None else 'H'}) or "
                             f"(N, T, {'V' if logits is not None else 'H'}), got shape {tuple(src.shape)}")
        if B * G == 0:
            raise ValueError(f"{src_name} of shape {tuple(src.shape)} holds no sequence (B * G = 0): "
                             "the loss is a mean over sequences")
        check_index_dtype(tokens, "tokens")
        if tuple(tokens.shape) != lead:
            raise ValueError(f"tokens must have shape {lead} ({src_name}.shape[:-1]), got {tuple(tokens.shape)}")
        self.shape = (B, G, T)
        self.vocab_group = vocab_group
        flat = len(lead) == 2
        dev = src.device
        if ref_logprobs is not None and ref_logits is not None:
            raise ValueError("give ref_logprobs or ref_logits, not both")
        if ref_logits is not None and ref_hidden is not None:
            raise ValueError("give ref_logits or ref_hidden, not both")
        if ref_logits is not None:
            check_logits(ref_logits, name="ref_logits")
            if logits is not None and tuple(ref_logits.shape) != tuple(logits.shape):
                raise ValueError(f"ref_logits must have the logits' shape {tuple(logits.shape)}, "
                                 f"got {tuple(ref_logits.shape)}")
        has_ref = ref_logprobs is not None or ref_logits is not None or ref_hidden is not None
        if beta > 0 and not has_ref:
            raise ValueError("beta > 0 needs a reference: ref_logprobs, ref_logits or ref_hidden (or set beta=0)")
        self.denominator = _resolve_denominator(denominator, old_logprobs is not None, has_ref)
        mask_b = resolve_mask(mask, lengths, tokens)  # checks shapes against the given tokens
        self.mask = (torch.ones((B, G, T), dtype=torch.bool, device=tokens.device) if mask_b is None
                     else mask_b.reshape(B, G, T))
        nonempty = self.mask.any(-1)
        # advantage mode / rewards
        if isinstance(advantage, Tensor):
            ok = [(B, G)] + ([(B, G, T)] if adv_token_ok else [])
            if tuple(advantage.shape) not in ok:
                raise ValueError(f"advantage tensor must have shape {' or '.join(map(str, ok))}, "
                                 f"got {tuple(advantage.shape)}")
            if not advantage.dtype.is_floating_point:
                raise TypeError(f"advantage tensor must be float, got {advantage.dtype}")
            if advantage.device != dev:
                raise ValueError(f"advantage is on {advantage.device} but the logits are on {dev}")
            valid = self.mask if advantage.dim() == 3 else nonempty
            self.advantage = finite_where(advantage.detach(), valid, "advantage")
        elif isinstance(advantage, str) and advantage in adv_modes:
            self.advantage = advantage
            if rewards is None:
                raise ValueError(f"advantage={advantage!r} needs rewards (B, G)")
        else:
            raise ValueError(f"advantage must be one of {adv_modes} or a tensor, got {advantage!r}")
        if rewards is not None:
            if not isinstance(rewards, Tensor) or not (rewards.dtype.is_floating_point or
                                                       rewards.dtype in (torch.int32, torch.int64)):
                raise TypeError(f"rewards must be a float tensor of shape {(B, G)}, got "
                                f"{type(rewards).__name__ if not isinstance(rewards, Tensor) else rewards.dtype}")
            if flat and tuple(rewards.shape) == (B * G,):
                rewards = rewards.reshape(B, G)
            if tuple(rewards.shape) != (B, G):
                want = f"{(B, G)}" + (f" or {(B * G,)}" if flat else "")
                raise ValueError(f"rewards must have shape {want}, got {tuple(rewards.shape)}")
            if rewards.device != dev:
                raise ValueError(f"rewards is on {rewards.device} but the logits are on {dev}; put them on one device")
            rewards = rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32))
            rewards = finite_where(rewards, torch.ones((), dtype=torch.bool, device=dev), "rewards")
        self.rewards = rewards
        ref_tok = _check_float(ref_logprobs, "ref_logprobs", (B, G, T), flat, dev)
        old_tok = _check_float(old_logprobs, "old_logprobs", (B, G, T), flat, dev)
        self.ref_tok = None if ref_tok is None else finite_where(ref_tok.detach(), self.mask, "ref_logprobs")
        self.old_tok = None if old_tok is None else finite_where(old_tok.detach(), self.mask, "old_logprobs")
        # the policy's per-token log-probs and entropies: the only pass over the logits
        self.logp, self.entropy = self._logprobs(logits, tokens, hidden, weight, bias, temperature, chunk_size,
                                                 grad=True)
        if ref_logits is not None or ref_hidden is not None:
            with torch.no_grad():
                self.ref_tok = self._logprobs(ref_logits, tokens, ref_hidden, ref_weight if ref_weight is not None
                                              else weight, ref_bias, temperature, chunk_size, grad=False)[0]
        self.tokens = tokens.reshape(B, G, T)

    def _logprobs(self, logits, tokens, hidden, weight, bias, temperature, chunk_size, grad):
        """``(logp, entropy)`` per token, ``(B, G, T)``, exact zeros at masked positions;
        the entropy comes from the same pass (for the policy; None for the reference)."""
        valid = self.mask.reshape(tokens.shape)
        kw = dict(temperature=temperature, valid=valid, return_entropy=grad, vocab_group=self.vocab_group)
        if logits is not None:
            out = token_logprobs(logits, tokens, **kw)
        else:
            from .linear import linear_token_logprobs  # local: the linear path is optional

            out = linear_token_logprobs(hidden, weight, tokens, bias=bias, chunk_size=chunk_size, **kw)
        lp, ent = out if grad else (out, None)
        zero = lambda x: torch.where(self.mask, x.reshape(self.shape), torch.zeros((), dtype=x.dtype,  # noqa: E731
                                                                                   device=x.device))
        return zero(lp), None if ent is None else zero(ent)


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
