"""The hidden-state kernels' tiles and launch plans (kernels: :mod:`._kernels_linear`).

:data:`GPU_TILES` per operand width, architecture and row alignment (how they were chosen is
written beside them), :data:`INTERPRET_TILES` for Triton's CPU interpreter; :func:`fwd_launches`
and :func:`bwd_launches` build the exact :class:`~gspo_kernels._kernels.Launch` es that
``linear.fused_fwd`` / ``fused_bwd`` run (and ``tests/codegen_probe.py`` compiles).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ._kernels import HAS_TRITON, Launch

if HAS_TRITON:
    import triton

    from ._kernels_linear import (
        _linear_combine_kernel,
        _linear_dz_kernel,
        _linear_fwd_kernel,
        _linear_grad_kernel,
        _linear_gradh_kernel,
    )

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
    (2, True, True): {
        "fwd": Tiles(128, 64, 64, 8, 3),
        "dz": Tiles(128, 64, 64, 8, 3),
        "gemm": Tiles(128, 128, 64, 8, 3),
    },
    (2, False, True): {
        "fwd": Tiles(128, 64, 32, 8, 4),
        "dz": Tiles(128, 64, 64, 8, 3),
        "gemm": Tiles(128, 128, 32, 8, 4),
    },
    (4, True, True): _same(Tiles(128, 64, 16, 8, 3)),
    (4, False, True): _same(Tiles(128, 64, 16, 8, 3)),
    (2, True, False): {
        "fwd": Tiles(128, 64, 16, 8, 2),
        "dz": Tiles(128, 64, 32, 8, 2),
        "gemm": Tiles(128, 32, 32, 8, 2),
    },
    (2, False, False): {
        "fwd": Tiles(128, 64, 16, 8, 2),
        "dz": Tiles(128, 64, 32, 8, 2),
        "gemm": Tiles(128, 32, 32, 8, 2),
    },
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
    return all(
        t.stride(-1) == 1 and t.stride(0) % 16 == 0 and t.shape[-1] % 16 == 0 and t.data_ptr() % 16 == 0 for t in ts
    )


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
    fwd = Launch(
        _linear_fwd_kernel,
        (triton.cdiv(R, t.block_m), n_split),
        (
            hidden,
            weight,
            bias if bias is not None else hidden,
            tokens,
            valid if valid is not None else tokens,
            stats,
            R,
            V,
            K,
            span,
            n_split,
            hidden.stride(0),
            hidden.stride(1),
            weight.stride(0),
            weight.stride(1),
            inv_temp,
        ),
        dict(
            HAS_BIAS=bias is not None,
            HAS_VALID=valid is not None,
            ENTROPY=ent is not None,
            BLOCK_M=t.block_m,
            BLOCK_N=t.block_n,
            BLOCK_K=t.block_k,
            PREC=_prec(hidden.dtype),
            DOT_F32=_dot_f32(hidden.dtype),
            num_warps=t.num_warps,
            num_stages=t.num_stages,
        ),
    )
    # Combine: 4 warps over (ROWS, SPLITS) = (32, 32) blocks of 1,024 states (8 a thread and
    # quantity), looping over the splits: it moves 16 bytes a row and split, so any block that
    # keeps registers low will do; fixed, so that one variant serves every n_split.
    splits, rows = COMBINE_SPLITS, COMBINE_ROWS
    comb = Launch(
        _linear_combine_kernel,
        (triton.cdiv(R, rows),),
        (
            stats,
            valid if valid is not None else tokens,
            logp,
            lse,
            ent if ent is not None else logp,
            R,
            n_split,
            inv_temp,
        ),
        dict(HAS_VALID=valid is not None, ENTROPY=ent is not None, ROWS=rows, SPLITS=splits, num_warps=4),
    )
    return [fwd, comb]


def _gemm(
    kernel, a, sa, b, sb, out, so, acc, flags, M, N, K, bm, flag_k, bout, kact, dot, sparse, prec, t: Tiles
) -> Launch:
    """``out = (acc +) a @ b`` launch of ``kernel`` (``_linear_grad_kernel`` where K is the row
    count, ``_linear_gradh_kernel`` where M is); ``sa, sb, so`` the (M/K, K/N, M/N) strides; ``flags``
    (M blocks of ``bm`` x K blocks of ``flag_k``, the dz tiles) select the K blocks. The K
    step is the tiles' BLOCK_K or ``flag_k``, the smaller."""
    bk = min(t.block_k, flag_k)
    assert flag_k % bk == 0, "the product's K step must divide the dz tile"
    cnt = flags.sum(1, dtype=torch.int32)
    # SPARSE: the flagged K blocks first, in increasing order (a stable sort; on the device, no sync).
    idx = (
        torch.sort((flags == 0).to(torch.int8), dim=1, stable=True).indices.to(torch.int32).contiguous()
        if sparse
        else cnt
    )
    return Launch(
        kernel,
        (triton.cdiv(M, bm), triton.cdiv(N, t.block_n) if dot else 1),
        (
            a,
            b,
            out,
            acc if acc is not None else out,
            flags,
            idx,
            cnt,
            bout if bout is not None else out,
            kact if kact is not None else cnt,
            M,
            N,
            K,
            *sa,
            *sb,
            *so,
            *flags.stride(),
            idx.stride(0) if sparse else 0,
        ),
        dict(
            ACCUM=acc is not None,
            DOT=dot,
            BIAS=bout is not None,
            HAS_KACT=kact is not None,
            SPARSE=sparse,
            BLOCK_M=bm,
            BLOCK_N=t.block_n,
            BLOCK_K=bk,
            FLAG_K=flag_k,
            PREC=prec,
            DOT_F32=_dot_f32(a.dtype),
            num_warps=t.num_warps,
            num_stages=t.num_stages,
        ),
    )


