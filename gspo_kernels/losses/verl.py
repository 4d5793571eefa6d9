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
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..errors import OptionError, UnknownOptionError, nearest
from .core import common_metrics, correction_ratio, sequence_correction
from .inputs import LossInputs
from .objectives import guarded_exp, kl_tokens, log_importance_weight, masked_seq_mean, ppo_clip, sapo
from .options import LossOptions

CLIP_RATIO_C = 3.0  # verl's default clip_ratio_c (vanilla's dual clip, DPPO's truncation)
VERL_AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm",
                     "seq-mean-token-mean")

# verl actor config key -> option name ("policy_loss.x": the nested policy_loss section).
VERL_CONFIG_KEYS = {
    "clip_ratio_low": "epsilon", "clip_ratio_high": "epsilon_high", "clip_ratio_c": "clip_ratio_c",
    "loss_agg_mode": "loss_agg_mode", "entropy_coeff": "entropy_coef", "kl_loss_coef": "beta",
    "kl_loss_type": "kl", "tau_pos": "sapo_temperature_pos", "tau_neg": "sapo_temperature_neg",
    "loss_scale_factor": "max_completion_length", "policy_loss.loss_mode": "loss_type",
    "policy_loss.clip_cov_ratio": "clip_cov_ratio", "policy_loss.clip_cov_lb": "clip_cov_lb",
    "policy_loss.clip_cov_ub": "clip_cov_ub", "policy_loss.kl_cov_ratio": "kl_cov_ratio",
    "policy_loss.ppo_kl_coef": "ppo_kl_coef", "policy_loss.dro_beta": "dro_beta",
}
# verl's values of kl_loss_type and policy_loss.loss_mode -> ours
VERL_KL_TYPES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "k3": "low_var_kl",
                 "low_var_kl": "low_var_kl"}
VERL_LOSS_MODES = {"vanilla": "vanilla", "gspo": "verl_gspo", "sapo": "verl_sapo", "cispo": "verl_cispo",
                   "gpg": "gpg", "clip_cov": "clip_cov", "kl_cov": "kl_cov", "geo_mean": "geo_mean", "dro": "dro",
                   "dppo_tv": "dppo_tv", "dppo_kl": "dppo_kl"}
# verl 0.9.1's ActorConfig defaults for what shapes the loss
VERL_DEFAULTS = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "clip_ratio_c": CLIP_RATIO_C,
                 "loss_agg_mode": "token-mean", "entropy_coeff": 0.0, "use_kl_loss": False, "kl_loss_coef": 0.001,
                 "kl_loss_type": "low_var_kl", "tau_pos": 1.0, "tau_neg": 1.05, "loss_scale_factor": None,
                 "policy_loss.loss_mode": "vanilla", "policy_loss.clip_cov_ratio": 0.0002,
                 "policy_loss.clip_cov_lb": 1.0, "policy_loss.clip_cov_ub": 5.0, "policy_loss.kl_cov_ratio": 0.0002,
                 "policy_loss.ppo_kl_coef": 0.1, "policy_loss.dro_beta": None}
BYPASS_MODE_MESSAGE = ("verl's loss_mode='bypass_mode' is not supported: it is a rollout-correction driver "
                       "(IS weights and rejection from old = rollout log-probs), not a loss; use loss_type="
                       "'vanilla' or 'gpg' with importance_sampling_ratio or vllm_importance_sampling_mode")


# ---------------------------------------------------------------- options
def check_verl_options(opt: LossOptions) -> None:
    """Refuse, with a verl loss type, the options verl has no counterpart for (called by LossOptions)."""
    trl_only = {"delta": opt.delta is not None,
                "off_policy_mask_threshold": opt.off_policy_mask_threshold is not None,
                "top_entropy_quantile": opt.top_entropy_quantile < 1.0,
                "importance_sampling_level": opt.importance_sampling_level != "token"}
    for name, is_set in trl_only.items():
        if is_set:
            hint = " (verl's sequence ratio is loss_type='verl_gspo')" if name == "importance_sampling_level" else ""
            raise OptionError(f"{name} is a TRL option; verl's loss_type={opt.loss_type!r} has none{hint}")
    if opt.aggregation not in VERL_AGGREGATIONS:
        raise OptionError(f"loss_type={opt.loss_type!r} aggregates as verl's agg_loss: loss_agg_mode must be one of "
                         f"{VERL_AGGREGATIONS}, got {opt.aggregation!r}")
    if opt.loss_type == "clip_cov" and opt.clip_cov_ratio <= 0:
        raise OptionError("loss_type='clip_cov' needs clip_cov_ratio > 0")
    if opt.loss_type == "kl_cov" and opt.kl_cov_ratio <= 0:
        raise OptionError("loss_type='kl_cov' needs kl_cov_ratio > 0")


