"""Fused Triton kernels for the hidden-state path: per-token log-probs and
entropy of ``softmax((hidden @ weight.T + bias) / tau)`` and their gradients
w.r.t. ``hidden``, ``weight`` and ``bias``; no logit is ever written to memory.
Launch builders here; ``linear.fused_fwd`` / ``fused_bwd`` drive them.

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

import os
from dataclasses import dataclass

import torch

from ._kernels import HAS_TRITON, Launch

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._kernels import _FLOOR, _LN2, _LOG2E, _softmax_update

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Tiles:
    """``BLOCK_M x BLOCK_N`` output tile, ``BLOCK_K`` reduction step, warps, pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# GPU tiles, per (operand bytes, sm_90 or newer, rows aligned: ``aligned_rows``): each
# kernel kind's (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Chosen by
# compiling for sm_80/90/100 (tests/test_codegen.py prints the registers:
# none spills) among Triton's usual matmul tiles: the largest that leave room
# for the softmax epilogue, and headroom under the 255-register limit (so that
# another Triton or ptxas does not spill). Not yet timed on a GPU.
# Registers below are Triton 3.9's unless said (with entropy, the largest).
# - 16-bit, sm_90+: logit tiles 128 x 64, K steps of 64, 8 warps (two
#   warpgroups of wgmma), 3 stages (72 KB of shared memory to hide a step's
#   latency): at 128 x 128 the softmax epilogues took 232-240 (sm_90) and
#   250-255 (sm_100) registers; at 128 x 64, 175 / 173 (forward) and 105 / 80
#   (dz; the gradient filter's tiles are these). The products (no epilogue)
#   keep 128 x 128 output tiles: 88-161.
# - 16-bit, sm_80 (mma.sync also holds operand fragments in registers): logit
#   tiles 128 x 64, the forward with K steps of 32 and 4 stages (159-161; at
#   128 x 128, 220-227, and 249-251 with Triton 3.6), dz with K steps of 64 (at
#   128 x 128 its entropy epilogue spilled 16 bytes).
# - fp32 (3xTF32: each operand split into hi + lo in registers): 128 x 64 with
#   K steps of 16: at K steps of 32 the sm_80 forward took all 255 and
#   grad_hidden 248-250; at 16, 167-179.
# - rows Triton cannot prove aligned (H = 897, or 904 in bf16) get no
#   asynchronous 16-byte copies and stage through registers, 2 stages: forward
#   128 x 64 with K steps of 16 (at 32: 247), dz 128 x 64 x 32, products 128 x
#   32 x 32 (at 128 x 64: 238-240); fp32 128 x 64 x 16.
# The product kernels' BLOCK_M is the dz tile's side along their M (one flag
# per A tile); their BLOCK_K must divide the dz tile's sides.
def _same(t: Tiles) -> dict:
    return {"fwd": t, "dz": t, "gemm": t}


GPU_TILES = {
    (2, True, True): {"fwd": Tiles(128, 64, 64, 8, 3), "dz": Tiles(128, 64, 64, 8, 3),
                      "gemm": Tiles(128, 128, 64, 8, 3)},
    (2, False, True): {"fwd": Tiles(128, 64, 32, 8, 4), "dz": Tiles(128, 64, 64, 8, 3),
                       "gemm": Tiles(128, 128, 32, 8, 4)},
    (4, True, True): _same(Tiles(128, 64, 16, 8, 3)),
    (4, False, True): _same(Tiles(128, 64, 16, 8, 3)),
    (2, True, False): {"fwd": Tiles(128, 64, 16, 8, 2), "dz": Tiles(128, 64, 32, 8, 2),
                       "gemm": Tiles(128, 32, 32, 8, 2)},
    (2, False, False): {"fwd": Tiles(128, 64, 16, 8, 2), "dz": Tiles(128, 64, 32, 8, 2),
                        "gemm": Tiles(128, 32, 32, 8, 2)},
    (4, True, False): _same(Tiles(128, 64, 16, 8, 2)),
    (4, False, False): _same(Tiles(128, 64, 16, 8, 2)),
}
# The interpreter runs each program as NumPy, its cost per operation: logit
# tiles of 16 rows x 32 columns (16 is tl.dot's smallest side) put the tests'
# tiny shapes over several tiles; K steps of 32 and 32-wide product tiles
# keep the loops short.
INTERPRET_TILES = {"fwd": Tiles(16, 32, 32, 1, 1), "dz": Tiles(16, 32, 32, 1, 1), "gemm": Tiles(16, 32, 32, 1, 1)}
# The split combine's block: ROWS x SPLITS states, looping over the splits (in the
# interpreter 2 splits a step, so that the tests' few splits take several steps).
COMBINE_SPLITS, COMBINE_ROWS = (2, 16) if INTERPRET else (32, 32)