def bwd_launches(
    hidden,
    weight,
    bias,
    tokens,
    c,
    g,
    ent,
    gh,
    inv_temp,
    thr,
    dz,
    flags,
    v0,
    ncols,
    grad_h,
    acc_h,
    grad_w,
    grad_b,
    active,
    tiles,
) -> list[Callable[[], Any]]:
    """The launches for one vocabulary slice ``[v0, v0 + ncols)``: the dz Launch, then
    callables that build the grad_weight (and grad_bias) and grad_hidden Launches from
    the flags dz wrote (into ``grad_h``, adding ``acc_h``, the fp32 accumulator, unless
    None: the first slice). ``active``: int8 (R,), rows with an upstream gradient."""
    R, K = hidden.shape
    t = tiles["dz"]
    prec = _prec(hidden.dtype)
    entropy = gh is not None
    out: list[Callable[[], Any]] = [
        Launch(
            _linear_dz_kernel,
            (triton.cdiv(R, t.block_m), triton.cdiv(ncols, t.block_n)),
            (
                hidden,
                weight,
                bias if bias is not None else hidden,
                tokens,
                c,
                g,
                ent if entropy else c,
                gh if entropy else g,
                dz,
                flags,
                R,
                K,
                v0,
                ncols,
                dz.shape[1],
                hidden.stride(0),
                hidden.stride(1),
                weight.stride(0),
                weight.stride(1),
                dz.stride(0),
                flags.stride(0),
                inv_temp,
                thr if thr is not None else 0.0,
            ),
            dict(
                HAS_BIAS=bias is not None,
                ENTROPY=entropy,
                FILTER=thr is not None,
                BLOCK_M=t.block_m,
                BLOCK_N=t.block_n,
                BLOCK_K=t.block_k,
                PREC=prec,
                DOT_F32=_dot_f32(hidden.dtype),
                num_warps=t.num_warps,
                num_stages=t.num_stages,
            ),
        )
    ]
    flags = flags[:, : triton.cdiv(ncols, t.block_n)]  # this slice's tiles
    if grad_w is not None or grad_b is not None:  # grad_weight[v0 + i] = sum_r dz[r, i] hidden[r]
        gw = grad_w[v0 : v0 + ncols] if grad_w is not None else dz
        gb = grad_b[v0 : v0 + ncols] if grad_b is not None else None
        out.append(
            lambda: _gemm(
                _linear_grad_kernel,
                dz,
                (dz.stride(1), dz.stride(0)),
                hidden,
                (hidden.stride(0), hidden.stride(1)),
                gw,
                (gw.stride(0), gw.stride(1)),
                None,
                flags.t(),
                ncols,
                K,
                R,
                t.block_n,
                t.block_m,
                gb,
                active,
                grad_w is not None,
                thr is not None,
                prec,
                tiles["gemm"],
            )
        )
    if grad_h is not None:  # grad_hidden[r] (+)= sum_i dz[r, i] weight[v0 + i]
        w = weight[v0 : v0 + ncols]
        out.append(
            lambda: _gemm(
                _linear_gradh_kernel,
                dz,
                (dz.stride(0), dz.stride(1)),
                w,
                (w.stride(0), w.stride(1)),
                grad_h,
                (grad_h.stride(0), grad_h.stride(1)),
                acc_h,
                flags,
                R,
                K,
                ncols,
                t.block_m,
                t.block_n,
                None,
                None,
                True,
                thr is not None,
                prec,
                tiles["gemm"],
            )
        )
    return out