# verl actor config keys that do not shape the loss (batch sizes, optimizer, checkpointing, parallelism,
# kernels, profiling): options_from_verl ignores them, with whatever they hold beneath. Any other key is
# refused, naming the nearest known one.
VERL_IGNORED_KEYS = frozenset({
    "_target_", "strategy", "ppo_mini_batch_size", "ppo_micro_batch_size", "ppo_micro_batch_size_per_gpu",
    "use_dynamic_bsz", "ppo_max_token_len_per_gpu", "ppo_epochs", "shuffle", "data_loader_seed", "checkpoint",
    "optim", "use_torch_compile", "use_fused_kernels", "fused_kernel_options", "profiler", "engine", "fsdp_config",
    "megatron", "load_weight", "grad_clip", "ulysses_sequence_parallel_size", "entropy_from_logits_with_chunking",
    "entropy_checkpointing", "use_remove_padding", "use_prefix_grouper", "freeze_vision_tower", "rollout_n",
    "calculate_entropy", "router_replay", "qat", "nccl_timeout", "model_config", "use_rollout_log_probs",
    "calculate_sum_pi_squared", "sum_pi_squared_checkpointing", "policy_loss._target_",
})
# A whole verl config (or its dotted overrides) reaches the actor's keys through these prefixes.
VERL_ACTOR_PREFIXES = ("actor_rollout_ref.actor.", "actor.")


def _flatten(cfg, prefix="") -> dict:
    """Nested mappings (dicts, OmegaConf configs) -> dotted keys, as verl's overrides spell them."""
    out = {}
    for k, v in dict(cfg).items():
        key = prefix + str(k)
        if hasattr(v, "items") and str(k) not in VERL_IGNORED_KEYS:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _actor_keys(actor_config) -> dict:
    """The actor section's keys, dotted (``policy_loss.loss_mode``): nested or dotted forms, with or
    without the ``actor_rollout_ref.actor.`` / ``actor.`` prefix; unknown keys refused."""
    known = set(VERL_DEFAULTS) | set(VERL_IGNORED_KEYS)
    out = {}
    for key, v in _flatten(actor_config).items():
        k = key
        for pre in VERL_ACTOR_PREFIXES:
            if k.startswith(pre):
                k = k[len(pre):]
                break
        if k in known or k.split(".", 1)[0] in VERL_IGNORED_KEYS:
            if k in out and out[k] != v:
                raise OptionError(f"verl key {k!r} is given twice with different values ({out[k]!r}, {v!r})")
            out[k] = v
            continue
        if k.split(".", 1)[0] in ("actor_rollout_ref", "algorithm", "data", "trainer", "critic", "reward_model"):
            raise OptionError(
                f"options_from_verl takes verl's actor section, got {key!r}: pass "
                f"cfg.actor_rollout_ref.actor (keys such as 'clip_ratio_low', 'policy_loss.loss_mode', nested or "
                f"dotted, optionally prefixed 'actor_rollout_ref.actor.'), and verl's algorithm.rollout_correction "
                f"as rollout_correction=")
        near = f"policy_loss.{k}" if f"policy_loss.{k}" in known else nearest(k, known)
        raise UnknownOptionError(f"unknown verl actor config key {key!r}" + (f"; did you mean {near!r}?" if near
                                                                              else ".")
                                 + f" The keys that shape the loss are {sorted(VERL_DEFAULTS)}; ignored (they do not "
                                 f"shape it): {sorted(VERL_IGNORED_KEYS)}")
    return out


def _threshold(spec):
    """verl's rollout_is_threshold: ``x`` (upper bound, TIS) or ``"lo_hi"`` (IcePop) -> (lo, hi)."""
    if isinstance(spec, str) and "_" in spec:
        lo, hi = (float(s) for s in spec.split("_", 1))
        return lo, hi
    return None, float(spec)


