"""verl 0.9.1's policy losses, transcribed into plain PyTorch (no verl, ray or omegaconf needed).

Source: the PyPI wheel ``verl-0.9.1-py3-none-any.whl``
(sha256 db6e6f2a8d9d5808d9ec32d357a42319fdc6967df688ff9d9810050f49bfdd14), files

* ``verl/trainer/ppo/core_algos.py``
  (sha256 a54b6d812db4441e8b0989ae69d2c46b0a0a7b584296f73d8316f264462c37cb):
  ``agg_loss`` l.1140, ``compute_policy_loss_vanilla`` l.1286 (registered "vanilla"),
  ``compute_policy_loss_dppo_tv`` l.1380 ("dppo_tv"), ``compute_policy_loss_dppo_kl`` l.1461
  ("dppo_kl"), ``compute_policy_loss_gspo`` l.1546 ("gspo"), ``compute_policy_loss_sapo``
  l.1623 ("sapo"), ``compute_policy_loss_gpg`` l.1708 ("gpg"), ``compute_policy_loss_clip_cov``
  l.1744 ("clip_cov"), ``compute_policy_loss_kl_cov`` l.1849 ("kl_cov"),
  ``compute_policy_loss_geo_mean`` l.1929 ("geo_mean", GMPO), ``compute_policy_loss_dro``
  l.2015 ("dro"), ``compute_policy_loss_cispo`` l.2048 ("cispo"), ``kl_penalty`` l.2188,
  ``kl_penalty_forward`` l.2216, ``compute_policy_loss_reinforce`` l.2333 (not registered),
  ``compute_policy_loss_bypass_mode`` l.2414 ("bypass_mode").
  These twelve are all of ``POLICY_LOSS_REGISTRY`` in 0.9.1.
* ``verl/trainer/ppo/rollout_corr_helper.py``
  (sha256 763158342551bc4077805a8a009d959a7a2043c4d43b772fe6045f4a40932f3e):
  ``_parse_rollout_is_threshold`` l.93, ``_parse_rollout_rs_thresholds`` l.132,
  ``compute_rollout_rejection_mask`` l.197, ``compute_rollout_correction_weights`` l.522
  (TIS and IcePop), ``compute_rollout_correction_and_rejection_mask`` l.786.
* ``verl/utils/torch_functional.py``
  (sha256 9855e101c19b64c90d1f07bf47ce3e628751afe979b40d2b863ae6d16aa4cee1):
  ``masked_sum`` l.273, ``masked_mean`` l.294.
* ``verl/workers/utils/losses.py`` (sha256
  c6dfeb10900054e96b432633b975f3e3a535d3358a4ad13eeda9f730c5942d4a): ``ppo_loss`` l.57 (how the actor
  adds the entropy bonus and the KL loss to the policy loss).

No v0.9.1 git tag was reachable offline; against the v0.9.0 tag (commit
483b8a009ba3a97563edee3a19887e4862b8094a) these files differ only in GSPO's aggregation:
0.9.0 forced ``seq-mean-token-mean``, 0.9.1 uses ``loss_agg_mode``.

verl's ``ActorConfig`` is replaced by keyword arguments named as its keys, with its defaults
(``verl/workers/config/actor.py`` / ``trainer/config/actor/actor.yaml``): clip_ratio=0.2,
clip_ratio_low=0.2, clip_ratio_high=0.2 (None falls back to clip_ratio), clip_ratio_c=3.0,
loss_agg_mode="token-mean", tau_pos=1.0, tau_neg=1.05; ``policy_loss.*``: clip_cov_ratio=0.0002,
clip_cov_lb=1.0, clip_cov_ub=5.0, kl_cov_ratio=0.0002, ppo_kl_coef=0.1, dro_beta=None;
``policy_loss.rollout_correction.*`` (yaml): rollout_is=None, rollout_is_threshold=2.0,
rollout_is_batch_normalize=False, rollout_rs=None, rollout_rs_threshold=None, loss_type="ppo_clip".
``config.global_batch_info`` becomes the keywords dp_size / batch_num_tokens /
global_batch_size / loss_scale_factor, passed on to ``agg_loss``.

Every loss returns ``(loss, metrics)`` with verl's metric names. The rollout-correction
diagnostics (``rollout_corr/*`` metrics) are not transcribed: only the weights and masks.
"""