def aligned_rows(*ts: torch.Tensor) -> bool:
    """Whether the kernels' loads of these (rows, H) operands vectorise, as Triton decides it: it
    specialises integer arguments on divisibility by 16 (elements, whatever the dtype) and
    pointers on 16-byte alignment, so every row must be contiguous, its stride and H multiples
    of 16 elements and the first row 16-byte aligned (bf16 with H = 8 mod 16 has 16-byte rows,
    but Triton cannot prove it: not aligned here)."""
    return all(t.stride(-1) == 1 and t.stride(0) % 16 == 0 and t.shape[-1] % 16 == 0 and t.data_ptr() % 16 == 0
               for t in ts)


def tile_set(dtype: torch.dtype, device: torch.device, aligned: bool = True, arch: int | None = None) -> dict:
    """The tiles for this dtype on ``device`` (CPU: the interpreter's), or for CUDA arch ``arch`` (e.g. 90).
    sm_90 and sm_100 (wgmma, tcgen05, 228 KB of shared memory) take the large tiles; sm_80 and the
    rest (mma.sync; sm_120 has ~100 KB) the sm_80 ones."""
    if arch is None:
        if device.type != "cuda":
            return INTERPRET_TILES
        major, minor = torch.cuda.get_device_capability(device)
        arch = 10 * major + minor
    return GPU_TILES[(4 if dtype == torch.float32 else 2, 90 <= arch < 120, aligned)]


def supported(hidden: torch.Tensor) -> bool:
    """Whether the fused kernels take this input (dtype); the rest use the chunked path."""
    return HAS_TRITON and hidden.dtype in (torch.bfloat16, torch.float16, torch.float32)


if HAS_TRITON:

    @triton.jit
    def _i64(x):
        """``x`` as int64 (a runtime integer or a constexpr specialised to 1, folded away)."""
        return tl.cast(x, tl.int64)

    @triton.jit
    def _logit_tile(X, W, B, rows, rmask, cols, cmask, K, sxr, sxk, swv, swk, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
                    DOT_F32: tl.constexpr):
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
    def _linear_fwd_kernel(X, W, B, Y, VALID, STATS, R, V, K, span, n_split, sxr, sxk, swv, swk, inv,
                           HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr, ENTROPY: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           PREC: tl.constexpr, DOT_F32: tl.constexpr):
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
            x = _logit_tile(X, W, B, rows, live, v0 + j, cm, K, sxr, sxk, swv, swk, HAS_BIAS, BLOCK_M, BLOCK_N,
                            BLOCK_K, PREC, DOT_F32)
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
    def _linear_combine_kernel(STATS, VALID, LOGP, LSE, ENT, R, n_split, inv, HAS_VALID: tl.constexpr,
                               ENTROPY: tl.constexpr, ROWS: tl.constexpr, SPLITS: tl.constexpr):
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
        M = tl.where(M == float("-inf"), 0.0, M)  # a row of only -inf: S = 0
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
    def _linear_dz_kernel(X, W, B, Y, C, G, ENT, GH, DZ, FLAG, R, K, v0, ncols, width, sxr, sxk, swv, swk, sdr, sfr,
                          inv, thr, HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr, FILTER: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
                          DOT_F32: tl.constexpr):
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
            x = _logit_tile(X, W, B, rows, act, v0 + loc.to(tl.int64), cm, K, sxr, sxk, swv, swk, HAS_BIAS,
                            BLOCK_M, BLOCK_N, BLOCK_K, PREC, DOT_F32)
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
            tl.store((DZ + rows * sdr)[:, None] + loc[None, :], d.to(DZ.dtype.element_ty),
                     mask=live[:, None] & (loc < width)[None, :])
            if FILTER:  # used: any p >= thr (or NaN), or a sampled token in the tile
                flag = tl.max(tl.max(tl.where(p < thr, 0, 1) | hit.to(tl.int32), 1), 0)
        tl.store(FLAG + pid_m.to(tl.int64) * sfr + pid_n, flag.to(tl.int8))

    def _linear_grad(A, Bm, OUT, ACC, FLAG, IDX, CNT, BOUT, KACT, M, N, K, sam, sak, sbk, sbn, som, son,
                            sfm, sfk, sidx, ACCUM: tl.constexpr, DOT: tl.constexpr, BIAS: tl.constexpr,
                            HAS_KACT: tl.constexpr, SPARSE: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FLAG_K: tl.constexpr, PREC: tl.constexpr,
                            DOT_F32: tl.constexpr):
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


