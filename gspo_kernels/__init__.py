"""gspo-kernels: fused Triton kernels for sequence-level policy-gradient losses (GSPO, GRPO).

Functional API:

- :func:`token_logprobs` ``(..., T, V) -> (..., T)``: per-token log-probs of the sampled tokens
  (``return_entropy=True``: and the per-token entropy, from the same pass).
- :func:`sequence_logprobs` ``(..., T, V) -> (...)``: masked mean ("1/L") or sum per sequence;
  packed (padding-free) rows with ``cu_seqlens=`` (:func:`cu_seqlens_from_position_ids`), as the losses.
- :func:`linear_token_logprobs`, :func:`linear_sequence_logprobs`: the same from hidden states
  ``(..., T, H)`` and the LM head ``(V, H)``, by fused kernels that never write a logit to memory.
- :func:`policy_loss` (and ``PolicyLoss``): every policy loss of TRL's ``GRPOTrainer`` and verl,
  under TRL's option names, ``-> (loss, metrics)``; :func:`gspo_loss`, :func:`grpo_loss` (and
  ``GSPOLoss``, ``GRPOLoss``) are presets over it; :func:`rollout_correction` the rollout/training
  mismatch ratio.

None materialises a ``(..., V)`` log-softmax; all are differentiable w.r.t.
the logits (or hidden states and LM head), with a one-pass backward. Every op
and loss takes ``vocab_group=`` for a vocabulary sharded over a
``torch.distributed`` group (tensor parallel, :mod:`gspo_kernels.vocab_parallel`).
"""

from .errors import (
    DeviceError,
    DTypeError,
    GSPOKernelsError,
    InputValueError,
    OptionError,
    ShapeError,
    UnknownOptionError,
)
from .linear import linear_sequence_logprobs, linear_token_logprobs
from .logprobs import LogprobOptions, SequenceLogprobs, TokenLogprobs, sequence_logprobs, token_logprobs
from .losses import (
    ARTICLE_GSPO,
    GRPOLoss,
    GSPOLoss,
    LossOptions,
    PolicyLoss,
    contrast_advantage,
    group_norm_advantage,
    grpo_loss,
    gspo_loss,
    policy_loss,
    rollout_correction,
)
from .sequences import cu_seqlens_from_position_ids

__all__ = [
    "ARTICLE_GSPO",
    "LossOptions",
    "PolicyLoss",
    "policy_loss",
    "rollout_correction",
    "GRPOLoss",
    "GSPOLoss",
    "contrast_advantage",
    "cu_seqlens_from_position_ids",
    "group_norm_advantage",
    "linear_sequence_logprobs",
    "linear_token_logprobs",
    "grpo_loss",
    "gspo_loss",
    "LogprobOptions",
    "SequenceLogprobs",
    "TokenLogprobs",
    "sequence_logprobs",
    "token_logprobs",
    "GSPOKernelsError",
    "ShapeError",
    "DTypeError",
    "DeviceError",
    "InputValueError",
    "OptionError",
    "UnknownOptionError",
]
__version__ = "0.1.0"