from __future__ import annotations

import inspect

import torch

# verl_F.masked_sum / masked_mean and the rollout correction: reference/verl_rollout.py
from .verl_rollout import (  # noqa: F401
    masked_mean,
    masked_sum,
    parse_rollout_is_threshold,
    parse_rollout_rs_thresholds,
    rollout_correction_and_rejection_mask,
    rollout_correction_weights,
    rollout_rejection_mask,
)

VERL_VERSION = "0.9.1"

LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")


def agg_loss(
    loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None
):
    """core_algos.agg_loss: reduce a (B, T) loss matrix to a scalar.

    token-mean:  sum(L*m) / batch_num_tokens * dp_size   (batch_num_tokens default: sum(m))
    token-sum:   sum(L*m) * dp_size
    seq-mean-token-sum:      sum_i [seq_i non-empty] * sum_t(L*m)_i / global_batch_size * dp_size
    seq-mean-token-sum-norm: the same / loss_scale_factor (default: T = loss_mask.shape[-1])
    seq-mean-token-mean:     sum_i [seq_i non-empty] * (sum_t(L*m)_i / (|m_i| + 1e-8)) / global_batch_size * dp_size
    (global_batch_size default: number of non-empty sequences in the micro-batch).
    """
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            batch_num_tokens = loss_mask.sum()
        loss = masked_sum(loss_mat, loss_mask) / batch_num_tokens * dp_size
    elif loss_agg_mode == "token-sum":
        loss = masked_sum(loss_mat, loss_mask) * dp_size
    elif loss_agg_mode in ["seq-mean-token-sum", "seq-mean-token-sum-norm"]:
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).float()
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
            global_batch_size = seq_mask.sum()
        loss = masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            if loss_scale_factor is None:
                loss_scale_factor = loss_mask.shape[-1]
            loss /= loss_scale_factor
    elif loss_agg_mode == "seq-mean-token-mean":
        seq_mask = torch.sum(loss_mask, dim=-1)
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)
        seq_mask = (seq_mask > 0).float()
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
            global_batch_size = seq_mask.sum()
        loss = masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
    else:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    return loss


def _clip_bounds(clip_ratio, clip_ratio_low, clip_ratio_high):
    # config.clip_ratio_low/high if not None else config.clip_ratio
    low = clip_ratio_low if clip_ratio_low is not None else clip_ratio
    high = clip_ratio_high if clip_ratio_high is not None else clip_ratio
    return low, high


# --------------------------------------------------------------------------- KL estimators


def kl_penalty_forward(logprob, ref_logprob, kl_penalty):
    """core_algos.kl_penalty_forward: per-token KL estimate between policy and reference.

    "kl"/"k1": lp - ref;  "abs": |lp - ref|;  "mse"/"k2": 0.5 (lp - ref)^2;
    "low_var_kl"/"k3": d = clamp(ref - lp, -20, 20); clamp(exp(d) - d - 1, -10, 10);
    "full": not implemented in verl.
    """
    if kl_penalty in ("kl", "k1"):
        return logprob - ref_logprob
    if kl_penalty == "abs":
        return (logprob - ref_logprob).abs()
    if kl_penalty in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    if kl_penalty in ("low_var_kl", "k3"):
        kl = ref_logprob - logprob
        kl = torch.clamp(kl, min=-20, max=20)
        ratio = torch.exp(kl)
        kld = (ratio - kl - 1).contiguous()
        return torch.clamp(kld, min=-10, max=10)
    raise NotImplementedError(kl_penalty)


def kl_penalty(logprob, ref_logprob, kl_penalty):
    """core_algos.kl_penalty: forward estimate; a trailing "+" (e.g. "k3+", "low_var_kl+") keeps the
    forward value but takes the gradient of k2 = 0.5 (lp - ref)^2 (straight-through)."""
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    forward_score = kl_penalty_forward(logprob, ref_logprob, base)
    if not kl_penalty.endswith("+") or kl_penalty in ("mse", "k2"):
        return forward_score
    backward_score = 0.5 * (logprob - ref_logprob).square()
    return backward_score - backward_score.detach() + forward_score.detach()