def _dot_f32(dtype: torch.dtype) -> bool:
    """Interpreter only: its tl.dot multiplies bf16 operands' storage (uint16) as
    integers, so bf16 operands are widened to fp32 first there (exact; the GPU's
    MMA also accumulates their products in fp32). Compiled kernels never widen."""
    return INTERPRET and dtype == torch.bfloat16


def _prec(dtype: torch.dtype) -> str:
    """fp32 products: 3xTF32 (~fp32 accuracy) unless torch allows TF32 matmuls; bf16/fp16: the MMA's own."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def fwd_launches(hidden, weight, bias, tokens, valid, inv_temp, logp, lse, ent, stats, span, tiles) -> list[Launch]:
    """The two forward launches (tiles x splits, then the combine) for these tensors."""
    R, K = hidden.shape
    V = weight.shape[0]
    n_split = stats.shape[-1]
    t = tiles["fwd"]
    fwd = Launch(_linear_fwd_kernel, (triton.cdiv(R, t.block_m), n_split),
                 (hidden, weight, bias if bias is not None else hidden, tokens,
                  valid if valid is not None else tokens, stats, R, V, K, span, n_split,
                  hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), inv_temp),
                 dict(HAS_BIAS=bias is not None, HAS_VALID=valid is not None, ENTROPY=ent is not None,
                      BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, PREC=_prec(hidden.dtype),
                      DOT_F32=_dot_f32(hidden.dtype), num_warps=t.num_warps, num_stages=t.num_stages))
    # Combine: 4 warps over (ROWS, SPLITS) = (32, 32) blocks of 1,024 states (8 a thread and
    # quantity), looping over the splits: it moves 16 bytes a row and split, so any block that
    # keeps registers low will do; fixed, so that one variant serves every n_split.
    splits, rows = COMBINE_SPLITS, COMBINE_ROWS
    comb = Launch(_linear_combine_kernel, (triton.cdiv(R, rows),),
                  (stats, valid if valid is not None else tokens, logp, lse, ent if ent is not None else logp,
                   R, n_split, inv_temp),
                  dict(HAS_VALID=valid is not None, ENTROPY=ent is not None, ROWS=rows, SPLITS=splits,
                       num_warps=4))
    return [fwd, comb]


def _gemm(kernel, a, sa, b, sb, out, so, acc, flags, M, N, K, bm, flag_k, bout, kact, dot, sparse, prec,
          t: Tiles) -> Launch:
    """``out = (acc +) a @ b`` launch of ``kernel`` (``_linear_grad_kernel`` where K is the row
    count, ``_linear_gradh_kernel`` where M is); ``sa, sb, so`` the (M/K, K/N, M/N) strides; ``flags``
    (M blocks of ``bm`` x K blocks of ``flag_k``, the dz tiles) select the K blocks. The K
    step is the tiles' BLOCK_K or ``flag_k``, the smaller."""
    bk = min(t.block_k, flag_k)
    assert flag_k % bk == 0, "the product's K step must divide the dz tile"
    cnt = flags.sum(1, dtype=torch.int32)
    # SPARSE: the flagged K blocks first, in increasing order (a stable sort; on the device, no sync).
    idx = torch.sort((flags == 0).to(torch.int8), dim=1, stable=True).indices.to(torch.int32).contiguous() \
        if sparse else cnt
    return Launch(kernel, (triton.cdiv(M, bm), triton.cdiv(N, t.block_n) if dot else 1),
                  (a, b, out, acc if acc is not None else out, flags, idx, cnt, bout if bout is not None else out,
                   kact if kact is not None else cnt, M, N, K, *sa, *sb, *so, *flags.stride(),
                   idx.stride(0) if sparse else 0),
                  dict(ACCUM=acc is not None, DOT=dot, BIAS=bout is not None, HAS_KACT=kact is not None,
                       SPARSE=sparse, BLOCK_M=bm, BLOCK_N=t.block_n, BLOCK_K=bk, FLAG_K=flag_k, PREC=prec,
                       DOT_F32=_dot_f32(a.dtype), num_warps=t.num_warps, num_stages=t.num_stages))


