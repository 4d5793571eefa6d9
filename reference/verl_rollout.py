"""verl 0.9.1's rollout correction (``verl/trainer/ppo/rollout_corr_helper.py``), transcribed
into plain PyTorch: importance weights (TIS, IcePop) and rejection masks, without verl's
diagnostic metrics. Source and line numbers: see :mod:`reference.verl_losses`."""

from __future__ import annotations

import math

import torch

SAFETY_BOUND = 20.0  # rollout_corr_helper.SAFETY_BOUND


def masked_sum(values, mask, axis=None):
    """verl_F.masked_sum: sum of values where mask != 0 (NaNs outside the mask are zeroed)."""
    valid_values = torch.where(mask.bool(), values, 0.0)
    return (valid_values * mask).sum(axis=axis)


def masked_mean(values, mask, axis=None):
    """verl_F.masked_mean: masked sum / (mask count + 1e-8)."""
    return masked_sum(values, mask, axis) / (mask.sum(axis=axis) + 1e-8)


# --------------------------------------------------------------------------- rollout correction


def parse_rollout_is_threshold(threshold_spec):
    """_parse_rollout_is_threshold: float / "x" -> (upper=x, lower=None) = TIS;
    "lo_hi" -> (upper=hi, lower=lo) = IcePop. Returns (upper, lower)."""
    if isinstance(threshold_spec, bool):
        raise TypeError("rollout_is_threshold must be a float or a string, not a boolean.")
    if isinstance(threshold_spec, int | float):
        upper, lower = float(threshold_spec), None
    elif isinstance(threshold_spec, str):
        spec = threshold_spec.strip()
        if not spec:
            raise ValueError("rollout_is_threshold must not be an empty string.")
        if "_" in spec:
            lower_str, upper_str = spec.split("_", 1)
            lower, upper = float(lower_str), float(upper_str)
        else:
            upper, lower = float(spec), None
    else:
        raise TypeError("rollout_is_threshold must be a float or a string threshold specification.")
    if upper <= 0:
        raise ValueError(f"rollout_is_threshold upper bound must be positive, got {upper}.")
    if lower is not None:
        if lower <= 0:
            raise ValueError(f"rollout_is_threshold lower bound must be positive, got {lower}.")
        if lower > upper:
            raise ValueError("rollout_is_threshold lower bound must be <= upper bound.")
    return upper, lower


def rollout_correction_weights(
    log_ratio, response_mask, rollout_is="token", rollout_is_threshold=2.0, rollout_is_batch_normalize=False
):
    """compute_rollout_correction_weights (single process), without metrics. log_ratio = lp_train - lp_rollout.

    token:    w_t = exp(clamp(log_ratio_t, -20, 20)) * m_t
    sequence: w_t = exp(clamp(sum_t m log_ratio, -20, 20)) * m_t   (product of token ratios)
    TIS (threshold x):      w = min(w, x)           (upper only)
    IcePop ("lo_hi"):       w = w if lo <= w <= hi else 0
    detached; batch normalize: w / mean (token: masked token mean; sequence: mean over non-empty
    sequences of their masked mean), only when that mean > 1e-8. Returns (B, T).
    """
    if rollout_is not in {"token", "sequence"}:
        raise ValueError(f"Invalid rollout_is: {rollout_is}. Must be one of {{'token', 'sequence'}}.")
    upper, lower = parse_rollout_is_threshold(rollout_is_threshold)
    if rollout_is == "token":
        raw = torch.exp(torch.clamp(log_ratio, min=-SAFETY_BOUND, max=SAFETY_BOUND))
    else:
        log_ratio_sum = masked_sum(log_ratio, response_mask, axis=-1).unsqueeze(-1)
        raw = torch.exp(torch.clamp(log_ratio_sum, min=-SAFETY_BOUND, max=SAFETY_BOUND)).expand_as(log_ratio)
    raw = raw * response_mask
    if lower is None:
        weights = raw.clamp(max=upper)
    else:
        kept = (raw >= lower) & (raw <= upper)
        weights = torch.where(kept, raw, torch.zeros_like(raw))
    weights = weights.detach()
    if rollout_is_batch_normalize:
        if rollout_is == "token":
            weights_mean = masked_mean(weights, response_mask)
        else:
            seq_weights = masked_mean(weights, response_mask, axis=-1)
            seq_mask = (response_mask.sum(dim=-1) > 0).to(dtype=weights.dtype)
            weights_mean = (seq_weights * seq_mask).sum() / seq_mask.sum().clamp_min(1e-8)
        if weights_mean > 1e-8:
            weights = weights / weights_mean
    return weights


SUPPORTED_ROLLOUT_RS_OPTIONS = (
    "token_k1",
    "token_k2",
    "token_k3",
    "seq_sum_k1",
    "seq_sum_k2",
    "seq_sum_k3",
    "seq_mean_k1",
    "seq_mean_k2",
    "seq_mean_k3",
    "seq_max_k2",
    "seq_max_k3",
)


