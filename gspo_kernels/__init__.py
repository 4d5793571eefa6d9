"""gspo-kernels: fused Triton kernels for sequence-level policy-gradient losses (GSPO, GRPO).

Functional API:

- :func:`token_logprobs` ``(..., T, V) -> (..., T)``: per-token log-probs of the sampled tokens.
- :func:`sequence_logprobs` ``(..., T, V) -> (...)``: masked mean ("1/L") or sum per sequence.

Neither materialises a ``(..., V)`` log-softmax; both are differentiable
w.r.t. the logits, with a one-pass backward.
"""
from .logprobs import LogprobOptions, SequenceLogprobs, TokenLogprobs, sequence_logprobs, token_logprobs

__all__ = [
    "LogprobOptions",
    "SequenceLogprobs",
    "TokenLogprobs",
    "sequence_logprobs",
    "token_logprobs",
]
__version__ = "0.1.0"
