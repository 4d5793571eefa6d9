"""The composition: resolved per-token inputs + options -> ``(loss, metrics)``.

    log_ratio_t = lp_t - den_t                  den: old / ref / sg[lp] (options.denominator)
    log w       = importance weight at the chosen level (objectives.log_importance_weight)
    l_t         = objective(w, A, lp)           ppo_clip | cispo | sapo | vespo (objectives.OBJECTIVES)
    l_t        *= off-policy mask * high-entropy mask * rollout-correction ratio
    l_t        += beta * KL_t (* w with use_bias_correction_kl)
    loss        = aggregate(l, m) - entropy_coef * (sum H m') / (sum m')

verl's loss types (``opt.family == "verl"``) are composed in :mod:`.verl` from the same parts.
On the Triton path the TRL family runs fused instead (:mod:`._tail_fn`: two kernels forward,
one backward), equal to this composition, which stays the CPU path and the reference.
Everything here is O(N*T); autograd hands the fused log-prob kernel's backward one
per-token gradient for ``lp`` (and one for the entropy when the bonus asks for it).
"""
from __future__ import annotations

import warnings
from typing import Dict, Tuple

import torch
from torch import Tensor

from . import _tail_fn
from .advantages import advantage_from_rewards
from .aggregate import aggregate
from .inputs import LossInputs
from .masks import high_entropy_mask, off_policy_mask, rollout_correction
from .objectives import OBJECTIVES, guarded_exp, kl_tokens, log_importance_weight, masked_seq_mean
from .options import LossOptions

_warned_contrast = False


def _warn_contrast(inp: LossInputs, mode: str, stacklevel: int) -> None:
    global _warned_contrast
    if (inp.advantages is None and mode == "contrast" and inp.denominator == "detached"
            and not _warned_contrast):
        _warned_contrast = True
        warnings.warn("advantages='contrast' with the detached current policy as the ratio's denominator "
                      "is identically 0 (every ratio is 1): this loss has no gradient. Pass old_logprobs "
                      "(off-policy steps) or use advantages='group_norm'", stacklevel=stacklevel)


def _advantages(inp: LossInputs, opt: LossOptions, mode: str, log_ratio: Tensor, process_group) -> Tensor:
    if inp.advantages is not None:
        return inp.advantages.to(inp.logp.dtype)
    B, G = inp.rewards.shape
    s = None
    if mode == "contrast":
        _warn_contrast(inp, mode, stacklevel=5)
        s = torch.exp(masked_seq_mean(log_ratio, inp.mask).detach()).reshape(B, G)
    A = advantage_from_rewards(mode, inp.rewards, s, process_group)
    return A.reshape(B * G, 1).to(inp.logp.dtype)


def _global_mean(x: Tensor, m: Tensor) -> Tensor:
    """TRL's ``global_masked_mean`` on one process: a per-sequence (N, 1) value averages over
    the N sequences, a per-token one over the valid tokens."""
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if x.shape[-1] == 1 and m.shape[-1] != 1:
        return x.mean()
    return torch.where(m, x, 0).sum() / m.sum().clamp(min=1)


def _seq_fraction(x: Tensor, m: Tensor) -> Tensor:
    """Per-sequence share of valid tokens where ``x`` (NaN for an empty sequence, as TRL)."""
    x = x.to(torch.float32)
    if x.shape[-1] == 1 and m.shape[-1] != 1:
        return x.squeeze(-1)
    return torch.where(m, x, 0).sum(-1) / m.sum(-1)


def sequence_correction(opt: LossOptions) -> bool:
    """Whether ``vllm_importance_sampling_mode`` gives one correction ratio per sequence."""
    return (opt.vllm_importance_sampling_mode or "").startswith("sequence")


def correction_ratio(inp: LossInputs, opt: LossOptions):
    """The rollout-correction ratio: ``importance_sampling_ratio`` as given, or computed from
    ``old`` and ``sampling`` by ``vllm_importance_sampling_mode`` (masks.rollout_correction); None
    without either."""
    if opt.vllm_importance_sampling_mode is None:
        return inp.is_ratio
    return rollout_correction(inp.old, inp.sampling, inp.mask, opt.vllm_importance_sampling_mode,
                              opt.vllm_importance_sampling_clip_min, opt.vllm_importance_sampling_clip_max)