# --------------------------------------------------------------------------- policy losses


def policy_loss_vanilla(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    *,
    clip_ratio=0.2,
    clip_ratio_low=0.2,
    clip_ratio_high=0.2,
    clip_ratio_c=3.0,
    rollout_is_weights=None,
    **global_batch_info,
):
    """ "vanilla": PPO clip with dual clip (Ye et al. 2019) on negative advantages.

    r = exp(clamp(lp - old, -20, 20));  L1 = -A r;  L2 = -A clip(r, 1-low, 1+high);  C = max(L1, L2)
    loss_t = min(-A clip_ratio_c, C) if A < 0 else C;  times rollout_is_weights; agg_loss(loss_agg_mode).
    """
    low, high = _clip_bounds(clip_ratio, clip_ratio_low, clip_ratio_high)
    assert clip_ratio_c > 1.0, f"clip_ratio_c must be > 1.0, got {clip_ratio_c}"
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = masked_mean(-negative_approx_kl, response_mask)

    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - low, 1 + high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)

    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = masked_mean(torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(), response_mask)

    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = agg_loss(pg_losses, response_mask, loss_agg_mode, **global_batch_info)
    return pg_loss, {
        "actor/pg_clipfrac": pg_clipfrac.item(),
        "actor/ppo_kl": ppo_kl.item(),
        "actor/pg_clipfrac_lower": pg_clipfrac_lower.item(),
    }


def _dppo(
    kind,
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode,
    clip_ratio,
    clip_ratio_low,
    clip_ratio_high,
    clip_ratio_c,
    rollout_is_weights,
    global_batch_info,
):
    # Shared body of dppo_tv / dppo_kl: truncated-IS policy gradient on tokens inside a
    # divergence trust region (clip_ratio* are divergence thresholds, not ratio ranges).
    div_low, div_high = _clip_bounds(clip_ratio, clip_ratio_low, clip_ratio_high)
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = masked_mean(-negative_approx_kl, response_mask)
    truncated_ratio = torch.clamp(ratio, max=clip_ratio_c).detach()

    prob = torch.exp(log_prob)
    old_prob = torch.exp(old_log_prob)
    if kind == "tv":
        valid_positive_mask = (prob - old_prob) <= div_high
        valid_negative_mask = (prob - old_prob) >= -div_low
    else:
        binary_kl = old_prob * (old_log_prob - log_prob) + (1 - old_prob) * torch.log(
            (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8)
        )
        valid_positive_mask = (binary_kl <= div_high) | (prob <= old_prob)
        valid_negative_mask = (binary_kl <= div_low) | (prob >= old_prob)
    valid_mask = torch.where(advantages > 0, valid_positive_mask, valid_negative_mask).detach().float()

    pg_losses = -advantages * truncated_ratio * log_prob * valid_mask
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = agg_loss(pg_losses, response_mask, loss_agg_mode, **global_batch_info)
    pg_clipfrac = masked_mean((1.0 - valid_mask).float(), response_mask)
    pg_clipfrac_lower = masked_mean((ratio > clip_ratio_c).float() * valid_mask, response_mask)
    return pg_loss, {
        "actor/pg_clipfrac": pg_clipfrac.item(),
        "actor/ppo_kl": ppo_kl.item(),
        "actor/pg_clipfrac_lower": pg_clipfrac_lower.item(),
    }


def policy_loss_dppo_tv(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    *,
    clip_ratio=0.2,
    clip_ratio_low=0.2,
    clip_ratio_high=0.2,
    clip_ratio_c=3.0,
    rollout_is_weights=None,
    **global_batch_info,
):
    """ "dppo_tv" (DPPO-Binary-TV): loss_t = -A * sg(min(r, clip_ratio_c)) * lp * sg(valid),
    valid = (p - p_old <= high) if A > 0 else (p - p_old >= -low), p = exp(lp).
    verl reads clip_ratio_c with fallback 20.0, but ActorConfig always carries clip_ratio_c (3.0)."""
    return _dppo(
        "tv",
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        clip_ratio,
        clip_ratio_low,
        clip_ratio_high,
        clip_ratio_c,
        rollout_is_weights,
        global_batch_info,
    )


