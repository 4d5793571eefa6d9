"""Triton kernels and launchers for per-token log-probs, their gradient, and
the masked per-sequence reduction.

Row addressing: the logits are ``(..., V)`` with stride 1 on ``V`` and any
strides on the leading dims. The launcher collapses the leading dims into at
most three ``(D0, D1, D2)`` with strides ``(s0, s1, s2)`` (merging dims that
are contiguous with each other), so a row ``r`` of the flattened index lives
at ``i0*s0 + i1*s1 + i2*s2`` with ``(i0, i1, i2)`` = unravel(r). All offsets are
int64: ``N*T*V`` passes 2**31 at ordinary sizes. Shapes and strides are plain
(non-constexpr) arguments marked ``do_not_specialize``: one compilation serves
every shape; only ``BLOCK_V`` (a power of two, at most 13 values) and the
accumulator dtype are compile-time.
"""
from __future__ import annotations

import math

import torch

try:  # triton is optional on CPU-only machines: the chunked PyTorch path covers them.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

# Block over V. 4096 elements are 8 KB of bf16 per program per iteration:
# with 8 warps (256 threads) each thread loads 16 contiguous elements (two
# 16-byte vector loads), enough bytes in flight per SM to approach HBM
# bandwidth, while the fp32 working set (16 registers/thread for x, same for
# exp(x)) stays far below the register budget. Smaller V uses the next power
# of two so tiny vocabularies do not waste lanes. Module-level so tests can
# lower it to exercise many blocks at small V in the interpreter.
MAX_BLOCK_V = 4096
# Block over T in the per-sequence reduction: T is at most a few thousand and
# the reduction reads O(N*T) floats, so one 1024-wide block per loop step is ample.
BLOCK_T = 1024


