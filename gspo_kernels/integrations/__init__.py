"""Adapters that make existing RL trainers compute their log-probs through gspo_kernels.

- :mod:`gspo_kernels.integrations.trl`: a drop-in for TRL's ``GRPOTrainer``
  (``pip install 'gspo-kernels[trl]'``).
- :mod:`gspo_kernels.integrations.verl`: ``fused_kernel_options.impl_backend=gspo_kernels``
  for verl 0.9.1's actor, switched on through ``external_lib`` (``pip install 'gspo-kernels[verl]'``;
  docs/verl.md).

Trainers without an adapter (OpenRLHF, custom loops) call
:func:`gspo_kernels.token_logprobs` or :func:`gspo_kernels.sequence_logprobs`
on the logits they already have; see docs/trainers.md.
"""
