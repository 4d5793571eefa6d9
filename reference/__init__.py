"""Plain PyTorch reference implementations, written from ../shared/design/GSPO.md.

They materialise everything (the full log-softmax) on purpose: they are the
ground truth for tests and the ``naive`` provider of the benchmarks.
"""
from .logprobs import naive_sequence_logprobs, naive_token_logprobs

__all__ = ["naive_sequence_logprobs", "naive_token_logprobs"]