def parse_rollout_rs_thresholds(options, threshold_spec):
    """_parse_rollout_rs_thresholds: one spec shared by all options or one per option (comma separated).
    *_k1 options take "lo_hi" ratio bounds (a single x means lo = 1/x, hi = x); others an upper bound."""
    if threshold_spec is None:
        raise ValueError("rollout_rs_threshold must be provided for rejection sampling.")
    if isinstance(threshold_spec, int | float):
        raw_specs = [str(threshold_spec)]
    elif isinstance(threshold_spec, str):
        raw_specs = [part.strip() for part in threshold_spec.split(",") if part.strip()]
    else:
        raise TypeError("rollout_rs_threshold must be a string or numeric value.")
    if not raw_specs:
        raise ValueError("rollout_rs_threshold must contain at least one threshold value.")
    if len(raw_specs) not in (1, len(options)):
        raise ValueError("rollout_rs_threshold needs one threshold or one per rollout_rs option.")
    if len(raw_specs) == 1 and len(options) > 1:
        raw_specs = raw_specs * len(options)
    thresholds = {}
    for option, spec in zip(options, raw_specs, strict=False):
        if option.endswith("k1"):
            if "_" in spec:
                lower_str, upper_str = spec.split("_", 1)
            else:
                upper_str, lower_str = spec, str(1.0 / float(spec))
            lower, upper = float(lower_str), float(upper_str)
            if lower <= 0 or upper <= 0:
                raise ValueError(f"Thresholds for option '{option}' must be positive, got {spec}.")
            if lower > upper:
                raise ValueError(f"Thresholds for option '{option}' must be lower <= upper, got {spec}.")
            thresholds[option] = {"lower": lower, "upper": upper}
        else:
            if "_" in spec:
                raise ValueError(f"rollout_rs_threshold for option '{option}' must be a single upper bound.")
            upper = float(spec)
            if upper <= 0:
                raise ValueError(f"Threshold for option '{option}' must be positive, got {spec}.")
            thresholds[option] = {"lower": None, "upper": upper}
    return thresholds


def rollout_rejection_mask(log_ratio, response_mask, rollout_rs="token_k1", rollout_rs_threshold=None):
    """compute_rollout_rejection_mask without metrics: response_mask * AND over options of keep-masks.

    With l = clamp(log_ratio, -20, 20): k1 = -l, k2 = 0.5 l^2, k3 = exp(l) - 1 - l (per token).
    token_k1: log(lo) <= k1 <= log(hi); token_k2/k3: k <= hi.
    seq_sum_k* / seq_mean_k*: masked sum / masked mean (mean: / (|m| + 1e-8)) of the token statistic,
    same bounds, applied to the whole sequence; seq_max_k2/k3: masked max (0 for empty rows) <= hi.
    """
    if rollout_rs is None or not isinstance(rollout_rs, str):
        raise ValueError("rollout_rs must be a non-empty string (comma separated for multiple options).")
    if rollout_rs_threshold is None:
        raise ValueError("rollout_rs_threshold must be provided for rejection sampling.")
    if log_ratio.shape[0] == 0:
        return response_mask
    options = []
    for opt in (o.strip() for o in rollout_rs.split(",") if o.strip()):
        if opt not in SUPPORTED_ROLLOUT_RS_OPTIONS:
            raise ValueError(f"Invalid rollout_rs option: {opt}.")
        if opt not in options:
            options.append(opt)
    if not options:
        raise ValueError("rollout_rs must contain at least one valid option.")
    specs = parse_rollout_rs_thresholds(options, rollout_rs_threshold)

    log_ratio_safe = torch.clamp(log_ratio, min=-SAFETY_BOUND, max=SAFETY_BOUND)
    token_stats = {
        "k1": -log_ratio_safe,
        "k2": 0.5 * log_ratio_safe**2,
        "k3": torch.exp(log_ratio_safe) - 1.0 - log_ratio_safe,
    }
    combined_mask = torch.ones_like(response_mask, dtype=log_ratio.dtype)

    def seq_max(values):
        masked_values = values.masked_fill(~response_mask.bool(), float("-inf"))
        max_values = masked_values.max(dim=-1).values
        return torch.where(max_values == float("-inf"), torch.zeros_like(max_values), max_values)

    for option in options:
        upper, lower = specs[option]["upper"], specs[option]["lower"]
        k = option[-2:]
        stat = token_stats[k]
        if option.startswith("seq_sum"):
            stat = masked_sum(stat, response_mask, axis=-1)
        elif option.startswith("seq_mean"):
            stat = masked_mean(stat, response_mask, axis=-1)
        elif option.startswith("seq_max"):
            stat = seq_max(stat)
        if k == "k1":
            keep = (stat >= math.log(lower)) & (stat <= math.log(upper))
        else:
            keep = stat <= upper
        if option.startswith("seq"):
            keep = keep.unsqueeze(-1).expand_as(response_mask)
        combined_mask = combined_mask * keep.to(dtype=log_ratio.dtype)
    return (response_mask * combined_mask).to(dtype=response_mask.dtype)


def rollout_correction_and_rejection_mask(
    old_log_prob,
    rollout_log_prob,
    response_mask,
    rollout_is=None,
    rollout_is_threshold=2.0,
    rollout_is_batch_normalize=False,
    rollout_rs=None,
    rollout_rs_threshold=None,
):
    """compute_rollout_correction_and_rejection_mask without metrics: log_ratio = old - rollout;
    returns (IS weights (B, T) or None when rollout_is or its threshold is None, modified response mask)."""
    if not response_mask.any():
        raise ValueError("response_mask must contain at least one valid token (1).")
    if old_log_prob.shape != rollout_log_prob.shape or old_log_prob.shape != response_mask.shape:
        raise ValueError("old_log_prob, rollout_log_prob and response_mask must have the same shape.")
    log_ratio = old_log_prob - rollout_log_prob
    weights = None
    if rollout_is is not None and rollout_is_threshold is not None:
        weights = rollout_correction_weights(
            log_ratio, response_mask, rollout_is, rollout_is_threshold, rollout_is_batch_normalize
        )
    modified_response_mask = response_mask.clone()
    if rollout_rs is not None:
        if rollout_rs_threshold is None:
            raise ValueError("rollout_rs_threshold must be explicitly provided when rollout_rs is enabled.")
        modified_response_mask = rollout_rejection_mask(log_ratio, response_mask, rollout_rs, rollout_rs_threshold)
    return weights, modified_response_mask
