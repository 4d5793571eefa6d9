"""verl 0.9.1's policy losses, composed from the core's parts as verl's actor composes them.

Per token (``lp`` the policy's log-probs, ``old`` the denominator's, ``m`` the mask, ``A`` the
advantage broadcast to every token, ``d = lp - old``, ``r = exp(clamp(d, -20, 20))``)::

    pg_t   = the loss type's per-token loss (table below)
    pg_t  *= rollout IS weight (importance_sampling_ratio, or vllm_importance_sampling_mode)
    loss   = agg(pg) + beta * agg(KL_t(lp, ref)) - entropy_coef * agg(H)

``agg`` is verl's ``agg_loss`` with ``loss_agg_mode`` (:func:`verl_aggregate`); ``beta`` is
verl's ``kl_loss_coef`` (``use_kl_loss``: a reference and beta > 0), ``kl`` its ``kl_loss_type``.

| loss_type | verl loss_mode | pg_t |
|---|---|---|
| vanilla | vanilla | ``-min(r A, clip(r, 1-eps, 1+eps_high) A)``, dual clip ``c`` for A < 0 |
| verl_gspo | gspo | the same on ``s_t = exp(min(sg[mean_m d] + lp - sg[lp], 10))``, no dual clip |
| verl_sapo | sapo | ``-(4/tau) sigmoid(tau (r - 1)) A``; pg always ``seq-mean-token-mean`` |
| verl_cispo | cispo | ``-sg[clip(r, 1-eps, 1+eps_high)] A lp`` |
| gpg | gpg | ``-A lp`` |
| clip_cov | clip_cov | PPO clip on ``exp(d)``, zeroed on random high-covariance tokens |
| kl_cov | kl_cov | ``-A exp(d)``, ``+ ppo_kl_coef |d|`` on the top-covariance tokens |
| geo_mean | geo_mean | per sequence ``-A_i exp(mean_m clip_log(d))``, plain mean over rows |
| dro | dro | ``-A lp + dro_beta d^2 / 2`` |
| dppo_tv / dppo_kl | dppo_tv / dppo_kl | ``-A sg[min(r, c)] lp`` on tokens inside the trust region |

``eps``/``eps_high`` are verl's ``clip_ratio_low/high`` (dppo: divergence thresholds), ``c`` its
``clip_ratio_c`` (None: 3.0). Not supported: verl's ``bypass_mode`` (a rollout-correction
driver, not a loss) and the straight-through ``"k3+"``-style KL types; TRL-only options
(``delta``, sequence levels, the off-policy and entropy masks) are refused with a verl loss type;
``use_bias_correction_kl`` does not apply (verl's KL loss has no importance weight).
``clip_cov`` and ``kl_cov`` read token counts from the device (host syncs, as verl; not
``torch.compile(fullgraph=True)``-able); ``clip_cov`` draws its tokens with ``torch.randperm`` on
the global CPU generator, as verl does: seed it (``torch.manual_seed``) to reproduce a step.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .inputs import LossInputs
from .masks import correction_ratio, sequence_correction
from .metrics import common_metrics
from .objectives import guarded_exp, kl_tokens, log_importance_weight, masked_seq_mean, ppo_clip, sapo
from .options import LossOptions
from .verl_config import (
    CLIP_RATIO_C,
    VERL_ACTOR_PREFIXES,
    VERL_CONFIG_KEYS,
    VERL_DEFAULTS,
    VERL_IGNORED_KEYS,
    VERL_KL_TYPES,
    VERL_LOSS_MODES,
    options_from_verl,
)

# verl's actor config -> options (losses/verl_config.py), kept importable from here
__all__ = [
    "CLIP_RATIO_C",
    "VERL_ACTOR_PREFIXES",
    "VERL_CONFIG_KEYS",
    "VERL_DEFAULTS",
    "VERL_IGNORED_KEYS",
    "VERL_KL_TYPES",
    "VERL_LOSS_MODES",
    "VERL_OBJECTIVES",
    "compose_verl",
    "options_from_verl",
    "verl_aggregate",
]


# ---------------------------------------------------------------- aggregation
def verl_aggregate(
    l: Tensor, m: Tensor, mode: str, loss_scale_factor: Optional[int] = None, num_tokens: Optional[Tensor] = None
) -> Tensor:
    """verl's ``agg_loss`` on one process. token-mean: ``sum m l / num_tokens`` (default ``sum m``);
    token-sum: ``sum m l``; seq-mean-token-sum: mean of ``sum_t m l`` over the non-empty sequences;
    seq-mean-token-sum-norm: that ``/ loss_scale_factor`` (default T); seq-mean-token-mean: mean of
    ``sum_t m l / (L + 1e-8)`` over the non-empty sequences. An all-empty batch gives 0 (verl: 0/0)."""
    lm = torch.where(m, l, torch.zeros((), dtype=l.dtype, device=l.device))
    if mode == "token-mean":
        n = m.sum() if num_tokens is None else num_tokens.to(lm.dtype)
        return lm.sum() / n.clamp(min=1)
    if mode == "token-sum":
        return lm.sum()
    L = m.sum(-1)
    per_seq = lm.sum(-1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / (L + 1e-8)  # an integer count + 1e-8: in torch's default dtype, as verl's
    loss = torch.where(L > 0, per_seq, 0).sum() / (L > 0).sum().clamp(min=1)
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_scale_factor or m.shape[-1])
    return loss


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    """verl's masked_mean: ``sum m x / (sum m + 1e-8)``."""
    return torch.where(m, x, 0).sum() / (m.sum() + 1e-8)


