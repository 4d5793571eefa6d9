"""TRL drop-in: ``GRPOTrainer`` with per-token log-probs from the fused kernel.

Usage — replace the trainer class, keep everything else::

    from gspo_kernels.integrations.trl import FusedGRPOTrainer
    from trl import GRPOConfig

    args = GRPOConfig(importance_sampling_level="sequence", loss_type="grpo", ...)  # GSPO
    trainer = FusedGRPOTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=ds)
    trainer.train()

What changes: TRL's ``_get_per_token_logps_and_entropies`` (which TRL uses for
the policy, old-policy and reference log-probs) runs the model's own forward
for the ``T`` completion positions only (``logits_to_keep=T + 1``) and reduces
the ``(b, T, V)`` logits with :func:`gspo_kernels.token_logprobs`: one read of
the logits forward, one read and one in-place write backward; the ``(b, T, V)``
log-softmax and a separate gradient buffer never exist. Masked positions get a
log-prob of exactly 0, as in TRL.

What stays TRL's: advantages, old and reference log-probs handling, the
importance-sampling level (``"sequence"`` is GSPO, ``"token"`` GRPO), clipping,
the KL term, the loss aggregation (``loss_type``), metrics, generation.

Entropies (TRL logs them, and masks low-entropy tokens when
``top_entropy_quantile < 1``) are computed from the same logits without
gradient, a few rows at a time. The entropy bonus (``entropy_coef != 0`` or
adaptive entropy) needs the entropy's gradient and is refused at construction;
so are multimodal inputs.

Tested against TRL 1.16 (``tests/test_trl.py``): one step through this class
and one through TRL's own loss give the same loss and parameter gradients.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..logprobs import token_logprobs

try:
    from trl import GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "gspo_kernels.integrations.trl needs TRL: pip install 'gspo-kernels[trl]' (TRL >=1.16,<1.17)"
    ) from exc

__all__ = ["FusedGRPOTrainer", "FusedLogprobsMixin", "chunked_entropy"]

# Elements of logits per entropy chunk: 2**22 fp32 = 16 MiB per temporary (27
# rows at V = 152k), negligible next to the logits, and large enough that the
# per-chunk launch overhead is amortised on a GPU.
_ENTROPY_CHUNK_ELEMENTS = 2**22

_MULTIMODAL = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
               "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


@torch.no_grad()
def chunked_entropy(logits: Tensor, temperature: float = 1.0, rows: Optional[int] = None) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` per row, without gradient.

    ``logits`` ``(..., V)`` -> ``(...)`` float32. ``H = lse(z) - sum_v p_v z_v``
    with ``z = logits / tau``; extra memory is a few ``rows x V`` fp32
    temporaries (``rows`` defaults to ``2**22 // V``).
    """
    rows = rows or max(1, _ENTROPY_CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], rows):
        z = flat[start:start + rows].float() / temperature
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        out[start:start + rows] = (lse - (torch.exp(z - lse) * z).sum(-1, keepdim=True)).squeeze(-1)
    return out.view(logits.shape[:-1])


class FusedLogprobsMixin:
    """Mixin over ``trl.GRPOTrainer`` (or a subclass of it) that swaps in the fused log-prob op.

    Class attribute ``gspo_inplace_backward`` (default ``True``): write the
    logits' gradient into the logits' own storage. Safe: if the model saved its
    logits for its own backward (a soft-cap, say), autograd raises its in-place
    error instead of computing a wrong gradient; set it to ``False`` for such models.
    """

    gspo_inplace_backward: bool = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self, "_entropy_bonus_enabled", False):
            raise ValueError(
                "FusedGRPOTrainer: the entropy bonus (entropy_coef != 0 or adaptive entropy) needs the gradient of "
                "the entropy, which the fused op does not compute; use trl.GRPOTrainer for it, or set entropy_coef=0"
            )

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size: Optional[int] = None, compute_entropy: bool = False,
                                           compute_aux_loss: bool = False, **multimodal):
        given = sorted(k for k, v in multimodal.items() if v is not None)
        if given:
            raise NotImplementedError(
                f"FusedGRPOTrainer handles text-only models; got multimodal inputs {given}. Use trl.GRPOTrainer."
            )
        unknown = sorted(set(multimodal) - set(_MULTIMODAL))
        if unknown:
            raise TypeError(f"FusedGRPOTrainer: unexpected arguments {unknown} (TRL version mismatch?)")
        batch_size = batch_size or input_ids.size(0)
        all_logps, all_entropies, all_aux = [], [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids = input_ids[start:start + batch_size]
            attn = attention_mask[start:start + batch_size]
            inputs = {"input_ids": ids, "attention_mask": attn, "use_cache": False}
            if compute_aux_loss:
                inputs["output_router_logits"] = True
            with self.accelerator.autocast():
                # The model's own forward (TRL's patched one passes through when fused_lm_head is not set):
                # logits for the T completion positions and the one before them only.
                outputs = model(**inputs, logits_to_keep=logits_to_keep + 1)
            logits = outputs.logits[:, :-1]                       # (b, T, V): position t predicts token t + 1
            tokens = ids[:, -logits_to_keep:]
            valid = attn[:, -logits_to_keep:] != 0
            if compute_entropy:
                all_entropies.append(chunked_entropy(logits, self.temperature).masked_fill(~valid, 0.0))
            logps = token_logprobs(logits, tokens, temperature=self.temperature, valid=valid,
                                   inplace_backward=self.gspo_inplace_backward and torch.is_grad_enabled())
            all_logps.append(logps.masked_fill(~valid, 0.0))
            if compute_aux_loss:
                all_aux.append(outputs.aux_loss)
        logps = torch.cat(all_logps, dim=0)
        entropies = torch.cat(all_entropies, dim=0) if compute_entropy else None
        aux_loss = torch.stack(all_aux).mean() if compute_aux_loss else None
        return logps, entropies, aux_loss


class FusedGRPOTrainer(FusedLogprobsMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` whose log-probs come from :func:`gspo_kernels.token_logprobs`.

    Same constructor and config as ``trl.GRPOTrainer``. ``GRPOConfig(importance_sampling_level="sequence")``
    trains GSPO, ``"token"`` GRPO; TRL's loss math is unchanged.
    """
