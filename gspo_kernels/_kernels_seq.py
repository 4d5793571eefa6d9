"""The per-sequence reduction kernel: the masked sum or mean of per-token log-probs over T,
with the value checks it can compute on the way (ids, lengths), for
:class:`~gspo_kernels.logprobs.SequenceLogprobs` (row kernels: :mod:`._kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ._kernels import HAS_TRITON, Launch, seq_shrink

if HAS_TRITON:
    import triton
    import triton.language as tl

# Block over T in the per-sequence reduction: T is at most a few thousand and
# the reduction reads O(N*T) floats, so one 1024-wide block per loop step is ample.
BLOCK_T = 1024

if HAS_TRITON:

    @triton.jit
    def _or(a, b):
        return a | b

    @triton.jit(do_not_specialize=["T", "V"])
    def _seq_reduce_kernel(
        LOGP,
        MASK,
        OUT,
        LEN,
        TOK,
        LENS,
        FLAG,
        T,
        V,
        shrink,
        NORMALIZE: tl.constexpr,
        CHECK: tl.constexpr,
        GRAD_SCALE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One program per sequence n (deterministic, no atomics):

            L_n = sum_t mask[n, t];   out_n = sum_t mask[n, t] * logp[n, t]  (/ L_n if NORMALIZE; 0 if L_n = 0)

        ``CHECK`` (the caller's value checks, computed here instead of by ops of their own):
        bit 1, ``0 <= LENS[n] <= T``; bit 2, ``0 <= TOK[n, t] < V`` where the mask is set;
        ``FLAG[n]`` gets the failed bits (read once by the caller, after the kernels).
        ``GRAD_SCALE``: ``LEN[n]`` gets ``d out_n / d (mask * logp)``, ``1 / L_n`` (0 if L_n = 0)
        when NORMALIZE, else 1, instead of ``L_n``: what the backward multiplies by.

        The sum runs on ``logp * shrink`` (``shrink = 2^-ceil(log2 T)``, exact),
        so no partial sum can overflow: a mean of finite log-probs (each down
        to -3.4e38) is finite, and the plain sum is inf only when it truly
        exceeds the fp32 range. Bytes: reads O(T) floats of per-token stats;
        never touches the logits.
        """
        n = tl.program_id(0).to(tl.int64)
        acc = tl.zeros((BLOCK,), LOGP.dtype.element_ty)
        cnt = tl.zeros((BLOCK,), LOGP.dtype.element_ty)
        f = tl.zeros((BLOCK,), tl.int32)
        for start in range(0, T, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = tl.load(MASK + n * T + offs, mask=offs < T, other=0.0)
            lp = tl.load(LOGP + n * T + offs, mask=offs < T, other=0.0)
            acc += tl.where(m != 0, lp * shrink, 0.0)
            cnt += m
            if CHECK & 2:
                y = tl.load(TOK + n * T + offs, mask=(offs < T) & (m != 0), other=0)
                f = f | tl.where((m != 0) & ((y < 0) | (y >= V)), 2, 0)
        if CHECK != 0:
            flag = tl.reduce(f, 0, _or)
            if CHECK & 1:
                Ln = tl.load(LENS + n)
                flag = flag | tl.where((Ln < 0) | (Ln > T), 1, 0)
            tl.store(FLAG + n, flag)
        total = tl.sum(acc, 0)
        length = tl.sum(cnt, 0)
        if NORMALIZE:
            total = tl.where(length > 0, total / tl.maximum(length, 1.0), 0.0)
        tl.store(OUT + n, total / shrink)
        if GRAD_SCALE:
            if NORMALIZE:
                if LOGP.dtype.element_ty == tl.float64:
                    inv = 1.0 / tl.maximum(length, 1.0)
                else:  # correctly rounded (a GPU's fp32 "/" is approximate): 1/L as the CPU computes it
                    inv = tl.div_rn(length * 0.0 + 1.0, tl.maximum(length, 1.0))
                length = tl.where(length > 0, inv, 0.0)
            else:
                length = length * 0.0 + 1.0
        tl.store(LEN + n, length)


@dataclass(frozen=True)
class SeqChecks:
    """Value checks the per-sequence reduction computes (``_seq_reduce_kernel``'s ``CHECK``):
    ``lengths`` (...) in ``[0, T]`` (bit 1) and ``tokens`` (..., T) in ``[0, vocab)`` where the
    mask is set (bit 2); either may be None."""

    tokens: Any = None
    vocab: int = 0
    lengths: Any = None

    @property
    def bits(self) -> dict:
        """Kind -> bit index in the flags (``CHECK`` holds ``1 << index``)."""
        return {k: b for k, b, t in (("lengths", 0, self.lengths), ("ids", 1, self.tokens)) if t is not None}


def triton_seq_reduce(
    logp: torch.Tensor,
    maskf: torch.Tensor,
    normalize: bool,
    checks: Optional[SeqChecks] = None,
    grad_scale: bool = False,
):
    """Per-sequence masked sum (or mean) of ``logp`` (..., T). Returns (values, lengths), each (...)
    (``grad_scale``: the backward's per-sequence factor instead of lengths, see the kernel), and
    with ``checks`` their per-sequence flags (int32 (N,), failed ``checks.bits``)."""
    T = logp.shape[-1]
    flags = torch.empty(0 if checks is None else logp.numel() // max(T, 1), dtype=torch.int32, device=logp.device)
    if T == 0 or logp.numel() == 0:  # no tokens: every sequence is empty (0, L = 0)
        z = logp.new_zeros(logp.shape[:-1])
        return (z, torch.zeros_like(z)) if checks is None else (z, torch.zeros_like(z), flags.zero_())
    out = torch.empty(logp.numel() // T, dtype=logp.dtype, device=logp.device)
    length = torch.empty_like(out)
    seq_reduce_launch(logp, maskf, normalize, checks, grad_scale, out, length, flags)()
    res = (out.reshape(logp.shape[:-1]), length.reshape(logp.shape[:-1]))
    return res if checks is None else (*res, flags)


def seq_reduce_launch(logp, maskf, normalize: bool, checks, grad_scale: bool, out, length, flags) -> Launch:
    """The per-sequence reduction's launch (see ``triton_seq_reduce``; T >= 1, N >= 1)."""
    T = logp.shape[-1]
    lp = logp.reshape(-1, T)
    mk = maskf.reshape(-1, T)
    bits = 0 if checks is None else sum(1 << b for b in checks.bits.values())
    tok = lp if not bits & 2 else checks.tokens.reshape(-1, T).contiguous()
    lens = lp if not bits & 1 else checks.lengths.reshape(-1).contiguous()
    return Launch(
        _seq_reduce_kernel,
        (out.numel(),),
        (lp, mk, out, length, tok, lens, flags if bits else out, T, checks.vocab if bits else 0, seq_shrink(T)),
        dict(NORMALIZE=normalize, CHECK=bits, GRAD_SCALE=grad_scale, BLOCK=BLOCK_T, num_warps=4),
    )