# ---------------------------------------------------------------- parts
class Terms(NamedTuple):
    pg: Tensor  # (N, T) per-token loss; (N, 1) per-sequence (geo_mean)
    ratio: Tensor  # the importance ratio the loss uses, for the "ratio" metric
    stats: dict[str, Tensor]  # verl metric name -> per-token value, reported as its masked mean


def pg_logprob(weight: Tensor, A: Tensor, lp: Tensor) -> Tensor:
    """``-sg[weight] A lp``: the policy gradient through the log-prob (cispo, dppo, gpg, dro)."""
    return -weight.detach() * A * lp


def _ppo(w: Tensor, A: Tensor, opt: LossOptions, clip_ratio_c: Optional[float]):
    """objectives.ppo_clip with verl's dual clip ``clip_ratio_c`` (None: none); verl's pg_clipfrac
    (``clip(w) A < w A``) is its clipped region."""
    loss, parts = ppo_clip(w, w.detach(), A, None, dataclasses.replace(opt, clip_ratio_c=clip_ratio_c), None)
    return loss, parts["_low"] | parts["_high"]


def _zeros(x: Tensor) -> Tensor:
    return torch.zeros_like(x.detach())


def _ratio(d: Tensor) -> Tensor:
    return torch.exp(d.clamp(-20.0, 20.0))


def vanilla(lp, old, d, A, m, opt) -> Terms:
    r = _ratio(d)
    c = opt.clip_ratio_c or CLIP_RATIO_C
    pg, clipped = _ppo(r, A, opt, c)
    return Terms(
        pg,
        r,
        {
            "actor/pg_clipfrac": clipped,
            "actor/ppo_kl": -d.clamp(-20.0, 20.0).detach(),
            "actor/pg_clipfrac_lower": (A < 0) & (r.detach() > c),
        },
    )


def verl_gspo(lp, old, d, A, m, opt) -> Terms:
    log_s = log_importance_weight(d, lp, m, "sequence_token").clamp(max=10.0)
    pg, clipped = _ppo(torch.exp(log_s), A, opt, None)
    ratio = torch.exp(masked_seq_mean(d.detach(), m).clamp(max=10.0))
    return Terms(
        pg, ratio, {"actor/pg_clipfrac": clipped, "actor/ppo_kl": -d.detach(), "actor/pg_clipfrac_lower": _zeros(d)}
    )


def verl_sapo(lp, old, d, A, m, opt) -> Terms:
    r = _ratio(d)
    pg, _ = sapo(r, r.detach(), A, lp, opt, None)
    return Terms(
        pg,
        r,
        {
            "actor/pg_clipfrac": _zeros(d),
            "actor/ppo_kl": -d.clamp(-20.0, 20.0).detach(),
            "actor/pg_clipfrac_lower": _zeros(d),
        },
    )


def verl_cispo(lp, old, d, A, m, opt) -> Terms:
    r = _ratio(d).detach()
    w = r.clamp(1.0 - opt.epsilon, 1.0 + opt.eps_high)
    return Terms(
        pg_logprob(w, A, lp),
        r,
        {
            "actor/pg_clipfrac": w != r,
            "actor/ppo_kl": -d.clamp(-20.0, 20.0).detach(),
            "actor/pg_clipfrac_lower": _zeros(d),
        },
    )


def gpg(lp, old, d, A, m, opt) -> Terms:
    return Terms(pg_logprob(torch.ones_like(A), A, lp), torch.exp(d.detach()), {})


def dro(lp, old, d, A, m, opt) -> Terms:
    pg = pg_logprob(torch.ones_like(A), A, lp) + 0.5 * opt.dro_beta * d * d
    return Terms(pg, torch.exp(d.detach()), {"actor/ppo_kl": -d.detach()})