def options_from_verl(actor_config, rollout_correction: Optional[dict] = None) -> dict:
    """Our options from a verl actor config (``actor_rollout_ref.actor`` as a dict or OmegaConf
    config; ``policy_loss`` nested or as ``"policy_loss.x"`` keys; dotted keys may carry the
    ``"actor_rollout_ref.actor."`` or ``"actor."`` prefix), verl's defaults for missing keys. Keys
    that do not shape the loss (:data:`VERL_IGNORED_KEYS`: batch sizes, optimizer, ...) are
    ignored; any other key raises :class:`~gspo_kernels.errors.OptionError` naming the nearest
    known one. ``rollout_correction``: verl's
    ``rollout_is`` / ``rollout_is_threshold`` ("token" | "sequence"; ``x``: TIS truncation at x,
    ``"lo_hi"``: IcePop masking) -> ``vllm_importance_sampling_mode`` and its bounds (the call then
    needs ``sampling_logprobs``, verl's rollout log-probs). Example::

        policy_loss(logits, tokens, A, mask, old_logprobs=old, **options_from_verl(cfg))
    """
    flat = _actor_keys(actor_config)
    given = {k: v for k, v in flat.items() if v is not None and k in VERL_DEFAULTS}
    cfg = {**VERL_DEFAULTS, **given}
    mode = cfg["policy_loss.loss_mode"]
    if mode == "bypass_mode":
        raise OptionError(BYPASS_MODE_MESSAGE)
    if mode not in VERL_LOSS_MODES:
        raise OptionError(f"policy_loss.loss_mode must be one of {tuple(VERL_LOSS_MODES)}, got {mode!r}")
    kl = cfg["kl_loss_type"]
    if kl not in VERL_KL_TYPES:
        raise OptionError(f"kl_loss_type must be one of {tuple(VERL_KL_TYPES)} (the straight-through '+' forms "
                         f"and 'full' are not supported), got {kl!r}")
    for side in ("clip_ratio_low", "clip_ratio_high"):  # verl: an explicit None falls back to clip_ratio
        if side in flat and flat[side] is None:
            cfg[side] = cfg["clip_ratio"]
    out = {VERL_CONFIG_KEYS[k]: cfg[k] for k in VERL_CONFIG_KEYS}
    out["loss_type"] = VERL_LOSS_MODES[mode]
    out["kl"] = VERL_KL_TYPES[kl]
    out["beta"] = float(cfg["kl_loss_coef"]) if cfg["use_kl_loss"] else 0.0
    scale = out.pop("max_completion_length")
    if scale is not None:
        if float(scale) != int(scale) or int(scale) < 1:
            raise OptionError(f"loss_scale_factor must be a positive whole number, got {scale!r}")
        out["max_completion_length"] = int(scale)
    rc = dict(rollout_correction or {})
    if rc.get("rollout_rs") is not None or rc.get("rollout_is_batch_normalize"):
        raise OptionError("verl's rejection sampling (rollout_rs) and rollout_is_batch_normalize are not supported")
    level, spec = rc.get("rollout_is"), rc.get("rollout_is_threshold", 2.0)
    if level is not None and spec is not None:
        if level not in ("token", "sequence"):
            raise OptionError(f"rollout_is must be 'token' or 'sequence', got {level!r}")
        lo, hi = _threshold(spec)
        out["vllm_importance_sampling_mode"] = f"{level}_{'truncate' if lo is None else 'mask'}"
        out["vllm_importance_sampling_clip_min"], out["vllm_importance_sampling_clip_max"] = lo, hi
    return out


# ---------------------------------------------------------------- aggregation
def verl_aggregate(l: Tensor, m: Tensor, mode: str, loss_scale_factor: Optional[int] = None,
                   num_tokens: Optional[Tensor] = None) -> Tensor:
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
    pg: Tensor                 # (N, T) per-token loss; (N, 1) per-sequence (geo_mean)
    ratio: Tensor              # the importance ratio the loss uses, for the "ratio" metric
    stats: Dict[str, Tensor]   # verl metric name -> per-token value, reported as its masked mean


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
    return Terms(pg, r, {"actor/pg_clipfrac": clipped, "actor/ppo_kl": -d.clamp(-20.0, 20.0).detach(),
                         "actor/pg_clipfrac_lower": (A < 0) & (r.detach() > c)})


