"""The per-token math of the fused loss tail (TRL family), as Triton device functions,
and the slot layout of the buffers its kernels share (:mod:`.kernels`).

Each function mirrors one piece of the torch composition, operation for operation and
dtype for dtype (what torch promotes, they promote; what torch rounds to fp32, they
round): :func:`_terms` is :func:`..objectives.ppo_clip` / ``cispo`` / ``sapo`` / ``vespo``,
the masks and correction of :func:`..core.compose` and :func:`..objectives.kl_tokens`, with
their derivatives (derived in :mod:`.autograd`); :func:`_group_advantage` is
:mod:`..advantages`; :func:`_entropy_threshold` is :func:`..masks.quantile_of_valid` after
its sort; :func:`_correction` is :func:`..masks.rollout_correction`'s clip.
"""

from __future__ import annotations

from ..._kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

# Slot numbers, read by the kernels (which may only read tl.constexpr globals; the host
# takes int() of them).
_slot = tl.constexpr if HAS_TRITON else int
# PART columns (one row per sequence, the loss dtype).
(P_LOSS, P_L, P_KL, P_H, P_HE, P_NE, P_C0, P_C1, P_C2, P_RS, P_RMIN, P_RMAX, P_A, P_LW, P_COND, P_VW, P_ISR, P_FLAG) = (
    map(_slot, range(18))
)
K = 18
# MET slots (the scalar metrics, the log-probs' dtype).
M_KL, M_ENT, M_LOW, M_HIGH, M_REGION, M_LOWMIN, M_HIGHMAX, M_CISPO, M_PHI, M_RMIN, M_RMEAN, M_RMAX = map(
    _slot, range(12)
)
N_MET = 12
# PRM slots (fp64 option values).
(
    R_LO,
    R_HI,
    R_DELTA,
    R_CLIPC,
    R_EPSH,
    R_BETA,
    R_TPOS,
    R_TNEG,
    R_KPOS,
    R_LPOS,
    R_KNEG,
    R_LNEG,
    R_LAMMIN,
    R_OFFTHR,
    R_CMIN,
    R_CMAX,
    R_Q,
    R_COEF,
    R_LOGLO,
    R_GNEPS,
) = map(_slot, range(20))
N_PRM = 20

# constexpr codes
LEVELS = {"token": 0, "sequence": 1, "sequence_token": 2}
DENS = {"old": 0, "ref": 1, "detached": 2}
ADV_SEQ, ADV_TOK, ADV_GROUP_NORM, ADV_CONTRAST = range(4)
OBJS = {"ppo_clip": 0, "cispo": 1, "sapo": 2, "vespo": 3}
KLS = {None: 0, "k1": 1, "k2": 2, "k3": 3, "low_var_kl": 4, "abs": 5}
ISR_NONE, ISR_TOK, ISR_SEQ, ISR_MODE_TOK, ISR_MODE_SEQ = range(5)
AGGS = {
    "seq-mean-token-mean": 0,
    "token-mean": 1,
    "seq-mean-token-sum": 2,
    "token-sum": 3,
    "dr_grpo": 4,
    "seq-mean-token-sum-norm": 4,
    "token-sum-norm": 5,
}