def covariance(A: Tensor, lp: Tensor, m: Tensor, eps: float) -> Tensor:
    """``(A - mean_m A) (sg[lp] - mean_m sg[lp])`` per token, means ``sum m x / (sum m + eps)``."""
    lp = lp.detach()
    n = m.sum() + eps
    return (A - torch.where(m, A, 0).sum() / n) * (lp - torch.where(m, lp, 0).sum() / n)


def random_tokens(candidates: Tensor, k: int) -> Tensor:
    """``min(k, #candidates)`` of the candidate tokens, uniformly at random (row-major candidates
    permuted by ``torch.randperm`` on the global CPU generator, as verl): bool like ``candidates``."""
    idx = candidates.flatten().nonzero().squeeze(-1)  # host sync
    chosen = torch.zeros(candidates.numel(), dtype=torch.bool, device=candidates.device)
    if idx.numel():
        chosen[idx[torch.randperm(idx.numel())[:k].to(idx.device)]] = True
    return chosen.view_as(candidates)


def top_tokens(score: Tensor, m: Tensor, ratio: float) -> Tensor:
    """The ``max(1, int(n ratio))`` valid tokens of largest ``score`` (n valid tokens; none if n = 0)."""
    n = int(m.sum())  # host sync
    chosen = torch.zeros(m.numel(), dtype=torch.bool, device=m.device)
    if n:
        chosen[torch.where(m, score, -float("inf")).flatten().topk(max(1, int(n * ratio))).indices] = True
    return chosen.view_as(m)


def clip_cov(lp, old, d, A, m, opt) -> Terms:
    r = guarded_exp(d, A)
    pg, clipped = _ppo(r, A, opt, None)
    cov = covariance(A, lp, m, 1e-8)
    candidates = m & ~clipped & (cov > opt.clip_cov_lb) & (cov < opt.clip_cov_ub)
    drop = random_tokens(candidates, max(int(opt.clip_cov_ratio * int(m.sum())), 1))
    pg = torch.where(drop, 0, pg)
    return Terms(pg, torch.exp(d.detach()), {"actor/pg_clipfrac": drop, "actor/ppo_kl": -d.detach()})


def kl_cov(lp, old, d, A, m, opt) -> Terms:
    r = guarded_exp(d, A)
    top = top_tokens(covariance(A, lp, m, 0.0), m, opt.kl_cov_ratio)
    pg = -A * r + torch.where(top, opt.ppo_kl_coef * d.abs(), 0)
    return Terms(pg, torch.exp(d.detach()), {"actor/ppo_kl": d.detach().abs()})


def geo_mean(lp, old, d, A, m, opt) -> Terms:
    """GMPO: ``d`` clipped to [-eps, eps_high] on the side that lowers ``sign(A) d``; per sequence
    ``-A_i exp(sum_t m d' / (L + 1e-8))``, ``A_i = sum_t m A / (L + 1e-8)``; (N, 1)."""
    dc = d.clamp(-opt.epsilon, opt.eps_high)
    s = torch.sign(A)
    d_min = s * torch.minimum(s * d, s * dc)
    L = m.sum(-1, keepdim=True) + 1e-8
    R = torch.exp(torch.where(m, d_min, 0).sum(-1, keepdim=True) / L)
    A_seq = torch.where(m, A, 0).sum(-1, keepdim=True) / L
    clipped = d.detach() != dc.detach()
    return Terms(
        -A_seq * R,
        R.detach(),
        {
            "actor/pg_clipfrac": clipped & (A > 0),
            "actor/ppo_kl": -d.detach(),
            "actor/pg_clipfrac_lower": clipped & (A < 0),
        },
    )


def geometric_mean(w: Tensor, m: Tensor) -> Tensor:
    """Per sequence ``exp(sum_t m log(w + 1e-10) / (L + 1e-8))`` (geo_mean's rollout IS weight)."""
    L = m.sum(-1, keepdim=True) + 1e-8
    return torch.exp(torch.where(m, torch.log(w + 1e-10), 0).sum(-1, keepdim=True) / L)


