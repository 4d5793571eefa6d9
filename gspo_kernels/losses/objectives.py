"""Importance weights, per-token objectives and KL estimators: small functions over
O(N*T) per-token values. Notation: ``lp`` (N, T) the policy's log-probs (the only
differentiable input), ``m`` (N, T) the mask, ``A`` the advantage ((N, 1) or (N, T)),
``log_w`` the log importance weight ((N, 1) at sequence level, else (N, T)).

Each objective returns the per-token loss ``l_t`` (broadcastable to (N, T)) and its
metrics; sources: TRL 1.16 ``GRPOTrainer._compute_loss``, verl 0.9.1
``verl/trainer/ppo/core_algos.py`` (see docs/losses.md, "What a call computes").
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .options import LossOptions


def masked_seq_mean(x: Tensor, m: Tensor) -> Tensor:
    """``(sum_t m x) / max(L, 1)`` per sequence, (N, 1): 0 for an empty sequence."""
    return torch.where(m, x, 0).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)


def log_importance_weight(log_ratio: Tensor, lp: Tensor, m: Tensor, level: str) -> Tensor:
    """token: ``log_ratio``; sequence (GSPO): its masked mean, (N, 1); sequence_token
    (GSPO-token): ``sg[sequence] + lp - sg[lp]`` (value of the sequence weight, per-token gradient)."""
    if level == "token":
        return log_ratio
    seq = masked_seq_mean(log_ratio, m)
    if level == "sequence":
        return seq
    return seq.detach() + (lp - lp.detach())


def guarded_exp(log_w: Tensor, A: Tensor) -> Tensor:
    """``exp(log_w)``, but 1 where the advantage is exactly 0: an overflowing weight
    (log_w > 88 in fp32) times a zero advantage gives 0 and a zero gradient, not
    ``inf * 0 = NaN``. Elsewhere no clamp (docs/edges.md, "Overflowing ratios")."""
    return torch.exp(torch.where(A == 0, torch.zeros((), dtype=log_w.dtype, device=log_w.device), log_w))


def kl_tokens(lp: Tensor, ref: Tensor, estimator: str) -> Tensor:
    """Per-token KL estimate against the reference, ``d = ref - lp``: k1 ``-d``; k2 ``d^2/2``;
    k3 ``e^d - d - 1`` (>= 0); low_var_kl verl's k3: d clamped to [-20, 20], then the result to
    [-10, 10] (no gradient where either clamp acts); abs ``|d|``."""
    d = ref - lp
    if estimator == "k1":
        return -d
    if estimator == "abs":
        return d.abs()
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "low_var_kl":
        d = d.clamp(-20.0, 20.0)
        return (torch.exp(d) - d - 1).clamp(-10.0, 10.0)
    return torch.exp(d) - d - 1


# ---------------------------------------------------------------- objectives
def ppo_clip(w: Tensor, w_raw: Tensor, A: Tensor, lp: Optional[Tensor], opt: LossOptions, ctx) -> tuple[Tensor, dict]:
    """``l = -min(w' A, clip(w, 1-eps, 1+eps_high) A)``, ``w' = min(w, delta)`` with two-sided
    clipping (TRL ``delta``); dual clip (verl ``clip_ratio_c``): for ``A < 0``, ``l = min(l, -A c)``."""
    w2 = torch.clamp(w, 1.0 - opt.epsilon, 1.0 + opt.eps_high)
    w1 = w if opt.delta is None else torch.clamp(w, max=opt.delta)
    loss = -torch.minimum(w1 * A, w2 * A)
    if opt.clip_ratio_c is not None:
        loss = torch.where(A < 0, torch.minimum(loss, -A * opt.clip_ratio_c), loss)
    low = (w_raw < 1.0 - opt.epsilon) & (A < 0)
    high = (w_raw > 1.0 + opt.eps_high) & (A > 0)
    return loss, {"_low": low, "_high": high}


def cispo(w: Tensor, w_raw: Tensor, A: Tensor, lp: Tensor, opt: LossOptions, ctx) -> tuple[Tensor, dict]:
    """CISPO: ``l = -sg[min(w, eps_high)] A lp``: the weight clipped and detached, the gradient
    through the log-prob (TRL; verl's ``cispo`` is the same with its ``clip_ratio_high``)."""
    loss = -torch.clamp(w, max=opt.eps_high).detach() * A * lp
    return loss, {"_cispo": (w_raw > opt.eps_high) & (A > 0)}


def sapo(w: Tensor, w_raw: Tensor, A: Tensor, lp: Tensor, opt: LossOptions, ctx) -> tuple[Tensor, dict]:
    """SAPO: ``tau = tau_pos if A > 0 else tau_neg``; ``l = -(4/tau) sigmoid(tau (w - 1)) A``."""
    tau = torch.where(A > 0, opt.sapo_temperature_pos, opt.sapo_temperature_neg).to(w.dtype)
    return -(torch.sigmoid(tau * (w - 1.0)) * 4.0 / tau) * A, {}


def vespo_phi(log_ratio: Tensor, m: Tensor, A: Tensor, is_ratio, opt: LossOptions) -> Tensor:
    """VESPO's detached sequence weight ``phi = exp(lam + k log W - lam W)``, ``log W =
    clamp(sum_t m clamp(log_ratio, +-20) + sum_t clamp(log IS ratio, log 1e-8, 20), log 1e-8, 20)``,
    ``(k, lam) = (k_pos, lam_pos)`` if ``A >= 0`` else the negative pair; non-finite phi -> 0."""
    lo = math.log(1e-8)
    log_w = torch.where(m, log_ratio.detach().clamp(-20.0, 20.0), 0).sum(-1, keepdim=True)
    if is_ratio is not None:
        log_is = torch.clamp(torch.log(is_ratio), lo, 20.0)
        log_w = log_w + (torch.where(m, log_is, 0) if log_is.shape == m.shape else log_is).sum(-1, keepdim=True)
    log_w = log_w.clamp(lo, 20.0)
    pos = A >= 0
    k = torch.where(pos, opt.vespo_k_pos, opt.vespo_k_neg).to(log_w.dtype)
    lam = torch.where(pos, opt.vespo_lambda_pos, opt.vespo_lambda_neg).to(log_w.dtype).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


def vespo(w: Tensor, w_raw: Tensor, A: Tensor, lp: Tensor, opt: LossOptions, ctx) -> tuple[Tensor, dict]:
    """VESPO: ``l = -sg[phi] A lp`` (TRL), phi from :func:`vespo_phi`."""
    phi = vespo_phi(ctx["log_ratio"], ctx["mask"], A, ctx["is_ratio"], opt)
    return -phi * A * lp, {"_phi": phi}


OBJECTIVES = {"ppo_clip": ppo_clip, "cispo": cispo, "sapo": sapo, "vespo": vespo}
