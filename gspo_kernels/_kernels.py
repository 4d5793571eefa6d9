"""Triton kernels and launchers: per-token log-probs (and entropy) of sampled
tokens, their gradient, and the masked per-sequence reduction.

One online-softmax core serves every forward: :func:`_softmax_update` (fold a
block into the running max / sum / entropy state) and :func:`_softmax_merge`
(combine states), used by the logits kernel's load loop here and by the
hidden-state kernels' ``tl.dot`` tiles (``_kernels_linear``); the backward
kernels reuse the saved logsumexp. The entropy output is a constexpr-selected
part of both kernels, not a copy.

Row addressing: the logits are ``(..., V)`` with stride 1 on ``V`` and any
strides on the leading dims. The launcher collapses the leading dims into at
most three ``(D0, D1, D2)`` with strides ``(s0, s1, s2)`` (merging dims that are
contiguous with each other), so flattened row ``r`` lives at
``i0*s0 + i1*s1 + i2*s2`` with ``(i0, i1, i2)`` = unravel(r). Offsets are int64
(``N*T*V`` passes 2**31 at ordinary sizes).

Specialisation (what is compiled, and how often): shapes are never
``tl.constexpr``. ``V`` and the strides are plain integers that Triton
specialises on divisibility by 16 (and on being 1): when a row's start and V
are multiples of 16 elements, the compiler can prove every 8-element group of
a row is 16-byte aligned and in or out of bounds together, and emits 16-byte
vector loads and stores; otherwise (V = 50,257, say) it falls back to narrower
accesses, same values. That gives a handful of variants per kernel, not one
per shape. The row count and the leading sizes ``D1, D2``, which change every
call and never touch alignment, are ``do_not_specialize``. Compile-time
parameters: ``BLOCK_V`` and ``ROWS`` (powers of two chosen from V's size
class), ``VEC`` (elements per 16 bytes of the logits' dtype), the accumulator
dtype and the ``ENTROPY`` switch.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ShapeError

try:  # triton is optional on CPU-only machines: the chunked PyTorch path covers them.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

# Tile over V for rows of a large vocabulary (V > TILE): one row per program,
# BLOCK_V elements per loop step, per kernel ("fwd", "bwd"): (BLOCK_V, num_warps).
# 4096 bf16 = 8 KB per step; with 8 warps each thread owns 16 contiguous
# elements = two 16-byte loads in flight, and keeps the running (max, sum[,
# entropy]) state of its two 16-byte chunks: 31-40 registers (forward, with or
# without entropy) and 32-36 (backward) on sm_90, no spills
# (tests/test_codegen.py prints them), so many programs fit one SM and tens of
# KB of loads are in flight per SM, what HBM's latency-bandwidth product asks.
# The H100 sweep that chose these (benchmarks/tune.py; figures in
# benchmarks/NOTES.md): 2048 x 4, 4096 x 4, 4096 x 8 and 8192 x 8 all ran the
# forward within 1% of each other (1.62-1.63 ms, 3050-3070 GB/s of reads) and
# the backward within 1% too; 4096 x 8 is within noise of the best for both.
# GSPO_KERNELS_LARGE_V (e.g. "fwd=8192x16,bwd=4096x8") overrides them, for tuning runs.
LARGE_V = {"fwd": (4096, 8), "bwd": (4096, 8)}
# Medium vocabularies (TILE < V <= MID_V, e.g. 32,000) may take MID_ROWS rows
# per program, paying each row's fixed cost (final cross-warp reduction,
# stores) once per MID_ROWS rows. Measured on an H100 at V = 32,000
# (benchmarks/results/tune_v32000.csv): 1 row 0.355 ms, 2 rows 0.364 ms,
# 4 rows 0.395 ms (forward, 4096 x 8 warps): one row per program is best;
# the knob stays for other GPUs.
MID_V = 65_536
MID_ROWS = 1
for _item in filter(None, os.environ.get("GSPO_KERNELS_LARGE_V", "").split(",")):
    _kind, _cfg = _item.split("=")
    _rows, _block = (int(v) for v in _cfg.split("x"))
    LARGE_V[_kind] = (_rows, _block)
# Cap on BLOCK_V (and so on TILE): tests lower it to exercise many blocks at a
# small V in the interpreter.
MAX_BLOCK_V = 1 << 16
# Vocabularies up to TILE elements put several rows in one program
# (ROWS * BLOCK_V = TILE): a V = 1,000 row alone would leave most of a
# program idle and make the grid launch-bound.
TILE = 4096

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@dataclass(frozen=True)
class BlockConfig:
    """Compile-time tile of one launch: ``ROWS`` rows of ``BLOCK_V`` columns, ``num_warps`` warps."""

    rows: int
    block_v: int
    num_warps: int


def block_config(V: int, kind: str = "fwd", itemsize: int = 4) -> BlockConfig:
    """Tile for a vocabulary of size V (elements of ``itemsize`` bytes): one row of
    ``LARGE_V[kind]`` columns per program for V > TILE, else ``TILE // BLOCK_V`` rows of
    the next power of two >= V (fp64: half of TILE, see below)."""
    tile = min(TILE, MAX_BLOCK_V)
    per_thread = 16
    if itemsize == 8:
        # fp64: 16 elements a thread kept 252-255 registers (sm_80 at V = 1,000: and a stack
        # frame) in the forward with entropy where V is not a multiple of 16 (scalar loads;
        # fp64 exp2 and log2 are software sequences); 8 a thread leave headroom (sm_80/90/100,
        # Triton 3.9: 94-166).
        tile, per_thread = tile // 2, 8
    if tile < V:
        bv, warps = LARGE_V[kind]
        return BlockConfig(MID_ROWS if V <= MID_V else 1, min(bv * per_thread // 16, MAX_BLOCK_V), warps)
    b = max(16, 1 << max(0, math.ceil(math.log2(max(V, 1)))))
    rows = max(1, tile // b)
    # Fewer warps for a small tile: at least 16 elements (two 16-byte bf16 vectors) per thread.
    warps = max(1, min(8, rows * b // (32 * per_thread)))
    return BlockConfig(rows, b, warps)


def collapse_rows(shape, strides):
    """Collapse leading dims ``shape``/``strides`` (everything but V) into at most
    three (size, stride) pairs, outermost first, without copying anything.

    Raises ValueError if the strides cannot be expressed with three dims.
    """
    dims = [(s, st) for s, st in zip(shape, strides) if s != 1]
    merged: list[tuple[int, int]] = []
    for size, stride in reversed(dims):  # innermost first
        if merged and stride == merged[-1][0] * merged[-1][1]:
            merged[-1] = (merged[-1][0] * size, merged[-1][1])
        else:
            merged.append((size, stride))
    merged = list(reversed(merged))
    if len(merged) > 3:
        raise ShapeError(
            f"logits' leading dims {tuple(shape)} with strides {tuple(strides)} cannot be addressed "
            "as three strided dims; make the leading dims partly contiguous"
        )
    while len(merged) < 3:
        merged.insert(0, (1, 0))
    return merged


def split_float(v: float) -> tuple[float, float]:
    """``v`` as fp32 ``hi + lo``: Triton passes Python floats as fp32, and the
    fp64 kernels need 1/tau to ~48 bits (``hi + lo`` summed in fp64)."""
    hi = struct.unpack("f", struct.pack("f", v))[0]
    return hi, struct.unpack("f", struct.pack("f", v - hi))[0]


if HAS_TRITON:
    _LOG2E = tl.constexpr(LOG2E)
    _LN2 = tl.constexpr(LN2)
    # Floor of base-2 exponents where the entropy multiplies them by a weight:
    # 2^floor is 0 in fp32 and fp64, so -inf logits give p * z = 0 * floor = 0
    # (not 0 * -inf = NaN); |floor| * V stays far below the fp32 maximum.
    _FLOOR = tl.constexpr(-1.0e30)

    @triton.jit
    def _row_offset(row, D1, D2, s0, s1, s2):
        i2 = row % D2
        rest = row // D2
        return (rest // D1) * s0 + (rest % D1) * s1 + i2 * s2

    @triton.jit
    def _scale(inv_hi, inv_lo, ACC: tl.constexpr):
        """1/tau in ACC precision (``hi + lo``: fp64 kernels get ~48 bits)."""
        return tl.cast(inv_hi, ACC) + tl.cast(inv_lo, ACC)

    @triton.jit
    def _softmax_update(m, s, u, x, scale2, AXIS: tl.constexpr, ENTROPY: tl.constexpr):
        """One step of the online softmax: fold the block ``x`` (raw logit units,
        reduced along ``AXIS``) into the running state ``(m, s, u)`` of shape
        ``x.shape`` without ``AXIS``: ``m`` the max so far, and with
        ``z = scale2 * (x - m)`` (``scale2 = log2(e) / tau``): ``s = sum 2^z``,
        ``u = sum 2^z * z`` (``ENTROPY``; ``u`` is passed through otherwise).

        Shared by the logits kernels (``x`` a (ROWS, chunks, VEC) block of loaded
        logits, ``AXIS`` = 2: one state per 16-byte chunk slot) and the
        hidden-state kernels (``x`` a (rows, columns) tile from ``tl.dot``,
        ``AXIS`` = 1: one state per row). One exp2 per element and one per
        state; differences are taken before scaling, so a large common offset
        keeps full relative precision; -inf entries contribute 0 with no
        inf - inf (a state that has seen only -inf keeps shift 0)."""
        m_new = tl.maximum(m, tl.max(x, AXIS))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.where(m_new == float("-inf"), 0.0, (m - m_new) * scale2)
        alpha = tl.exp2(a)
        z = (x - tl.expand_dims(m_safe, AXIS)) * scale2
        if ENTROPY:  # finite z, so p * z is 0 (not NaN) for -inf logits
            z = tl.maximum(z, _FLOOR, propagate_nan=tl.PropagateNan.ALL)
        p = tl.exp2(z)
        if ENTROPY:
            u = alpha * (u + tl.maximum(a, _FLOOR) * s) + tl.sum(p * z, AXIS)
        s = s * alpha + tl.sum(p, AXIS)
        return m_new, s, u

    @triton.jit
    def _softmax_merge(m, s, u, scale2, AXIS: tl.constexpr, ENTROPY: tl.constexpr):
        """Merge online-softmax states ``(m, s, u)`` along ``AXIS`` (chunk slots of
        one row, or vocabulary splits): returns ``(M, S, U)`` relative to the
        common max ``M`` (0 for a row of only -inf: then ``S`` = 0); ``U`` is
        ``S`` when not ``ENTROPY``."""
        M = tl.max(m, AXIS)
        M = tl.where(float("-inf") == M, 0.0, M)  # a row of only -inf: S = 0, lse = -inf
        dm = tl.maximum((m - tl.expand_dims(M, AXIS)) * scale2, _FLOOR)
        w = tl.exp2(dm)
        S = tl.sum(s * w, AXIS)
        if ENTROPY:
            U = tl.sum(w * (u + dm * s), AXIS)
        else:
            U = S
        return M, S, U

    @triton.jit
    def _online_softmax(
        ptrs,
        live,
        V,
        scale2,
        ROWS: tl.constexpr,
        BLOCK_V: tl.constexpr,
        VEC: tl.constexpr,
        ACC: tl.constexpr,
        ENTROPY: tl.constexpr,
    ):
        """Stream ROWS rows of V logits once; return per row the max logit ``M``
        (raw units) and, with ``c = log2(e) / tau`` (``scale2``) and
        ``z_v = c * (x_v - M)``: ``S = sum_v 2^z_v`` and (``ENTROPY``)
        ``U = sum_v 2^z_v * z_v``. Then

            logsumexp(x / tau) = M / tau + ln2 * log2 S
            entropy            = ln2 * (log2 S - U / S)      (= -sum_v p_v log p_v)

        Each block of BLOCK_V columns is seen as ``BLOCK_V / VEC`` chunks of VEC
        contiguous elements (VEC * itemsize = 16 bytes: one vector load, held
        by one thread). Every chunk slot keeps its own running max ``m``, sum
        ``s`` (and ``u``); per block it takes the max of its VEC new elements
        (in-thread, no shuffle), rescales its state by one exp2, and adds
        ``2^(c (x - m))`` (:func:`_softmax_update`): one exp2 per element plus
        one per VEC elements, about six instructions per element (eight with the
        entropy). The chunk slots are merged once per row at the end
        (:func:`_softmax_merge`: one cross-warp reduction per row, not per
        block). NaN propagates through the sums; -inf logits (a masked
        vocabulary, the tail past V) contribute 0 with no inf - inf; finite
        logits anywhere in the fp32 range are exact (tested at +-3e38); a +inf
        logit makes its row NaN (``x - M`` is inf - inf), as on every backend.
        """
        NB: tl.constexpr = BLOCK_V // VEC
        cols = tl.arange(0, NB)[None, :, None] * VEC + tl.arange(0, VEC)[None, None, :]
        p3 = ptrs[:, :, None]
        lv = live[:, None, None]
        m = tl.full((ROWS, NB), float("-inf"), ACC)
        s = tl.zeros((ROWS, NB), ACC)
        u = tl.zeros((ROWS, NB), ACC)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            x = tl.load(p3 + offs, mask=lv & (offs < V), other=float("-inf")).to(ACC)
            m, s, u = _softmax_update(m, s, u, x, scale2, 2, ENTROPY)
        return _softmax_merge(m, s, u, scale2, 1, ENTROPY)

    @triton.jit(do_not_specialize=["n_rows", "D1", "D2"])
    def _logprob_fwd_kernel(
        X,
        Y,
        LOGP,
        LSE,
        ENT,
        n_rows,
        V,
        D1,
        D2,
        s0,
        s1,
        s2,
        inv_hi,
        inv_lo,
        ROWS: tl.constexpr,
        BLOCK_V: tl.constexpr,
        VEC: tl.constexpr,
        ACC: tl.constexpr,
        ENTROPY: tl.constexpr,
    ):
        """ROWS rows t (tokens) per program:

            lse_t  = logsumexp_v(x_t[v] / tau)
            logp_t = x_t[y_t] / tau - lse_t
            H_t    = lse_t - sum_v p_v x_t[v] / tau     (ENTROPY; p = softmax(x_t / tau))

        Saved for backward, in LSE: ``c_t = tau * lse_t``, the logsumexp in
        logit units, so that backward forms ``x - c_t`` before scaling (exact
        for V = 1, full precision for rows with a large common offset).

        Bytes: reads each row once (V * itemsize, 16-byte vector loads when
        aligned) plus one element at y_t; writes two floats per row (three with
        ENTROPY). Accumulation in ACC (fp32; fp64 for fp64 logits). Token ids
        are clamped into [0, V), so no id can read out of bounds (the launcher
        has already refused out-of-range ids at unmasked positions).
        """
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        live = rows < n_rows
        base = X + _row_offset(rows, D1, D2, s0, s1, s2)
        inv = _scale(inv_hi, inv_lo, ACC)
        # The sampled token's logit first: its two dependent loads overlap the stream.
        y = tl.load(Y + rows, mask=live, other=0).to(tl.int64)
        y = tl.minimum(tl.maximum(y, 0), V - 1)
        xy = tl.load(base + y, mask=live, other=0.0).to(ACC)
        M, S, U = _online_softmax(base[:, None], live, V, inv * _LOG2E, ROWS, BLOCK_V, VEC, ACC, ENTROPY)
        S = tl.where(live, S, 1.0)  # rows past the end: no log2(0)
        log_s = tl.log2(S) * _LN2
        tl.store(LOGP + rows, (xy - M) * inv - log_s, mask=live)
        tl.store(LSE + rows, M + log_s / inv, mask=live)
        if ENTROPY:
            tl.store(ENT + rows, log_s - U / S * _LN2, mask=live)

    @triton.jit(do_not_specialize=["n_rows", "D1", "D2", "E1", "E2"])
    def _logprob_bwd_kernel(
        X,
        Y,
        LSE,
        G,
        ENT,
        GH,
        DX,
        n_rows,
        V,
        D1,
        D2,
        s0,
        s1,
        s2,
        E1,
        E2,
        o0,
        o1,
        o2,
        inv_hi,
        inv_lo,
        ROWS: tl.constexpr,
        BLOCK_V: tl.constexpr,
        ACC: tl.constexpr,
        ENTROPY: tl.constexpr,
    ):
        """ROWS rows per program, for upstream gradients g_t (log-prob) and h_t (entropy):

            p_v      = exp(x_t[v] / tau - lse_t) = 2^((x_t[v] - c_t) * log2(e) / tau),  c_t = tau * lse_t
            dx_t[v]  = (g_t * (1[v = y_t] - p_v) - h_t * p_v * (log p_v + H_t)) / tau

        (the h_t term only with ENTROPY: d H_t / d x_t[v] = -p_v (log p_v + H_t) / tau).
        One exp2 per element. Bytes: reads each row once and writes it once
        (logits' dtype, 16-byte vectors when aligned); a row whose upstream
        gradients are all zero (masked token, empty sequence) skips the read and
        gets exact zeros, whatever its logits hold. DX may alias X (in-place
        backward): each element is read before it is written, by the same
        program. DX has its own collapsed layout (E1, E2, o*).
        """
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        live = rows < n_rows
        inv = _scale(inv_hi, inv_lo, ACC)
        g = tl.load(G + rows, mask=live, other=0.0).to(ACC)
        act = g != 0
        if ENTROPY:
            h = tl.load(GH + rows, mask=live, other=0.0).to(ACC)
            H = tl.load(ENT + rows, mask=live, other=0.0).to(ACC)
            act = act | (h != 0)
            hs = tl.where(act, h * inv, 0.0)[:, None]
        act = act & live
        # Inactive rows: c = +inf makes p = 0 and every term exactly 0, with
        # no per-element select and no read of their logits.
        c = tl.load(LSE + rows, mask=act, other=0.0).to(ACC)
        c = tl.where(act, c, float("inf"))[:, None]
        if ENTROPY:
            H = tl.where(act, H, 0.0)[:, None]
        # y only selects the one-hot column, it addresses nothing: an id outside [0, V)
        # (another vocabulary shard's token) matches no column.
        y = tl.load(Y + rows, mask=live, other=-1).to(tl.int64)[:, None]
        gs = tl.where(act, g * inv, 0.0)[:, None]
        scale2 = inv * _LOG2E
        src = (X + _row_offset(rows, D1, D2, s0, s1, s2))[:, None]
        dst = (DX + _row_offset(rows, E1, E2, o0, o1, o2))[:, None]
        cols = tl.arange(0, BLOCK_V)[None, :]
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            inb = offs < V
            z = (tl.load(src + offs, mask=act[:, None] & inb, other=0.0).to(ACC) - c) * scale2
            p = tl.exp2(z)
            if ENTROPY:
                logp = tl.where(p > 0, z * _LN2, 0.0)
                d = tl.where(offs == y, gs, 0.0) - p * (gs + hs * (logp + H))
            else:
                d = tl.where(offs == y, gs, 0.0) - p * gs
            tl.store(dst + offs, d.to(DX.dtype.element_ty), mask=live[:, None] & inb)


def seq_shrink(T: int) -> float:
    """``2^-ceil(log2 T)``: a sum of T terms each within the float range, times this, stays within it."""
    return 2.0 ** -max(0, math.ceil(math.log2(max(T, 1))))


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@dataclass(frozen=True)
class Launch:
    """One kernel launch, built from real tensors: ``kernel[grid](*args, **kwargs)``.

    The launchers build it, and the code-generation test compiles exactly what
    they would launch (same arguments, so the same specialisation)."""

    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict

    def __call__(self):
        self.kernel[self.grid](*self.args, **self.kwargs)


def fwd_launch(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    inv_temp: float,
    logp: torch.Tensor,
    lse: torch.Tensor,
    ent: torch.Tensor | None,
) -> Launch:
    V = logits.shape[-1]
    rows = logp.numel()
    (_, s0), (D1, s1), (D2, s2) = collapse_rows(logits.shape[:-1], logits.stride()[:-1])
    cfg = block_config(V, "fwd", logits.element_size())
    hi, lo = split_float(inv_temp)
    return Launch(
        _logprob_fwd_kernel,
        (triton.cdiv(rows, cfg.rows),),
        (logits, tokens.reshape(-1), logp, lse, lse if ent is None else ent, rows, V, D1, D2, s0, s1, s2, hi, lo),
        dict(
            ROWS=cfg.rows,
            BLOCK_V=cfg.block_v,
            VEC=max(1, min(cfg.block_v, 16 // logits.element_size())),
            ACC=_acc(logits.dtype),
            ENTROPY=ent is not None,
            num_warps=cfg.num_warps,
        ),
    )


def bwd_launch(logits, tokens, lse, grad, ent, grad_ent, inv_temp: float, out) -> Launch:
    V = logits.shape[-1]
    rows = lse.numel()
    (_, s0), (D1, s1), (D2, s2) = collapse_rows(logits.shape[:-1], logits.stride()[:-1])
    (_, o0), (E1, o1), (E2, o2) = collapse_rows(out.shape[:-1], out.stride()[:-1])
    cfg = block_config(V, "bwd", logits.element_size())
    hi, lo = split_float(inv_temp)
    entropy = grad_ent is not None
    return Launch(
        _logprob_bwd_kernel,
        (triton.cdiv(rows, cfg.rows),),
        (
            logits,
            tokens.reshape(-1),
            lse.reshape(-1),
            grad.reshape(-1),
            ent.reshape(-1) if entropy else lse,
            grad_ent.reshape(-1) if entropy else lse,
            out,
            rows,
            V,
            D1,
            D2,
            s0,
            s1,
            s2,
            E1,
            E2,
            o0,
            o1,
            o2,
            hi,
            lo,
        ),
        dict(ROWS=cfg.rows, BLOCK_V=cfg.block_v, ACC=_acc(logits.dtype), ENTROPY=entropy, num_warps=cfg.num_warps),
    )


def triton_fwd(logits: torch.Tensor, tokens: torch.Tensor, inv_temp: float, entropy: bool = False):
    """Forward kernel. Returns ``(logp, lse, ent)``, each ``logits.shape[:-1]``
    (``ent`` empty when not asked for)."""
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.empty(logits.shape[:-1], dtype=out_dtype, device=logits.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if entropy else logp.new_empty(0)
    if logp.numel():
        fwd_launch(logits, tokens, inv_temp, logp, lse, ent if entropy else None)()
    return logp, lse, ent


def triton_bwd(logits, tokens, lse, grad, ent, grad_ent, inv_temp: float, out: torch.Tensor) -> torch.Tensor:
    """Backward kernel writing into ``out`` (logits' shape; may be the logits themselves).
    ``grad_ent``/``ent``: the entropy's upstream gradient and value, or None."""
    if lse.numel():
        bwd_launch(logits, tokens, lse, grad, ent, grad_ent, inv_temp, out)()
    return out