def dppo_trust_region(lp: Tensor, old: Tensor, A: Tensor, opt: LossOptions, kind: str) -> Tensor:
    """DPPO's tokens inside the trust region (detached), ``p = e^lp``: tv: ``p - p_old <= eps_high``
    (A > 0) / ``>= -eps`` (A <= 0); kl: binary KL ``D = p_old (old - lp) + (1 - p_old)
    log((1 - p_old + 1e-8) / (1 - p + 1e-8))``, ``D <= eps_high or p <= p_old`` (A > 0) /
    ``D <= eps or p >= p_old``."""
    lp = lp.detach()
    p, p_old = torch.exp(lp), torch.exp(old)
    if kind == "tv":
        pos, neg = (p - p_old) <= opt.eps_high, (p - p_old) >= -opt.epsilon
    else:
        D = p_old * (old - lp) + (1 - p_old) * torch.log((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
        pos, neg = (opt.eps_high >= D) | (p <= p_old), (opt.epsilon >= D) | (p >= p_old)
    return torch.where(A > 0, pos, neg)


def _dppo(kind: str):
    def loss(lp, old, d, A, m, opt) -> Terms:
        r = _ratio(d).detach()
        c = opt.clip_ratio_c or CLIP_RATIO_C
        keep = dppo_trust_region(lp, old, A, opt, kind)
        pg = pg_logprob(r.clamp(max=c) * keep, A, lp)
        return Terms(
            pg,
            r,
            {
                "actor/pg_clipfrac": ~keep,
                "actor/ppo_kl": -d.clamp(-20.0, 20.0).detach(),
                "actor/pg_clipfrac_lower": (r > c) & keep,
            },
        )

    loss.__name__ = f"dppo_{kind}"
    return loss


VERL_OBJECTIVES = {
    "vanilla": vanilla,
    "verl_gspo": verl_gspo,
    "verl_sapo": verl_sapo,
    "verl_cispo": verl_cispo,
    "gpg": gpg,
    "clip_cov": clip_cov,
    "kl_cov": kl_cov,
    "geo_mean": geo_mean,
    "dro": dro,
    "dppo_tv": _dppo("tv"),
    "dppo_kl": _dppo("kl"),
}
PG_AGGREGATION = {"verl_sapo": "seq-mean-token-mean"}  # verl's sapo ignores loss_agg_mode for its pg term
SEQUENCE_RATIO = ("verl_gspo", "geo_mean")  # the loss types whose "ratio" metric is one per sequence


# ---------------------------------------------------------------- the actor's loss
def compose_verl(inp: LossInputs, opt: LossOptions, A: Tensor, old: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """verl's actor loss (workers/utils/losses.py ``ppo_loss``) on resolved inputs: the loss type's
    policy loss times the rollout IS weights, aggregated, plus the KL loss, minus the entropy bonus.
    ``A`` (N, 1) or (N, T) and ``old`` (N, T) detached. Metrics: core.common_metrics (``policy_loss``:
    pg + beta * KL loss, before the entropy bonus) and verl's names: ``actor/pg_loss``,
    ``actor/pg_clipfrac``, ``actor/pg_clipfrac_lower``, ``actor/ppo_kl`` (as the loss type reports
    them), ``actor/entropy_loss``, and ``kl_loss`` / ``kl_coef`` with a reference."""
    lp, m = inp.logp, inp.mask
    d = torch.where(m, lp - old, torch.zeros((), dtype=lp.dtype, device=lp.device))
    At = A.expand_as(lp)  # verl's advantages are per token
    pg, ratio, stats = VERL_OBJECTIVES[opt.objective](lp, old, d, At, m, opt)
    is_ratio = correction_ratio(inp, opt)
    agg = lambda x, mode=opt.aggregation: verl_aggregate(  # noqa: E731
        x, m, mode, opt.max_completion_length, inp.num_items_in_batch
    )
    if opt.objective == "geo_mean":  # per sequence: a plain mean over the N rows, IS as a geometric mean
        if is_ratio is not None:
            pg = pg * geometric_mean(is_ratio.to(pg.dtype).expand_as(lp), m)
        pg_loss = pg.mean()
    else:
        if is_ratio is not None:
            pg = pg * is_ratio.to(pg.dtype)
        pg_loss = agg(pg, PG_AGGREGATION.get(opt.objective, opt.aggregation))
    loss = pg_loss
    kl = kl_loss = None
    if inp.ref is not None:
        kl = kl_tokens(lp, inp.ref.to(lp.dtype), opt.kl)
        kl_loss = agg(kl)
        if opt.beta:
            loss = loss + opt.beta * kl_loss
    policy_loss = loss.detach()
    entropy_loss = agg(inp.entropy)
    if opt.entropy_coef:
        loss = loss - opt.entropy_coef * entropy_loss

    metrics = common_metrics(
        inp,
        A,
        ratio,
        policy_loss,
        kl,
        is_ratio,
        seq_ratio=opt.objective in SEQUENCE_RATIO,
        seq_is=sequence_correction(opt),
    )
    dt = ratio.dtype
    metrics.update({name: _masked_mean(x.to(dt), m).to(dt) for name, x in stats.items()})
    metrics["actor/pg_loss"] = pg_loss.detach()
    metrics["actor/entropy_loss"] = entropy_loss.detach()
    if kl_loss is not None:
        metrics["kl_loss"] = kl_loss.detach()
        metrics["kl_coef"] = torch.tensor(opt.beta, dtype=dt, device=lp.device)
    return loss, metrics