def policy_loss_dppo_kl(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    *,
    clip_ratio=0.2,
    clip_ratio_low=0.2,
    clip_ratio_high=0.2,
    clip_ratio_c=3.0,
    rollout_is_weights=None,
    **global_batch_info,
):
    """ "dppo_kl" (DPPO-Binary-KL): as dppo_tv with the binary KL
    D = p_old (lp_old - lp) + (1 - p_old) log((1 - p_old + 1e-8) / (1 - p + 1e-8)):
    valid = (D <= high or p <= p_old) if A > 0 else (D <= low or p >= p_old)."""
    return _dppo(
        "kl",
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        clip_ratio,
        clip_ratio_low,
        clip_ratio_high,
        clip_ratio_c,
        rollout_is_weights,
        global_batch_info,
    )


def policy_loss_gspo(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="seq-mean-token-mean",
    *,
    clip_ratio=0.2,
    clip_ratio_low=0.2,
    clip_ratio_high=0.2,
    rollout_is_weights=None,
    **global_batch_info,
):
    """ "gspo": sequence ratio with token gradients (GSPO-token).

    log s_it = lp - sg(lp) + sg(sum_t m (lp - old) / max(|m_i|, 1)), clamped max=10; s = exp(.)
    loss_t = max(-A s, -A clip(s, 1-low, 1+high)); no dual clip; agg_loss(loss_agg_mode)
    (the actor passes config.loss_agg_mode, default token-mean; the signature default here is verl's).
    """
    low, high = _clip_bounds(clip_ratio, clip_ratio_low, clip_ratio_high)
    negative_approx_kl = log_prob - old_log_prob
    seq_lengths = torch.sum(response_mask, dim=-1).clamp(min=1)
    negative_approx_kl_seq = torch.sum(negative_approx_kl * response_mask, dim=-1) / seq_lengths
    log_seq_importance_ratio = log_prob - log_prob.detach() + negative_approx_kl_seq.detach().unsqueeze(-1)
    log_seq_importance_ratio = torch.clamp(log_seq_importance_ratio, max=10.0)
    seq_importance_ratio = torch.exp(log_seq_importance_ratio)

    pg_losses1 = -advantages * seq_importance_ratio
    pg_losses2 = -advantages * torch.clamp(seq_importance_ratio, 1 - low, 1 + high)
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = agg_loss(pg_losses, response_mask, loss_agg_mode, **global_batch_info)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    ppo_kl = masked_mean(-negative_approx_kl, response_mask)
    return pg_loss, {
        "actor/pg_clipfrac": pg_clipfrac.item(),
        "actor/ppo_kl": ppo_kl.item(),
        "actor/pg_clipfrac_lower": 0.0,
    }


def policy_loss_sapo(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="seq-mean-token-mean",
    *,
    tau_pos=1.0,
    tau_neg=1.05,
    rollout_is_weights=None,
    **global_batch_info,
):
    """ "sapo": soft gate instead of clipping.

    r = exp(clamp(lp - old, -20, 20)); tau = tau_pos if A > 0 else tau_neg;
    loss_t = -A * sigmoid(tau (r - 1)) * 4 / tau.  Always aggregated with "seq-mean-token-mean":
    loss_agg_mode is ignored.
    """
    tau_pos = torch.as_tensor(tau_pos, dtype=advantages.dtype, device=advantages.device)
    tau_neg = torch.as_tensor(tau_neg, dtype=advantages.dtype, device=advantages.device)
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    taus = torch.where(advantages > 0, tau_pos, tau_neg)
    gates = torch.sigmoid(taus * (ratio - 1.0)) * (4.0 / taus)
    pg_losses = -gates * advantages
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = agg_loss(pg_losses, response_mask, "seq-mean-token-mean", **global_batch_info)
    ppo_kl = masked_mean(-negative_approx_kl, response_mask)
    return pg_loss, {"actor/pg_clipfrac": 0.0, "actor/ppo_kl": ppo_kl.item(), "actor/pg_clipfrac_lower": 0.0}


