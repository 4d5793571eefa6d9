"""The loss's value checks, computed inside the fused tail's forward kernel.

Each program of :func:`.kernels._tail_fwd_kernel` already walks its sequence's per-token
inputs; with checks on it also reads, once, what the queued value checks need (the ids
and the mask, the given per-token and per-sequence tensors, its length and reward) and
ORs one bit per failed check into a per-sequence integer (a ``PART`` column); the
reduce kernel ORs those into a 0-d int32 flag that :class:`gspo_kernels._checks.ValueChecks`
reads once, after the kernels. So a checked call launches no kernel of its own for its
checks: the checks are the ``CHECK`` bits (``tl.constexpr``) of kernels that run anyway.
Bytes: one more read of each checked O(N*T) tensor (and of the ids); none of the logits.

Kinds and their bits, in the order their messages are raised (the torch evaluation of the
same checks, for every other path, is queued by :func:`..inputs.resolve` and
:mod:`gspo_kernels._validate`)::

    lengths      0 <= lengths_i <= T                     (per sequence)
    binary_mask  a float mask holds only 0 and 1         (every position)
    old, ref     finite at valid positions               (per token)
    isr, adv     finite at valid positions (per token), or where the sequence has a valid
                 token (per sequence)
    rewards      finite                                  (per sequence)
    ids          0 <= id < V at valid positions          (per token)
"""

from __future__ import annotations

from ..._kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

KINDS = ("lengths", "binary_mask", "old", "ref", "isr", "adv", "rewards", "ids")
BITS = {kind: 1 << i for i, kind in enumerate(KINDS)}
_bit = tl.constexpr if HAS_TRITON else int
C_LEN, C_BIN, C_OLD, C_REF, C_ISR, C_ADV, C_REW, C_IDS = (_bit(BITS[k]) for k in KINDS)

if HAS_TRITON:
    from ..._kernels_seq import _or

    @triton.jit
    def _not_finite(x):
        """NaN or +-inf (``abs(NaN) < inf`` is false)."""
        return ~(tl.abs(x) < float("inf"))

    @triton.jit
    def _row_count(M, row, T, BLOCK: tl.constexpr):
        """``L = sum_t m[row, t]``, the sequence's count of valid tokens."""
        ar = tl.arange(0, BLOCK)
        n = tl.zeros([BLOCK], tl.int32)
        for start in range(0, T, BLOCK):
            offs = start + ar
            n += (tl.load(M + row * T + offs, mask=offs < T, other=0) != 0).to(tl.int32)
        return tl.sum(n, 0)

    @triton.jit
    def _row_checks(
        M,
        TOK,
        FMASK,
        LENS,
        OLD,
        REF,
        ISR,
        ADV,
        REW,
        row,
        T,
        V,
        CHECK: tl.constexpr,
        ISR_MODE: tl.constexpr,
        ADV_MODE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """The bits (``C_*``) of the checks in ``CHECK`` that sequence ``row`` fails: one pass
        over its tokens (the per-token checks), then its per-sequence values. (``CHECK & 2``
        tests C_BIN's bit: the interpreter passes ``CHECK`` as a plain int, which does not
        combine with a constexpr.)"""
        base = row * T
        ar = tl.arange(0, BLOCK)
        f = tl.zeros([BLOCK], tl.int32)
        n = tl.zeros([BLOCK], tl.int32)
        for start in range(0, T, BLOCK):
            offs = start + ar
            inb = offs < T
            idx = base + offs
            m = tl.load(M + idx, mask=inb, other=0) != 0
            n += m.to(tl.int32)
            if CHECK & 2:
                x = tl.load(FMASK + idx, mask=inb, other=0.0)
                f = f | tl.where((x != 0) & (x != 1), C_BIN, 0)
            if CHECK & 4:
                f = f | tl.where(m & _not_finite(tl.load(OLD + idx, mask=inb, other=0.0)), C_OLD, 0)
            if CHECK & 8:
                f = f | tl.where(m & _not_finite(tl.load(REF + idx, mask=inb, other=0.0)), C_REF, 0)
            if CHECK & 16:
                if ISR_MODE == 1:
                    f = f | tl.where(m & _not_finite(tl.load(ISR + idx, mask=inb, other=0.0)), C_ISR, 0)
            if CHECK & 32:
                if ADV_MODE == 1:
                    f = f | tl.where(m & _not_finite(tl.load(ADV + idx, mask=inb, other=0.0)), C_ADV, 0)
            if CHECK & 128:
                y = tl.load(TOK + idx, mask=inb & m, other=0)
                f = f | tl.where(m & ((y < 0) | (y >= V)), C_IDS, 0)
        flag = tl.reduce(f, 0, _or)
        some = tl.sum(n, 0) > 0
        if CHECK & 1:
            Ln = tl.load(LENS + row)
            flag = flag | tl.where((Ln < 0) | (Ln > T), C_LEN, 0)
        if CHECK & 16:
            if ISR_MODE == 2:
                flag = flag | tl.where(some & _not_finite(tl.load(ISR + row)), C_ISR, 0)
        if CHECK & 32:
            if ADV_MODE == 0:
                flag = flag | tl.where(some & _not_finite(tl.load(ADV + row)), C_ADV, 0)
        if CHECK & 64:
            flag = flag | tl.where(_not_finite(tl.load(REW + row)), C_REW, 0)
        return flag
