"""The fused loss tail of the TRL family: its forward and reduce kernels (backward:
:mod:`.kernels_bwd`; launch plans: :mod:`.launch`).

Everything :func:`..core.compose` does after the log-prob kernel, for the TRL loss types,
runs as two kernels forward and one backward over the O(N*T) per-token values
(notation and the torch composition they equal: :mod:`..core`, :mod:`..objectives`,
:mod:`..masks`, :mod:`..aggregate`; the per-token math: :mod:`.math`; the
derivatives and the autograd function: :mod:`.autograd`):

- :func:`_tail_fwd_kernel`, one program per sequence: the sequence's sums first (masked
  log-ratio, length, log-prob, off-policy gap, rollout-correction log-ratio, VESPO's
  clamped log-weight; with advantages from rewards, those of its group), then per token
  the weight, the objective, the masks and correction, the KL, and their masked sums:
  one row of ``PART`` (N, K), the per-sequence metrics ``SEQM`` (3, N) and the per-token
  ratio.
- :func:`_tail_reduce_kernel`, one program: reduces ``PART`` over the N sequences in a
  fixed order (deterministic, no atomics) into the loss, every scalar metric and the
  aggregation's divisors for backward (``SCAL``).
- :func:`.kernels_bwd._tail_bwd_kernel`, one program per sequence: ``dloss/dlp_t`` and
  ``dloss/dH_t``, recomputed from the inputs and ``PART`` (nothing per-token is saved).

Options are ``tl.constexpr`` (one compiled variant per option set in use); shapes
(``T``, ``G``, ``N``) are plain integers, not specialised. Float options travel in a
small fp64 device tensor ``PRM`` (cached per option set, :mod:`.launch`): Triton passes
Python floats as fp32, and the fp64 path needs them exact. Bytes: each kernel reads the
per-token inputs it uses once per pass (one pass, two at sequence level or when a
sequence statistic gates the tokens; the contrast advantage reads its group's log-ratios,
G rows); the forward writes K floats per sequence (plus T ratios at token level), the
backward one or two floats per token. Nothing here touches the logits.
"""

from __future__ import annotations

