"""Log-probs straight from hidden states and the LM head, never holding the
full ``(..., T, V)`` logits.

Forward, per chunk of ``C`` rows: ``logits_c = hidden_c @ weight.T (+ bias)``
(one matrix product), reduced by the fused kernel to per-token log-probs and
logsumexp, then dropped. Saved: hidden, weight, bias, tokens and the per-token
logsumexp (O(N*T) floats). Backward, per chunk: recompute ``logits_c``, let the
fused backward kernel overwrite it in place with ``dlogits_c``, then

    grad_hidden_c  = dlogits_c @ weight
    grad_weight   += dlogits_c.T @ hidden_c     (fp32 accumulator across chunks)
    grad_bias     += dlogits_c.sum(0)           (fp32)

Peak extra memory: one chunk of logits (``C * V`` elements in the input dtype),
plus the fp32 ``grad_weight`` accumulator and one ``(V, H)`` partial product
when the weight is not fp32 — never O(N*T*V). A chunk whose rows are all
masked (forward) or all have zero upstream gradient (backward) skips its
matrix products. Compute: one more product than materialising the logits
(the forward one is recomputed in backward), the price of not storing them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .logprobs import logprob_bwd, logprob_fwd, masked_sequence_mean
from ._validate import check_temperature, check_token_range, check_tokens, resolve_mask

# Budget for one chunk of logits when the caller gives no chunk_size: at most
# 1/8 of the free device memory (room for the gradient buffers and the
# caller's own tensors) and at most 256 MiB (beyond that, a GEMM of
# 256 MiB / (V * 2 B) >= 512 rows at V = 151,936 is already large enough to
# run the tensor cores near peak, so larger chunks buy no speed). On CPU: 64 MiB.
CHUNK_BYTES_CAP = 256 << 20
CPU_CHUNK_BYTES = 64 << 20


def default_chunk_size(V: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk: a power of two whose ``rows * V`` logits fit the budget above."""
    budget = CPU_CHUNK_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(CHUNK_BYTES_CAP, free // 8)
    rows = max(1, budget // (V * torch.empty((), dtype=dtype).element_size()))
    return 1 << (rows.bit_length() - 1)


@dataclass(frozen=True)
class LinearOptions:
    inv_temp: float
    chunk_size: int
    entropy: bool = False
    shard: Optional[object] = None  # vocab_parallel.Shard: weight holds rows [start, start + width) of V


def _logits(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return torch.nn.functional.linear(h, weight, bias)


class LinearTokenLogprobs(torch.autograd.Function):
    """``(hidden (R, H), weight (V, H), bias (V,) | None, tokens (R,), valid (R,) | None, opts) -> logp (R,)``,
    or ``(logp, entropy)`` with ``opts.entropy``. A chunk whose rows are all
    invalid is skipped: its outputs are 0 and so is its gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, valid, opts: LinearOptions):
        R, C = hidden.shape[0], opts.chunk_size
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logp = torch.zeros(R, dtype=acc, device=hidden.device)
        lse = torch.zeros(R, dtype=acc, device=hidden.device)
        ent = torch.zeros(R, dtype=acc, device=hidden.device) if opts.entropy else None
        sharded = opts.shard is not None
        if sharded:
            from .vocab_parallel import combine_local, local_ids

            tokens, inside = local_ids(tokens, opts.shard)
        skipped = []
        for r in range(0, R, C):
            v = None if valid is None else valid[r:r + C]
            if v is not None and not bool(v.any()):
                skipped.append(r)
                continue  # fully masked chunk: outputs 0, no matrix product
            lp, l, e = logprob_fwd(_logits(hidden[r:r + C], weight, bias), tokens[r:r + C], v, opts.inv_temp,
                                   opts.entropy, check=not sharded)
            logp[r:r + C], lse[r:r + C] = lp, l
            if opts.entropy:
                ent[r:r + C] = e
        if sharded:  # this shard's statistics -> global ones (two all-reduces over R floats)
            logp, lse, ent = combine_local(logp, lse, ent, inside, opts.inv_temp, opts.shard.group)
            for r in skipped:
                logp[r:r + C] = 0
                if ent is not None:
                    ent[r:r + C] = 0
        ctx.opts = opts
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, tokens, lse, valid, ent)
        return (logp, ent) if opts.entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        hidden, weight, bias, tokens, lse, valid, ent = ctx.saved_tensors
        opts: LinearOptions = ctx.opts
        R, C = hidden.shape[0], opts.chunk_size
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32 if weight.dtype != torch.float64 else weight.dtype,
                             device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=grad_w.dtype if grad_w is not None else torch.float32,
                             device=bias.device) if (need_b and bias is not None) else None
        if grad_logp is None and grad_ent is None:
            return grad_h, grad_w, grad_b, None, None, None
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.contiguous()
        grad_ent = None if grad_ent is None else grad_ent.contiguous()
        for r in range(0, R, C):
            if valid is not None and not bool(valid[r:r + C].any()):
                continue  # forward returned constants (0) for this chunk: zero gradient
            g = grad_logp[r:r + C]
            h_ent = None if grad_ent is None else grad_ent[r:r + C]
            if not bool(g.any()) and (h_ent is None or not bool(h_ent.any())):
                continue  # no upstream gradient in this chunk: skip its matrix products
            h = hidden[r:r + C]
            dl = _logits(h, weight, bias)
            logprob_bwd(dl, tokens[r:r + C], lse[r:r + C], g, None if h_ent is None else ent[r:r + C], h_ent,
                        opts.inv_temp, True)
            if grad_h is not None:
                grad_h[r:r + C] = dl @ weight
            if grad_w is not None:
                if grad_w.dtype == dl.dtype:
                    grad_w.addmm_(dl.t(), h)
                else:  # low-precision product (fp32 accumulation inside the GEMM), fp32 sum across chunks
                    grad_w += dl.t() @ h
            if grad_b is not None:
                grad_b += dl.sum(0, dtype=grad_b.dtype)
        if grad_h is not None and opts.shard is not None:
            # hidden feeds every shard (a column-parallel layer's input): sum its gradient over the group
            import torch.distributed as dist

            dist.all_reduce(grad_h, group=opts.shard.group)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def _check(hidden, weight, tokens, bias, temperature, chunk_size):
    if not isinstance(hidden, Tensor) or not hidden.dtype.is_floating_point:
        raise TypeError(f"hidden must be a float tensor (..., T, H), got "
                        f"{hidden.dtype if isinstance(hidden, Tensor) else type(hidden).__name__}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must have shape (..., T, H), got {tuple(hidden.shape)}")
    if hidden.shape[-1] < 1:
        raise ValueError(f"hidden must have H >= 1 (last dim), got shape {tuple(hidden.shape)}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be the 2-D (V, H) LM head, got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have V >= 1 rows (the (V, H) LM head), got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) (V), got "
                         f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
    if bias is not None and bias.dtype != hidden.dtype:
        raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}; put them on one device")
    check_tokens(tokens, hidden[..., :1], logits_name="hidden")
    inv_temp = 1.0 / check_temperature(temperature)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (rows per chunk), got {chunk_size!r}")
    return inv_temp


def _rows(hidden: Tensor) -> Tensor:
    """``(..., T, H) -> (R, H)``: a view when the leading dims allow it, else a copy of
    ``hidden`` (O(N*T*H), never V-sized). The matrix products take any row stride."""
    return hidden.reshape(-1, hidden.shape[-1])


def linear_token_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor, *, bias: Optional[Tensor] = None,
                          temperature: float = 1.0, chunk_size: Optional[int] = None,
                          valid: Optional[Tensor] = None, return_entropy: bool = False, vocab_group=None,
                          vocab_size: Optional[int] = None):
    """Per-token log-probs of ``tokens`` under ``softmax((hidden @ weight.T + bias) / temperature)``
    (and, with ``return_entropy=True``, that distribution's entropy, from the same pass).

    Args:
        hidden: ``(..., T, H)`` last hidden states (any strides), bf16/fp16/fp32/fp64.
        weight: ``(V, H)`` LM head (may be tied to the embedding), hidden's dtype.
        tokens: ``(..., T)`` ids in ``[0, V)``.
        bias: optional ``(V,)``.
        temperature: tau > 0.
        chunk_size: rows per chunk; default :func:`default_chunk_size` (from V and free memory).
        valid: optional ``(..., T)`` mask: ids are checked only there, and fully
            masked chunks skip their matrix products (their outputs are 0, and
            so is their gradient).
        return_entropy: also return the per-token entropy (its gradient flows
            to hidden, weight and bias like the log-prob's).
        vocab_group: process group over which the LM head is sharded by rows:
            ``weight`` (and ``bias``) are this rank's ``(V/P, H)`` rows (a
            ``ColumnParallelLinear`` output shard, rank order); tokens are global
            ids. The gradient of ``hidden`` is all-reduced over the group here
            (Megatron's column-parallel input rule); ``grad_weight`` stays local.
        vocab_size: optional global V, checked against ``V/P * P`` (on every rank alike).

    Returns:
        ``(..., T)`` float32 (float64 for float64 input), or ``(logp, entropy)``;
        differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    inv_temp = _check(hidden, weight, tokens, bias, temperature, chunk_size)
    C = chunk_size or default_chunk_size(weight.shape[0], hidden.dtype, hidden.device)
    v = None if valid is None else resolve_mask(valid, None, tokens, name="valid").reshape(-1)
    shard = None
    if vocab_group is None:
        check_token_range(tokens.reshape(-1), weight.shape[0], v)  # before the first matrix product
    else:
        from . import vocab_parallel as vp

        shard = vp.resolve_shard(vocab_group, weight.shape[0], tokens.numel(), vocab_size, name="weight")
        check_token_range(tokens.reshape(-1), shard.vocab, v)
    opts = LinearOptions(inv_temp, C, bool(return_entropy), shard)
    out = LinearTokenLogprobs.apply(_rows(hidden), weight, bias, tokens.reshape(-1), v, opts)
    if return_entropy:
        return out[0].reshape(tokens.shape), out[1].reshape(tokens.shape)
    return out.reshape(tokens.shape)


def linear_sequence_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor, mask: Optional[Tensor] = None, *,
                             lengths: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                             temperature: float = 1.0, normalize: bool = True,
                             chunk_size: Optional[int] = None, vocab_group=None,
                             vocab_size: Optional[int] = None) -> Tensor:
    """Masked mean (``normalize=True``, GSPO's 1/L) or sum of :func:`linear_token_logprobs`
    over T: ``(..., T, H) -> (...)`` float32; a sequence with L = 0 gives 0 and zero gradients."""
    _check(hidden, weight, tokens, bias, temperature, chunk_size)
    valid = resolve_mask(mask, lengths, tokens)
    if valid is None:
        valid = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    logp = linear_token_logprobs(hidden, weight, tokens, bias=bias, temperature=temperature, chunk_size=chunk_size,
                                 valid=valid, vocab_group=vocab_group, vocab_size=vocab_size)
    return masked_sequence_mean(logp, valid, normalize)
