"""Oracle for TRL's GRPO loss: runs the *installed* ``trl.GRPOTrainer._compute_loss`` itself.

No trainer is built. ``object.__new__(GRPOTrainer)`` gives a bare instance; only the
attributes ``_compute_loss`` (and ``get_high_entropy_mask``) read are set, with the
values ``GRPOTrainer.__init__`` would derive from a ``GRPOConfig``:

* ``args``: a namespace holding every ``GRPOConfig`` field at its dataclass default,
  overridden by the caller's ``**config`` (read with ``dataclasses.fields``, no
  ``GRPOConfig(...)`` instantiation, which needs an output_dir and is slow);
  ``steps_per_generation=None`` resolves to ``gradient_accumulation_steps`` as in
  ``GRPOConfig.__post_init__``;
* trainer attributes copied from ``args`` as in ``GRPOTrainer.__init__``
  (``epsilon_low = epsilon``, ``epsilon_high = epsilon_high or epsilon``, ``beta``,
  ``loss_type``, ...), ``current_gradient_accumulation_steps = gradient_accumulation_steps``;
* a single-process accelerator stub (gather / reduce / pad_across_processes are the
  identity, ``num_processes = 1``) and a model stub with ``training = True``;
* ``_get_per_token_logps_and_entropies`` replaced by a function returning the caller's
  ``per_token_logps`` and ``entropies`` (B, T), so gradients flow back to them.

``trl_compute_loss`` returns TRL's loss tensor and the last value TRL appended to each
``_metrics["train"][name]`` list.

``trl_importance_sampling_ratio`` is a transcription: TRL computes the rollout
(vLLM) importance-sampling ratio inline in ``GRPOTrainer._generate_and_score_completions``
(trl 1.16.0, trl/trainer/grpo_trainer.py lines 2659-2707, file sha256
1c3dc2253fb3653269c11dfce4f946f74201a4cb63e0887a37e8e3bb4a3f5503), which cannot be called
on its own.

This module imports TRL (slow); ``reference/__init__.py`` does not import it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import defaultdict
from types import SimpleNamespace

import torch

TRL_VERSION_TESTED = "1.16.0"


@functools.lru_cache(maxsize=1)
def _trl():
    import trl
    from trl import GRPOConfig, GRPOTrainer

    return trl, GRPOConfig, GRPOTrainer


@functools.lru_cache(maxsize=1)
def grpo_config_defaults() -> dict:
    """Every ``GRPOConfig`` dataclass field with its default (fields without one are left out)."""
    _, GRPOConfig, _ = _trl()
    out = {}
    for f in dataclasses.fields(GRPOConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


class _Accelerator:
    """Single-process stand-in for ``accelerate.Accelerator`` as used by ``_compute_loss``."""

    num_processes = 1
    process_index = 0
    is_main_process = True
    sync_gradients = True

    @staticmethod
    def gather(x):
        return x

    @staticmethod
    def gather_for_metrics(x):
        return x

    @staticmethod
    def reduce(x, reduction="sum"):
        return x

    @staticmethod
    def pad_across_processes(x, dim=0, pad_index=0, pad_first=False):
        return x

    @staticmethod
    def unwrap_model(model):
        return model


def _args(config: dict) -> SimpleNamespace:
    defaults = grpo_config_defaults()
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise TypeError(f"not GRPOConfig fields: {unknown}")
    args = dict(defaults)
    args.update(config)
    # GRPOConfig.__post_init__: steps_per_generation defaults to gradient_accumulation_steps,
    # and the deprecated vllm_importance_sampling_cap overrides vllm_importance_sampling_clip_max.
    if args["steps_per_generation"] is None:
        args["steps_per_generation"] = args["gradient_accumulation_steps"]
    if args.get("vllm_importance_sampling_cap") is not None:
        args["vllm_importance_sampling_clip_max"] = args["vllm_importance_sampling_cap"]
    return SimpleNamespace(**args)


def _bare_trainer(args: SimpleNamespace, use_vllm: bool, per_token_logps, entropies):
    """A GRPOTrainer instance with only what ``_compute_loss`` reads (mirrors GRPOTrainer.__init__)."""
    _, _, GRPOTrainer = _trl()
    obj = object.__new__(GRPOTrainer)
    obj.args = args
    obj.accelerator = _Accelerator()
    obj.model = SimpleNamespace(training=True)
    obj._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    obj.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    obj.max_completion_length = args.max_completion_length
    obj.use_vllm = use_vllm
    obj.vllm_importance_sampling_correction = use_vllm
    obj.vllm_importance_sampling_mode = args.vllm_importance_sampling_mode
    obj.vllm_importance_sampling_clip_max = args.vllm_importance_sampling_clip_max
    obj.vllm_importance_sampling_clip_min = args.vllm_importance_sampling_clip_min
    obj.loss_type = args.loss_type
    obj.router_aux_loss_coef = 0.0
    obj.aux_loss_enabled = False
    obj.importance_sampling_level = args.importance_sampling_level
    obj.off_policy_mask_threshold = args.off_policy_mask_threshold
    obj.top_entropy_quantile = args.top_entropy_quantile
    obj.entropy_coef = args.entropy_coef
    obj.use_adaptive_entropy = args.use_adaptive_entropy
    obj._entropy_bonus_enabled = obj.entropy_coef != 0.0 or obj.use_adaptive_entropy
    obj._last_world_entropy = float("inf")
    obj._entropy_window_stats = None
    obj.num_iterations = args.num_iterations
    obj.epsilon_low = args.epsilon
    obj.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    obj.beta = args.beta
    obj.ref_model = None

    def _get_per_token_logps_and_entropies(*_args, **_kwargs):
        return per_token_logps, entropies, None

    obj._get_per_token_logps_and_entropies = _get_per_token_logps_and_entropies
    return obj


def trl_compute_loss(
    per_token_logps,
    entropies,
    completion_mask,
    advantages,
    *,
    old_per_token_logps=None,
    ref_per_token_logps=None,
    sampling_per_token_logps=None,
    importance_sampling_ratio=None,
    num_items_in_batch=None,
    tool_mask=None,
    **config,
):
    """TRL's GRPO loss on given per-token tensors.

    per_token_logps, entropies: (B, T), may require grad. completion_mask: (B, T), 0/1
    (converted to int as TRL holds it). advantages: (B,) or (B, T).
    old/ref/sampling_per_token_logps: (B, T) or None (TRL's own convention: a missing
    ``old_per_token_logps`` means ``per_token_logps.detach()``).
    importance_sampling_ratio: the rollout-correction ratio ((B, T) token modes, (B, 1)
    sequence modes, e.g. from ``trl_importance_sampling_ratio``); when given, TRL runs with
    ``use_vllm = vllm_importance_sampling_correction = True`` and multiplies it in
    (VESPO folds it into its weights instead).
    num_items_in_batch: default ``completion_mask.sum()`` (TRL: tokens of the whole generation batch).
    **config: GRPOConfig field names (loss_type, importance_sampling_level, epsilon, epsilon_high,
    delta, beta, use_bias_correction_kl, max_completion_length, sapo_temperature_pos/neg,
    vespo_*, off_policy_mask_threshold, top_entropy_quantile, entropy_coef,
    gradient_accumulation_steps, steps_per_generation, ...), GRPOConfig's defaults otherwise.

    Returns (loss, metrics): the loss tensor exactly as ``_compute_loss`` returns it, and
    {metric name: last value TRL logged} for this call.
    """
    args = _args(config)
    use_vllm = importance_sampling_ratio is not None
    completion_mask = completion_mask.int()
    B = completion_mask.shape[0]
    device = completion_mask.device
    if num_items_in_batch is None:
        num_items_in_batch = completion_mask.sum()
    num_items_in_batch = torch.as_tensor(num_items_in_batch, device=device)
    inputs = {
        "prompt_ids": torch.zeros(B, 0, dtype=torch.long, device=device),
        "prompt_mask": torch.zeros(B, 0, dtype=completion_mask.dtype, device=device),
        "completion_ids": torch.zeros(completion_mask.shape, dtype=torch.long, device=device),
        "completion_mask": completion_mask,
        "advantages": advantages,
        "num_items_in_batch": num_items_in_batch,
    }
    optional = {
        "old_per_token_logps": old_per_token_logps,
        "ref_per_token_logps": ref_per_token_logps,
        "sampling_per_token_logps": sampling_per_token_logps,
        "importance_sampling_ratio": importance_sampling_ratio,
        "tool_mask": tool_mask,
    }
    inputs.update({k: v for k, v in optional.items() if v is not None})
    if args.beta != 0.0 and ref_per_token_logps is None:
        raise ValueError("beta != 0 needs ref_per_token_logps")

    trainer = _bare_trainer(args, use_vllm, per_token_logps, entropies)
    loss = trainer._compute_loss(trainer.model, inputs)
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items() if values}
    return loss, metrics


def trl_importance_sampling_ratio(
    old_per_token_logps,
    sampling_per_token_logps,
    completion_mask,
    mode="sequence_mask",
    clip_min=None,
    clip_max=3.0,
    tool_mask=None,
):
    """TRL's rollout-correction ratio pi_old / pi_sampler, transcribed from
    ``GRPOTrainer._generate_and_score_completions`` (trl 1.16.0, grpo_trainer.py lines 2659-2707).

    mode: GRPOConfig.vllm_importance_sampling_mode, one of token_truncate, token_mask,
    sequence_truncate, sequence_mask (GRPOConfig default: sequence_mask, clip_min None, clip_max 3.0).
    Returns (B, T) for token modes, (B, 1) for sequence modes (the sequence ratio is
    exp(sum of masked log-ratio), not a mean). *_truncate clamps to [clip_min, clip_max];
    *_mask sets ratios outside [clip_min, clip_max] to 0 (a None bound is -inf / +inf).
    NaN sampling log-probs give a zero log-ratio (ratio 1).
    """
    mask = completion_mask if tool_mask is None else completion_mask * tool_mask
    per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)

    sequence_level_is = mode in ["sequence_mask", "sequence_truncate"]
    if sequence_level_is:
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    else:
        logps_diff = per_token_logps_diff

    ratio = torch.exp(logps_diff)

    if mode in ["sequence_truncate", "token_truncate"]:
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    elif mode in ["sequence_mask", "token_mask"]:
        min_val = clip_min if clip_min is not None else -math.inf
        max_val = clip_max if clip_max is not None else math.inf
        invalid_mis_mask = (ratio < min_val) | (ratio > max_val)
        ratio = ratio.masked_fill(invalid_mis_mask, value=0.0)
    else:
        raise ValueError(
            f"Unknown vLLM importance sampling level: {mode}. Possible values are 'token_truncate', "
            "'token_mask', 'sequence_truncate', and 'sequence_mask'."
        )
    return ratio