from ..._kernels import HAS_TRITON
from .math import (
    M_CISPO,
    M_ENT,
    M_HIGH,
    M_HIGHMAX,
    M_KL,
    M_LOW,
    M_LOWMIN,
    M_PHI,
    M_REGION,
    M_RMAX,
    M_RMEAN,
    M_RMIN,
    P_A,
    P_C0,
    P_C1,
    P_C2,
    P_COND,
    P_FLAG,
    P_H,
    P_HE,
    P_ISR,
    P_KL,
    P_L,
    P_LOSS,
    P_LW,
    P_NE,
    P_RMAX,
    P_RMIN,
    P_RS,
    P_VW,
    R_COEF,
    R_EPSH,
    R_HI,
    R_LO,
    R_LOGLO,
    R_OFFTHR,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .checks import _not_finite, _or, _row_checks, _row_count
    from .math import (
        _clamp,
        _correction,
        _entropy_threshold,
        _group_advantage,
        _load_token,
        _prm,
        _row_sums,
        _terms,
        _vespo_phi,
    )

# Tokens per loop step: a program holds ~20 live per-token arrays (log-probs, weights,
# advantage, masks, KL, ratios); 256 tokens over 4 warps is 2 values per thread per array,
# which fits the registers with no spill on sm_80/90/100 (tests/test_tail.py compiles them),
# and a completion of a few thousand tokens takes a few steps.
BLOCK_T = 256
# Sequences per step of the one-program reduction: N is at most a few thousand.
BLOCK_N = 256
NUM_WARPS = 4

if HAS_TRITON:

    @triton.jit(do_not_specialize=["T", "G", "NT", "n_iter", "V"])
    def _tail_fwd_kernel(
        LP,
        H,
        M,
        OLD,
        REF,
        SAMP,
        ISR,
        ADV,
        REW,
        SORTED,
        PRM,
        PART,
        SEQM,
        RATIO,
        SCAL,
        TOK,
        FMASK,
        LENS,
        T,
        G,
        NT,
        n_iter,
        V,
        CHECK: tl.constexpr,
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
        CLIP_TOK: tl.constexpr,
        PASS1: tl.constexpr,
        ACC: tl.constexpr,
        PS: tl.constexpr,
        PR: tl.constexpr,
        RD: tl.constexpr,
        VD: tl.constexpr,
        LD: tl.constexpr,
        BLOCK: tl.constexpr,
        NCOL: tl.constexpr,
    ):
        """Sequence ``row``: its sums (pass 1, when a sequence statistic gates its tokens),
        then per token ``l_t`` and its masked sums (pass 2).

        Writes ``PART[row]`` (NCOL values in the loss dtype LD: the masked sums of ``l``,
        ``1``, ``kl``, ``H``, ``H`` and ``1`` over the kept tokens, the metric counts, the
        correction ratio's sum/min/max, and what the backward reads: advantage, log-weight,
        off-policy flag, VESPO's log-weight, sequence correction ratio), ``SEQM[:, row]`` =
        (advantage, seq_logprobs, ratio) and, unless the weight is per sequence, the
        per-token ratio ``RATIO[row]``; program 0 writes the entropy threshold to ``SCAL[2]``.
        ``CHECK``: the value checks computed here (:mod:`._tail_checks`; their bits in
        ``PART[row, P_FLAG]``). A given per-sequence advantage of an empty sequence counts as
        0 unless finite (and T > 1), a per-sequence correction ratio as 0 (LossInputs.zeroed)."""
        row = tl.program_id(0).to(tl.int64)
        base = row * T
        ar = tl.arange(0, BLOCK)
        SAMP_IN: tl.constexpr = OFFPOL == 1 or ISR_MODE >= 3
        OLD_IN: tl.constexpr = DEN == 0 or ISR_MODE >= 3
        VESPO: tl.constexpr = OBJ == 3
        zero = (row * 0).to(ACC)  # a scalar 0 (a sum of a zero block would be a real reduction)
        # ---- the advantage first (group_norm's fp64 divisions are subroutine calls: made while
        # little is live)
        if ADV_MODE == 0 or ISR_MODE == 2:
            some = _row_count(M, row, T, BLOCK) > 0
        if ADV_MODE == 0:
            A_seq = tl.load(ADV + row).to(ACC)
            A_seq = tl.where(some | (~_not_finite(A_seq) & (T != 1)), A_seq, 0.0)
        elif ADV_MODE == 1:
            A_seq = zero  # per token; its masked mean (the metric) comes from pass 2
        else:
            A_seq = _group_advantage(LP, M, OLD, REF, REW, row, T, G, PRM, DEN, ADV_MODE, ACC, BLOCK)
        # ---- the sequence's sums (pass 1)
        s_lr = zero
        s_n = zero
        s_vw = zero
        s_off = zero.to(PS)
        s_rd = zero.to(PR)
        s_vis = zero.to(RD)
        if PASS1:
            s_lr, s_n, s_vw, s_off, s_rd, s_vis = _row_sums(
                LP,
                M,
                OLD,
                REF,
                SAMP,
                ISR,
                row,
                T,
                PRM,
                DEN,
                KL,
                SAMP_IN,
                OLD_IN,
                OFFPOL,
                ISR_MODE,
                ISR_MASK,
                HAS_CMIN,
                HAS_CMAX,
                VESPO,
                ACC,
                PS,
                PR,
                RD,
                BLOCK,
            )
        seq_lw = s_lr / tl.maximum(s_n, 1.0)
        cond = False
        if OFFPOL != 0:
            cond = s_off / tl.maximum(s_n, 1.0) <= _prm(PRM, R_OFFTHR, PS)
        r_seq = zero.to(RD) + 1.0
        if ISR_MODE == 2:
            r_seq = tl.where(some, tl.load(ISR + row).to(RD), 0.0)
        if ISR_MODE == 4:
            r_seq = _correction(tl.exp(s_rd), PRM, ISR_MASK, HAS_CMIN, HAS_CMAX, PR).to(RD)
        vw = zero.to(VD)
        if VESPO:
            vw = s_vw.to(VD)
            if ISR_MODE == 1 or ISR_MODE == 3:
                vw = vw + s_vis
            if ISR_MODE == 2:
                vw = vw + _clamp(tl.log(r_seq), _prm(PRM, R_LOGLO, RD), 20.0)
            vw = _clamp(vw.to(VD), _prm(PRM, R_LOGLO, VD), 20.0)
        thr = 0.0
        if ENTMASK:
            thr = _entropy_threshold(SORTED, NT, n_iter, PRM)
            tl.store(SCAL + 2, thr.to(tl.float64), mask=row == 0)
        # ---- per token (pass 2)
        s_loss = tl.zeros([BLOCK], LD)
        s_kl = tl.zeros([BLOCK], ACC)
        s_h = tl.zeros([BLOCK], ACC)
        s_he = tl.zeros([BLOCK], ACC)
        s_ne = tl.zeros([BLOCK], ACC)
        s_c0 = tl.zeros([BLOCK], VD)
        s_c1 = tl.zeros([BLOCK], ACC)
        s_c2 = tl.zeros([BLOCK], ACC)
        s_rs = tl.zeros([BLOCK], ACC)
        r_min = tl.full([BLOCK], float("inf"), ACC)
        r_max = tl.full([BLOCK], float("-inf"), ACC)
        n2 = tl.zeros([BLOCK], ACC)
        lp2 = tl.zeros([BLOCK], ACC)
        a2 = tl.zeros([BLOCK], ACC)
        for start in range(0, T, BLOCK):
            offs = start + ar
            inb = offs < T
            idx = base + offs
            m, lp, lr, old, ref, samp = _load_token(LP, M, OLD, REF, SAMP, idx, inb, DEN, KL, SAMP_IN, OLD_IN, ACC)
            Hv = tl.load(H + idx, mask=inb, other=0.0)
            if ADV_MODE == 1:
                A = tl.load(ADV + idx, mask=inb, other=0.0).to(ACC)
                a2 += tl.where(m, A, 0.0)
            else:
                A = tl.zeros_like(lp) + A_seq
            l, kl, em, low, high, r, w_raw, phi, d_w, d_lp = _terms(
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
                False,
            )
            s_loss += tl.where(m, l, 0.0)
            s_kl += tl.where(m, kl, 0.0)
            s_h += tl.where(m, Hv, 0.0)
            s_he += tl.where(em, Hv, 0.0)
            s_ne += em.to(ACC)
            n2 += m.to(ACC)
            lp2 += tl.where(m, lp, 0.0)
            if CLIP_TOK:
                if VESPO:
                    s_c0 += tl.where(m, phi, 0.0)
                else:
                    s_c0 += tl.where(m & low, 1.0, 0.0)
                s_c1 += tl.where(m & high, 1.0, 0.0)
                s_c2 += tl.where(m & (low | high), 1.0, 0.0)
            if ISR_MODE == 1 or ISR_MODE == 3:
                rd = r.to(ACC)
                s_rs += tl.where(m, rd, 0.0)
                r_min = tl.minimum(r_min, tl.where(m, rd, float("inf")))
                r_max = tl.maximum(r_max, tl.where(m, rd, float("-inf")))
            if LEVEL != 1:
                tl.store(RATIO + idx, w_raw, mask=inb)
        L = tl.sum(n2, 0)
        Lc = tl.maximum(L, 1.0)
        p = PART + row * NCOL
        tl.store(p + P_LOSS, tl.sum(s_loss, 0))
        tl.store(p + P_L, L)
        tl.store(p + P_KL, tl.sum(s_kl, 0))
        tl.store(p + P_H, tl.sum(s_h, 0))
        tl.store(p + P_HE, tl.sum(s_he, 0))
        tl.store(p + P_NE, tl.sum(s_ne, 0))
        if CLIP_TOK:
            tl.store(p + P_C0, tl.sum(s_c0, 0))
            tl.store(p + P_C1, tl.sum(s_c1, 0))
            tl.store(p + P_C2, tl.sum(s_c2, 0))
        else:  # one weight and one advantage per sequence: the sequence's flags (or phi)
            w_i = tl.exp(seq_lw)
            if OBJ == 0:
                lo_i = (w_i < _prm(PRM, R_LO, ACC)) & (A_seq < 0)
                hi_i = (w_i > _prm(PRM, R_HI, ACC)) & (A_seq > 0)
                tl.store(p + P_C0, tl.where(lo_i, 1.0, 0.0))
                tl.store(p + P_C1, tl.where(hi_i, 1.0, 0.0))
                tl.store(p + P_C2, tl.where(lo_i | hi_i, 1.0, 0.0))
            elif OBJ == 1:
                tl.store(p + P_C0, tl.where((w_i > _prm(PRM, R_EPSH, ACC)) & (A_seq > 0), 1.0, 0.0))
            elif OBJ == 3:
                tl.store(p + P_C0, _vespo_phi(A_seq, vw, PRM, VD))
        if ISR_MODE == 1 or ISR_MODE == 3:
            tl.store(p + P_RS, tl.sum(s_rs, 0))
            tl.store(p + P_RMIN, tl.min(r_min, 0))
            tl.store(p + P_RMAX, tl.max(r_max, 0))
        tl.store(p + P_A, A_seq)
        tl.store(p + P_LW, seq_lw)
        tl.store(p + P_COND, tl.where(cond, 1.0, 0.0))
        tl.store(p + P_VW, vw)
        tl.store(p + P_ISR, r_seq)
        if CHECK != 0:
            tl.store(
                p + P_FLAG,
                _row_checks(
                    M, TOK, FMASK, LENS, OLD, REF, ISR, ADV, REW, row, T, V, CHECK, ISR_MODE, ADV_MODE, BLOCK
                ).to(LD),
            )
        if ADV_MODE == 1:
            A_seq = tl.sum(a2, 0) / Lc
        N = tl.num_programs(0)
        tl.store(SEQM + row, A_seq)
        tl.store(SEQM + N + row, tl.sum(lp2, 0) / Lc)
        tl.store(SEQM + 2 * N + row, tl.exp(seq_lw))

    @triton.jit(do_not_specialize=["N", "div"])
    def _tail_reduce_kernel(
        PART,
        PRM,
        NIB,
        LOSS,
        PL,
        MET,
        SCAL,
        FLAG,
        N,
        div,
        CHECK: tl.constexpr,
        AGG: tl.constexpr,
        HAS_NIB: tl.constexpr,
        ENT_BONUS: tl.constexpr,
        HAS_KL: tl.constexpr,
        OBJ: tl.constexpr,
        CLIP_TOK: tl.constexpr,
        ISR_MODE: tl.constexpr,
        ACC: tl.constexpr,
        LD: tl.constexpr,
        BLOCK: tl.constexpr,
        NCOL: tl.constexpr,
    ):
        """One program: the N rows of ``PART`` in a fixed order (deterministic), into

            policy_loss = aggregate(l, m)        (aggregate.py: sum_i S_i / max(L_i, 1) / N, sum S / max(sum L, 1),
                                                  sum S / N, sum S, sum S / max(N * mcl, 1), sum S / max(nib, 1))
            loss        = policy_loss - coef * (sum H m') / max(sum m', 1)

        and every scalar metric (MET), with ``SCAL`` = (the aggregation's divisor D, ``max(sum
        m', 1)``) for the backward, and (``CHECK``) the OR of the sequences' check bits in
        ``FLAG``. Bytes: reads N * NCOL floats."""
        ar = tl.arange(0, BLOCK)
        z = tl.zeros([BLOCK], LD)
        s_loss = z
        s_kl = z
        s_h = z
        s_he = z
        s_ne = z
        s_c0 = z
        s_c1 = z
        s_c2 = z
        s_rs = z
        n_tok = tl.zeros([BLOCK], tl.int64)
        c0_min = tl.full([BLOCK], float("inf"), LD)
        c1_max = tl.full([BLOCK], float("-inf"), LD)
        r_min = tl.full([BLOCK], float("inf"), LD)
        r_max = tl.full([BLOCK], float("-inf"), LD)
        flags = tl.zeros([BLOCK], tl.int32)
        for start in range(0, N, BLOCK):
            i = start + ar
            ok = i < N
            p = PART + i.to(tl.int64) * NCOL
            if CHECK != 0:
                flags = flags | tl.load(p + P_FLAG, mask=ok, other=0.0).to(tl.int32)
            L = tl.load(p + P_L, mask=ok, other=0.0)
            S = tl.load(p + P_LOSS, mask=ok, other=0.0)
            if AGG == 0:
                S = S / tl.maximum(L, 1.0)
            s_loss += S
            n_tok += L.to(tl.int64)
            s_kl += tl.load(p + P_KL, mask=ok, other=0.0)
            s_h += tl.load(p + P_H, mask=ok, other=0.0)
            s_he += tl.load(p + P_HE, mask=ok, other=0.0)
            s_ne += tl.load(p + P_NE, mask=ok, other=0.0)
            if OBJ != 2:  # clip counts (ppo_clip), the CISPO count, VESPO's phi
                s_c0 += tl.load(p + P_C0, mask=ok, other=0.0)
            if OBJ == 0:
                c0 = tl.load(p + P_C0, mask=ok, other=0.0)
                c1 = tl.load(p + P_C1, mask=ok, other=0.0)
                s_c1 += c1
                s_c2 += tl.load(p + P_C2, mask=ok, other=0.0)
                if CLIP_TOK:  # per-sequence share of the valid tokens (NaN for an empty one -> +-inf), in fp32
                    c0 = tl.where(L > 0, c0.to(tl.float32) / L.to(tl.float32), float("inf")).to(LD)
                    c1 = tl.where(L > 0, c1.to(tl.float32) / L.to(tl.float32), float("-inf")).to(LD)
                c0_min = tl.minimum(c0_min, tl.where(ok, c0, float("inf")))
                c1_max = tl.maximum(c1_max, tl.where(ok, c1, float("-inf")))
            if ISR_MODE == 1 or ISR_MODE == 3:
                s_rs += tl.load(p + P_RS, mask=ok, other=0.0)
                r_min = tl.minimum(r_min, tl.load(p + P_RMIN, mask=ok, other=float("inf")))
                r_max = tl.maximum(r_max, tl.load(p + P_RMAX, mask=ok, other=float("-inf")))
            if ISR_MODE == 2 or ISR_MODE == 4:
                r = tl.load(p + P_ISR, mask=ok, other=0.0).to(ACC).to(LD)
                s_rs += r
                r_min = tl.minimum(r_min, tl.where(ok, r, float("inf")))
                r_max = tl.maximum(r_max, tl.where(ok, r, float("-inf")))
        n = tl.sum(n_tok, 0)
        nf = n.to(LD)
        Nf = (n * 0 + N).to(LD)
        S = tl.sum(s_loss, 0)
        if AGG == 0 or AGG == 2:
            D = Nf
        elif AGG == 1:
            D = tl.maximum(nf, 1.0)
        elif AGG == 3:
            D = Nf * 0.0 + 1.0
        elif AGG == 4:
            D = (n * 0 + tl.maximum(div, 1)).to(LD)
        else:
            if HAS_NIB:
                D = tl.maximum(tl.load(NIB).to(LD), 1.0)
            else:
                D = tl.maximum(nf, 1.0)
        pol = S / D
        if AGG == 3:
            pol = S
        loss = pol
        ne = tl.maximum(tl.sum(s_ne, 0).to(ACC), 1.0)
        if ENT_BONUS:
            loss = pol - _prm(PRM, R_COEF, ACC) * tl.sum(s_he, 0).to(ACC) / ne
        tl.store(LOSS, loss)
        tl.store(PL, pol)
        if CHECK != 0:
            tl.store(FLAG, tl.reduce(flags, 0, _or))
        tl.store(SCAL, D.to(tl.float64))
        tl.store(SCAL + 1, ne.to(tl.float64))
        ntf = tl.maximum(nf, 1.0).to(ACC)
        if HAS_KL:
            tl.store(MET + M_KL, tl.sum(s_kl, 0).to(ACC) / ntf)
        else:
            tl.store(MET + M_KL, ntf * 0.0)
        tl.store(MET + M_ENT, tl.sum(s_h, 0).to(ACC) / ntf)
        if CLIP_TOK:
            den = ntf
        else:
            den = Nf.to(ACC)
        f32 = den.to(tl.float32)  # boolean flags are averaged in fp32 (core._global_mean), whatever ACC
        if OBJ == 0:
            tl.store(MET + M_LOW, tl.sum(s_c0, 0).to(tl.float32) / f32)
            tl.store(MET + M_HIGH, tl.sum(s_c1, 0).to(tl.float32) / f32)
            tl.store(MET + M_REGION, tl.sum(s_c2, 0).to(tl.float32) / f32)
            tl.store(MET + M_LOWMIN, tl.min(c0_min, 0))
            tl.store(MET + M_HIGHMAX, tl.max(c1_max, 0))
        if OBJ == 1:
            tl.store(MET + M_CISPO, tl.sum(s_c0, 0).to(tl.float32) / f32)
        if OBJ == 3:
            tl.store(MET + M_PHI, tl.sum(s_c0, 0) / den)
        if ISR_MODE != 0:
            if ISR_MODE == 1 or ISR_MODE == 3:
                nr = nf
            else:
                nr = Nf
            tl.store(MET + M_RMIN, tl.where(nr > 0, tl.min(r_min, 0), 0.0))
            tl.store(MET + M_RMEAN, (tl.sum(s_rs, 0) / tl.maximum(nr, 1.0)).to(ACC))
            tl.store(MET + M_RMAX, tl.where(nr > 0, tl.max(r_max, 0), 0.0))
