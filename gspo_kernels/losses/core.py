"""The composition: resolved per-token inputs + options -> ``(loss, metrics)``.

    log_ratio_t = lp_t - den_t                  den: old / ref / sg[lp] (options.denominator)
    log w       = importance weight at the chosen level (objectives.log_importance_weight)
    l_t         = objective(w, A, lp)           ppo_clip | cispo | sapo | vespo (objectives.OBJECTIVES)
    l_t        *= off-policy mask * high-entropy mask * rollout-correction ratio
    l_t        += beta * KL_t (* w with use_bias_correction_kl)
    loss        = aggregate(l, m) - entropy_coef * (sum H m') / (sum m')

verl's loss types (``opt.family == "verl"``) are composed in :mod:`.verl` from the same parts
(a row of :data:`FAMILIES`). On the Triton path the TRL family runs fused instead (:mod:`.tail`: two kernels forward,
one backward), equal to this composition, which stays the CPU path and the reference.
Everything here is O(N*T); autograd hands the fused log-prob kernel's backward one
per-token gradient for ``lp`` (and one for the entropy when the bonus asks for it).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .advantages import advantage_from_rewards
from .aggregate import aggregate
from .inputs import LossInputs
from .masks import correction_ratio, high_entropy_mask, off_policy_mask, sequence_correction
from .metrics import common_metrics, objective_metrics
from .objectives import OBJECTIVES, guarded_exp, kl_tokens, log_importance_weight, masked_seq_mean
from .options import LossOptions
from .tail import autograd as tail
from .verl import compose_verl

# Loss families composed by their own module, by LossOptions.family; the TRL family is composed
# here (torch parts) or by the fused tail. A new family: its module of parts and one row here.
FAMILIES = {"verl": compose_verl}

_warned_contrast = False


def _warn_contrast(inp: LossInputs, mode: str, stacklevel: int) -> None:
    global _warned_contrast
    if inp.advantages is None and mode == "contrast" and inp.denominator == "detached" and not _warned_contrast:
        _warned_contrast = True
        warnings.warn(
            "advantages='contrast' with the detached current policy as the ratio's denominator "
            "is identically 0 (every ratio is 1): this loss has no gradient. Pass old_logprobs "
            "(off-policy steps) or use advantages='group_norm'",
            stacklevel=stacklevel,
        )


def _advantages(inp: LossInputs, opt: LossOptions, mode: str, log_ratio: Tensor, process_group) -> Tensor:
    if inp.advantages is not None:
        return inp.advantages.to(inp.logp.dtype)
    assert inp.rewards is not None, "inputs.resolve gives advantages or rewards"
    B, G = inp.rewards.shape
    s = None
    if mode == "contrast":
        _warn_contrast(inp, mode, stacklevel=5)
        s = torch.exp(masked_seq_mean(log_ratio, inp.mask).detach()).reshape(B, G)
    A = advantage_from_rewards(mode, inp.rewards, s, process_group)
    return A.reshape(B * G, 1).to(inp.logp.dtype)


def compose(
    inp: LossInputs, opt: LossOptions, mode: str, process_group=None, checks=None
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss and its metrics. ``checks``: the call's queued value checks; the fused tail
    computes those it can in its forward kernel (the rest run in ``checks.finish``)."""
    if tail.applies(inp, opt, process_group):  # the TRL family on the Triton path: the fused tail
        _warn_contrast(inp, mode, stacklevel=4)
        return tail.fused_compose(inp, opt, mode, checks)
    inp = inp.zeroed()
    lp, m = inp.logp, inp.mask
    den = {"old": inp.old, "ref": inp.ref}.get(inp.denominator)
    den = lp.detach() if den is None else den.to(lp.dtype)
    log_ratio = torch.where(m, lp - den, torch.zeros((), dtype=lp.dtype, device=lp.device))
    A = _advantages(inp, opt, mode, log_ratio, process_group)
    if opt.family in FAMILIES:  # a loss family composed by its own module (as an objective is: a table row)
        return FAMILIES[opt.family](inp, opt, A, den.detach())
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
    metrics = common_metrics(
        inp,
        A,
        w_raw,
        policy_loss,
        kl,
        is_ratio,
        seq_ratio=opt.importance_sampling_level == "sequence",
        seq_is=sequence_correction(opt),
    )
    metrics.update(objective_metrics(parts, m, w_raw.dtype))
    return loss, metrics
