"""TRL drop-in: ``GRPOTrainer`` with per-token log-probs from this package's fused op.

Usage — replace the trainer class, keep everything else::

    from gspo_kernels.integrations.trl import FusedGRPOTrainer
    from trl import GRPOConfig

    args = GRPOConfig(importance_sampling_level="sequence", loss_type="grpo", ...)  # GSPO ("token": GRPO)
    trainer = FusedGRPOTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=ds)
    trainer.train()

What changes: TRL's ``_get_per_token_logps_and_entropies`` (used for the
policy, old-policy and reference log-probs) is replaced. Two sources, chosen by
the constructor argument ``logprob_source``:

- ``"hidden"``: the model's backbone returns the last hidden states (through
  the model's own ``forward``, so DDP wrappers see the call) and
  :func:`gspo_kernels.linear_token_logprobs` reduces them with the LM head,
  chunk by chunk: the ``(b, T, V)`` logits never exist.
- ``"logits"``: the model's own forward computes the logits of the ``T``
  completion positions only (``logits_to_keep=T + 1``) and
  :func:`gspo_kernels.token_logprobs` reduces them, its gradient written in
  place (``inplace_backward=True``, the default): one logits-sized buffer, no log-softmax.
  Works for any causal LM, including soft-capped or scaled heads.
- ``"auto"`` (default): ``"hidden"`` for a plain linear LM head, else ``"logits"``
  (logit soft-capping or scaling in the config, an MoE aux loss, or a
  DeepSpeed-partitioned head).

Masked positions get a log-prob of exactly 0, as in TRL. The loss itself
(``_compute_loss``) runs through :func:`gspo_kernels.policy_loss` with the
config's options mapped one to one (``loss_type``, ``importance_sampling_level``,
``epsilon``/``epsilon_high``, ``delta``, ``beta``, ``use_bias_correction_kl``,
the off-policy and high-entropy masks, the vLLM importance-sampling ratio, the
entropy bonus), scaled for gradient accumulation as TRL scales it, and logs
TRL's metric names. Adaptive entropy control, MoE auxiliary losses and
multimodal batches keep TRL's own ``_compute_loss`` (still on the fused
log-probs below). What stays TRL's: generation, rewards, advantages, old and
reference log-probs.

Entropies (TRL logs them, masks low-entropy tokens when
``top_entropy_quantile < 1``, and adds the entropy bonus when
``entropy_coef != 0`` or adaptive entropy is on) come from the same pass over
the logits as the log-probs, with their gradient: no second pass. Multimodal
inputs are refused.

Tested against TRL 1.16 (``tests/test_trl.py``): one step through this class
and one through TRL's own loss give the same loss and parameter gradients.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any, Optional

import torch

from ..errors import OptionError
from ..linear import linear_token_logprobs
from ..logprobs import token_logprobs
from ..losses import policy_loss

try:
    from accelerate.utils import is_peft_model
    from trl import GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "gspo_kernels.integrations.trl needs TRL: pip install 'gspo-kernels[trl]' (TRL >=1.16,<1.17)"
    ) from exc

__all__ = ["FusedGRPOTrainer", "FusedLogprobsMixin"]

_MULTIMODAL = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
# Config fields that put something between the LM head's matrix product and the softmax.
_HEAD_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)
SOURCES = ("auto", "hidden", "logits")


def _add_hidden_forward(model) -> None:
    """``model(..., gspo_hidden=True)`` returns the backbone's last hidden states ``(b, L, H)``
    (after the final norm); without the flag the forward is the previous one."""
    previous = model.forward

    def forward(self, *args, gspo_hidden: bool = False, **kwargs):
        if not gspo_hidden:
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        return self.base_model(*args, **kwargs).last_hidden_state

    model.forward = types.MethodType(forward, model)


def _plain_head(model) -> bool:
    cfg = model.config.get_text_config()
    transformed = any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in _HEAD_TRANSFORMS)
    head = model.get_output_embeddings()
    return not transformed and head is not None and not hasattr(head.weight, "ds_id")


if TYPE_CHECKING:  # the mixin's host class: a GRPOTrainer (or subclass), whose attributes it reads
    _TrainerBase = Any
else:
    _TrainerBase = object


class FusedLogprobsMixin(_TrainerBase):
    """Mixin over ``trl.GRPOTrainer`` (or a subclass of it) that swaps in the fused log-prob op.

    Keyword arguments on top of the trainer's: ``logprob_source`` in ``"auto"``
    (default), ``"hidden"``, ``"logits"`` (see the module docstring);
    ``inplace_backward`` (default ``True``, ``"logits"`` source only): write the
    logits' gradient into their own storage. Safe: if the model saved its logits
    for its own backward (a soft-cap, say), autograd raises its in-place error
    instead of computing a wrong gradient; pass ``False`` for such models.
    """

    def __init__(self, *args, logprob_source: str = "auto", inplace_backward: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.gspo_inplace_backward = bool(inplace_backward)
        source = logprob_source
        if source not in SOURCES:
            raise OptionError(f"logprob_source must be one of {SOURCES}, got {source!r}")
        models = [m for m in (self.model, self.ref_model) if m is not None]
        models = [m.get_base_model() if is_peft_model(m) else m for m in models]  # the objects TRL patched
        plain = all(_plain_head(m) for m in models) and not self.aux_loss_enabled
        if source == "hidden" and not plain:
            raise OptionError(
                "logprob_source='hidden' needs a plain linear LM head (no logit soft-capping or scaling in the "
                "config, no MoE aux loss, no DeepSpeed-partitioned head); use 'logits' (or 'auto') for this model"
            )
        self._gspo_source = "hidden" if source == "hidden" or (source == "auto" and plain) else "logits"
        if self._gspo_source == "hidden":
            for m in models:
                _add_hidden_forward(m)

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size: Optional[int] = None,
        compute_entropy: bool = False,
        compute_aux_loss: bool = False,
        **multimodal,
    ):
        given = sorted(k for k, v in multimodal.items() if v is not None)
        if given:
            raise NotImplementedError(
                f"FusedGRPOTrainer handles text-only models; got multimodal inputs {given}. Use trl.GRPOTrainer."
            )
        unknown = sorted(set(multimodal) - set(_MULTIMODAL))
        if unknown:
            raise TypeError(f"FusedGRPOTrainer: unexpected arguments {unknown} (TRL version mismatch?)")
        batch_size = batch_size or input_ids.size(0)
        step = self._hidden_step if self._gspo_source == "hidden" else self._logits_step
        parts = [
            step(
                model,
                input_ids[s : s + batch_size],
                attention_mask[s : s + batch_size],
                logits_to_keep,
                compute_entropy,
                compute_aux_loss,
            )
            for s in range(0, input_ids.size(0), batch_size)
        ]
        logps = torch.cat([p[0] for p in parts], dim=0)
        entropies = torch.cat([p[1] for p in parts], dim=0) if compute_entropy else None
        aux_loss = torch.stack([p[2] for p in parts]).mean() if compute_aux_loss else None
        return logps, entropies, aux_loss

    def _logits_step(self, model, ids, attn, k, compute_entropy, compute_aux_loss):
        inputs = {"input_ids": ids, "attention_mask": attn, "use_cache": False}
        if compute_aux_loss:
            inputs["output_router_logits"] = True
        with self.accelerator.autocast():
            # The model's own forward (TRL's patched one passes through when fused_lm_head is not set):
            # logits for the k completion positions and the one before them only.
            outputs = model(**inputs, logits_to_keep=k + 1)
        logits = outputs.logits[:, :-1]  # (b, k, V): position t predicts token t + 1
        valid = attn[:, -k:] != 0
        out = token_logprobs(
            logits,
            ids[:, -k:],
            temperature=self.temperature,
            valid=valid,
            inplace_backward=self.gspo_inplace_backward and torch.is_grad_enabled(),
            return_entropy=compute_entropy,
        )
        logps, ent = out if compute_entropy else (out, None)
        ent = None if ent is None else ent.masked_fill(~valid, 0.0)
        return logps.masked_fill(~valid, 0.0), ent, outputs.aux_loss if compute_aux_loss else None

    def _hidden_step(self, model, ids, attn, k, compute_entropy, compute_aux_loss):
        with self.accelerator.autocast():
            hidden = model(input_ids=ids, attention_mask=attn, gspo_hidden=True)[:, -k - 1 : -1]  # (b, k, H)
        weight, bias, dtype = self._head_params(model, hidden)
        hidden, dev = hidden.to(dtype), hidden.device.type
        valid = attn[:, -k:] != 0
        with torch.autocast(dev, enabled=False):
            out = linear_token_logprobs(
                hidden,
                weight,
                ids[:, -k:],
                bias=bias,
                temperature=self.temperature,
                valid=valid,
                return_entropy=compute_entropy,
            )
        logps, ent = out if compute_entropy else (out, None)
        ent = None if ent is None else ent.masked_fill(~valid, 0.0)
        return logps.masked_fill(~valid, 0.0), ent, None

    # ------------------------------------------------------------------ the loss
    def _compute_loss(self, model, inputs):
        if self.use_adaptive_entropy or self.aux_loss_enabled or any(k in inputs for k in _MULTIMODAL):
            return super()._compute_loss(model, inputs)
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        k = inputs["completion_ids"].size(1)
        mask = (
            inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        )
        mask = mask.bool()
        args, train = self.args, self.model.training
        accum = self.current_gradient_accumulation_steps if train else 1.0
        tensors = dict(
            tokens=ids[:, -k:],
            advantages=inputs["advantages"],
            mask=mask,
            old_logprobs=inputs.get("old_per_token_logps"),
        )
        if self.beta != 0.0:
            tensors["ref_logprobs"] = inputs["ref_per_token_logps"]
        if self.off_policy_mask_threshold is not None and "sampling_per_token_logps" in inputs:
            tensors["sampling_logprobs"] = inputs["sampling_per_token_logps"]
        if self.use_vllm and self.vllm_importance_sampling_correction:
            tensors["importance_sampling_ratio"] = inputs["importance_sampling_ratio"]
        coef = self.entropy_coef if self._entropy_bonus_enabled else 0.0
        scale = 1.0 / accum  # TRL divides the per-call loss (and the entropy bonus) by the accumulation steps
        if self.loss_type in ("cispo", "dapo", "vespo"):
            # TRL's normaliser: the generation batch's token count, rescaled to one accumulation window
            factor = (accum / args.steps_per_generation if train else 1.0) / self.accelerator.num_processes
            tensors["num_items_in_batch"] = inputs["num_items_in_batch"].clamp(min=1.0)
            scale, coef = 1.0 / factor, coef / accum * factor
        options = dict(
            loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            epsilon=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            delta=args.delta,
            beta=self.beta,
            use_bias_correction_kl=args.use_bias_correction_kl,
            max_completion_length=self.max_completion_length,
            sapo_temperature_pos=args.sapo_temperature_pos,
            sapo_temperature_neg=args.sapo_temperature_neg,
            vespo_k_pos=args.vespo_k_pos,
            vespo_lambda_pos=args.vespo_lambda_pos,
            vespo_k_neg=args.vespo_k_neg,
            vespo_lambda_neg=args.vespo_lambda_neg,
            off_policy_mask_threshold=self.off_policy_mask_threshold,
            top_entropy_quantile=self.top_entropy_quantile,
            entropy_coef=coef,
            temperature=self.temperature,
        )
        if self._gspo_source == "hidden":
            with self.accelerator.autocast():
                hidden = model(input_ids=ids, attention_mask=attn, gspo_hidden=True)[:, -k - 1 : -1]
            weight, bias, dtype = self._head_params(model, hidden)
            with torch.autocast(hidden.device.type, enabled=False):
                loss, metrics = policy_loss(hidden=hidden.to(dtype), weight=weight, bias=bias, **tensors, **options)
        else:
            with self.accelerator.autocast():
                logits = model(input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=k + 1).logits
            loss, metrics = policy_loss(
                logits[:, :-1], **tensors, **options, inplace_backward=self.gspo_inplace_backward
            )
        self._log_fused_metrics(metrics)
        return loss * scale

    def _log_fused_metrics(self, metrics):
        """TRL's metric names, gathered across processes (per-process means averaged)."""
        mode = "train" if self.model.training else "eval"
        gather = self.accelerator.gather
        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(gather(metrics["kl"]).nanmean().item())
        self._metrics[mode]["entropy"].append(gather(metrics["entropy"]).nanmean().item())
        if self._entropy_bonus_enabled:
            self._metrics[mode]["policy_loss"].append(gather(metrics["policy_loss"]).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        for name in (
            "clip_ratio/low_mean",
            "clip_ratio/high_mean",
            "clip_ratio/region_mean",
            "cispo_clip_ratio",
            "vespo/phi_seq_mean",
        ):
            if name in metrics:
                self._metrics[mode][name].append(gather(metrics[name]).nanmean().item())
        if "clip_ratio/low_min" in metrics:
            self._metrics[mode]["clip_ratio/low_min"].append(gather(metrics["clip_ratio/low_min"]).min().item())
            self._metrics[mode]["clip_ratio/high_max"].append(gather(metrics["clip_ratio/high_max"]).max().item())

    def _head_params(self, model, hidden):
        """The LM head's weight and bias in the dtype its product runs in: the autocast dtype when
        autocast is on (as the model's own head would), else the weight's; the same dtype in
        forward and in the backward's recomputation, so the saved logsumexp matches."""
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 shards the head as a DTensor
            weight, bias = weight.full_tensor(), None if bias is None else bias.full_tensor()
        dev = hidden.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        return weight.to(dtype), None if bias is None else bias.to(dtype), dtype


class FusedGRPOTrainer(FusedLogprobsMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` whose log-probs come from this package's fused op.

    Same constructor and config as ``trl.GRPOTrainer``. ``GRPOConfig(importance_sampling_level="sequence")``
    trains GSPO, ``"token"`` GRPO; TRL's loss math is unchanged. Extra keyword arguments
    ``logprob_source`` and ``inplace_backward``: see :class:`FusedLogprobsMixin`.
    """
