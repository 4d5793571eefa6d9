"""TRL 1.16's own default log-prob path, as a benchmark provider.

``GRPOTrainer`` always patches the policy with ``trl.trainer.utils.add_fused_lm_head`` and
calls it with ``fused_lm_head=True``: the backbone runs, then only the positions whose
label is not -100 go through ``trl.kernels.ChunkedLogProbFunction`` (cuBLAS products on
4,096-token x 32,768-vocabulary tiles, a Triton kernel folding each tile into an online
logsumexp; backward recomputes each tile, overwrites it with the logits' gradient and
accumulates ``grad_hidden`` / ``grad_weight`` in fp32). That, not naive logits, is what a
TRL user's step costs; these helpers call TRL's code itself, nothing copied.

On a CPU, TRL's tiles fold in PyTorch (its own fallback) and every position is scored.
"""

from __future__ import annotations

import torch


def chunked_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token log-probs ``(*tokens.shape)`` (0 where ``valid`` is False) from ``hidden``
    ``(*tokens.shape, H)`` and ``weight`` ``(V, H)`` through TRL's ``ChunkedLogProbFunction``,
    valid rows only on CUDA (as ``add_fused_lm_head``'s forward selects them)."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.kernels.chunked_logprob import _use_triton
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    compact = _use_triton(hidden.device)
    h = hidden[valid] if compact else hidden.reshape(-1, hidden.shape[-1])
    y = tokens[valid] if compact else tokens.reshape(-1)
    lp = ChunkedLogProbFunction.apply(
        h, weight, None, y, temperature, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs",)
    )[0]
    if compact:
        return lp.new_zeros(valid.shape).masked_scatter(valid, lp)
    return lp.view(valid.shape).masked_fill(~valid, 0)


def ensure_head(model) -> None:
    """Patch ``model`` with TRL's fused LM head once (its plain forward is unchanged)."""
    if not getattr(model, "_trl_fused_head", False):
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, temperature=1.0, outputs=("log_probs",))
        model._trl_fused_head = True


def step_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, P: int) -> torch.Tensor:
    """``(N, T)`` completion log-probs as ``GRPOTrainer._get_per_token_logps_and_entropies``
    computes them: labels = the ids, -100 on the prompt and on masked completion tokens,
    ``model(..., labels=labels, fused_lm_head=True).log_probs[:, -T:]``."""
    ensure_head(model)
    T = ids.shape[1] - P
    labels = ids.clone()
    labels[:, :P] = -100
    labels[:, P:] = labels[:, P:].masked_fill(~mask, -100)
    return model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs[:, -T:]
