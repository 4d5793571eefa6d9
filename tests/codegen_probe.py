"""Compile the kernels the public ops launch for CUDA targets, without a GPU,
and report what their generated code does. Run by ``tests/test_codegen.py`` in
a subprocess (Triton's JIT must not be in interpreter mode here):

    python tests/codegen_probe.py            # prints one JSON document

Each case builds real (CPU) input tensors, asks the launchers for the exact
launch they would make (``_kernels.fwd_launch`` / ``bwd_launch``), lets
Triton's own binder specialise those arguments for the target, and compiles
the result with ``triton.compile(..., target=GPUTarget("cuda", arch, 32))``.
From the PTX it counts global loads and stores by width; from the cubin
(``cuobjdump -res-usage``, shipped inside Triton) registers and local memory.
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
    acc = torch.float32
    stats = torch.zeros(N, T, dtype=acc)
    entropy = kind.endswith("_ent")
    if kind.startswith("fwd"):
        return _kernels.fwd_launch(logits, tokens, 0.7, stats, stats.clone(), stats.clone() if entropy else None)
    grad = torch.empty(logits.shape, dtype=logits.dtype)
    return _kernels.bwd_launch(logits, tokens, stats, stats.clone(), stats.clone() if entropy else None,
                               stats.clone() if entropy else None, 0.7, grad)


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
    return dict(regs=int(reg.group(1)) if reg else None, local=int(local.group(1)) if local else None,
                stack=int(stack.group(1)) if stack else None)


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
    return dict(kind=kind, dtype=dtype, V=V, layout=layout, arch=arch, rows=launch.kwargs["ROWS"],
                block_v=launch.kwargs["BLOCK_V"], num_warps=launch.kwargs["num_warps"],
                loads_v4=sum(".v4" in x for x in loads), loads_v2=sum(".v2" in x for x in loads),
                loads_scalar=sum(".v" not in x for x in loads),
                stores_v4=sum(".v4" in x for x in stores), stores_v2=sum(".v2" in x for x in stores),
                stores_scalar=sum(".v" not in x for x in stores),
                local_ptx=len(re.findall(r"\b(?:ld|st)\.local", ptx)),
                **_resource_usage(k.asm["cubin"]))


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
                keys = {variant_key(launches(kind, dtype, V, layout, n, t))
                        for V in vs for (n, t) in shapes for layout in ("contiguous", "sliced")}
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
    with ProcessPoolExecutor(max_workers=min(8, os.cpu_count() or 2),
                             mp_context=multiprocessing.get_context("spawn")) as ex:
        results = list(ex.map(compile_case, [v[0] for v in uniq.values()]))
    rows = []
    for res, group in zip(results, uniq.values()):
        for c in group:
            rows.append(dict(res, kind=c[0], dtype=c[1], V=c[2], layout=c[3], arch=c[4]))
    json.dump(dict(cases=rows, variants=variants()), sys.stdout)


if __name__ == "__main__":
    main()