def policy_loss_gpg(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    *,
    rollout_is_weights=None,
    **global_batch_info,
):
    """ "gpg": plain policy gradient, loss_t = -lp * A (old_log_prob unused); no metrics."""
    pg_losses = -log_prob * advantages
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    return agg_loss(pg_losses, response_mask, loss_agg_mode, **global_batch_info), {}


def policy_loss_clip_cov(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    *,
    clip_ratio=0.2,
    clip_ratio_low=0.2,
    clip_ratio_high=0.2,
    clip_cov_ratio=0.0002,
    clip_cov_lb=1.0,
    clip_cov_ub=5.0,
    rollout_is_weights=None,
    generator=None,
    **global_batch_info,
):
    """ "clip_cov": PPO clip (no ratio clamp, no dual clip) with the gradient of a random subset of
    high-covariance tokens removed.

    cov_t = (A - mean_m A) (lp - mean_m sg(lp)), set to -inf on padding and PPO-clipped tokens;
    candidates: clip_cov_lb < cov_t < clip_cov_ub; pick min(max(int(clip_cov_ratio * N), 1), #cand)
    of them uniformly (torch.randperm, global RNG unless ``generator``) and zero their loss.
    loss_t = max(-A r, -A clip(r, 1-low, 1+high)) * corr_t.
    """
    assert clip_cov_ratio > 0, "clip_ratio should be larger than 0."
    low, high = _clip_bounds(clip_ratio, clip_ratio_low, clip_ratio_high)
    negative_approx_kl = log_prob - old_log_prob
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = masked_mean(-negative_approx_kl, response_mask)

    pg_losses1 = -advantages * ratio
    corr = torch.ones_like(advantages)
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - low, 1 + high)
    clip_by_origin = (pg_losses2 > pg_losses1) & (response_mask > 0)

    cov_all = (advantages - masked_mean(advantages, response_mask)) * (
        log_prob - masked_mean(log_prob.detach(), response_mask)
    )
    cov_all[response_mask == 0] = -torch.inf
    cov_all[clip_by_origin] = -torch.inf

    clip_num = max(int(clip_cov_ratio * response_mask.sum().item()), 1)
    top_k_idx = torch.nonzero((cov_all < clip_cov_ub) & (cov_all > clip_cov_lb) & (response_mask > 0))
    if len(top_k_idx) > 0:
        perm = torch.randperm(len(top_k_idx), generator=generator)
        top_k_idx = top_k_idx[perm[: min(clip_num, len(top_k_idx))]]
    else:
        top_k_idx = torch.empty((0, 2), device=cov_all.device, dtype=torch.long)
    corr[top_k_idx[:, 0], top_k_idx[:, 1]] = 0

    pg_clipfrac = masked_mean((corr == 0).float(), response_mask)
    pg_losses = torch.maximum(pg_losses1, pg_losses2) * corr
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = agg_loss(pg_losses, response_mask, loss_agg_mode, **global_batch_info)
    return pg_loss, {"actor/pg_clipfrac": pg_clipfrac.item(), "actor/ppo_kl": ppo_kl.item()}


