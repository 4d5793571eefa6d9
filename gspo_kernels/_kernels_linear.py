"""Fused Triton kernels for the hidden-state path: per-token log-probs and
entropy of ``softmax((hidden @ weight.T + bias) / tau)`` and their gradients
w.r.t. ``hidden``, ``weight`` and ``bias``; no logit is ever written to memory.
Tiles and launch plans: :mod:`._launch_linear`; ``linear.fused_fwd`` / ``fused_bwd`` drive them.

Notation: ``R`` rows (tokens), ``H`` hidden width, ``V`` vocabulary (this
rank's shard under tensor parallelism), ``x = hidden @ weight.T + bias`` the
logits (never stored), ``c = tau * logsumexp(x / tau)`` per row (saved, in
logit units, as the logits kernels save it), ``p = softmax(x / tau)``.

Forward: a grid of (row block, vocabulary split). Each program forms
``BLOCK_M x BLOCK_N`` tiles of ``x`` with ``tl.dot`` over H (fp32
accumulation, bias added in fp32) and folds each tile straight into the
online-softmax state with ``_kernels._softmax_update``, the logits kernels'
own update (one state per row here): running max, rescaled sum, entropy
partial, and the sampled token's logit, picked from the tile that holds it.
Each split writes its per-row state (16 bytes); ``_linear_combine_kernel``
merges the splits in a fixed order (``_kernels._softmax_merge``'s formulas) into the
logits forward's per-row outputs (local log-prob, ``c``, entropy): a
vocabulary shard's statistics, which ``vocab_parallel.combine_local``
combines across ranks. FLOPs ``2 R V H``; bytes: ``weight`` once per row
block (from L2 while the row blocks of one split run together: the grid's
fastest axis), ``hidden`` once per tile column, 16 per row and split.

Backward, for upstream gradients ``g`` (log-prob) and ``h`` (entropy):

    dz[r, v] = (g_r (1[v = y_r] - p_rv) - h_r p_rv (ln p_rv + H_r)) / tau
    grad_hidden = dz @ weight,   grad_weight = dz.T @ hidden,   grad_bias = dz.sum(0)

The vocabulary is walked in slices of ``Vc`` columns. Per slice,
``_linear_dz_kernel`` recomputes the ``x`` tiles with ``tl.dot`` from the
saved ``c`` (and entropy), forms ``dz`` in registers and writes it in the
input dtype to an ``R x Vc`` buffer, with one flag byte per tile: 0 for a
tile of rows without upstream gradient (not computed) or, with gradient
filtering, a tile whose p are all below the threshold and that holds no
sampled token. Two ``tl.dot`` kernels (``_linear_grad_kernel`` and
``_linear_gradh_kernel``, one body) then read
the slice, in a fixed order, leaving out the unflagged tiles:

- ``grad_weight[slice] = dz.T @ hidden``: a program per (vocabulary block,
  H block) summing over all R rows. Each element is summed once, in fp32
  registers, and written once in the weight's dtype: no fp32 ``V x H``
  accumulator and no partial product (the row-chunked path needs both: 3.7
  GB at V = 151,936, H = 4,096, bf16). ``grad_bias``: the row sums of the
  same ``dz`` tiles, in the same programs.
- ``grad_hidden += dz @ weight[slice]``: a program per (row block, H block)
  summing over the slice's vocabulary blocks; across slices the sum lives in
  an fp32 ``R x H`` accumulator (read and written once per slice; none when
  ``hidden`` is fp32 or one slice covers V); the last slice writes
  ``hidden``'s dtype.

Deterministic: no atomics, every sum in a fixed order (splits, slices,
blocks): the same inputs on the same device give bitwise the same results.
Extra memory: the ``R x Vc`` dz slice (256 MiB at most, see
``linear.slice_cols``), a byte per tile, and the fp32 accumulator (4 R H
bytes) when ``hidden`` is 16-bit and V needs several slices: 0.27 GB + 0.27
GB at R = 16,384, H = 4,096, V = 151,936, against 4.98 GB of bf16 logits.
FLOPs ``6 R V H`` (recompute, two products); bytes: dz written once and read
twice, ``8 R H`` per slice for the accumulator.

Taken: bf16, fp16, fp32 (fp32 products as 3xTF32, ~fp32 accuracy on the
tensor cores, unless torch allows TF32 matmuls); any strides, R, H, V.
fp64 goes to the chunked path (``linear.py``).
"""

