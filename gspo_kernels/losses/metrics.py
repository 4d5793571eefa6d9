"""The metrics a loss reports, from its per-token values (detached; TRL's and verl's names).

``global_mean`` is TRL's ``global_masked_mean`` on one process; :func:`common_metrics` the
metrics every loss reports; :func:`objective_metrics` those of the TRL objectives' parts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .inputs import LossInputs
from .objectives import masked_seq_mean


def global_mean(x: Tensor, m: Tensor) -> Tensor:
    """TRL's ``global_masked_mean`` on one process: a per-sequence (N, 1) value averages over
    the N sequences, a per-token one over the valid tokens."""
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if x.shape[-1] == 1 and m.shape[-1] != 1:
        return x.mean()
    return torch.where(m, x, 0).sum() / m.sum().clamp(min=1)


def seq_fraction(x: Tensor, m: Tensor) -> Tensor:
    """Per-sequence share of valid tokens where ``x`` (NaN for an empty sequence, as TRL)."""
    x = x.to(torch.float32)
    if x.shape[-1] == 1 and m.shape[-1] != 1:
        return x.squeeze(-1)
    return torch.where(m, x, 0).sum(-1) / m.sum(-1)


def common_metrics(
    inp: LossInputs,
    A: Tensor,
    ratio: Tensor,
    policy_loss: Tensor,
    kl,
    is_ratio,
    *,
    seq_ratio: bool,
    seq_is: bool = False,
) -> dict[str, Tensor]:
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
    metrics: dict[str, Tensor] = {
        "ratio": inp.per_sequence(ratio) if seq_ratio else inp.per_token(ratio.expand(m.shape))
    }
    A_seq = A if A.shape[-1] == 1 else masked_seq_mean(A, m)
    metrics["advantage"] = inp.per_sequence(A_seq.detach())
    metrics["seq_logprobs"] = inp.per_sequence(masked_seq_mean(lp.detach(), m))
    metrics["policy_loss"] = policy_loss
    metrics["kl"] = (
        global_mean(kl.detach(), m).to(dt) if kl is not None else torch.zeros((), dtype=dt, device=lp.device)
    )
    metrics["entropy"] = global_mean(inp.entropy.detach(), m).to(dt)
    if is_ratio is not None:
        r = is_ratio.detach().to(dt)
        valid = m if r.shape == m.shape and not seq_is else torch.ones_like(r, dtype=torch.bool)
        n = valid.sum()
        metrics["sampling/importance_sampling_ratio/min"] = torch.where(
            n > 0, torch.where(valid, r, float("inf")).min(), 0
        ).to(dt)
        metrics["sampling/importance_sampling_ratio/mean"] = (torch.where(valid, r, 0).sum() / n.clamp(min=1)).to(dt)
        metrics["sampling/importance_sampling_ratio/max"] = torch.where(
            n > 0, torch.where(valid, r, -float("inf")).max(), 0
        ).to(dt)
    return metrics


def objective_metrics(parts: dict[str, Tensor], m: Tensor, dt: torch.dtype) -> dict[str, Tensor]:
    """TRL's metrics of an objective's per-token parts (``_low``/``_high``: PPO-clip's clipped
    tokens, ``_cispo``, ``_phi``), in ``dt``: ``clip_ratio/{low_mean,high_mean,region_mean,low_min,
    high_max}`` and ``clip_fraction``, ``cispo_clip_ratio``, ``vespo/phi_seq_mean``."""
    out: dict[str, Tensor] = {}
    if "_low" in parts:
        low, high = parts["_low"], parts["_high"]
        region = low | high
        out["clip_ratio/low_mean"] = global_mean(low, m).to(dt)
        out["clip_ratio/high_mean"] = global_mean(high, m).to(dt)
        out["clip_ratio/region_mean"] = global_mean(region, m).to(dt)
        out["clip_ratio/low_min"] = torch.nan_to_num(seq_fraction(low, m), nan=float("inf")).min().to(dt)
        out["clip_ratio/high_max"] = torch.nan_to_num(seq_fraction(high, m), nan=-float("inf")).max().to(dt)
        out["clip_fraction"] = out["clip_ratio/region_mean"]
    if "_cispo" in parts:
        out["cispo_clip_ratio"] = global_mean(parts["_cispo"], m).to(dt)
    if "_phi" in parts:
        out["vespo/phi_seq_mean"] = global_mean(parts["_phi"], m).to(dt)
    return out