def common_metrics(inp: LossInputs, A: Tensor, ratio: Tensor, policy_loss: Tensor, kl,
                   is_ratio, *, seq_ratio: bool, seq_is: bool = False) -> Dict[str, Tensor]:
    """The metrics every loss reports (detached, in ``ratio``'s dtype): ``ratio`` (per sequence
    when ``seq_ratio``, else per token, in the caller's layout: ``(B, G)`` / ``(B, G, T)``, T = 1
    included), ``advantage`` and ``seq_logprobs`` per sequence, ``policy_loss``, ``kl`` and
    ``entropy`` (means over valid tokens; kl 0 without a reference), and
    ``sampling/importance_sampling_ratio/{min,mean,max}`` when a correction ratio is used: over
    every sequence for a per-sequence one (``seq_is``: a ``sequence_*`` mode, as TRL, T = 1
    included; a given (N, 1) ratio with T > 1), else over the valid tokens."""
    lp, m = inp.logp, inp.mask
    dt = ratio.dtype
    ratio = ratio.detach()
    metrics: Dict[str, Tensor] = {
        "ratio": inp.per_sequence(ratio) if seq_ratio else inp.per_token(ratio.expand(m.shape))}
    A_seq = A if A.shape[-1] == 1 else masked_seq_mean(A, m)
    metrics["advantage"] = inp.per_sequence(A_seq.detach())
    metrics["seq_logprobs"] = inp.per_sequence(masked_seq_mean(lp.detach(), m))
    metrics["policy_loss"] = policy_loss
    metrics["kl"] = _global_mean(kl.detach(), m).to(dt) if kl is not None else torch.zeros((), dtype=dt,
                                                                                           device=lp.device)
    metrics["entropy"] = _global_mean(inp.entropy.detach(), m).to(dt)
    if is_ratio is not None:
        r = is_ratio.detach().to(dt)
        valid = m if r.shape == m.shape and not seq_is else torch.ones_like(r, dtype=torch.bool)
        n = valid.sum()
        metrics["sampling/importance_sampling_ratio/min"] = torch.where(
            n > 0, torch.where(valid, r, float("inf")).min(), 0).to(dt)
        metrics["sampling/importance_sampling_ratio/mean"] = (torch.where(valid, r, 0).sum() / n.clamp(min=1)).to(dt)
        metrics["sampling/importance_sampling_ratio/max"] = torch.where(
            n > 0, torch.where(valid, r, -float("inf")).max(), 0).to(dt)
    return metrics


def compose(inp: LossInputs, opt: LossOptions, mode: str, process_group=None,
            checks=None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The loss and its metrics. ``checks``: the call's queued value checks; the fused tail
    computes those it can in its forward kernel (the rest run in ``checks.finish``)."""
    if _tail_fn.applies(inp, opt, process_group):  # the TRL family on the Triton path: the fused tail
        _warn_contrast(inp, mode, stacklevel=4)
        return _tail_fn.fused_compose(inp, opt, mode, checks)
    inp = inp.zeroed()
    lp, m = inp.logp, inp.mask
    den = {"old": inp.old, "ref": inp.ref}.get(inp.denominator)
    den = lp.detach() if den is None else den.to(lp.dtype)
    log_ratio = torch.where(m, lp - den, torch.zeros((), dtype=lp.dtype, device=lp.device))
    A = _advantages(inp, opt, mode, log_ratio, process_group)
    if opt.family == "verl":
        from .verl import compose_verl

        return compose_verl(inp, opt, A, den.detach())
    log_w = log_importance_weight(log_ratio, lp, m, opt.importance_sampling_level)
    w_raw = torch.exp(log_w.detach())
    w = guarded_exp(log_w, A)
    is_ratio = correction_ratio(inp, opt)
    ctx = {"log_ratio": log_ratio, "mask": m, "is_ratio": is_ratio}
    l, parts = OBJECTIVES[opt.objective](w, w_raw, A, lp, opt, ctx)
    if opt.off_policy_mask_threshold is not None:
        samp = inp.sampling if inp.sampling is not None else den.detach()
        keep = off_policy_mask(A, lp, samp, m, opt.off_policy_mask_threshold)
        l = l * keep.to(l.dtype)
    ent_mask = None
    if opt.top_entropy_quantile < 1.0:
        ent_mask = high_entropy_mask(inp.entropy, m, opt.top_entropy_quantile)
        l = l * ent_mask.to(l.dtype)
    if is_ratio is not None and opt.loss_type != "vespo":
        l = l * is_ratio.to(l.dtype)
    kl = None
    if inp.ref is not None:
        kl = kl_tokens(lp, inp.ref.to(lp.dtype), opt.kl)
        if opt.use_bias_correction_kl:
            kl = kl * torch.exp(log_w)
        if opt.beta:
            l = l + opt.beta * kl
    loss = aggregate(l, m, opt.aggregation, opt.max_completion_length, inp.num_items_in_batch)
    policy_loss = loss.detach()
    if opt.entropy_coef:
        eff = m if ent_mask is None else ent_mask
        loss = loss - opt.entropy_coef * torch.where(eff, inp.entropy, 0).sum() / eff.sum().clamp(min=1)

    # ---- metrics (detached), TRL's names where TRL has the quantity
    metrics = common_metrics(inp, A, w_raw, policy_loss, kl, is_ratio,
                             seq_ratio=opt.importance_sampling_level == "sequence", seq_is=sequence_correction(opt))
    dt = w_raw.dtype
    if "_low" in parts:
        low, high = parts["_low"], parts["_high"]
        region = low | high
        metrics["clip_ratio/low_mean"] = _global_mean(low, m).to(dt)
        metrics["clip_ratio/high_mean"] = _global_mean(high, m).to(dt)
        metrics["clip_ratio/region_mean"] = _global_mean(region, m).to(dt)
        metrics["clip_ratio/low_min"] = torch.nan_to_num(_seq_fraction(low, m), nan=float("inf")).min().to(dt)
        metrics["clip_ratio/high_max"] = torch.nan_to_num(_seq_fraction(high, m), nan=-float("inf")).max().to(dt)
        metrics["clip_fraction"] = metrics["clip_ratio/region_mean"]
    if "_cispo" in parts:
        metrics["cispo_clip_ratio"] = _global_mean(parts["_cispo"], m).to(dt)
    if "_phi" in parts:
        metrics["vespo/phi_seq_mean"] = _global_mean(parts["_phi"], m).to(dt)
    return loss, metrics