from __future__ import annotations

from ._kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._kernels import _FLOOR, _LN2, _LOG2E, _softmax_update

if HAS_TRITON:

    @triton.jit
    def _i64(x):
        """``x`` as int64 (a runtime integer or a constexpr specialised to 1, folded away)."""
        return tl.cast(x, tl.int64)

    @triton.jit
    def _logit_tile(
        X,
        W,
        B,
        rows,
        rmask,
        cols,
        cmask,
        K,
        sxr,
        sxk,
        swv,
        swk,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PREC: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        """``hidden[rows] @ weight[cols].T (+ bias[cols])`` as a (BLOCK_M, BLOCK_N) fp32
        tile: K steps of ``tl.dot`` on (BLOCK_M, BLOCK_K) x (BLOCK_K, BLOCK_N) operands. The strides
        are int64: every offset that meets one is 64-bit."""
        sxr, sxk, swv, swk = _i64(sxr), _i64(sxk), _i64(swv), _i64(swk)
        ks = tl.arange(0, BLOCK_K)
        xp = X + rows[:, None] * sxr + ks[None, :] * sxk
        wp = W + cols[None, :] * swv + ks[:, None] * swk  # weight[cols].T, read in place
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            km = (k0 + ks) < K
            a = tl.load(xp, mask=rmask[:, None] & km[None, :], other=0.0)
            b = tl.load(wp, mask=km[:, None] & cmask[None, :], other=0.0)
            if DOT_F32:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PREC)
            xp += BLOCK_K * sxk
            wp += BLOCK_K * swk
        if HAS_BIAS:
            acc += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        return acc

    @triton.jit(do_not_specialize=["R", "n_split"])
    def _linear_fwd_kernel(
        X,
        W,
        B,
        Y,
        VALID,
        STATS,
        R,
        V,
        K,
        span,
        n_split,
        sxr,
        sxk,
        swv,
        swk,
        inv,
        HAS_BIAS: tl.constexpr,
        HAS_VALID: tl.constexpr,
        ENTROPY: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PREC: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        """Rows ``[m BLOCK_M, (m + 1) BLOCK_M)`` against vocabulary split ``s``
        (columns ``[s span, (s + 1) span)``): per row, with ``z = (x - m_r) log2(e) / tau``,

            m_r = max_v x_rv,   s_r = sum_v 2^z,   u_r = sum_v 2^z z,   t_r = x_r[y_r] (0 if y_r is elsewhere)

        written to ``STATS[q, r, s]`` for q = m, s, u, t. A row block with no
        valid row does no products. FLOPs ``2 BLOCK_M span H``."""
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        inside = rows < R
        live = inside
        if HAS_VALID:
            live = live & (tl.load(VALID + rows, mask=inside, other=0) != 0)
        y = tl.load(Y + rows, mask=inside, other=-1).to(tl.int64)
        scale2 = inv * _LOG2E
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_M,), tl.float32)
        u = tl.zeros((BLOCK_M,), tl.float32)
        t = tl.zeros((BLOCK_M,), tl.float32)
        lo = pid_s.to(tl.int64) * span
        hi = tl.minimum(lo + span, V)
        hi = tl.where(tl.max(live.to(tl.int32), 0) > 0, hi, lo)  # no valid row: no tiles
        for v0 in range(lo, hi, BLOCK_N):
            j = tl.arange(0, BLOCK_N)
            cm = j < hi - v0
            x = _logit_tile(
                X,
                W,
                B,
                rows,
                live,
                v0 + j,
                cm,
                K,
                sxr,
                sxk,
                swv,
                swk,
                HAS_BIAS,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                PREC,
                DOT_F32,
            )
            x = tl.where(cm[None, :], x, float("-inf"))
            yt = tl.where((y >= v0) & (y < hi), y - v0, -1).to(tl.int32)  # the sampled column in this tile, or -1
            t += tl.sum(tl.where(j[None, :] == yt[:, None], x, 0.0), 1)
            m, s, u = _softmax_update(m, s, u, x, scale2, 1, ENTROPY)
        off = rows * n_split + pid_s
        plane = _i64(R) * n_split
        tl.store(STATS + off, m, mask=inside)
        tl.store(STATS + plane + off, s, mask=inside)
        if ENTROPY:
            tl.store(STATS + 2 * plane + off, u, mask=inside)
        tl.store(STATS + 3 * plane + off, t, mask=inside)

    @triton.jit(do_not_specialize=["R", "n_split"])
    def _linear_combine_kernel(
        STATS,
        VALID,
        LOGP,
        LSE,
        ENT,
        R,
        n_split,
        inv,
        HAS_VALID: tl.constexpr,
        ENTROPY: tl.constexpr,
        ROWS: tl.constexpr,
        SPLITS: tl.constexpr,
    ):
        """Merge the splits' states per row, in split order (``_softmax_merge``'s formulas, over
        the splits in steps of SPLITS: the common max first, then the rescaled sums), into

            lse = M / tau + ln S,  logp = (t - M) / tau - ln S,  H = ln S - ln2 U / S,  c = tau lse

        (``LSE`` holds ``c``). Rows that are not valid get exact zeros. Bytes: 16 per row and
        split (the maxima read twice). One compiled variant whatever ``n_split``."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        inside = rows < R
        sp = tl.arange(0, SPLITS)
        plane = _i64(R) * n_split
        scale2 = inv * _LOG2E
        M = tl.full((ROWS,), float("-inf"), tl.float32)
        for s0 in range(0, n_split, SPLITS):
            msk = inside[:, None] & (s0 + sp < n_split)[None, :]
            off = rows[:, None] * n_split + (s0 + sp)[None, :]
            M = tl.maximum(M, tl.max(tl.load(STATS + off, mask=msk, other=float("-inf")), 1))
        M = tl.where(float("-inf") == M, 0.0, M)  # a row of only -inf: S = 0
        S = tl.zeros((ROWS,), tl.float32)
        U = tl.zeros((ROWS,), tl.float32)
        t = tl.zeros((ROWS,), tl.float32)
        for s0 in range(0, n_split, SPLITS):
            msk = inside[:, None] & (s0 + sp < n_split)[None, :]
            off = rows[:, None] * n_split + (s0 + sp)[None, :]
            m = tl.load(STATS + off, mask=msk, other=float("-inf"))
            s = tl.load(STATS + plane + off, mask=msk, other=0.0)
            dm = tl.maximum((m - M[:, None]) * scale2, _FLOOR)
            w = tl.exp2(dm)
            S += tl.sum(s * w, 1)
            if ENTROPY:
                u = tl.load(STATS + 2 * plane + off, mask=msk, other=0.0)
                U += tl.sum(w * (u + dm * s), 1)
            t += tl.sum(tl.load(STATS + 3 * plane + off, mask=msk, other=0.0), 1)
        if not ENTROPY:
            U = S
        ok = inside
        if HAS_VALID:
            ok = ok & (tl.load(VALID + rows, mask=inside, other=0) != 0)
        S = tl.where(ok, S, 1.0)
        log_s = tl.log2(S) * _LN2
        tl.store(LOGP + rows, tl.where(ok, (t - M) * inv - log_s, 0.0), mask=inside)
        tl.store(LSE + rows, tl.where(ok, M + log_s / inv, 0.0), mask=inside)
        if ENTROPY:
            tl.store(ENT + rows, tl.where(ok, log_s - U / S * _LN2, 0.0), mask=inside)

    @triton.jit(do_not_specialize=["R", "v0", "ncols", "sfr"])
    def _linear_dz_kernel(
        X,
        W,
        B,
        Y,
        C,
        G,
        ENT,
        GH,
        DZ,
        FLAG,
        R,
        K,
        v0,
        ncols,
        width,
        sxr,
        sxk,
        swv,
        swk,
        sdr,
        sfr,
        inv,
        thr,
        HAS_BIAS: tl.constexpr,
        ENTROPY: tl.constexpr,
        FILTER: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PREC: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        """One (BLOCK_M x BLOCK_N) tile of ``dz`` for vocabulary columns ``v0 + [0, ncols)``:
        recompute ``x`` (``tl.dot`` over H), ``p = 2^((x - c) log2(e) / tau)``, then

            dz = (g (1[v = y] - p) - h p (ln p + H)) / tau      (h term with ENTROPY)

        written to ``DZ`` in its dtype, and ``FLAG[tile]`` = 1. A tile whose rows
        all have zero upstream gradient is neither computed nor written (flag
        0); with ``FILTER``, one whose p are all below ``thr`` and that holds no
        sampled token is written but flagged 0 (the products leave it out).
        FLOPs ``2 BLOCK_M BLOCK_N H``; bytes: the tile once (input dtype),
        3-5 floats per row."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        live = rows < R
        g = tl.load(G + rows, mask=live, other=0.0)
        act = g != 0
        if ENTROPY:
            h = tl.load(GH + rows, mask=live, other=0.0)
            act = act | (h != 0)
        act = act & live
        flag = tl.max(act.to(tl.int32), 0)  # 1: the tile is computed and written
        if flag > 0:
            loc = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # column within the slice (int32: cheap 2-D masks)
            cm = loc < ncols
            # Inactive rows (their hidden states are not read: NaN there stays out) get
            # c = +inf, so p = 0 and dz = 0 exactly.
            x = _logit_tile(
                X,
                W,
                B,
                rows,
                act,
                v0 + loc.to(tl.int64),
                cm,
                K,
                sxr,
                sxk,
                swv,
                swk,
                HAS_BIAS,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                PREC,
                DOT_F32,
            )
            c = tl.where(act, tl.load(C + rows, mask=act, other=0.0), float("inf"))
            gs = tl.where(act, g * inv, 0.0)[:, None]
            y = tl.load(Y + rows, mask=act, other=-1).to(tl.int64) - v0
            y = tl.where(act & (y >= 0) & (y < ncols), y, -1).to(tl.int32)  # -1: not in this slice
            hit = loc[None, :] == y[:, None]
            z = (x - c[:, None]) * (inv * _LOG2E)
            if ENTROPY:  # finite z, so p ln p is 0 (not NaN) where p = 0
                z = tl.maximum(z, _FLOOR, propagate_nan=tl.PropagateNan.ALL)
            p = tl.where(cm[None, :], tl.exp2(z), 0.0)
            if ENTROPY:
                hs = tl.where(act, h * inv, 0.0)[:, None]
                He = tl.where(act, tl.load(ENT + rows, mask=act, other=0.0), 0.0)[:, None]
                d = tl.where(hit, gs, 0.0) - p * (gs + hs * (z * _LN2 + He))
            else:
                d = tl.where(hit, gs, 0.0) - p * gs
            # Masked by the buffer's width, not ncols: the last slice's tile columns past ncols
            # (p = 0 there) stay inside the buffer and are never read, and the stores stay
            # 16-byte vectors (width is a multiple of 16).
            tl.store(
                (DZ + rows * sdr)[:, None] + loc[None, :],
                d.to(DZ.dtype.element_ty),
                mask=live[:, None] & (loc < width)[None, :],
            )
            if FILTER:  # used: any p >= thr (or NaN), or a sampled token in the tile
                flag = tl.max(tl.max(tl.where(p < thr, 0, 1) | hit.to(tl.int32), 1), 0)
        tl.store(FLAG + pid_m.to(tl.int64) * sfr + pid_n, flag.to(tl.int8))

    def _linear_grad(
        A,
        Bm,
        OUT,
        ACC,
        FLAG,
        IDX,
        CNT,
        BOUT,
        KACT,
        M,
        N,
        K,
        sam,
        sak,
        sbk,
        sbn,
        som,
        son,
        sfm,
        sfk,
        sidx,
        ACCUM: tl.constexpr,
        DOT: tl.constexpr,
        BIAS: tl.constexpr,
        HAS_KACT: tl.constexpr,
        SPARSE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        FLAG_K: tl.constexpr,
        PREC: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        """``OUT[M, N] = (ACC +) A[M, K] @ Bm[K, N]`` over the dz tiles that hold
        something (flag set), in increasing K: fp32 accumulation, one rounding to
        OUT's dtype. ``CNT[pid_m]``: how many K blocks (of FLAG_K) are flagged for
        this M block; none: no loop at all (row blocks of masked tokens).

        - dense (default): every K step, the loads of unflagged tiles predicated
          off (no memory read; the MMA runs on zeros). No branch in the loop, so
          Triton pipelines it ``num_stages`` deep.
        - ``SPARSE`` (gradient filtering): only the flagged K blocks, listed in
          ``IDX[pid_m, :CNT]``: skipped tiles cost no MMA either; the index load
          in the loop leaves Triton one stage less of pipelining.

        ``BIAS``: also the row sums of A (``grad_bias``), stored by the first
        column of programs; ``DOT`` False: only those. ``KACT``: B rows whose
        entry is 0 are read as 0 (hidden states of rows with no upstream
        gradient: NaN there stays out of grad_weight). Used as
        ``grad_weight[slice] = dz.T @ hidden`` (K = R) and ``grad_hidden (+)= dz @
        weight[slice]`` (K = Vc). FLOPs ``2 BLOCK_M BLOCK_N K`` (kept K with
        SPARSE); bytes per program: its kept A and B tiles once. Strides are int64:
        ``kk * sbk`` reaches R H in grad_weight, Vc H in grad_hidden."""
        STEPS: tl.constexpr = FLAG_K // BLOCK_K
        sam, sak, sbk, sbn, som, son = _i64(sam), _i64(sak), _i64(sbk), _i64(sbn), _i64(som), _i64(son)
        sfm, sfk, sidx = _i64(sfm), _i64(sfk), _i64(sidx)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        mm = rm < M
        mn = rn < N
        ks = tl.arange(0, BLOCK_K)
        out_off = rm[:, None] * som + rn[None, :] * son
        if ACCUM:
            acc = tl.load(ACC + out_off, mask=mm[:, None] & mn[None, :], other=0.0)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        bsum = tl.zeros((BLOCK_M,), tl.float32)
        kept = tl.load(CNT + pid_m)
        if SPARSE:
            steps = kept * STEPS
        else:
            steps = tl.where(kept > 0, tl.cdiv(K, BLOCK_K), 0)
        for j in range(steps):
            if SPARSE:
                kk = tl.load(IDX + pid_m * sidx + j // STEPS).to(tl.int64) * FLAG_K + (j % STEPS) * BLOCK_K + ks
                km = kk < K
            else:
                kk = j * BLOCK_K + ks
                km = kk < tl.where(tl.load(FLAG + pid_m * sfm + (j // STEPS) * sfk) != 0, K, 0)
            a = tl.load(A + rm[:, None] * sam + kk[None, :] * sak, mask=mm[:, None] & km[None, :], other=0.0)
            if DOT:
                if HAS_KACT:
                    km = km & (tl.load(KACT + kk, mask=km, other=0) != 0)
                b = tl.load(Bm + kk[:, None] * sbk + rn[None, :] * sbn, mask=km[:, None] & mn[None, :], other=0.0)
                if DOT_F32:
                    acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)
                else:
                    acc = tl.dot(a, b, acc, input_precision=PREC)
            if BIAS:
                bsum += tl.sum(a.to(tl.float32), 1)
        if DOT:
            tl.store(OUT + out_off, acc.to(OUT.dtype.element_ty), mask=mm[:, None] & mn[None, :])
        if BIAS:
            if pid_n == 0:
                tl.store(BOUT + rm, bsum.to(BOUT.dtype.element_ty), mask=mm)


# One body, two specialisation policies: the row count R changes every call and is never
# specialised (K in grad_weight, M in grad_hidden); the slice width (M, resp. K) keeps its
# divisibility by 16 (the masked loads along it vectorise by it); the flag and index strides
# (tiles per slice row, from Vc) change with R too.
if HAS_TRITON:
    _linear_grad_kernel = triton.jit(do_not_specialize=["K", "sfm", "sfk", "sidx"])(_linear_grad)
    _linear_gradh_kernel = triton.jit(do_not_specialize=["M", "sfm", "sfk", "sidx"])(_linear_grad)
