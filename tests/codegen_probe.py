"""Compile the kernels the public ops launch for CUDA targets, without a GPU,
and report what their generated code does. Run by ``tests/test_codegen.py`` in
a subprocess (Triton's JIT must not be in interpreter mode here):

    python tests/codegen_probe.py            # prints one JSON document

Each case builds real (CPU) input tensors, asks the launchers for the exact
launch they would make (``_kernels.fwd_launch`` / ``bwd_launch``; for the
hidden-state kernels ``_launch_linear.fwd_launches`` / ``bwd_launches`` with
the tiles that arch gets), lets Triton's own binder specialise those
arguments for the target, and compiles the result with
``triton.compile(..., target=GPUTarget("cuda", arch, 32))``. From the PTX it
counts global loads and stores by width and tensor-core instructions; from
the cubin (``cuobjdump -res-usage``, shipped inside Triton) registers, local
memory and stack (spills).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)

ARCHS = (80, 90, 100)
DTYPES = ("bfloat16", "float16", "float32")
ALIGNED_V = (151_936, 128_256)
UNALIGNED_V = (50_257, 151_655)


def _inputs(dtype, V, layout, N=2, T=3):
    import torch

    dt = getattr(torch, dtype)
    if layout == "sliced":  # a trainer's out[:, :-1]: row stride (T + 1) * V
        logits = torch.empty(N, T + 1, V, dtype=dt)[:, :-1]  # never touched: no memory committed
    else:
        logits = torch.empty(N, T, V, dtype=dt)
    tokens = torch.zeros(N, T, dtype=torch.long)
    return logits, tokens


def launches(kind, dtype, V, layout, N=2, T=3):
    """The Launch the public op makes for this input (fwd/bwd, with or without entropy)."""
    import torch

    from gspo_kernels import _kernels

    logits, tokens = _inputs(dtype, V, layout, N, T)
    acc = torch.float64 if dtype == "float64" else torch.float32
    stats = torch.zeros(N, T, dtype=acc)
    entropy = kind.endswith("_ent")
    if kind.startswith("fwd"):
        return _kernels.fwd_launch(logits, tokens, 0.7, stats, stats.clone(), stats.clone() if entropy else None)
    grad = torch.empty(logits.shape, dtype=logits.dtype)
    return _kernels.bwd_launch(
        logits,
        tokens,
        stats,
        stats.clone(),
        stats.clone() if entropy else None,
        stats.clone() if entropy else None,
        0.7,
        grad,
    )


def specialise(launch, arch):
    """(signature, constexprs, attrs, options) exactly as Triton's launcher would make them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(launch.kwargs)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return backend, signature, constexprs, attrs, options, specialization


def variant_key(launch, arch=90):
    """What Triton's kernel cache keys on: the specialisation and the options."""
    *_, options, specialization = specialise(launch, arch)
    return repr((specialization, sorted(launch.kwargs.items(), key=lambda kv: kv[0])))


# Hidden-state kernels: forward (tiles x splits; with entropy), the split combine,
# dz (plain, with the entropy gradient, with filtering), grad_weight (with
# grad_bias) and grad_hidden (accumulating over slices), each product also in
# its filtering (sparse K list) variant. Shapes: H = 4,096, V = 151,936 (a
# 7-8B model's head), and odd H = 897, V = 151,655 (unaligned rows).
LINEAR_KINDS = (
    "lin_fwd",
    "lin_fwd_ent",
    "lin_combine",
    "lin_dz",
    "lin_dz_ent",
    "lin_dz_filter",
    "lin_gw",
    "lin_gh",
    "lin_gw_filter",
    "lin_gh_filter",
)
LINEAR_SHAPES = {"aligned": (4096, 151_936), "unaligned": (897, 151_655)}
TENSOR_CORE = {80: r"\bmma\.sync", 90: r"\bwgmma\.mma_async", 100: r"\btcgen05\.mma"}


