"""Masks and corrections applied to the per-token loss before aggregation, and the
rollout-correction ratio (training vs rollout engine mismatch). All device-side:
no host sync (the entropy quantile is a sort and a gather, not ``torch.quantile``
on a boolean-indexed tensor)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .inputs import LossInputs
from .options import LossOptions


def off_policy_mask(A: Tensor, lp: Tensor, sampling: Tensor, m: Tensor, threshold: float) -> Tensor:
    """Off-policy sequence mask (TRL's ``off_policy_mask_threshold``, DeepSeek-V3.2): keep a
    sequence if ``A >= 0`` or ``(1/L) sum_t m (sampling_t - sg[lp_t]) <= threshold``; a NaN
    difference (a token the rollout engine could not score) counts 0. (N, 1) or (N, T) bool."""
    kl = torch.nan_to_num(sampling - lp.detach(), nan=0.0)
    avg = torch.where(m, kl, 0).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
    return (A >= 0) | (avg <= threshold)


def quantile_of_valid(x: Tensor, m: Tensor, q: float) -> Tensor:
    """``torch.quantile(x[m], q)`` (linear interpolation) without the host sync of boolean
    indexing: invalid entries sort last as +inf, the rank comes from the device-side count.
    +inf when no entry is valid."""
    if x.numel() == 0:
        return torch.full((), float("inf"), dtype=x.dtype, device=x.device)
    vals = torch.where(m, x, float("inf")).flatten().sort().values
    n = m.sum()
    pos = q * (n - 1).clamp(min=0).to(torch.float64)
    lo = pos.floor().long().reshape(1)
    hi = pos.ceil().long().reshape(1)
    v_lo, v_hi = vals.gather(0, lo).reshape(()), vals.gather(0, hi).reshape(())  # no host read of the rank
    frac = (pos - lo).to(x.dtype)
    out = torch.where(v_hi == v_lo, v_lo, torch.lerp(v_lo, v_hi, frac))
    return torch.where(n > 0, out, torch.full_like(out, float("inf")))


def high_entropy_mask(entropy: Tensor, m: Tensor, top_quantile: float) -> Tensor:
    """Tokens whose entropy is at or above the ``1 - top_quantile`` quantile of the valid
    tokens' entropies (TRL's ``top_entropy_quantile``); (N, T) bool, False at masked positions."""
    H = entropy.detach()
    thr = quantile_of_valid(H.float(), m, 1.0 - top_quantile)  # in fp32, as TRL takes it
    return (torch.where(m, H, 0) >= thr) & m


def rollout_correction(
    old_logprobs: Tensor,
    sampling_logprobs: Tensor,
    mask: Tensor,
    mode: str,
    clip_min: Optional[float] = None,
    clip_max: Optional[float] = 3.0,
) -> Tensor:
    """Importance ratio ``pi_old / pi_sampler`` correcting the rollout engine's mismatch (TRL's
    ``vllm_importance_sampling_mode``). ``d_t = (old_t - sampling_t) m_t`` (NaN -> 0);
    ``token_*``: ``r_t = exp(d_t)``, (..., T); ``sequence_*``: ``r = exp(sum_t d_t)``, (..., 1).
    ``*_truncate`` clamps r to ``[clip_min, clip_max]`` (None: unbounded on that side);
    ``*_mask`` sets r = 0 outside it (verl's IcePop is ``token_mask``, its rejection
    sampling ``sequence_mask``). Inputs ``(..., T)``; no gradient."""
    d = torch.nan_to_num((old_logprobs.detach() - sampling_logprobs.detach()) * mask.to(old_logprobs.dtype), nan=0.0)
    if mode.startswith("sequence"):
        d = d.sum(-1, keepdim=True)
    r = torch.exp(d)
    if mode.endswith("truncate"):
        return torch.clamp(r, min=clip_min, max=clip_max)
    lo = -float("inf") if clip_min is None else clip_min
    hi = float("inf") if clip_max is None else clip_max
    return r.masked_fill((r < lo) | (r > hi), 0.0)


def sequence_correction(opt: LossOptions) -> bool:
    """Whether ``vllm_importance_sampling_mode`` gives one correction ratio per sequence."""
    return (opt.vllm_importance_sampling_mode or "").startswith("sequence")


def correction_ratio(inp: LossInputs, opt: LossOptions):
    """The rollout-correction ratio: ``importance_sampling_ratio`` as given, or computed from
    ``old`` and ``sampling`` by ``vllm_importance_sampling_mode`` (:func:`rollout_correction`); None
    without either."""
    if opt.vllm_importance_sampling_mode is None:
        return inp.is_ratio
    assert inp.old is not None and inp.sampling is not None, "inputs.resolve requires them for the mode"
    return rollout_correction(
        inp.old,
        inp.sampling,
        inp.mask,
        opt.vllm_importance_sampling_mode,
        opt.vllm_importance_sampling_clip_min,
        opt.vllm_importance_sampling_clip_max,
    )