def policy_loss_kl_cov(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    *,
    kl_cov_ratio=0.0002,
    ppo_kl_coef=0.1,
    rollout_is_weights=None,
    **global_batch_info,
):
    """ "kl_cov": unclipped policy-gradient ratio loss, plus a |log-ratio| penalty on the top
    max(1, int(kl_cov_ratio * N)) valid tokens by covariance (A - mean A)(sg(lp) - mean sg(lp)).

    r = exp(lp - old) (no clamp); loss_t = -A r, or -A r + ppo_kl_coef |lp - old| on selected tokens.
    """
    assert kl_cov_ratio > 0, "kl_cov_ratio should be larger than 0."
    negative_approx_kl = log_prob - old_log_prob
    abs_kl = negative_approx_kl.abs()
    ratio = torch.exp(negative_approx_kl)
    ppo_kl_abs = masked_mean(negative_approx_kl.abs(), response_mask)
    pg_losses1 = -advantages * ratio
    pg_losses_kl = -advantages * ratio + ppo_kl_coef * abs_kl
    pg_losses = pg_losses1  # same tensor: verl edits it in place

    all_valid = response_mask > 0
    all_valid_idx = torch.nonzero(all_valid.reshape(-1), as_tuple=True)[0]
    all_valid_adv = advantages[all_valid].detach().reshape(-1).cpu()
    all_valid_logp = log_prob[all_valid].detach().reshape(-1).cpu()
    k = min(kl_cov_ratio, len(all_valid_adv))
    if k != 0:
        cov_lst_all = (all_valid_adv - all_valid_adv.mean()) * (all_valid_logp - all_valid_logp.mean())
        k_percent_nums = max(1, int(len(cov_lst_all) * kl_cov_ratio))
        large_cov_idxs = torch.topk(cov_lst_all, k_percent_nums, largest=True).indices
        if len(large_cov_idxs) != 0:
            large_cov_idxs = all_valid_idx[large_cov_idxs]
            rows, cols = large_cov_idxs // advantages.shape[1], large_cov_idxs % advantages.shape[1]
            pg_losses[rows, cols] = pg_losses_kl[rows, cols]

    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = agg_loss(pg_losses, response_mask, loss_agg_mode, **global_batch_info)
    return pg_loss, {"actor/ppo_kl": ppo_kl_abs.item()}


def policy_loss_geo_mean(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    *,
    clip_ratio=0.2,
    clip_ratio_low=0.2,
    clip_ratio_high=0.2,
    rollout_is_weights=None,
    **global_batch_info,
):
    """ "geo_mean" (GMPO): geometric mean of token ratios, clipped in log space, per sequence.

    d = lp - old (no clamp); s = sign(A); d' = s * min(s d, s clamp(d, -low, high));
    R_i = exp(sum_t m d' / (|m_i| + 1e-8)); A_i = sum_t m A / (|m_i| + 1e-8); loss = mean_i(-A_i R_i)
    (times the geometric mean of rollout_is_weights per sequence). Ignores loss_agg_mode and the
    global batch info: a plain mean over all B rows, empty rows included (they contribute 0).
    """
    unknown = set(global_batch_info) - {"dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor"}
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
    low, high = _clip_bounds(clip_ratio, clip_ratio_low, clip_ratio_high)
    negative_approx_kl = log_prob - old_log_prob
    ppo_kl = masked_mean(-negative_approx_kl, response_mask)

    sgn_advantage = torch.sign(advantages)
    negative_approx_kl_clamp = torch.clamp(negative_approx_kl, -low, high)
    negative_approx_kl_min = torch.min(sgn_advantage * negative_approx_kl, sgn_advantage * negative_approx_kl_clamp)
    negative_approx_kl_min = sgn_advantage * negative_approx_kl_min

    response_mask_sum = response_mask.sum(dim=-1)
    ratio = torch.exp((negative_approx_kl_min * response_mask).sum(dim=-1) / (response_mask_sum + 1e-8))
    advantage = (advantages * response_mask).sum(dim=-1) / (response_mask_sum + 1e-8)
    pg_losses = -advantage * ratio
    if rollout_is_weights is not None:
        seq_is_weights = torch.exp(
            (torch.log(rollout_is_weights + 1e-10) * response_mask).sum(dim=-1) / (response_mask_sum + 1e-8)
        )
        pg_losses = pg_losses * seq_is_weights
    pg_loss = torch.mean(pg_losses)

    clipped = torch.ne(negative_approx_kl, negative_approx_kl_clamp)
    pg_clipfrac = masked_mean((clipped * (advantages > 0)).float(), response_mask)
    pg_clipfrac_lower = masked_mean((clipped * (advantages < 0)).float(), response_mask)
    return pg_loss, {
        "actor/pg_clipfrac": pg_clipfrac.item(),
        "actor/ppo_kl": ppo_kl.item(),
        "actor/pg_clipfrac_lower": pg_clipfrac_lower.item(),
    }


