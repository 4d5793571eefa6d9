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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

from .._validate import check_temperature
from ..errors import DTypeError, OptionError, UnknownOptionError, nearest

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
VERL_LOSS_TYPES = (
    "vanilla",
    "verl_gspo",
    "verl_sapo",
    "verl_cispo",
    "gpg",
    "clip_cov",
    "kl_cov",
    "geo_mean",
    "dro",
    "dppo_tv",
    "dppo_kl",
)
TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
# How per-token losses l_t (masked by m_t) become one scalar (see aggregate.py).
AGGREGATIONS = (
    "seq-mean-token-mean",
    "token-mean",
    "seq-mean-token-sum",
    "dr_grpo",
    "token-sum-norm",
    "seq-mean-token-sum-norm",
    "token-sum",
)
# verl's agg_loss modes: the aggregations a verl loss type takes
VERL_AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")
LEVELS = ("token", "sequence", "sequence_token")
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl", "abs")
ADVANTAGE_MODES = ("group_norm", "contrast")
DENOMINATORS = ("old", "ref", "detached")
CORRECTION_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _number(name: str, v, *, lo=None, lo_open=False, hi=None, optional=False) -> None:
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise OptionError(f"{name} must be a finite float{' or None' if optional else ''}, got {v!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise OptionError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise OptionError(f"{name} must be <= {hi}, got {v}")


# Names a user may reach for that are not loss types: how to say what they mean.
LOSS_TYPE_HINTS = {
    "gspo": "GSPO is loss_type='grpo' with importance_sampling_level='sequence' (TRL's form, what gspo_loss "
    "calls; 'sequence_token' for GSPO-token), or verl's form loss_type='verl_gspo'",
    "ppo": "PPO's clipped loss is loss_type='bnpo' (TRL, token-mean) or 'vanilla' (verl's loss_mode='vanilla')",
}


def _loss_type_hint(v) -> str:
    key = str(v).lower().replace("-", "_")
    for name in ("gspo", "ppo"):
        if key in (name, f"{name}_token", f"{name}_seq", f"{name}_sequence"):
            return f"; {LOSS_TYPE_HINTS[name]}"
    near = nearest(key, LOSS_TYPES)
    return f"; did you mean {near!r}?" if near else ""


def _choice(name: str, v, choices, optional=False) -> None:
    if v is None and optional:
        return
    if v not in choices:
        hint = (
            _loss_type_hint(v)
            if name == "loss_type"
            else (f"; did you mean {nearest(str(v), choices)!r}?" if nearest(str(v), choices) else "")
        )
        raise OptionError(f"{name} must be one of {tuple(choices)}{' or None' if optional else ''}, got {v!r}{hint}")


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
            raise OptionError(BYPASS_MODE_MESSAGE)
        _choice("loss_type", self.loss_type, LOSS_TYPES)
        _choice("importance_sampling_level", self.importance_sampling_level, LEVELS)
        _number("epsilon", self.epsilon)
        if not 0.0 < self.epsilon < 1.0:
            raise OptionError(f"epsilon must lie in (0, 1), got {self.epsilon}")
        _number("epsilon_high", self.epsilon_high, lo=0.0, lo_open=True, optional=True)
        _number("delta", self.delta, lo=1.0, lo_open=True, optional=True)
        _number("clip_ratio_c", self.clip_ratio_c, lo=1.0, lo_open=True, optional=True)
        _number("beta", self.beta, lo=0.0)
        _choice("kl", self.kl, KL_ESTIMATORS)
        if not isinstance(self.use_bias_correction_kl, bool):
            raise DTypeError(f"use_bias_correction_kl must be a bool, got {self.use_bias_correction_kl!r}")
        if self.max_completion_length is not None and (
            isinstance(self.max_completion_length, bool)
            or not isinstance(self.max_completion_length, int)
            or self.max_completion_length < 1
        ):
            raise OptionError(
                f"max_completion_length must be a positive int or None, got {self.max_completion_length!r}"
            )
        for name in ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_lambda_pos", "vespo_lambda_neg"):
            _number(name, getattr(self, name), lo=0.0, lo_open=True)
        for name in ("vespo_k_pos", "vespo_k_neg", "ppo_kl_coef", "clip_cov_lb", "clip_cov_ub"):
            _number(name, getattr(self, name))
        for name in ("clip_cov_ratio", "kl_cov_ratio"):
            _number(name, getattr(self, name), lo=0.0, hi=1.0)
        _number("dro_beta", self.dro_beta, lo=0.0, lo_open=True, optional=True)
        if self.loss_type == "dro" and self.dro_beta is None:
            raise OptionError("loss_type='dro' needs dro_beta > 0 (verl's policy_loss.dro_beta)")
        _number("off_policy_mask_threshold", self.off_policy_mask_threshold, optional=True)
        _number("top_entropy_quantile", self.top_entropy_quantile, lo=0.0, hi=1.0)
        _choice("vllm_importance_sampling_mode", self.vllm_importance_sampling_mode, CORRECTION_MODES, optional=True)
        _number("vllm_importance_sampling_clip_min", self.vllm_importance_sampling_clip_min, optional=True)
        _number("vllm_importance_sampling_clip_max", self.vllm_importance_sampling_clip_max, optional=True)
        _choice("loss_agg_mode", self.loss_agg_mode, AGGREGATIONS, optional=True)
        _number("entropy_coef", self.entropy_coef)
        _choice("advantage", self.advantage, ADVANTAGE_MODES)
        _choice("denominator", self.denominator, DENOMINATORS, optional=True)
        object.__setattr__(self, "temperature", check_temperature(self.temperature))
        if self.family == "verl":
            check_verl_options(self)

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def objective(self) -> str:
        return LOSS_TYPES[self.loss_type][0]

    @property
    def family(self) -> str:
        """ "verl" for verl's losses (composed as verl's actor does), else "trl"."""
        return "verl" if self.loss_type in VERL_LOSS_TYPES else "trl"

    @property
    def aggregation(self) -> str:
        return self.loss_agg_mode or LOSS_TYPES[self.loss_type][1]


# verl's bypass_mode is a rollout-correction driver, not a loss: refused by name, with what to use instead
BYPASS_MODE_MESSAGE = (
    "verl's loss_mode='bypass_mode' is not supported: it is a rollout-correction driver "
    "(IS weights and rejection from old = rollout log-probs), not a loss; use loss_type="
    "'vanilla' or 'gpg' with importance_sampling_ratio or vllm_importance_sampling_mode"
)


def check_verl_options(opt: LossOptions) -> None:
    """Refuse, with a verl loss type, the options verl has no counterpart for (called by LossOptions)."""
    trl_only = {
        "delta": opt.delta is not None,
        "off_policy_mask_threshold": opt.off_policy_mask_threshold is not None,
        "top_entropy_quantile": opt.top_entropy_quantile < 1.0,
        "importance_sampling_level": opt.importance_sampling_level != "token",
    }
    for name, is_set in trl_only.items():
        if is_set:
            hint = " (verl's sequence ratio is loss_type='verl_gspo')" if name == "importance_sampling_level" else ""
            raise OptionError(f"{name} is a TRL option; verl's loss_type={opt.loss_type!r} has none{hint}")
    if opt.aggregation not in VERL_AGGREGATIONS:
        raise OptionError(
            f"loss_type={opt.loss_type!r} aggregates as verl's agg_loss: loss_agg_mode must be one of "
            f"{VERL_AGGREGATIONS}, got {opt.aggregation!r}"
        )
    if opt.loss_type == "clip_cov" and opt.clip_cov_ratio <= 0:
        raise OptionError("loss_type='clip_cov' needs clip_cov_ratio > 0")
    if opt.loss_type == "kl_cov" and opt.kl_cov_ratio <= 0:
        raise OptionError("loss_type='kl_cov' needs kl_cov_ratio > 0")


OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(LossOptions))