def block_v(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary of size V."""
    b = min(MAX_BLOCK_V, max(16, 1 << max(0, math.ceil(math.log2(max(V, 1))))))
    return b, (8 if b >= 2048 else 4)


def collapse_rows(shape, strides):
    """Collapse leading dims ``shape``/``strides`` (everything but V) into at most
    three (size, stride) pairs, outermost first, without copying anything.

    Raises ValueError if the strides cannot be expressed with three dims.
    """
    dims = [(s, st) for s, st in zip(shape, strides) if s != 1]
    merged = []
    for size, stride in reversed(dims):  # innermost first
        if merged and stride == merged[-1][0] * merged[-1][1]:
            merged[-1] = (merged[-1][0] * size, merged[-1][1])
        else:
            merged.append((size, stride))
    merged = list(reversed(merged))
    if len(merged) > 3:
        raise ValueError(
            f"logits' leading dims {tuple(shape)} with strides {tuple(strides)} cannot be addressed "
            "as three strided dims; make the leading dims partly contiguous"
        )
    while len(merged) < 3:
        merged.insert(0, (1, 0))
    return merged


if HAS_TRITON:

    @triton.jit
    def _row_offset(row, D1, D2, s0, s1, s2):
        i2 = row % D2
        rest = row // D2
        return (rest // D1) * s0 + (rest % D1) * s1 + i2 * s2

    @triton.jit(do_not_specialize=["V", "D1", "D2", "s0", "s1", "s2", "inv_temp"])
    def _logprob_fwd_kernel(X, Y, LOGP, LSE, V, D1, D2, s0, s1, s2, inv_temp,
                            BLOCK_V: tl.constexpr, ACC: tl.constexpr):
        """One program per row t (a token):

            lse_t  = logsumexp_v(x_t[v] / tau)        (online: block max, rescaled sum)
            logp_t = x_t[y_t] / tau - lse_t

        Bytes: reads the row once (V * itemsize) plus one element at y_t;
        writes two floats. ``inv_temp`` = 1/tau arrives as fp32 (Triton passes
        Python floats as fp32); accumulation is in ACC (fp32, or fp64 for fp64 logits).
        Token ids are clamped into [0, V) so no id can read out of bounds (the
        launcher has already rejected out-of-range ids at unmasked positions).
        """
        row = tl.program_id(0).to(tl.int64)
        base = X + _row_offset(row, D1, D2, s0, s1, s2)
        cols = tl.arange(0, BLOCK_V)
        m = tl.full((), float("-inf"), ACC)
        s = tl.zeros((), ACC)
        m_safe = tl.zeros((), ACC)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(ACC) * inv_temp
            m_new = tl.maximum(m, tl.max(x, 0))
            # A block of only -inf (masked vocabulary) before any finite value:
            # shift by 0 instead of -inf so no inf - inf NaN appears.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new).to(ACC)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
            m = m_new
        lse = m_safe + tl.log(s)
        y = tl.load(Y + row).to(tl.int64)
        y = tl.minimum(tl.maximum(y, 0), V - 1)
        xy = tl.load(base + y).to(ACC) * inv_temp
        tl.store(LOGP + row, xy - lse)
        tl.store(LSE + row, lse)

    @triton.jit(do_not_specialize=["V", "D1", "D2", "s0", "s1", "s2", "E1", "E2", "o0", "o1", "o2",
                                   "inv_temp"])
    def _logprob_bwd_kernel(X, Y, LSE, G, DX, V, D1, D2, s0, s1, s2, E1, E2, o0, o1, o2, inv_temp,
                            BLOCK_V: tl.constexpr, ACC: tl.constexpr):
        """One program per row t:

            dx_t[v] = g_t * (1[v = y_t] - exp(x_t[v] / tau - lse_t)) / tau

        Bytes: reads the row once and writes it once (in the logits' dtype);
        a row with g_t = 0 (masked token, empty sequence) skips the read and
        writes exact zeros. DX may alias X (in-place backward): each element
        is read before it is written, by the same program. DX has its own
        collapsed layout (E1, E2, o*): the same logical row, other strides.
        """
        row = tl.program_id(0).to(tl.int64)
        base = X + _row_offset(row, D1, D2, s0, s1, s2)
        out = DX + _row_offset(row, E1, E2, o0, o1, o2)
        cols = tl.arange(0, BLOCK_V)
        g = tl.load(G + row).to(ACC)
        if g == 0:
            zero = tl.zeros((BLOCK_V,), ACC).to(DX.dtype.element_ty)
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                tl.store(out + offs, zero, mask=offs < V)
        else:
            lse = tl.load(LSE + row).to(ACC)
            y = tl.load(Y + row).to(tl.int64)
            y = tl.minimum(tl.maximum(y, 0), V - 1)
            scale = g * inv_temp
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                x = tl.load(base + offs, mask=offs < V, other=0.0).to(ACC) * inv_temp
                p = tl.exp(x - lse)
                d = (tl.where(offs == y, 1.0, 0.0) - p) * scale
                tl.store(out + offs, d.to(DX.dtype.element_ty), mask=offs < V)

    @triton.jit(do_not_specialize=["T"])
    def _seq_reduce_kernel(LOGP, MASK, OUT, LEN, T, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr):
        """One program per sequence n (deterministic, no atomics):

            L_n = sum_t mask[n, t];   out_n = sum_t mask[n, t] * logp[n, t]  (/ L_n if NORMALIZE; 0 if L_n = 0)

        Bytes: reads O(T) floats of per-token stats; never touches the logits.
        """
        n = tl.program_id(0).to(tl.int64)
        acc = tl.zeros((BLOCK,), LOGP.dtype.element_ty)
        cnt = tl.zeros((BLOCK,), LOGP.dtype.element_ty)
        for start in range(0, T, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = tl.load(MASK + n * T + offs, mask=offs < T, other=0.0)
            lp = tl.load(LOGP + n * T + offs, mask=offs < T, other=0.0)
            acc += tl.where(m != 0, lp, 0.0)
            cnt += m
        total = tl.sum(acc, 0)
        length = tl.sum(cnt, 0)
        if NORMALIZE:
            total = tl.where(length > 0, total / tl.maximum(length, 1.0), 0.0)
        tl.store(OUT + n, total)
        tl.store(LEN + n, length)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def triton_fwd(logits: torch.Tensor, tokens: torch.Tensor, inv_temp: float):
    """Launch the forward kernel. Returns (logp, lse), each ``logits.shape[:-1]``."""
    V = logits.shape[-1]
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.empty(logits.shape[:-1], dtype=out_dtype, device=logits.device)
    lse = torch.empty_like(logp)
    rows = logp.numel()
    if rows == 0:
        return logp, lse
    (_, s0), (D1, s1), (D2, s2) = collapse_rows(logits.shape[:-1], logits.stride()[:-1])
    BLOCK_V, warps = block_v(V)
    _logprob_fwd_kernel[(rows,)](
        logits, tokens.reshape(-1), logp, lse, V, D1, D2, s0, s1, s2, float(inv_temp),
        BLOCK_V=BLOCK_V, ACC=_acc(logits.dtype), num_warps=warps,
    )
    return logp, lse


def triton_bwd(logits: torch.Tensor, tokens: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
               inv_temp: float, out: torch.Tensor) -> torch.Tensor:
    """Launch the backward kernel writing into ``out`` (same shape as logits; may be logits)."""
    V = logits.shape[-1]
    if lse.numel() == 0:
        return out
    (_, s0), (D1, s1), (D2, s2) = collapse_rows(logits.shape[:-1], logits.stride()[:-1])
    (_, o0), (E1, o1), (E2, o2) = collapse_rows(out.shape[:-1], out.stride()[:-1])
    BLOCK_V, warps = block_v(V)
    _logprob_bwd_kernel[(lse.numel(),)](
        logits, tokens.reshape(-1), lse.reshape(-1), grad.reshape(-1), out,
        V, D1, D2, s0, s1, s2, E1, E2, o0, o1, o2, float(inv_temp),
        BLOCK_V=BLOCK_V, ACC=_acc(logits.dtype), num_warps=warps,
    )
    return out


def triton_seq_reduce(logp: torch.Tensor, maskf: torch.Tensor, normalize: bool):
    """Per-sequence masked sum (or mean) of ``logp`` (..., T). Returns (values, lengths), each (...)."""
    T = logp.shape[-1]
    lp = logp.reshape(-1, T)
    mk = maskf.reshape(-1, T)
    out = torch.empty(lp.shape[0], dtype=logp.dtype, device=logp.device)
    length = torch.empty_like(out)
    if out.numel():
        _seq_reduce_kernel[(out.numel(),)](lp, mk, out, length, T, NORMALIZE=normalize,
                                           BLOCK=BLOCK_T, num_warps=4)
    return out.reshape(logp.shape[:-1]), length.reshape(logp.shape[:-1])