def policy_loss_dro(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    *,
    dro_beta=None,
    rollout_is_weights=None,
    **global_batch_info,
):
    """ "dro": loss_t = -(lp A - 0.5 dro_beta (lp - old)^2); dro_beta (policy_loss.dro_beta) must be > 0."""
    if dro_beta is None or dro_beta <= 0:
        raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
    log_ratio = log_prob - old_log_prob
    pg_losses = -(log_prob * advantages - 0.5 * dro_beta * log_ratio.square())
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = agg_loss(pg_losses, response_mask, loss_agg_mode, **global_batch_info)
    return pg_loss, {"actor/ppo_kl": masked_mean(-log_ratio, response_mask).item()}


def policy_loss_cispo(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    *,
    clip_ratio=0.2,
    clip_ratio_low=0.2,
    clip_ratio_high=0.2,
    rollout_is_weights=None,
    **global_batch_info,
):
    """ "cispo": loss_t = -sg(clip(r, 1-low, 1+high)) * A * lp, r = exp(clamp(lp - old, -20, 20))
    (two-sided clamp of the detached weight, unlike TRL's upper-only epsilon_high cap)."""
    low, high = _clip_bounds(clip_ratio, clip_ratio_low, clip_ratio_high)
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = masked_mean(-negative_approx_kl, response_mask)
    clipped_ratio = torch.clamp(ratio, 1 - low, 1 + high)
    pg_losses = -clipped_ratio.detach() * advantages * log_prob
    pg_clipfrac = masked_mean((ratio != clipped_ratio).float(), response_mask)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = agg_loss(pg_losses, response_mask, loss_agg_mode, **global_batch_info)
    return pg_loss, {
        "actor/pg_clipfrac": pg_clipfrac.item(),
        "actor/ppo_kl": ppo_kl.item(),
        "actor/pg_clipfrac_lower": 0.0,
    }


def policy_loss_reinforce(
    rollout_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="seq-mean-token-sum",
    *,
    rollout_is_weights=None,
    **global_batch_info,
):
    """compute_policy_loss_reinforce (not registered; bypass_mode's "reinforce" branch):
    loss_t = -A lp (times rollout_is_weights, detached by the caller); ppo_kl = mean_m(rollout - lp)."""
    if rollout_is_weights is not None:
        pg_losses = -advantages * log_prob * rollout_is_weights
    else:
        pg_losses = -advantages * log_prob
    pg_loss = agg_loss(pg_losses, response_mask, loss_agg_mode, **global_batch_info)
    kl_divergence = masked_mean(-(log_prob - rollout_log_prob), response_mask)
    return pg_loss, {"actor/ppo_kl": kl_divergence.item()}


def policy_loss_bypass_mode(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    *,
    loss_type="ppo_clip",
    rollout_is=None,
    rollout_is_threshold=2.0,
    rollout_is_batch_normalize=False,
    rollout_rs=None,
    rollout_rs_threshold=None,
    clip_ratio=0.2,
    clip_ratio_low=0.2,
    clip_ratio_high=0.2,
    clip_ratio_c=3.0,
    rollout_is_weights=None,
    **global_batch_info,
):
    """ "bypass_mode": old_log_prob *is* the rollout log-prob. Under no_grad, IS weights and a
    rejection mask are computed from (log_prob, old_log_prob) (see rollout_correction_and_rejection_mask);
    then loss_type "reinforce" -> policy_loss_reinforce(mask = rejection mask, weights = IS weights),
    "ppo_clip" -> policy_loss_vanilla(mask = rejection mask, no IS weights). The incoming
    rollout_is_weights is ignored. The rollout_corr/* metrics are not reproduced.
    Keywords loss_type / rollout_* are policy_loss.rollout_correction.* in verl.
    """
    with torch.no_grad():
        computed_is_weights, effective_mask = rollout_correction_and_rejection_mask(
            log_prob,
            old_log_prob,
            response_mask,
            rollout_is=rollout_is,
            rollout_is_threshold=rollout_is_threshold,
            rollout_is_batch_normalize=rollout_is_batch_normalize,
            rollout_rs=rollout_rs,
            rollout_rs_threshold=rollout_rs_threshold,
        )
    if loss_type == "reinforce":
        return policy_loss_reinforce(
            old_log_prob,
            log_prob,
            advantages,
            effective_mask,
            loss_agg_mode,
            rollout_is_weights=computed_is_weights,
            **global_batch_info,
        )
    if loss_type == "ppo_clip":
        return policy_loss_vanilla(
            old_log_prob,
            log_prob,
            advantages,
            effective_mask,
            loss_agg_mode,
            clip_ratio=clip_ratio,
            clip_ratio_low=clip_ratio_low,
            clip_ratio_high=clip_ratio_high,
            clip_ratio_c=clip_ratio_c,
            rollout_is_weights=None,
            **global_batch_info,
        )
    raise ValueError(f"Invalid loss_type: {loss_type}. Must be 'reinforce' or 'ppo_clip'.")