# Other libraries' names for what policy_loss takes under another name: verl's actor config keys
# (options_from_verl converts a whole verl config) and TRL's GRPOConfig fields that are call arguments.
FOREIGN_NAMES = {
    "clip_ratio": ("verl", "epsilon (and epsilon_high)"),
    "clip_ratio_low": ("verl", "epsilon"),
    "clip_ratio_high": ("verl", "epsilon_high"),
    "entropy_coeff": ("verl", "entropy_coef"),
    "kl_loss_coef": ("verl", "beta"),
    "use_kl_loss": ("verl", "beta > 0"),
    "kl_loss_type": ("verl", "kl"),
    "tau_pos": ("verl", "sapo_temperature_pos"),
    "tau_neg": ("verl", "sapo_temperature_neg"),
    "loss_scale_factor": ("verl", "max_completion_length"),
    "loss_mode": ("verl", "loss_type"),
    "policy_loss": ("verl", "the keywords of options_from_verl(actor_config)"),
    "rollout_is": ("verl", "vllm_importance_sampling_mode"),
    "rollout_is_threshold": ("verl", "vllm_importance_sampling_clip_max"),
    "num_generations": ("TRL", "group_size (a call argument, for flat or packed input)"),
}


def unknown_option_error(unknown: Iterable[str], known: Iterable[str] = OPTION_NAMES) -> UnknownOptionError:
    """The error for option names the loss does not know: each with verl's or TRL's meaning
    (pointing at :func:`~gspo_kernels.losses.verl.options_from_verl` for verl's) or the nearest
    known name."""
    unknown, known = sorted(unknown), sorted(known)
    hints = []
    for name in unknown:
        if name in FOREIGN_NAMES:
            lib, ours = FOREIGN_NAMES[name]
            how = (
                " (or convert a whole verl actor config: policy_loss(..., **options_from_verl(cfg)), "
                "from gspo_kernels.losses.verl)"
                if lib == "verl"
                else ""
            )
            hints.append(f"{name} is {lib}'s name: pass {ours}{how}")
        else:
            near = nearest(name, known)
            if near:
                hints.append(f"{name}: did you mean {near!r}?")
    return UnknownOptionError(
        f"unknown loss option(s) {unknown}; " + ("; ".join(hints) + ". " if hints else "") + f"The options are {known}"
    )
