"""Plain PyTorch reference implementations, written from the math in docs/losses.md.

They materialise everything (the full log-softmax) on purpose: they are the
ground truth for tests and the ``naive`` provider of the benchmarks.

``verl_losses`` (verl 0.9.1's policy losses, transcribed) is imported here; ``trl_oracle``
(runs the installed TRL's GRPOTrainer._compute_loss) imports TRL, which is slow, so it is
not: import ``reference.trl_oracle`` explicitly.
"""

from . import verl_losses
from .linear import naive_linear_sequence_logprobs, naive_linear_token_entropy, naive_linear_token_logprobs
from .logprobs import lengths_to_mask, naive_sequence_logprobs, naive_token_entropy, naive_token_logprobs
from .losses import (
    contrast_advantage_reference,
    group_norm_advantage_reference,
    grpo_loss_reference,
    gspo_loss_reference,
)

__all__ = [
    "contrast_advantage_reference",
    "group_norm_advantage_reference",
    "grpo_loss_reference",
    "gspo_loss_reference",
    "lengths_to_mask",
    "naive_linear_sequence_logprobs",
    "naive_linear_token_entropy",
    "naive_linear_token_logprobs",
    "naive_sequence_logprobs",
    "naive_token_entropy",
    "naive_token_logprobs",
    "verl_losses",
]