POLICY_LOSSES = {
    "vanilla": policy_loss_vanilla,
    "dppo_tv": policy_loss_dppo_tv,
    "dppo_kl": policy_loss_dppo_kl,
    "gspo": policy_loss_gspo,
    "sapo": policy_loss_sapo,
    "gpg": policy_loss_gpg,
    "clip_cov": policy_loss_clip_cov,
    "kl_cov": policy_loss_kl_cov,
    "geo_mean": policy_loss_geo_mean,
    "dro": policy_loss_dro,
    "cispo": policy_loss_cispo,
    "bypass_mode": policy_loss_bypass_mode,
}

_GLOBAL_BATCH_KEYS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")


def verl_policy_loss(
    loss_mode, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", **config
):
    """Dispatch like verl's actor (``get_policy_loss_fn(loss_mode)`` called with config.loss_agg_mode).

    ``config`` may hold any actor / policy_loss / rollout_correction key; those the chosen loss
    does not read are dropped (verl passes the whole config), unknown names raise TypeError.
    """
    fn = POLICY_LOSSES[loss_mode]
    known = set(_GLOBAL_BATCH_KEYS) | {"generator"}
    for f in POLICY_LOSSES.values():
        known |= {p.name for p in inspect.signature(f).parameters.values() if p.kind == p.KEYWORD_ONLY}
    unknown = set(config) - known
    if unknown:
        raise TypeError(f"unknown verl config keys: {sorted(unknown)}")
    accepted = {p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY}
    kwargs = {k: v for k, v in config.items() if k in accepted or k in _GLOBAL_BATCH_KEYS}
    return fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, **kwargs)


def verl_actor_loss(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    *,
    loss_mode="vanilla",
    loss_agg_mode="token-mean",
    entropy=None,
    entropy_coeff=0.0,
    ref_log_prob=None,
    use_kl_loss=False,
    kl_loss_coef=0.001,
    kl_loss_type="low_var_kl",
    **config,
):
    """workers/utils/losses.py ``ppo_loss``: the actor's total loss
    pg_loss - entropy_coeff * agg_loss(entropy) + kl_loss_coef * agg_loss(kl_penalty(lp, ref, kl_loss_type)),
    both terms aggregated with loss_agg_mode (also for sapo/geo_mean, whose pg term ignores it).
    The response mask is used as bool, as verl does."""
    response_mask = response_mask.to(bool)
    gbi = {k: config[k] for k in _GLOBAL_BATCH_KEYS if k in config}
    policy_loss, metrics = verl_policy_loss(
        loss_mode, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, **config
    )
    metrics = dict(metrics)
    metrics["actor/pg_loss"] = policy_loss.item()
    if entropy is not None:
        entropy_loss = agg_loss(entropy, response_mask, loss_agg_mode, **gbi)
        policy_loss = policy_loss - entropy_coeff * entropy_loss
        metrics["actor/entropy_loss"] = entropy_loss.item()
    if use_kl_loss:
        kld = kl_penalty(log_prob, ref_log_prob, kl_loss_type)
        kl_loss = agg_loss(kld, response_mask, loss_agg_mode, **gbi)
        policy_loss = policy_loss + kl_loss * kl_loss_coef
        metrics["kl_loss"] = kl_loss.item()
        metrics["kl_coef"] = kl_loss_coef
    return policy_loss, metrics