def bwd_launches(hidden, weight, bias, tokens, c, g, ent, gh, inv_temp, thr, dz, flags, v0, ncols,
                 grad_h, acc_h, grad_w, grad_b, active, tiles) -> list[Launch]:
    """The launches for one vocabulary slice ``[v0, v0 + ncols)``: the dz Launch, then
    callables that build the grad_weight (and grad_bias) and grad_hidden Launches from
    the flags dz wrote (into ``grad_h``, adding ``acc_h``, the fp32 accumulator, unless
    None: the first slice). ``active``: int8 (R,), rows with an upstream gradient."""
    R, K = hidden.shape
    t = tiles["dz"]
    prec = _prec(hidden.dtype)
    entropy = gh is not None
    out = [Launch(_linear_dz_kernel, (triton.cdiv(R, t.block_m), triton.cdiv(ncols, t.block_n)),
                  (hidden, weight, bias if bias is not None else hidden, tokens, c, g, ent if entropy else c,
                   gh if entropy else g, dz, flags, R, K, v0, ncols, dz.shape[1], hidden.stride(0), hidden.stride(1),
                   weight.stride(0), weight.stride(1), dz.stride(0), flags.stride(0), inv_temp,
                   thr if thr is not None else 0.0),
                  dict(HAS_BIAS=bias is not None, ENTROPY=entropy, FILTER=thr is not None, BLOCK_M=t.block_m,
                       BLOCK_N=t.block_n, BLOCK_K=t.block_k, PREC=prec, DOT_F32=_dot_f32(hidden.dtype),
                       num_warps=t.num_warps, num_stages=t.num_stages))]
    flags = flags[:, :triton.cdiv(ncols, t.block_n)]  # this slice's tiles
    if grad_w is not None or grad_b is not None:  # grad_weight[v0 + i] = sum_r dz[r, i] hidden[r]
        gw = grad_w[v0:v0 + ncols] if grad_w is not None else dz
        gb = grad_b[v0:v0 + ncols] if grad_b is not None else None
        out.append(lambda: _gemm(_linear_grad_kernel, dz, (dz.stride(1), dz.stride(0)), hidden,
                                 (hidden.stride(0), hidden.stride(1)), gw, (gw.stride(0), gw.stride(1)), None,
                                 flags.t(), ncols, K, R, t.block_n, t.block_m, gb, active, grad_w is not None,
                                 thr is not None, prec, tiles["gemm"]))
    if grad_h is not None:  # grad_hidden[r] (+)= sum_i dz[r, i] weight[v0 + i]
        w = weight[v0:v0 + ncols]
        out.append(lambda: _gemm(_linear_gradh_kernel, dz, (dz.stride(0), dz.stride(1)), w,
                                 (w.stride(0), w.stride(1)), grad_h, (grad_h.stride(0), grad_h.stride(1)), acc_h,
                                 flags, R, K, ncols, t.block_m, t.block_n, None, None, True, thr is not None, prec,
                                 tiles["gemm"]))
    return out
