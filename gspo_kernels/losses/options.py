"""The hyper-parameters of a policy loss: one frozen dataclass, checked once.

Option names are TRL 1.16's ``GRPOConfig`` names where TRL has the option
(``loss_type``, ``importance_sampling_level``, ``epsilon``, ``epsilon_high``,
``delta``, ``beta``, ``use_bias_correction_kl``, ``max_completion_length``,
``sapo_temperature_pos/neg``, ``vespo_*``, ``off_policy_mask_threshold``,
``top_entropy_quantile``, ``entropy_coef``, ``vllm_importance_sampling_*``),
and verl's names for what only verl has (``clip_ratio_c``, ``loss_agg_mode``,
``kl_loss_type`` values, the Clip-Cov / KL-Cov / GMPO / DPPO knobs).
Defaults are TRL's, so a ``GRPOConfig`` maps to a call one to one.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

# loss_type -> (objective, default aggregation). TRL 1.16's eight first, then verl 0.9.1's
# (policy_loss.loss_mode; the three whose verl form differs from TRL's same-named loss carry a
# "verl_" prefix). verl's losses are composed as verl's actor does (losses/verl.py).
LOSS_TYPES = {
    # TRL
    "grpo": ("ppo_clip", "seq-mean-token-mean"),
    "bnpo": ("ppo_clip", "token-mean"),
    "dr_grpo": ("ppo_clip", "dr_grpo"),
    "dapo": ("ppo_clip", "token-sum-norm"),
    "luspo": ("ppo_clip", "seq-mean-token-sum"),
    "cispo": ("cispo", "token-sum-norm"),
    "sapo": ("sapo", "seq-mean-token-mean"),
    "vespo": ("vespo", "token-sum-norm"),
    # verl: aggregation is verl's loss_agg_mode (default token-mean)
    "vanilla": ("vanilla", "token-mean"),
    "verl_gspo": ("verl_gspo", "token-mean"),
    "verl_sapo": ("verl_sapo", "token-mean"),
    "verl_cispo": ("verl_cispo", "token-mean"),
    "gpg": ("gpg", "token-mean"),
    "clip_cov": ("clip_cov", "token-mean"),
    "kl_cov": ("kl_cov", "token-mean"),
    "geo_mean": ("geo_mean", "token-mean"),
    "dro": ("dro", "token-mean"),
    "dppo_tv": ("dppo_tv", "token-mean"),
    "dppo_kl": ("dppo_kl", "token-mean"),
}
VERL_LOSS_TYPES = ("vanilla", "verl_gspo", "verl_sapo", "verl_cispo", "gpg", "clip_cov", "kl_cov", "geo_mean",
                   "dro", "dppo_tv", "dppo_kl")
TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
# How per-token losses l_t (masked by m_t) become one scalar (see aggregate.py).
AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "dr_grpo", "token-sum-norm",
                "seq-mean-token-sum-norm", "token-sum")
LEVELS = ("token", "sequence", "sequence_token")
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl", "abs")
ADVANTAGE_MODES = ("group_norm", "contrast")
DENOMINATORS = ("old", "ref", "detached")
CORRECTION_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _number(name: str, v, *, lo=None, lo_open=False, hi=None, optional=False) -> None:
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite float{' or None' if optional else ''}, got {v!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {v}")


def _choice(name: str, v, choices, optional=False) -> None:
    if v is None and optional:
        return
    if v not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}{' or None' if optional else ''}, got {v!r}")


@dataclass(frozen=True)
class LossOptions:
    """Every hyper-parameter of :func:`gspo_kernels.policy_loss`, with TRL 1.16's defaults.

    Objective and importance weight:
        loss_type: one of :data:`LOSS_TYPES` (TRL: grpo, bnpo, dr_grpo, dapo, luspo,
            cispo, sapo, vespo; verl: :data:`VERL_LOSS_TYPES`, composed in losses/verl.py).
        importance_sampling_level: "token" (``log w_t = lp_t - old_t``), "sequence"
            (GSPO: the masked mean of that over the sequence), "sequence_token"
            (GSPO-token: ``w_t = sg[w] * exp(lp_t - sg[lp_t])``).
        epsilon, epsilon_high: clip range ``[1 - epsilon, 1 + epsilon_high]``
            (``epsilon_high`` None: = epsilon). CISPO clamps the weight at ``epsilon_high``.
        delta: two-sided clip (TRL): the unclipped weight is capped at ``delta``.
        clip_ratio_c: dual clip (verl, > 1): for ``A < 0`` the loss is capped at ``-A * c``.
        sapo_temperature_pos/neg, vespo_k_pos/lambda_pos/k_neg/lambda_neg: SAPO's and VESPO's knobs.
        clip_cov_ratio, clip_cov_lb, clip_cov_ub, kl_cov_ratio, ppo_kl_coef: verl's Clip-Cov / KL-Cov.
        dro_beta: verl's DRO quadratic penalty weight (> 0, required by ``loss_type="dro"``).
    KL against the reference:
        beta: weight of the per-token KL added to each token's loss (0: no reference needed).
        kl: estimator of ``d = ref - lp``: "k1" ``-d``, "k2" ``d^2/2``, "k3" ``e^d - d - 1``,
            "low_var_kl" (k3 clamped to [-10, 10], verl), "abs" ``|d|``.
        use_bias_correction_kl: multiply the KL by the (differentiable) importance weight (TRL).
    Masks and correction:
        off_policy_mask_threshold: drop a sequence with ``A < 0`` whose mean
            ``sampling - sg[lp]`` over its tokens exceeds this (TRL, DeepSeek-V3.2).
        top_entropy_quantile: keep only tokens whose entropy is at or above the
            ``1 - q`` quantile of the valid tokens' entropies (1.0: keep all).
        vllm_importance_sampling_mode: with ``sampling_logprobs``, the rollout
            correction ratio (see :func:`rollout_correction`); None: no correction
            unless an ``importance_sampling_ratio`` tensor is passed.
        vllm_importance_sampling_clip_min/max: its bounds.
    Aggregation and bonus:
        loss_agg_mode: override the loss type's aggregation (see :data:`AGGREGATIONS`).
        max_completion_length: ``dr_grpo``'s divisor per sequence (None: T).
        entropy_coef: ``loss -= coef * (sum H m') / (sum m')`` (m' the mask after the entropy mask).
    Advantage and ratio denominator:
        advantage: "group_norm" ``(r - mean r)/(std r + 1e-4)`` per group (TRL's
            ``scale_rewards="group"``) or "contrast" (the source article's); used when
            the call passes rewards instead of an advantage tensor.
        denominator: "old", "ref", "detached" or None (old if given, else detached; a
            reference without old log-probs with a sequence-level ratio is ambiguous).
        temperature: logits / temperature before the softmax (fused).
    """

    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    delta: Optional[float] = None
    clip_ratio_c: Optional[float] = None
    beta: float = 0.0
    kl: str = "k3"
    use_bias_correction_kl: bool = True
    max_completion_length: Optional[int] = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 0.0002
    ppo_kl_coef: float = 0.1
    dro_beta: Optional[float] = None
    off_policy_mask_threshold: Optional[float] = None
    top_entropy_quantile: float = 1.0
    vllm_importance_sampling_mode: Optional[str] = None
    vllm_importance_sampling_clip_min: Optional[float] = None
    vllm_importance_sampling_clip_max: Optional[float] = 3.0
    loss_agg_mode: Optional[str] = None
    entropy_coef: float = 0.0
    advantage: str = "group_norm"
    denominator: Optional[str] = None
    temperature: float = 1.0

    def __post_init__(self):
        if self.loss_type == "bypass_mode":
            from .verl import BYPASS_MODE_MESSAGE

            raise ValueError(BYPASS_MODE_MESSAGE)
        _choice("loss_type", self.loss_type, LOSS_TYPES)
        _choice("importance_sampling_level", self.importance_sampling_level, LEVELS)
        _number("epsilon", self.epsilon)
        if not 0.0 < self.epsilon < 1.0:
            raise ValueError(f"epsilon must lie in (0, 1), got {self.epsilon}")
        _number("epsilon_high", self.epsilon_high, lo=0.0, lo_open=True, optional=True)
        _number("delta", self.delta, lo=1.0, lo_open=True, optional=True)
        _number("clip_ratio_c", self.clip_ratio_c, lo=1.0, lo_open=True, optional=True)
        _number("beta", self.beta, lo=0.0)
        _choice("kl", self.kl, KL_ESTIMATORS)
        if not isinstance(self.use_bias_correction_kl, bool):
            raise TypeError(f"use_bias_correction_kl must be a bool, got {self.use_bias_correction_kl!r}")
        if self.max_completion_length is not None and (
                isinstance(self.max_completion_length, bool) or not isinstance(self.max_completion_length, int)
                or self.max_completion_length < 1):
            raise ValueError(f"max_completion_length must be a positive int or None, got {self.max_completion_length!r}")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_lambda_pos", "vespo_lambda_neg"):
            _number(name, getattr(self, name), lo=0.0, lo_open=True)
        for name in ("vespo_k_pos", "vespo_k_neg", "ppo_kl_coef", "clip_cov_lb", "clip_cov_ub"):
            _number(name, getattr(self, name))
        for name in ("clip_cov_ratio", "kl_cov_ratio"):
            _number(name, getattr(self, name), lo=0.0, hi=1.0)
        _number("dro_beta", self.dro_beta, lo=0.0, lo_open=True, optional=True)
        if self.loss_type == "dro" and self.dro_beta is None:
            raise ValueError("loss_type='dro' needs dro_beta > 0 (verl's policy_loss.dro_beta)")
        _number("off_policy_mask_threshold", self.off_policy_mask_threshold, optional=True)
        _number("top_entropy_quantile", self.top_entropy_quantile, lo=0.0, hi=1.0)
        _choice("vllm_importance_sampling_mode", self.vllm_importance_sampling_mode, CORRECTION_MODES, optional=True)
        _number("vllm_importance_sampling_clip_min", self.vllm_importance_sampling_clip_min, optional=True)
        _number("vllm_importance_sampling_clip_max", self.vllm_importance_sampling_clip_max, optional=True)
        _choice("loss_agg_mode", self.loss_agg_mode, AGGREGATIONS, optional=True)
        _number("entropy_coef", self.entropy_coef)
        _choice("advantage", self.advantage, ADVANTAGE_MODES)
        _choice("denominator", self.denominator, DENOMINATORS, optional=True)
        from .._validate import check_temperature

        object.__setattr__(self, "temperature", check_temperature(self.temperature))
        if self.family == "verl":
            from .verl import check_verl_options

            check_verl_options(self)

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def objective(self) -> str:
        return LOSS_TYPES[self.loss_type][0]

    @property
    def family(self) -> str:
        """"verl" for verl's losses (composed as verl's actor does), else "trl"."""
        return "verl" if self.loss_type in VERL_LOSS_TYPES else "trl"

    @property
    def aggregation(self) -> str:
        return self.loss_agg_mode or LOSS_TYPES[self.loss_type][1]


OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(LossOptions))