def verl_gspo(lp, old, d, A, m, opt) -> Terms:
    log_s = log_importance_weight(d, lp, m, "sequence_token").clamp(max=10.0)
    pg, clipped = _ppo(torch.exp(log_s), A, opt, None)
    ratio = torch.exp(masked_seq_mean(d.detach(), m).clamp(max=10.0))
    return Terms(pg, ratio, {"actor/pg_clipfrac": clipped, "actor/ppo_kl": -d.detach(),
                             "actor/pg_clipfrac_lower": _zeros(d)})


def verl_sapo(lp, old, d, A, m, opt) -> Terms:
    r = _ratio(d)
    pg, _ = sapo(r, r.detach(), A, lp, opt, None)
    return Terms(pg, r, {"actor/pg_clipfrac": _zeros(d), "actor/ppo_kl": -d.clamp(-20.0, 20.0).detach(),
                         "actor/pg_clipfrac_lower": _zeros(d)})


def verl_cispo(lp, old, d, A, m, opt) -> Terms:
    r = _ratio(d).detach()
    w = r.clamp(1.0 - opt.epsilon, 1.0 + opt.eps_high)
    return Terms(pg_logprob(w, A, lp), r, {"actor/pg_clipfrac": w != r, "actor/ppo_kl": -d.clamp(-20.0, 20.0).detach(),
                                           "actor/pg_clipfrac_lower": _zeros(d)})


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
    return Terms(-A_seq * R, R.detach(), {"actor/pg_clipfrac": clipped & (A > 0), "actor/ppo_kl": -d.detach(),
                                         "actor/pg_clipfrac_lower": clipped & (A < 0)})


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
        pos, neg = (D <= opt.eps_high) | (p <= p_old), (D <= opt.epsilon) | (p >= p_old)
    return torch.where(A > 0, pos, neg)


def _dppo(kind: str):
    def loss(lp, old, d, A, m, opt) -> Terms:
        r = _ratio(d).detach()
        c = opt.clip_ratio_c or CLIP_RATIO_C
        keep = dppo_trust_region(lp, old, A, opt, kind)
        pg = pg_logprob(r.clamp(max=c) * keep, A, lp)
        return Terms(pg, r, {"actor/pg_clipfrac": ~keep, "actor/ppo_kl": -d.clamp(-20.0, 20.0).detach(),
                             "actor/pg_clipfrac_lower": (r > c) & keep})
    loss.__name__ = f"dppo_{kind}"
    return loss


VERL_OBJECTIVES = {"vanilla": vanilla, "verl_gspo": verl_gspo, "verl_sapo": verl_sapo, "verl_cispo": verl_cispo,
                   "gpg": gpg, "clip_cov": clip_cov, "kl_cov": kl_cov, "geo_mean": geo_mean, "dro": dro,
                   "dppo_tv": _dppo("tv"), "dppo_kl": _dppo("kl")}
PG_AGGREGATION = {"verl_sapo": "seq-mean-token-mean"}
SEQUENCE_RATIO = ("verl_gspo", "geo_mean")  # the loss types whose "ratio" metric is one per sequence  # verl's sapo ignores loss_agg_mode for its pg term


# ---------------------------------------------------------------- the actor's loss
def compose_verl(inp: LossInputs, opt: LossOptions, A: Tensor, old: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
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
        x, m, mode, opt.max_completion_length, inp.num_items_in_batch)
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

    metrics = common_metrics(inp, A, ratio, policy_loss, kl, is_ratio, seq_ratio=opt.objective in SEQUENCE_RATIO,
                             seq_is=sequence_correction(opt))
    dt = ratio.dtype
    metrics.update({name: _masked_mean(x.to(dt), m).to(dt) for name, x in stats.items()})
    metrics["actor/pg_loss"] = pg_loss.detach()
    metrics["actor/entropy_loss"] = entropy_loss.detach()
    if kl_loss is not None:
        metrics["kl_loss"] = kl_loss.detach()
        metrics["kl_coef"] = torch.tensor(opt.beta, dtype=dt, device=lp.device)
    return loss, metrics
