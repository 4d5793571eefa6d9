"""verl's actor config -> :func:`gspo_kernels.policy_loss` options (:func:`options_from_verl`).

verl 0.9.1's ``actor_rollout_ref.actor`` keys that shape the loss map one to one to option
names (:data:`VERL_CONFIG_KEYS`); its ``kl_loss_type`` and ``policy_loss.loss_mode`` values to
ours (:data:`VERL_KL_TYPES`, :data:`VERL_LOSS_MODES`); missing keys take verl's defaults
(:data:`VERL_DEFAULTS`); keys that do not shape the loss are ignored (:data:`VERL_IGNORED_KEYS`)
and any other key is refused, naming the nearest known one. Its loss family (the per-token
losses, ``agg_loss``, the composition): :mod:`.verl`.
"""

from __future__ import annotations

from typing import Optional

from ..errors import OptionError, UnknownOptionError, nearest
from .options import BYPASS_MODE_MESSAGE

__all__ = [
    "CLIP_RATIO_C",
    "VERL_ACTOR_PREFIXES",
    "VERL_CONFIG_KEYS",
    "VERL_DEFAULTS",
    "VERL_IGNORED_KEYS",
    "VERL_KL_TYPES",
    "VERL_LOSS_MODES",
    "options_from_verl",
]

CLIP_RATIO_C = 3.0  # verl's default clip_ratio_c (vanilla's dual clip, DPPO's truncation)

# verl actor config key -> option name ("policy_loss.x": the nested policy_loss section).
VERL_CONFIG_KEYS = {
    "clip_ratio_low": "epsilon",
    "clip_ratio_high": "epsilon_high",
    "clip_ratio_c": "clip_ratio_c",
    "loss_agg_mode": "loss_agg_mode",
    "entropy_coeff": "entropy_coef",
    "kl_loss_coef": "beta",
    "kl_loss_type": "kl",
    "tau_pos": "sapo_temperature_pos",
    "tau_neg": "sapo_temperature_neg",
    "loss_scale_factor": "max_completion_length",
    "policy_loss.loss_mode": "loss_type",
    "policy_loss.clip_cov_ratio": "clip_cov_ratio",
    "policy_loss.clip_cov_lb": "clip_cov_lb",
    "policy_loss.clip_cov_ub": "clip_cov_ub",
    "policy_loss.kl_cov_ratio": "kl_cov_ratio",
    "policy_loss.ppo_kl_coef": "ppo_kl_coef",
    "policy_loss.dro_beta": "dro_beta",
}
# verl's values of kl_loss_type and policy_loss.loss_mode -> ours
VERL_KL_TYPES = {
    "kl": "k1",
    "k1": "k1",
    "abs": "abs",
    "mse": "k2",
    "k2": "k2",
    "k3": "low_var_kl",
    "low_var_kl": "low_var_kl",
}
VERL_LOSS_MODES = {
    "vanilla": "vanilla",
    "gspo": "verl_gspo",
    "sapo": "verl_sapo",
    "cispo": "verl_cispo",
    "gpg": "gpg",
    "clip_cov": "clip_cov",
    "kl_cov": "kl_cov",
    "geo_mean": "geo_mean",
    "dro": "dro",
    "dppo_tv": "dppo_tv",
    "dppo_kl": "dppo_kl",
}
# verl 0.9.1's ActorConfig defaults for what shapes the loss
VERL_DEFAULTS = {
    "clip_ratio": 0.2,
    "clip_ratio_low": 0.2,
    "clip_ratio_high": 0.2,
    "clip_ratio_c": CLIP_RATIO_C,
    "loss_agg_mode": "token-mean",
    "entropy_coeff": 0.0,
    "use_kl_loss": False,
    "kl_loss_coef": 0.001,
    "kl_loss_type": "low_var_kl",
    "tau_pos": 1.0,
    "tau_neg": 1.05,
    "loss_scale_factor": None,
    "policy_loss.loss_mode": "vanilla",
    "policy_loss.clip_cov_ratio": 0.0002,
    "policy_loss.clip_cov_lb": 1.0,
    "policy_loss.clip_cov_ub": 5.0,
    "policy_loss.kl_cov_ratio": 0.0002,
    "policy_loss.ppo_kl_coef": 0.1,
    "policy_loss.dro_beta": None,
}


# verl actor config keys that do not shape the loss (batch sizes, optimizer, checkpointing, parallelism,
# kernels, profiling): options_from_verl ignores them, with whatever they hold beneath. Any other key is
# refused, naming the nearest known one.
VERL_IGNORED_KEYS = frozenset(
    {
        "_target_",
        "strategy",
        "ppo_mini_batch_size",
        "ppo_micro_batch_size",
        "ppo_micro_batch_size_per_gpu",
        "use_dynamic_bsz",
        "ppo_max_token_len_per_gpu",
        "ppo_epochs",
        "shuffle",
        "data_loader_seed",
        "checkpoint",
        "optim",
        "use_torch_compile",
        "use_fused_kernels",
        "fused_kernel_options",
        "profiler",
        "engine",
        "fsdp_config",
        "megatron",
        "load_weight",
        "grad_clip",
        "ulysses_sequence_parallel_size",
        "entropy_from_logits_with_chunking",
        "entropy_checkpointing",
        "use_remove_padding",
        "use_prefix_grouper",
        "freeze_vision_tower",
        "rollout_n",
        "calculate_entropy",
        "router_replay",
        "qat",
        "nccl_timeout",
        "model_config",
        "use_rollout_log_probs",
        "calculate_sum_pi_squared",
        "sum_pi_squared_checkpointing",
        "policy_loss._target_",
    }
)
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
    out: dict[str, object] = {}
    for key, v in _flatten(actor_config).items():
        k = key
        for pre in VERL_ACTOR_PREFIXES:
            if k.startswith(pre):
                k = k[len(pre) :]
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
                f"as rollout_correction="
            )
        near = f"policy_loss.{k}" if f"policy_loss.{k}" in known else nearest(k, known)
        raise UnknownOptionError(
            f"unknown verl actor config key {key!r}"
            + (f"; did you mean {near!r}?" if near else ".")
            + f" The keys that shape the loss are {sorted(VERL_DEFAULTS)}; ignored (they do not "
            f"shape it): {sorted(VERL_IGNORED_KEYS)}"
        )
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
        raise OptionError(
            f"kl_loss_type must be one of {tuple(VERL_KL_TYPES)} (the straight-through '+' forms "
            f"and 'full' are not supported), got {kl!r}"
        )
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