if HAS_TRITON:
    _INF = tl.constexpr(float("inf"))

    @triton.jit
    def _nan_to_num(x, DT: tl.constexpr):
        """``torch.nan_to_num(x)``: NaN -> 0, +-inf -> +-(largest finite of DT)."""
        if tl.float64 == DT:
            big = 1.7976931348623157e308
        else:
            big = 3.4028234663852886e38
        y = tl.minimum(tl.maximum(x, -big), big)
        return tl.where(x != x, 0.0, y).to(DT)

    @triton.jit
    def _clamp(x, lo, hi):
        """``torch.clamp``: NaN propagates."""
        return tl.minimum(tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _prm(PRM, i, DT: tl.constexpr):
        """Option ``i`` (stored in fp64) in DT: the rounding torch applies to a Python scalar."""
        return tl.load(PRM + i).to(DT)

    @triton.jit
    def _correction(r, PRM, ISR_MASK: tl.constexpr, HAS_CMIN: tl.constexpr, HAS_CMAX: tl.constexpr, DT: tl.constexpr):
        """``*_truncate``: clamp r to [clip_min, clip_max]; ``*_mask``: 0 outside it (masks.rollout_correction)."""
        if ISR_MASK:
            bad = r < float("-inf")  # all False (NaN stays, as masked_fill of a NaN comparison)
            if HAS_CMIN:
                bad = bad | (r < _prm(PRM, R_CMIN, DT))
            if HAS_CMAX:
                bad = bad | (r > _prm(PRM, R_CMAX, DT))
            r = tl.where(bad, 0.0, r).to(DT)
        else:
            if HAS_CMIN:
                r = tl.maximum(r, _prm(PRM, R_CMIN, DT), propagate_nan=tl.PropagateNan.ALL)
            if HAS_CMAX:
                r = tl.minimum(r, _prm(PRM, R_CMAX, DT), propagate_nan=tl.PropagateNan.ALL)
        return r

    @triton.jit
    def _load_token(
        LP,
        M,
        OLD,
        REF,
        SAMP,
        idx,
        inb,
        DEN: tl.constexpr,
        KL: tl.constexpr,
        SAMP_IN: tl.constexpr,
        OLD_IN: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """Mask, log-prob, denominator, log-ratio ``where(m, lp - den, 0)``, and the raw
        old / reference / sampling log-probs a token's terms read (unused ones: 0)."""
        m = tl.load(M + idx, mask=inb, other=0) != 0
        lp = tl.load(LP + idx, mask=inb, other=0.0)
        old = tl.zeros_like(lp)
        ref = tl.zeros_like(lp)
        samp = tl.zeros_like(lp)
        if OLD_IN:
            old = tl.load(OLD + idx, mask=inb, other=0.0)
        if KL != 0 or DEN == 1:
            ref = tl.load(REF + idx, mask=inb, other=0.0).to(ACC)
        if SAMP_IN:
            samp = tl.load(SAMP + idx, mask=inb, other=0.0)
        if DEN == 0:
            den = old.to(ACC)
        elif DEN == 1:
            den = ref
        else:
            den = lp
        lr = tl.where(m, lp - den, 0.0)
        return m, lp, lr, old, ref, samp

    @triton.jit
    def _row_sums(
        LP,
        M,
        OLD,
        REF,
        SAMP,
        ISR,
        row,
        T,
        PRM,
        DEN: tl.constexpr,
        KL: tl.constexpr,
        SAMP_IN: tl.constexpr,
        OLD_IN: tl.constexpr,
        OFFPOL: tl.constexpr,
        ISR_MODE: tl.constexpr,
        ISR_MASK: tl.constexpr,
        HAS_CMIN: tl.constexpr,
        HAS_CMAX: tl.constexpr,
        VESPO: tl.constexpr,
        ACC: tl.constexpr,
        PS: tl.constexpr,
        PR: tl.constexpr,
        RD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Per-sequence sums over the valid tokens of row ``row``: log-ratio, length,
        off-policy gap ``nan_to_num(sampling - lp)`` (PS), rollout-correction log-ratio
        ``nan_to_num((old - sampling) m)`` (PR), VESPO's ``clamp(log_ratio, +-20)`` and
        ``clamp(log IS ratio, log 1e-8, 20)`` (RD)."""
        base = row * T
        ar = tl.arange(0, BLOCK)
        s_lr = tl.zeros([BLOCK], ACC)
        s_n = tl.zeros([BLOCK], ACC)
        s_vw = tl.zeros([BLOCK], ACC)
        s_off = tl.zeros([BLOCK], PS)
        s_rd = tl.zeros([BLOCK], PR)
        s_vis = tl.zeros([BLOCK], RD)
        for start in range(0, T, BLOCK):
            offs = start + ar
            inb = offs < T
            m, lp, lr, old, ref, samp = _load_token(
                LP, M, OLD, REF, SAMP, base + offs, inb, DEN, KL, SAMP_IN, OLD_IN, ACC
            )
            s_lr += lr
            s_n += m.to(ACC)
            if OFFPOL == 1:
                s_off += tl.where(m, _nan_to_num(samp - lp, PS), 0.0)
            if OFFPOL == 2:
                s_off += tl.where(m, _nan_to_num(-lr, PS), 0.0)  # sampling = the denominator: den - lp
            if ISR_MODE == 4:
                s_rd += _nan_to_num((old - samp) * m.to(OLD.dtype.element_ty), PR)
            if VESPO:
                s_vw += tl.where(m, _clamp(lr, -20.0, 20.0), 0.0)
                if ISR_MODE == 1:
                    r = tl.load(ISR + base + offs, mask=inb, other=1.0).to(RD)
                    s_vis += tl.where(m, _clamp(tl.log(r), _prm(PRM, R_LOGLO, RD), 20.0), 0.0)
                if ISR_MODE == 3:
                    r = tl.exp(_nan_to_num((old - samp) * m.to(OLD.dtype.element_ty), PR))
                    r = _correction(r, PRM, ISR_MASK, HAS_CMIN, HAS_CMAX, PR)
                    s_vis += tl.where(m, _clamp(tl.log(r), _prm(PRM, R_LOGLO, RD), 20.0), 0.0)
        return (tl.sum(s_lr, 0), tl.sum(s_n, 0), tl.sum(s_vw, 0), tl.sum(s_off, 0), tl.sum(s_rd, 0), tl.sum(s_vis, 0))

    @triton.jit
    def _group_advantage(
        LP,
        M,
        OLD,
        REF,
        REW,
        row,
        T,
        G,
        PRM,
        DEN: tl.constexpr,
        ADV_MODE: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Advantage of sequence ``row`` from its group's G rewards (fp64, advantages.py):
        group_norm ``(r - mean) / (std + 1e-4)`` (unbiased std, 0 for G = 1), or contrast
        ``+-(mean_good s - mean_bad s)`` with ``s_j = exp(masked mean log-ratio of row j)``."""
        first = (row // G) * G
        r_i = tl.load(REW + row).to(tl.float64)
        tot = r_i * 0.0
        for j in range(0, G):
            tot += tl.load(REW + first + j).to(tl.float64)
        mean = tot / G
        if ADV_MODE == 2:
            ss = r_i * 0.0
            for j in range(0, G):
                dv = tl.load(REW + first + j).to(tl.float64) - mean
                ss += dv * dv
            std = tl.where(G > 1, tl.sqrt(ss / tl.maximum(G - 1, 1)), 0.0)
            A = ((r_i - mean) / (std + tl.load(PRM + R_GNEPS))).to(ACC)
        else:
            rmax = r_i
            rmin = r_i
            for j in range(0, G):
                rj = tl.load(REW + first + j).to(tl.float64)
                rmax = tl.maximum(rmax, rj)
                rmin = tl.minimum(rmin, rj)
            same = rmax == rmin
            zero = tl.zeros([BLOCK], ACC)
            s_good = (first * 0).to(ACC)
            s_bad = s_good
            n_good = s_good
            n_bad = s_good
            for j in range(0, G):
                rj = tl.load(REW + first + j).to(tl.float64)
                good = (rj >= mean) | same
                lr_j = zero
                n_j = zero
                for start in range(0, T, BLOCK):
                    offs = start + tl.arange(0, BLOCK)
                    m, lp, lr, old, ref, samp = _load_token(
                        LP, M, OLD, REF, REF, (first + j) * T + offs, offs < T, DEN, 0, False, DEN == 0, ACC
                    )
                    lr_j += lr
                    n_j += m.to(ACC)
                s = tl.exp(tl.sum(lr_j, 0) / tl.maximum(tl.sum(n_j, 0), 1.0))
                s_good += tl.where(good, s, 0.0)
                n_good += tl.where(good, 1.0, 0.0)
                s_bad += tl.where(good, 0.0, s)
                n_bad += tl.where(good, 0.0, 1.0)
            diff = s_good / tl.maximum(n_good, 1.0) - s_bad / tl.maximum(n_bad, 1.0)
            A = tl.where(n_bad > 0, diff, 0.0)
            A = tl.where((r_i >= mean) | same, A, -A).to(ACC)
        return A

    @triton.jit
    def _entropy_threshold(SORTED, NT, n_iter, PRM):
        """``masks.quantile_of_valid(H, m, q)`` from ``where(m, H, inf)`` sorted ascending: the
        valid count n is the number of finite entries (binary search, ``n_iter`` steps),
        ``pos = q (n - 1)`` in fp64, then torch.lerp's formula between the two neighbours."""
        lo = tl.program_id(0).to(tl.int64) * 0
        hi = lo + NT
        for _ in range(0, n_iter):
            mid = (lo + hi) // 2
            v = tl.load(SORTED + mid, mask=mid < NT, other=float("inf"))
            fin = v < _INF
            lo = tl.where(fin, mid + 1, lo)
            hi = tl.where(fin, hi, mid)
        n = lo
        pos = tl.load(PRM + R_Q) * tl.maximum(n - 1, 0).to(tl.float64)
        i_lo = pos.to(tl.int64)
        i_hi = tl.where(pos > i_lo.to(tl.float64), i_lo + 1, i_lo)
        v_lo = tl.load(SORTED + i_lo)
        v_hi = tl.load(SORTED + i_hi)
        frac = (pos - i_lo.to(tl.float64)).to(tl.float32)
        diff = v_hi - v_lo
        lerp = tl.where(tl.abs(frac) < 0.5, v_lo + frac * diff, v_hi - diff * (1.0 - frac))
        out = tl.where(v_hi == v_lo, v_lo, lerp)
        return tl.where(n > 0, out, float("inf"))

    @triton.jit
    def _vespo_phi(A, vw, PRM, VD: tl.constexpr):
        """``exp(lam + k vw - lam e^vw)``, ``(k, lam)`` by the sign of A (fp32 values, as
        torch.where of two Python floats), lam clamped at 1e-4; non-finite -> 0."""
        pos = A >= 0
        k = tl.where(pos, _prm(PRM, R_KPOS, tl.float32), _prm(PRM, R_KNEG, tl.float32)).to(VD)
        lam = tl.where(pos, _prm(PRM, R_LPOS, tl.float32), _prm(PRM, R_LNEG, tl.float32)).to(VD)
        lam = tl.maximum(lam, _prm(PRM, R_LAMMIN, VD), propagate_nan=tl.PropagateNan.ALL)
        phi = tl.exp(lam + k * vw - lam * tl.exp(vw))
        return tl.where((phi == phi) & (tl.abs(phi) < _INF), phi, 0.0).to(VD)

    @triton.jit
    def _terms(
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
        LEVEL: tl.constexpr,
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
        ACC: tl.constexpr,
        PR: tl.constexpr,
        RD: tl.constexpr,
        VD: tl.constexpr,
        LD: tl.constexpr,
        GRAD: tl.constexpr,
    ):
        """One block of tokens: ``l_t`` (LD), the KL ``kl_t``, the entropy mask, the metric
        flags, the correction ratio, the ratio ``exp(log_w)``, VESPO's phi and (GRAD) the
        partial derivatives ``dl_t/dlog_w_t`` and ``dl_t/dlp_t`` (direct terms); see _tail_fn."""
        if LEVEL == 0:
            lw = lr
        else:
            lw = tl.zeros_like(lp) + seq_lw
        w_raw = tl.exp(lw)
        w = tl.exp(tl.where(A == 0, 0.0, lw))
        dw = tl.where(A == 0, 0.0, w)  # guarded_exp: d w / d log_w
        # rollout-correction ratio (RD)
        if ISR_MODE == 1:
            r = tl.load(ISR + idx, mask=inb, other=1.0).to(RD)
        elif ISR_MODE == 3:
            r = tl.exp(_nan_to_num((old - samp) * m.to(old.dtype), PR))
            r = _correction(r, PRM, ISR_MASK, HAS_CMIN, HAS_CMAX, PR).to(RD)
        else:
            r = (tl.zeros_like(lp) + r_seq).to(RD)
        phi = tl.zeros_like(lp).to(VD)
        low = m & False
        high = m & False
        d_w = tl.zeros_like(lp).to(LD)
        d_lp = tl.zeros_like(lp).to(LD)
        if OBJ == 0:  # ppo_clip
            w2 = _clamp(w, _prm(PRM, R_LO, ACC), _prm(PRM, R_HI, ACC))
            w1 = w
            if HAS_DELTA:
                w1 = tl.minimum(w, _prm(PRM, R_DELTA, ACC), propagate_nan=tl.PropagateNan.ALL)
            a = w1 * A
            b = w2 * A
            pl = -tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)
            fac = tl.full(lp.shape, 1.0, ACC)
            if HAS_CLIPC:
                cap = -A * _prm(PRM, R_CLIPC, ACC)
                neg = A < 0
                fac = tl.where(neg, tl.where(pl < cap, 1.0, tl.where(pl == cap, 0.5, 0.0)), 1.0)
                pl = tl.where(neg, tl.minimum(pl, cap, propagate_nan=tl.PropagateNan.ALL), pl)
            low = (w_raw < _prm(PRM, R_LO, ACC)) & (A < 0)
            high = (w_raw > _prm(PRM, R_HI, ACC)) & (A > 0)
            if GRAD:
                ga = tl.where(a < b, 1.0, tl.where(a == b, 0.5, 0.0))
                gb = tl.where(b < a, 1.0, tl.where(a == b, 0.5, 0.0))
                p1 = tl.full(lp.shape, 1.0, ACC)
                if HAS_DELTA:
                    p1 = tl.where(w <= _prm(PRM, R_DELTA, ACC), 1.0, 0.0)
                p2 = tl.where((w >= _prm(PRM, R_LO, ACC)) & (w <= _prm(PRM, R_HI, ACC)), 1.0, 0.0)
                d_w = (-fac * (ga * A * p1 + gb * A * p2) * dw).to(LD)
        elif OBJ == 1:  # cispo
            c = tl.minimum(w, _prm(PRM, R_EPSH, ACC), propagate_nan=tl.PropagateNan.ALL)
            pl = -c * A * lp
            low = (w_raw > _prm(PRM, R_EPSH, ACC)) & (A > 0)
            if GRAD:
                d_lp = (-c * A).to(LD)
        elif OBJ == 2:  # sapo
            tau = tl.where(A > 0, _prm(PRM, R_TPOS, tl.float32), _prm(PRM, R_TNEG, tl.float32)).to(ACC)
            sig = tl.sigmoid(tau * (w - 1.0))
            pl = -(sig * 4.0 / tau) * A
            if GRAD:
                d_w = (-A * 4.0 / tau * (sig * (1.0 - sig)) * tau * dw).to(LD)
        else:  # vespo: phi from the sequence's clamped log-weight vw (VD)
            phi = _vespo_phi(A, vw, PRM, VD)
            pl = -phi * A * lp
            if GRAD:
                d_lp = (-phi * A).to(LD)
        l = pl.to(LD)
        C = tl.full(lp.shape, 1.0, LD)
        if OFFPOL != 0:
            keep = tl.where(A >= 0, 1.0, tl.where(cond, 1.0, 0.0)).to(LD)  # (A >= 0) | cond
            l = l * keep
            C = C * keep
        em = m
        if ENTMASK:
            em = (tl.where(m, Hv, 0.0) >= thr) & m
            l = l * em.to(LD)
            C = C * em.to(LD)
        if ISR_MODE != 0 and OBJ != 3:
            l = l * r.to(LD)
            C = C * r.to(LD)
        d_w = d_w * C
        d_lp = d_lp * C
        kl = tl.zeros_like(lp)
        if KL != 0:
            d = ref - lp
            if KL == 1:
                kl = -d
                dkl = tl.full(lp.shape, 1.0, ACC)
            elif KL == 2:
                kl = 0.5 * d * d
                dkl = -d
            elif KL == 3:
                e = tl.exp(d)
                kl = e - d - 1
                dkl = 1.0 - e
            elif KL == 4:
                dc = _clamp(d, -20.0, 20.0)
                e = tl.exp(dc)
                v = e - dc - 1
                kl = _clamp(v, -10.0, 10.0)
                dkl = tl.where((d >= -20.0) & (d <= 20.0) & (v >= -10.0) & (v <= 10.0), 1.0 - e, 0.0)
            else:
                kl = tl.abs(d)
                dkl = tl.where(d > 0, -1.0, tl.where(d < 0, 1.0, 0.0))
            if BIAS_KL:
                E = tl.exp(lw)
                kl = kl * E
                if GRAD and ADD_KL:
                    beta = _prm(PRM, R_BETA, ACC)
                    d_lp += (beta * (dkl * E)).to(LD)
                    d_w += (beta * kl).to(LD)
            elif GRAD and ADD_KL:
                d_lp += (_prm(PRM, R_BETA, ACC) * dkl).to(LD)
            if ADD_KL:
                l = l + _prm(PRM, R_BETA, ACC) * kl
        return l, kl, em, low, high, r, w_raw, phi, d_w, d_lp