def linear_launch(kind, dtype, arch, shape="aligned", R=48):
    """The Launch ``_launch_linear`` makes for this kernel on a GPU of ``arch``."""
    import torch

    from gspo_kernels import _launch_linear as kl
    from gspo_kernels import linear

    dt = getattr(torch, dtype)
    H, V = LINEAR_SHAPES[shape]
    tiles = kl.tile_set(dt, torch.device("cpu"), kl.aligned_rows(torch.empty(1, H, dtype=dt)), arch)
    hid = torch.empty(R, H, dtype=dt)
    w = torch.empty(V, H, dtype=dt)  # never touched: no memory committed
    b = torch.empty(V, dtype=dt)
    y = torch.zeros(R, dtype=torch.long)
    f = torch.zeros(R)
    if kind in ("lin_fwd", "lin_fwd_ent", "lin_combine"):
        span, n = linear.split_span(R, V, tiles, 264)  # an H100's 132 SMs, twice
        stats = torch.empty(4, R, n)
        launches = kl.fwd_launches(
            hid,
            w,
            b,
            y,
            torch.ones(R, dtype=torch.bool),
            0.7,
            f,
            f.clone(),
            f.clone() if kind != "lin_fwd" else None,
            stats,
            span,
            tiles,
        )
        return launches[1] if kind == "lin_combine" else launches[0]
    vc = 8192
    t = tiles["dz"]
    dz = torch.empty(R, vc, dtype=dt)
    flags = torch.empty(-(-R // t.block_m), vc // t.block_n, dtype=torch.int8)
    ent = kind == "lin_dz_ent"
    launches = kl.bwd_launches(
        hid,
        w,
        b,
        y,
        f,
        f,
        f if ent else None,
        f if ent else None,
        0.7,
        2.0**-12 if kind.endswith("_filter") else None,
        dz,
        flags,
        vc,
        vc,
        torch.empty(R, H, dtype=dt),
        torch.empty(R, H),
        torch.empty_like(w),
        b.clone(),
        torch.ones(R, dtype=torch.int8),
        tiles,
    )
    flags.fill_(1)  # the products' K-block lists come from the flags dz writes
    launch = launches[
        {
            "lin_dz": 0,
            "lin_dz_ent": 0,
            "lin_dz_filter": 0,
            "lin_gw": 1,
            "lin_gh": 2,
            "lin_gw_filter": 1,
            "lin_gh_filter": 2,
        }[kind]
    ]
    return launch if kind.startswith("lin_dz") else launch()


def _resource_usage(cubin: bytes):
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    path = f"/tmp/gspo_probe_{os.getpid()}.cubin"
    with open(path, "wb") as f:
        f.write(cubin)
    out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    os.unlink(path)
    reg = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return dict(
        regs=int(reg.group(1)) if reg else None,
        local=int(local.group(1)) if local else None,
        stack=int(stack.group(1)) if stack else None,
    )


def compile_case(case):
    import triton
    from triton.compiler import ASTSource

    kind, dtype, V, layout, arch = case
    launch = launches(kind, dtype, V, layout)
    backend, signature, constexprs, attrs, options, _ = specialise(launch, arch)
    src = ASTSource(launch.kernel, signature, constexprs, attrs)
    k = triton.compile(src, target=backend.target, options=options.__dict__)
    ptx = k.asm["ptx"]
    loads = re.findall(r"\bld\.global(?:\.[a-z0-9:]+)*", ptx)
    stores = re.findall(r"\bst\.global(?:\.[a-z0-9:]+)*", ptx)
    return dict(
        kind=kind,
        dtype=dtype,
        V=V,
        layout=layout,
        arch=arch,
        rows=launch.kwargs["ROWS"],
        block_v=launch.kwargs["BLOCK_V"],
        num_warps=launch.kwargs["num_warps"],
        loads_v4=sum(".v4" in x for x in loads),
        loads_v2=sum(".v2" in x for x in loads),
        loads_scalar=sum(".v" not in x for x in loads),
        stores_v4=sum(".v4" in x for x in stores),
        stores_v2=sum(".v2" in x for x in stores),
        stores_scalar=sum(".v" not in x for x in stores),
        local_ptx=len(re.findall(r"\b(?:ld|st)\.local", ptx)),
        **_resource_usage(k.asm["cubin"]),
    )


def compile_linear_case(case):
    import triton
    from triton.compiler import ASTSource

    kind, dtype, shape, arch = case
    launch = linear_launch(kind, dtype, arch, shape)
    backend, signature, constexprs, attrs, options, _ = specialise(launch, arch)
    k = triton.compile(
        ASTSource(launch.kernel, signature, constexprs, attrs), target=backend.target, options=options.__dict__
    )
    ptx = k.asm["ptx"]
    kw = launch.kwargs
    tile = (kw.get("BLOCK_M", kw.get("ROWS")), kw.get("BLOCK_N", kw.get("SPLITS")), kw.get("BLOCK_K", 0))
    return dict(
        kind=kind,
        dtype=dtype,
        shape=shape,
        arch=arch,
        tile="x".join(map(str, tile)),
        num_warps=kw["num_warps"],
        num_stages=kw.get("num_stages", 0),
        tensor_core=len(re.findall(TENSOR_CORE[arch], ptx)),
        shared=k.metadata.shared,
        local_ptx=len(re.findall(r"\b(?:ld|st)\.local", ptx)),
        **_resource_usage(k.asm["cubin"]),
    )


def triton_skips(case) -> bool:
    """Cases a supported Triton cannot compile: Triton 3.6's sm_100 pipeline fails on the
    filtering dz kernel (its OptimizeTMemLayouts pass; the code before this check's fixes
    failed there too); Triton 3.9 compiles it."""
    import triton

    old = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7)
    return old and case[0] == "lin_dz_filter" and case[3] == 100


def linear_cases():
    # fp16 takes bf16's tiles and code path (same registers): bf16 and fp32 cover both.
    out = [
        (kind, dtype, "aligned", arch) for arch in ARCHS for kind in LINEAR_KINDS for dtype in ("bfloat16", "float32")
    ]
    return [c for c in out + [(kind, "bfloat16", "unaligned", 90) for kind in LINEAR_KINDS] if not triton_skips(c)]


def compile_headroom_case(case):
    """Registers of the kernels the main cases leave out: fp64 logits (V = 1,000 and 3,000:
    several rows or V not a multiple of 16) and the per-sequence reduction."""
    import torch
    import triton
    from triton.compiler import ASTSource

    from gspo_kernels import _kernels_seq

    kind, dtype, V, arch = case
    if kind == "seq_reduce":
        dt, N, T = getattr(torch, dtype), 4, 1000
        checks = _kernels_seq.SeqChecks(torch.zeros(N, T, dtype=torch.long), V, torch.zeros(N, dtype=torch.long))
        out = torch.empty(N, dtype=dt)
        launch = _kernels_seq.seq_reduce_launch(
            torch.empty(N, T, dtype=dt),
            torch.empty(N, T, dtype=dt),
            True,
            checks,
            True,
            out,
            torch.empty_like(out),
            torch.empty(N, dtype=torch.int32),
        )
    else:
        launch = launches(kind, dtype, V, "contiguous")
    backend, signature, constexprs, attrs, options, _ = specialise(launch, arch)
    k = triton.compile(
        ASTSource(launch.kernel, signature, constexprs, attrs), target=backend.target, options=options.__dict__
    )
    return dict(
        kind=kind,
        dtype=dtype,
        V=V,
        arch=arch,
        local_ptx=len(re.findall(r"\b(?:ld|st)\.local", k.asm["ptx"])),
        **_resource_usage(k.asm["cubin"]),
    )


def headroom_cases():
    out = [
        (kind, "float64", V, arch)
        for arch in ARCHS
        for kind in ("fwd", "fwd_ent", "bwd", "bwd_ent")
        for V in (1000, 3000, 151_936)
    ]
    return out + [("seq_reduce", dtype, 151_936, arch) for arch in ARCHS for dtype in ("float32", "float64")]


def cases():
    out = []
    for arch in ARCHS:
        for kind in ("fwd", "fwd_ent", "bwd", "bwd_ent"):
            for dtype in DTYPES:
                for V in ALIGNED_V + UNALIGNED_V:
                    for layout in ("contiguous", "sliced"):
                        out.append((kind, dtype, V, layout, arch))
    return out


def variants():
    """Distinct compiled variants per (kernel, dtype) over many (N, T) and V of one alignment class."""
    shapes = [(n, t) for n in (1, 3, 16, 17) for t in (1, 5, 64, 1000, 1023)]
    out = {}
    for kind in ("fwd", "bwd"):
        for dtype in DTYPES:
            for cls, vs in (("aligned", (32_000, 128_256, 151_936, 262_144)), ("unaligned", (50_257, 151_655))):
                keys = {
                    variant_key(launches(kind, dtype, V, layout, n, t))
                    for V in vs
                    for (n, t) in shapes
                    for layout in ("contiguous", "sliced")
                }
                out[f"{kind}/{dtype}/{cls}"] = len(keys)
    return out


def main():
    todo = cases()
    # Identical specialisations compile once: contiguous and sliced rows of one V usually coincide.
    uniq = {}
    for c in todo:
        key = (c[0], c[4], variant_key(launches(*c[:4]), c[4]))
        uniq.setdefault(key, []).append(c)
    # spawn, not fork: the parent has imported torch (threads) already.
    with ProcessPoolExecutor(
        max_workers=min(8, os.cpu_count() or 2), mp_context=multiprocessing.get_context("spawn")
    ) as ex:
        linear = ex.map(compile_linear_case, linear_cases())
        headroom = ex.map(compile_headroom_case, headroom_cases())
        results = list(ex.map(compile_case, [v[0] for v in uniq.values()]))
        linear, headroom = list(linear), list(headroom)
    rows = []
    for res, group in zip(results, uniq.values()):
        for c in group:
            rows.append(dict(res, kind=c[0], dtype=c[1], V=c[2], layout=c[3], arch=c[4]))
    skipped = [
        c
        for c in [(k, d, "aligned", a) for a in ARCHS for k in LINEAR_KINDS for d in ("bfloat16", "float32")]
        if triton_skips(c)
    ]
    json.dump(dict(cases=rows, variants=variants(), linear=linear, headroom=headroom, skipped=skipped), sys.stdout)


if __name__ == "__main__":
    main()
