"""Adapters that make existing RL trainers compute their log-probs through gspo_kernels.

- :mod:`gspo_kernels.integrations.trl`: a drop-in for TRL's ``GRPOTrainer``
  (``pip install 'gspo-kernels[trl]'``).

Trainers without an adapter (verl, OpenRLHF, custom loops) call
:func:`gspo_kernels.token_logprobs` or :func:`gspo_kernels.sequence_logprobs`
on the logits they already have; see the README.
"""
