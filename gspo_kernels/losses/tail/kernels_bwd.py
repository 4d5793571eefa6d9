"""The fused loss tail's backward kernel (forward and reduce: :mod:`.kernels`; launches: :mod:`.launch`).

:func:`_tail_bwd_kernel`, one program per sequence: the sequence-level ``dloss/dlog_w``
first (GSPO's weight is a mean over the sequence), then ``dloss/dlp_t`` and ``dloss/dH_t``
per token, recomputed from the inputs and ``PART`` (nothing per-token is saved by the
forward); each derivative is written out in :mod:`.autograd`'s docstring.
"""

from __future__ import annotations

from ..._kernels import HAS_TRITON
from .math import (
    P_A,
    P_COND,
    P_ISR,
    P_L,
    P_LW,
    P_VW,
    R_COEF,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .math import (
        _load_token,
        _prm,
        _terms,
    )

# Tokens per loop step: a program holds ~20 live per-token arrays (log-probs, weights,
# advantage, masks, KL, ratios); 256 tokens over 4 warps is 2 values per thread per array,
# which fits the registers with no spill on sm_80/90/100 (tests/test_tail.py compiles them),
# and a completion of a few thousand tokens takes a few steps.

if HAS_TRITON:

    @triton.jit(do_not_specialize=["T"])
    def _tail_bwd_kernel(
        LP,
        H,
        M,
        OLD,
        REF,
        SAMP,
        ISR,
        ADV,
        PRM,
        PART,
        SCAL,
        GRAD,
        DLP,
        DH,
        T,
        LEVEL: tl.constexpr,
        DEN: tl.constexpr,
        ADV_MODE: tl.constexpr,
        OBJ: tl.constexpr,
        HAS_DELTA: tl.constexpr,
        HAS_CLIPC: tl.constexpr,
        KL: tl.constexpr,
        BIAS_KL: tl.constexpr,
        ADD_KL: tl.constexpr,
        OFFPOL: tl.constexpr,
        ENTMASK: tl.constexpr,
        ISR_MODE: tl.constexpr,
        ISR_MASK: tl.constexpr,
        HAS_CMIN: tl.constexpr,
        HAS_CMAX: tl.constexpr,
        AGG: tl.constexpr,
        ENT_GRAD: tl.constexpr,
        ACC: tl.constexpr,
        PR: tl.constexpr,
        RD: tl.constexpr,
        VD: tl.constexpr,
        LD: tl.constexpr,
        BLOCK: tl.constexpr,
        NCOL: tl.constexpr,
    ):
        """Sequence ``row``, for the upstream gradient g of the loss (derivation: _tail_fn):

            g_t      = m_t g / D  (/ max(L, 1) for seq-mean-token-mean)
            dlp_t    = g_t (dl_t/dlp_t + dl_t/dlog_w_t)               token, sequence_token levels
                     = g_t dl_t/dlp_t + m_t / max(L, 1) sum_s g_s dl_s/dlog_w   sequence level (two passes)
            dH_t     = -coef g m'_t / max(sum m', 1)                    (ENT_GRAD)

        Reads the per-token inputs once (twice at sequence level) and ``PART[row]``; writes
        one float per token per output (exact zeros at masked tokens)."""
        row = tl.program_id(0).to(tl.int64)
        base = row * T
        ar = tl.arange(0, BLOCK)
        SAMP_IN: tl.constexpr = OFFPOL == 1 or ISR_MODE >= 3
        OLD_IN: tl.constexpr = DEN == 0 or ISR_MODE >= 3
        p = PART + row * NCOL
        L = tl.load(p + P_L).to(ACC)
        seq_lw = tl.load(p + P_LW).to(ACC)
        A_seq = tl.load(p + P_A).to(ACC)
        cond = tl.load(p + P_COND) != 0
        vw = tl.load(p + P_VW).to(VD)
        r_seq = tl.load(p + P_ISR).to(RD)
        thr = 0.0
        if ENTMASK:
            thr = tl.load(SCAL + 2).to(tl.float32)
        g = tl.load(GRAD).to(LD) / tl.load(SCAL).to(LD)
        if AGG == 0:
            g = g / tl.maximum(L, 1.0)
        if LEVEL == 1:  # the sequence's dloss/dlog_w first
            acc = tl.zeros([BLOCK], LD)
            for start in range(0, T, BLOCK):
                offs = start + ar
                inb = offs < T
                idx = base + offs
                m, lp, lr, old, ref, samp = _load_token(LP, M, OLD, REF, SAMP, idx, inb, DEN, KL, SAMP_IN, OLD_IN, ACC)
                Hv = tl.load(H + idx, mask=inb, other=0.0)
                if ADV_MODE == 1:
                    A = tl.load(ADV + idx, mask=inb, other=0.0).to(ACC)
                else:
                    A = tl.zeros_like(lp) + A_seq
                _, _, _, _, _, _, _, _, d_w, _ = _terms(
                    m,
                    lp,
                    lr,
                    old,
                    ref,
                    samp,
                    Hv,
                    A,
                    seq_lw,
                    cond,
                    vw,
                    r_seq,
                    thr,
                    ISR,
                    idx,
                    inb,
                    PRM,
                    LEVEL,
                    OBJ,
                    HAS_DELTA,
                    HAS_CLIPC,
                    KL,
                    BIAS_KL,
                    ADD_KL,
                    OFFPOL,
                    ENTMASK,
                    ISR_MODE,
                    ISR_MASK,
                    HAS_CMIN,
                    HAS_CMAX,
                    ACC,
                    PR,
                    RD,
                    VD,
                    LD,
                    True,
                )
                acc += tl.where(m, g * d_w, 0.0)
            g_lw = tl.sum(acc, 0) / tl.maximum(L, 1.0)
        if ENT_GRAD:
            gh = (-tl.load(GRAD).to(ACC) / tl.load(SCAL + 1).to(ACC)) * _prm(PRM, R_COEF, ACC)
        for start in range(0, T, BLOCK):
            offs = start + ar
            inb = offs < T
            idx = base + offs
            m, lp, lr, old, ref, samp = _load_token(LP, M, OLD, REF, SAMP, idx, inb, DEN, KL, SAMP_IN, OLD_IN, ACC)
            Hv = tl.load(H + idx, mask=inb, other=0.0)
            if ADV_MODE == 1:
                A = tl.load(ADV + idx, mask=inb, other=0.0).to(ACC)
            else:
                A = tl.zeros_like(lp) + A_seq
            _, _, em, _, _, _, _, _, d_w, d_lp = _terms(
                m,
                lp,
                lr,
                old,
                ref,
                samp,
                Hv,
                A,
                seq_lw,
                cond,
                vw,
                r_seq,
                thr,
                ISR,
                idx,
                inb,
                PRM,
                LEVEL,
                OBJ,
                HAS_DELTA,
                HAS_CLIPC,
                KL,
                BIAS_KL,
                ADD_KL,
                OFFPOL,
                ENTMASK,
                ISR_MODE,
                ISR_MASK,
                HAS_CMIN,
                HAS_CMAX,
                ACC,
                PR,
                RD,
                VD,
                LD,
                True,
            )
            if LEVEL == 1:
                d = g * d_lp + g_lw
            else:
                d = g * (d_lp + d_w)
            tl.store(DLP + idx, tl.where(m, d, 0.0), mask=inb)
            if ENT_GRAD:
                tl.store(DH + idx, tl.where(em, gh, 0.0), mask=inb)
